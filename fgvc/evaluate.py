"""Evaluate a fine-grained classifier with and without its meta-information.

``evaluate_checkpoint(path, config_file=None, overrides=()) -> summary`` (the command line is
``fgvc-eval`` / ``tools/eval_fgvc.py``, see :mod:`fgvc.cli`). Our checkpoints carry their
training config, class list and meta layout, so evaluation needs only the test split (never
the training annotations); an official MetaFormer file does not, so pass its recipe with
``config_file`` (loaded through ``fgvc.models.load_pretrained``).

Writes to ``eval.out_dir`` (default ``<checkpoint folder>/eval_<checkpoint name>_<split>``, so
evaluating ``last.pth`` never overwrites the results of ``best.pth``):

* ``summary.json``: top-1 / top-5 with meta, with meta zeroed (the official "mask-meta"
  test) and with each meta group dropped;
* ``predictions.csv``: one row per image: path, label, the top-k classes with their
  probabilities, whether top-1 is right;
* ``per_class.csv``: images, top-1 with meta and with meta zeroed, per class;
* ``confusion.png`` (row-normalised, up to ``eval.max_confusion_classes`` classes) and
  ``top_confusions.csv`` (the most frequent true -> predicted mistakes, any class count);
* a wandb run (offline by default, its files under the evaluation folder) with the metrics
  and a Table of predictions: image, readable meta values (decoded by encoder type), label,
  prediction and confidence.

Deterministic: fixed eval transform, fixed caption for text meta, no sampling; the same
checkpoint and data give the same numbers. Weights holding NaN / inf are refused.
"""
from __future__ import annotations

import copy
import csv
import json
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from sparse_mim.utils.config import Config, ConfigError, K, load_config

__all__ = ["EVAL_DEFAULTS", "eval_schema", "evaluate_checkpoint", "load_eval_config", "per_class_table",
           "confusion_matrix", "top_confusions", "prediction_rows", "write_predictions_csv", "default_eval_dir"]

EVAL_DEFAULTS = {
    "split": K("test", "test | val (the held-out part of train, as in training; needs the training annotations)",
               choices=("test", "val")),
    "out_dir": K("", "output folder ('' = <checkpoint folder>/eval_<checkpoint name>_<split>)"),
    "batch_size": K(0, "images per batch (0 = data.eval_batch_size)", min=0),
    "num_workers": K(-1, "loader workers (-1 = data.num_workers)", min=-1),
    "topk": K(5, "classes per image in predictions.csv", min=1),
    "max_confusion_classes": K(200, "draw confusion.png up to this many classes", min=0),
    "top_confusions": K(50, "rows of top_confusions.csv", min=0),
    "table_rows": K(200, "predictions in the wandb Table (0 = none)", min=0),
    "per_group": K(True, "also evaluate with each meta group dropped"),
    "tta": K("none", "test-time augmentation: none, hflip (2 views) or multicrop (centre + 4 corner crops of the "
                     "resized image and their mirror images, 10 views); class probabilities averaged",
             choices=("none", "hflip", "multicrop")),
}


def eval_schema() -> dict:
    """The training schema plus the ``eval`` section (what ``fgvc-eval`` accepts)."""
    from .train import DEFAULTS
    schema = copy.deepcopy(DEFAULTS)
    schema["eval"] = copy.deepcopy(EVAL_DEFAULTS)
    return schema


def _with_defaults(schema: Mapping, values: Mapping, prefix: str = "") -> dict:
    """A copy of ``schema`` whose defaults are replaced by ``values`` (a stored config) where
    the key exists; unknown stored keys are skipped (a checkpoint from an older version)."""
    out = {}
    for k, v in schema.items():
        if isinstance(v, K):
            if isinstance(values, Mapping) and k in values:
                nk = copy.copy(v)
                nk.default = copy.deepcopy(values[k])
                out[k] = nk
            else:
                out[k] = v
        elif isinstance(v, Mapping):
            out[k] = _with_defaults(v, values.get(k, {}) if isinstance(values, Mapping) else {}, prefix + k + ".")
        else:
            out[k] = v
    return out


def default_eval_dir(checkpoint: str, split: str) -> str:
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"eval_{stem}_{split}")


def load_eval_config(checkpoint: str, ckpt: Mapping, config_file: Optional[str] = None,
                     overrides: Sequence[str] = ()) -> tuple[Config, bool]:
    """(config, ours): defaults <- the checkpoint's stored config <- ``config_file`` <- ``overrides``."""
    from .train import validate_config
    from sparse_mim.utils.checkpoint import require_checkpoint_kind
    require_checkpoint_kind(ckpt, checkpoint, ["fgvc", "metaformer-weights", "unknown"], "fgvc-eval")
    ours = isinstance(ckpt, Mapping) and isinstance(ckpt.get("config"), Mapping) and "classes" in ckpt
    if not ours and not config_file:
        raise ConfigError(f"{checkpoint} holds no training config (an official MetaFormer file?): pass its recipe "
                          f"with -c configs/fgvc/<recipe>.yaml and data.root=...")
    schema = eval_schema()
    if ours:
        stored = {k: v for k, v in ckpt["config"].items() if k != "eval"}
        schema = _with_defaults(schema, stored)
    cfg = load_config(schema, config_file, list(overrides), validate=validate_config)
    return cfg, ours


def _load_weights(model: torch.nn.Module, state: Mapping, name: str, checkpoint: str) -> None:
    """Strict load; a mismatch is one line naming the checkpoint's and the model's variant."""
    from fgvc.models import load_state_dict_exact
    try:
        load_state_dict_exact(model, dict(state))
    except ValueError as e:
        raise ValueError(f"the weights in {checkpoint} do not fit model.name={name}: {e}; was it trained with "
                         f"another model.name / model.kwargs / meta layout?") from None


def per_class_table(pred: np.ndarray, pred0: Optional[np.ndarray], labels: np.ndarray, classes: List[str]):
    rows = []
    for c, name in enumerate(classes):
        m = labels == c
        n = int(m.sum())
        row = {"class_index": c, "class": name, "images": n,
               "top1": 100.0 * float((pred[m] == c).mean()) if n else float("nan")}
        if pred0 is not None:
            row["top1_meta_zeroed"] = 100.0 * float((pred0[m] == c).mean()) if n else float("nan")
        rows.append(row)
    return rows


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)


def save_confusion_png(cm: np.ndarray, classes: List[str], path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = len(classes)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = min(4 + k * 0.12, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 60:
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels(classes, rotation=90, fontsize=max(4, 9 - k // 10))
        ax.set_yticklabels(classes, fontsize=max(4, 9 - k // 10))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    from sparse_mim.utils.checkpoint import atomic_write
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def top_confusions(cm: np.ndarray, classes: List[str], n: int):
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:n]
    out = []
    for f in flat:
        t, p = divmod(int(f), cm.shape[0])
        if off[t, p] == 0:
            break
        out.append({"true": classes[t], "predicted": classes[p], "count": int(off[t, p]),
                    "fraction_of_true": float(off[t, p] / max(cm[t].sum(), 1))})
    return out


def thumbnail(path: str, size: int = 128):
    """The image at ``path`` as an RGB PIL thumbnail (at most ``size`` pixels a side), None if unreadable."""
    from fgvc.data.dataset import load_image
    try:
        image = load_image(path).convert("RGB")
        image.thumbnail((size, size))
        return image
    except Exception:  # noqa: BLE001 - a thumbnail is optional
        return None


def prediction_rows(rec, classes, groups, index, labels, pred, conf, pred0, max_rows: int):
    """Columns and rows of the predictions table: thumbnail (PIL or None), label, prediction,
    confidence, correct, readable meta per group, decoded by each group's encoder type (and the
    prediction with meta zeroed)."""
    from fgvc.data.meta import describe_meta
    columns = ["image", "label", "prediction", "confidence", "correct"] + [f"meta/{g.name}" for g in groups]
    if pred0 is not None:
        columns.append("prediction_meta_zeroed")
    rows = []
    for j in range(min(max_rows, len(index))):
        r = int(index[j])
        image = thumbnail(rec.paths[r])
        meta_text = describe_meta(groups, rec.meta[r], rec.meta_present[r]) if groups else {}
        row = [image, classes[labels[j]], classes[pred[j]], float(conf[j]), bool(pred[j] == labels[j])]
        row += [meta_text.get(g.name, "") for g in groups]
        if pred0 is not None:
            row.append(classes[pred0[j]])
        rows.append(row)
    return columns, rows


def _write_csv(path: str, rows: List[Dict], fieldnames: List[str]):
    import io
    from sparse_mim.utils.checkpoint import atomic_write_text
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fieldnames)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_predictions_csv(path: str, paths: Sequence[str], labels: np.ndarray, probs: torch.Tensor,
                          classes: Sequence[str], topk: int = 5) -> str:
    """One row per image: ``path, label, correct, pred_1, prob_1, ..., pred_k, prob_k``."""
    k = min(topk, probs.shape[1])
    p, idx = probs.topk(k, dim=1)
    fields = ["path", "label", "correct"] + [f for i in range(1, k + 1) for f in (f"pred_{i}", f"prob_{i}")]
    rows = []
    for j in range(len(paths)):
        row = {"path": paths[j], "label": classes[int(labels[j])], "correct": int(idx[j, 0]) == int(labels[j])}
        for i in range(k):
            row[f"pred_{i + 1}"] = classes[int(idx[j, i])]
            row[f"prob_{i + 1}"] = f"{float(p[j, i]):.6f}"
        rows.append(row)
    _write_csv(path, rows, fields)
    return path


def _shot_summary(pred: np.ndarray, labels: np.ndarray, train_counts, num_classes: int, log: Callable) -> Dict:
    """``many_shot`` / ``medium_shot`` / ``few_shot`` top-1 (with meta) from the checkpoint's training
    class counts (``fgvc.longtail.shot_accuracy``); None with a note when the checkpoint has no counts."""
    from .longtail import SHOT_SPLITS, shot_accuracy
    if train_counts is None or len(train_counts) != num_classes:
        log("[eval] the checkpoint stores no training class counts (an official file, or written by an older "
            "version): many / medium / few-shot top-1 are not computed")
        return {s: None for s in SHOT_SPLITS}
    correct = np.bincount(labels[pred == labels], minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes)
    shots = shot_accuracy(correct, total, train_counts)
    text = ", ".join(f"{s.replace('_', '-')} {shots[s]:.2f} ({shots[s + '_classes']} classes)" if shots[s] is not None
                     else f"{s.replace('_', '-')} - (no class)" for s in SHOT_SPLITS)
    log(f"[eval] top-1 by training images per class (>100 / 20-100 / <20): {text}")
    return shots


def evaluate_checkpoint(checkpoint: str, config_file: Optional[str] = None, overrides: Sequence[str] = (),
                        log: Callable = print) -> Dict:
    """Evaluate ``checkpoint`` on its test (or held-out val) split; returns the summary dict."""
    from torch.utils.data import DataLoader
    from fgvc.data import FGVCDataset, build_records, build_transform, collate_skip_bad
    from fgvc.eval_loop import predict, topk_accuracy
    from fgvc.models import load_pretrained
    from fgvc.models.metaformer import OFFICIAL_CONFIG_GLOBALS
    from sparse_mim.utils.amp import resolve_amp
    from sparse_mim.utils.checkpoint import load_checkpoint
    from sparse_mim.utils.logger import RunLogger
    from .train import DEMO_DIR_NAME, build_model, build_splits, resolve_data_config

    ckpt = load_checkpoint(checkpoint, check_finite=True, allowed_globals=OFFICIAL_CONFIG_GLOBALS)
    cfg, ours = load_eval_config(checkpoint, ckpt, config_file, overrides)
    e = cfg.eval
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    # the demo checkpoint's data lives next to it (the run folder the tool owns); a data.root given here is
    # only read, never written to
    data_cfg = resolve_data_config(cfg.data.to_dict(), os.path.join(os.path.dirname(os.path.abspath(checkpoint)),
                                                                    DEMO_DIR_NAME), log=log)
    stored_classes = list(ckpt["classes"]) if ours else None
    train_counts = ckpt.get("train_class_counts") if ours else None
    group = (ckpt.get("wandb_group") if ours else None) or cfg.wandb.group or None  # the training run's group
    if e.split == "val":
        if data_cfg["val_split"] <= 0:
            raise ConfigError("eval.split=val needs data.val_split > 0 (the held-out part of train)")
        _, rec, _ = build_splits(data_cfg, log)
    else:
        rec = build_records(data_cfg, "test", classes=stored_classes if data_cfg["dataset"] == "custom" else None)
        if rec.issues:
            log(f"[data] {rec.name}: {len(rec.issues)} issue(s):\n{rec.issues.summary()}")
    classes = stored_classes if ours else list(rec.classes)
    if ours:  # one line naming both sides: "checkpoint has 200 classes (CUB), data has 555 (NABirds: nabirds/test)"
        from .predict import dataset_label, check_same_classes
        check_same_classes(classes, rec.classes, dataset_label(ckpt["config"]),
                           f"{dataset_label({'data': data_cfg})}: {rec.name}")
    groups = rec.meta_groups
    if ours and "meta_groups" in ckpt:
        want = [(g["name"], int(g["dim"]), int(g["tokens"])) for g in ckpt["meta_groups"]]
        have = [(g.name, g.dim, g.tokens) for g in groups]
        if want != have:
            raise ValueError(f"meta groups differ: checkpoint {want}, data {have} (data.use_meta / meta config?)")
    model = build_model(cfg.model, len(classes), groups, init_weights=False)
    if ours:
        _load_weights(model, ckpt["model"], cfg.model.name, checkpoint)
    else:
        for note in load_pretrained(model, ckpt):
            log(f"[load] {note}")
    transform = build_transform(False, cfg.model.img_size)
    if e.tta != "none":
        from .tta import TTAModel, tta_transform
        model, transform = TTAModel(model, e.tta), tta_transform(cfg.model.img_size, e.tta)
        log(f"[eval] test-time augmentation: {e.tta} (averaged probabilities)")
    model = model.to(device).eval()
    del ckpt
    out_dir = e.out_dir or default_eval_dir(checkpoint, e.split)
    os.makedirs(out_dir, exist_ok=True)

    loader = DataLoader(FGVCDataset(rec, transform, train=False),
                        batch_size=e.batch_size or data_cfg["eval_batch_size"], shuffle=False,
                        num_workers=data_cfg["num_workers"] if e.num_workers < 0 else e.num_workers,
                        collate_fn=collate_skip_bad)
    amp = resolve_amp(cfg.train.amp, device)
    meta_sizes = [g.dim * g.tokens for g in groups]
    conditions = [("with_meta", "full", ())]
    if groups:
        conditions.append(("meta_zeroed", "zero", ()))
        if e.per_group and len(groups) > 1:
            conditions += [(f"without_{g.name}", "drop", (i,)) for i, g in enumerate(groups)]
    results, outputs = {}, {}
    for name, mode, drop in conditions:
        out = predict(model, loader, device, mode, drop, meta_sizes, amp=amp, progress=cfg.log.progress, desc=name)
        outputs[name] = out
        acc = topk_accuracy(out["logits"], out["labels"])
        results[name] = {"top1": acc["top1"], "top5": acc["top5"], "n": int(out["labels"].numel())}
        log(f"[eval] {name:>20s}: top1 {acc['top1']:6.2f}  top5 {acc['top5']:6.2f}  ({results[name]['n']} images)")
    main = outputs["with_meta"]
    labels = main["labels"].numpy()
    probs = main["logits"].softmax(1)
    conf, pred = probs.max(1)
    pred = pred.numpy()
    pred0 = outputs["meta_zeroed"]["logits"].argmax(1).numpy() if "meta_zeroed" in outputs else None
    index = main["index"].numpy()

    write_predictions_csv(os.path.join(out_dir, "predictions.csv"), [rec.paths[int(i)] for i in index], labels,
                          probs, classes, e.topk)
    rows = per_class_table(pred, pred0, labels, classes)
    _write_csv(os.path.join(out_dir, "per_class.csv"), rows, list(rows[0].keys()))
    cm = confusion_matrix(pred, labels, len(classes))
    confusions = top_confusions(cm, classes, e.top_confusions)
    _write_csv(os.path.join(out_dir, "top_confusions.csv"), confusions,
               ["true", "predicted", "count", "fraction_of_true"])
    if len(classes) <= e.max_confusion_classes:
        save_confusion_png(cm, classes, os.path.join(out_dir, "confusion.png"),
                           f"{rec.name}: top-1 {results['with_meta']['top1']:.2f} (with meta)")
    from .report import split_label
    log(f"[eval] {rec.name} is the {split_label(data_cfg['dataset'], e.split)}")
    summary = {"checkpoint": os.path.abspath(checkpoint), "dataset": rec.name, "split": e.split, "tta": e.tta,
               "split_label": split_label(data_cfg["dataset"], e.split),
               "num_classes": len(classes), "meta_groups": [g.name for g in groups],
               "skipped_images": int(main["skipped"]), "results": results,
               "mean_per_class_top1": float(np.nanmean([r["top1"] for r in rows])),
               "top_confusions": confusions[:10], "out_dir": out_dir}
    summary.update(_shot_summary(pred, labels, train_counts, len(classes), log))
    if "meta_zeroed" in results:
        summary["meta_gain_top1"] = results["with_meta"]["top1"] - results["meta_zeroed"]["top1"]
        log(f"[eval] meta gain (with meta - meta zeroed): {summary['meta_gain_top1']:+.2f} top-1 points")
    from sparse_mim.utils.checkpoint import atomic_write_text
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
    log(f"[eval] wrote {out_dir}/summary.json, predictions.csv, per_class.csv, top_confusions.csv"
        + (", confusion.png" if len(classes) <= e.max_confusion_classes else ""))

    # wandb: metrics + a Table of predictions (images, meta, label, prediction, confidence)
    logger = RunLogger(out_dir, cfg, project=cfg.wandb.project,
                       name=(cfg.wandb.name + "-eval") if cfg.wandb.name else None, entity=cfg.wandb.entity or None,
                       enabled=True, use_wandb=cfg.wandb.enabled, job_type="fgvc-eval", log_model="off", group=group)
    logger.summary({f"eval/{c}/{k}": v for c, r in results.items() for k, v in r.items() if k != "n"})
    # per-class top-1 and the confusion matrix in the run too (a table, wandb's plot; metrics.jsonl), not only as files
    from .dashboard import log_evaluation
    k = len(classes)
    log_evaluation(logger, {"per_class_correct": np.bincount(labels[pred == labels], minlength=k),
                            "per_class_total": np.bincount(labels, minlength=k),
                            "confusion": cm if k <= e.max_confusion_classes else None, "samples": []},
                   "eval", 0, classes, rec, train_counts)
    if logger.run is not None and e.table_rows > 0:
        import wandb
        columns, trows = prediction_rows(rec, classes, groups, index, labels, pred, conf.numpy(), pred0, e.table_rows)
        table = wandb.Table(columns=columns)
        strip = []
        for row in trows:
            if row[0] is not None and len(strip) < 32:  # the first thumbnails also as an image panel
                strip.append(wandb.Image(row[0], caption=f"{row[1]} -> {row[2]} ({row[3]:.2f})"))
            row[0] = wandb.Image(row[0]) if row[0] is not None else None
            table.add_data(*row)
        logger.run.log({"eval/predictions": table, "eval/prediction_images": strip})
    logger.finish()
    return summary
