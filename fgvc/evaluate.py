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

from .dashboard import thumbnail

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
    from sparse_mim.utils.amp import resolve_amp
    from sparse_mim.utils.checkpoint import atomic_write_text
    job = _EvalJob(checkpoint, config_file, overrides, log)
    e = job.cfg.eval
    out_dir = e.out_dir or default_eval_dir(checkpoint, e.split)
    os.makedirs(out_dir, exist_ok=True)
    amp = resolve_amp(job.cfg.train.amp, job.device)
    results, outputs = _run_conditions(job, amp, log)
    summary, files = _write_reports(job, results, outputs, out_dir, log)
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
    log(f"[eval] wrote {out_dir}/summary.json, " + ", ".join(files))
    _log_to_wandb(job, results, outputs, out_dir)
    return summary


class _EvalJob:
    """What one evaluation reads: config, records of the split, classes, meta groups, the model on its device
    (with test-time augmentation when asked) and the loader."""

    def __init__(self, checkpoint: str, config_file: Optional[str], overrides: Sequence[str], log: Callable):
        from fgvc.models.metaformer import OFFICIAL_CONFIG_GLOBALS
        from sparse_mim.utils.checkpoint import load_checkpoint
        from .builders import resolve_data_config
        from .demo import DEMO_DIR_NAME
        ckpt = load_checkpoint(checkpoint, check_finite=True, allowed_globals=OFFICIAL_CONFIG_GLOBALS)
        self.checkpoint = checkpoint
        self.cfg, self.ours = load_eval_config(checkpoint, ckpt, config_file, overrides)
        cfg = self.cfg
        self.device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        # the demo checkpoint's data lives next to it (the run folder the tool owns); a data.root given here is
        # only read, never written to
        self.data_cfg = resolve_data_config(
            cfg.data.to_dict(), os.path.join(os.path.dirname(os.path.abspath(checkpoint)), DEMO_DIR_NAME), log=log)
        self.train_counts = ckpt.get("train_class_counts") if self.ours else None
        self.group = (ckpt.get("wandb_group") if self.ours else None) or cfg.wandb.group or None  # training's group
        self.rec, self.classes = self._records(ckpt, log)
        self.groups = self.rec.meta_groups
        self._check_meta_groups(ckpt)
        self.model, self.loader = self._model_and_loader(ckpt, log)

    def _records(self, ckpt: Mapping, log: Callable):
        from fgvc.data import build_records
        from .builders import build_splits
        e, data_cfg = self.cfg.eval, self.data_cfg
        stored_classes = list(ckpt["classes"]) if self.ours else None
        if e.split == "val":
            if data_cfg["val_split"] <= 0:
                raise ConfigError("eval.split=val needs data.val_split > 0 (the held-out part of train)")
            _, rec, _ = build_splits(data_cfg, log)
        else:
            rec = build_records(data_cfg, "test", classes=stored_classes if data_cfg["dataset"] == "custom" else None)
            if rec.issues:
                log(f"[data] {rec.name}: {len(rec.issues)} issue(s):\n{rec.issues.summary()}")
        classes = stored_classes if self.ours else list(rec.classes)
        if self.ours:  # one line naming both sides: "checkpoint has 200 classes (CUB), data has 555 (NABirds: ...)"
            from .predict import check_same_classes, dataset_label
            check_same_classes(classes, rec.classes, dataset_label(ckpt["config"]),
                               f"{dataset_label({'data': data_cfg})}: {rec.name}")
        return rec, classes

    def _check_meta_groups(self, ckpt: Mapping) -> None:
        if self.ours and "meta_groups" in ckpt:
            want = [(g["name"], int(g["dim"]), int(g["tokens"])) for g in ckpt["meta_groups"]]
            have = [(g.name, g.dim, g.tokens) for g in self.groups]
            if want != have:
                raise ValueError(f"meta groups differ: checkpoint {want}, data {have} (data.use_meta / meta config?)")

    def _model_and_loader(self, ckpt: Mapping, log: Callable):
        from fgvc.data import build_transform
        from fgvc.models import load_pretrained
        from .builders import build_model, eval_loader
        cfg, e = self.cfg, self.cfg.eval
        model = build_model(cfg.model, len(self.classes), self.groups, init_weights=False)
        if self.ours:
            _load_weights(model, ckpt["model"], cfg.model.name, self.checkpoint)
        else:
            for note in load_pretrained(model, ckpt):
                log(f"[load] {note}")
        transform = build_transform(False, cfg.model.img_size)
        if e.tta != "none":
            from .tta import TTAModel, tta_transform
            model, transform = TTAModel(model, e.tta), tta_transform(cfg.model.img_size, e.tta)
            log(f"[eval] test-time augmentation: {e.tta} (averaged probabilities)")
        loader = eval_loader(self.rec, cfg.model.img_size, e.batch_size or self.data_cfg["eval_batch_size"],
                             self.data_cfg["num_workers"] if e.num_workers < 0 else e.num_workers, transform=transform)
        return model.to(self.device).eval(), loader


def _run_conditions(job: _EvalJob, amp, log: Callable):
    """Logits and top-1 / top-5 with meta, meta zeroed and (``eval.per_group``) without each group."""
    from fgvc.eval_loop import predict, topk_accuracy
    groups = job.groups
    meta_sizes = [g.dim * g.tokens for g in groups]
    conditions = [("with_meta", "full", ())]
    if groups:
        conditions.append(("meta_zeroed", "zero", ()))
        if job.cfg.eval.per_group and len(groups) > 1:
            conditions += [(f"without_{g.name}", "drop", (i,)) for i, g in enumerate(groups)]
    results, outputs = {}, {}
    for name, mode, drop in conditions:
        out = predict(job.model, job.loader, job.device, mode, drop, meta_sizes, amp=amp,
                      progress=job.cfg.log.progress, desc=name)
        outputs[name] = out
        acc = topk_accuracy(out["logits"], out["labels"])
        results[name] = {"top1": acc["top1"], "top5": acc["top5"], "n": int(out["labels"].numel())}
        log(f"[eval] {name:>20s}: top1 {acc['top1']:6.2f}  top5 {acc['top5']:6.2f}  ({results[name]['n']} images)")
    main = outputs["with_meta"]
    probs = main["logits"].softmax(1)
    conf, pred = probs.max(1)
    outputs["main"] = {"labels": main["labels"].numpy(), "probs": probs, "conf": conf.numpy(), "pred": pred.numpy(),
                       "pred0": outputs["meta_zeroed"]["logits"].argmax(1).numpy() if "meta_zeroed" in outputs
                       else None, "index": main["index"].numpy(), "skipped": int(main["skipped"])}
    return results, outputs


def _write_reports(job: _EvalJob, results: Dict, outputs: Dict, out_dir: str, log: Callable):
    """predictions.csv, per_class.csv, top_confusions.csv, confusion.png; the summary dict and the files."""
    from .report import split_label
    e, rec, classes, m = job.cfg.eval, job.rec, job.classes, outputs["main"]
    labels, pred = m["labels"], m["pred"]
    write_predictions_csv(os.path.join(out_dir, "predictions.csv"), [rec.paths[int(i)] for i in m["index"]], labels,
                          m["probs"], classes, e.topk)
    rows = per_class_table(pred, m["pred0"], labels, classes)
    _write_csv(os.path.join(out_dir, "per_class.csv"), rows, list(rows[0].keys()))
    cm = confusion_matrix(pred, labels, len(classes))
    m["confusion"] = cm
    confusions = top_confusions(cm, classes, e.top_confusions)
    _write_csv(os.path.join(out_dir, "top_confusions.csv"), confusions,
               ["true", "predicted", "count", "fraction_of_true"])
    files = ["predictions.csv", "per_class.csv", "top_confusions.csv"]
    if len(classes) <= e.max_confusion_classes:
        save_confusion_png(cm, classes, os.path.join(out_dir, "confusion.png"),
                           f"{rec.name}: top-1 {results['with_meta']['top1']:.2f} (with meta)")
        files.append("confusion.png")
    dataset = job.data_cfg["dataset"]
    log(f"[eval] {rec.name} is the {split_label(dataset, e.split)}")
    summary = {"checkpoint": os.path.abspath(job.checkpoint), "dataset": rec.name, "split": e.split, "tta": e.tta,
               "split_label": split_label(dataset, e.split),
               "num_classes": len(classes), "meta_groups": [g.name for g in job.groups],
               "skipped_images": m["skipped"], "results": results,
               "mean_per_class_top1": float(np.nanmean([r["top1"] for r in rows])),
               "top_confusions": confusions[:10], "out_dir": out_dir}
    summary.update(_shot_summary(pred, labels, job.train_counts, len(classes), log))
    if "meta_zeroed" in results:
        summary["meta_gain_top1"] = results["with_meta"]["top1"] - results["meta_zeroed"]["top1"]
        log(f"[eval] meta gain (with meta - meta zeroed): {summary['meta_gain_top1']:+.2f} top-1 points")
    return summary, files


def _log_to_wandb(job: _EvalJob, results: Dict, outputs: Dict, out_dir: str) -> None:
    """Metrics, per-class top-1, the confusion matrix and a table of predictions (images, meta, label,
    prediction, confidence) in a wandb run that joins the training run's group."""
    from sparse_mim.utils.logger import RunLogger
    from .dashboard import log_evaluation
    cfg, e, classes, m = job.cfg, job.cfg.eval, job.classes, outputs["main"]
    logger = RunLogger(out_dir, cfg, project=cfg.wandb.project,
                       name=(cfg.wandb.name + "-eval") if cfg.wandb.name else None, entity=cfg.wandb.entity or None,
                       enabled=True, use_wandb=cfg.wandb.enabled, job_type="fgvc-eval", log_model="off",
                       group=job.group)
    logger.summary({f"eval/{c}/{k}": v for c, r in results.items() for k, v in r.items() if k != "n"})
    labels, pred, k = m["labels"], m["pred"], len(classes)
    log_evaluation(logger, {"per_class_correct": np.bincount(labels[pred == labels], minlength=k),
                            "per_class_total": np.bincount(labels, minlength=k),
                            "confusion": m["confusion"] if k <= e.max_confusion_classes else None, "samples": []},
                   "eval", 0, classes, job.rec, job.train_counts)
    if logger.run is not None and e.table_rows > 0:
        import wandb
        columns, trows = prediction_rows(job.rec, classes, job.groups, m["index"], labels, pred, m["conf"], m["pred0"],
                                         e.table_rows)
        table = wandb.Table(columns=columns)
        strip = []
        for row in trows:
            if row[0] is not None and len(strip) < 32:  # the first thumbnails also as an image panel
                strip.append(wandb.Image(row[0], caption=f"{row[1]} -> {row[2]} ({row[3]:.2f})"))
            row[0] = wandb.Image(row[0]) if row[0] is not None else None
            table.add_data(*row)
        logger.run.log({"eval/predictions": table, "eval/prediction_images": strip})
    logger.finish()
