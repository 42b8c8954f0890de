#!/usr/bin/env python
"""Evaluate a fine-grained classifier with and without its meta-information.

    python tools/eval_fgvc.py outputs/fgvc_demo/best.pth
    python tools/eval_fgvc.py outputs/inat21/best.pth data.root=/data/inat21 eval.split=test
    python tools/eval_fgvc.py metaformer2_inat21_384.pth -c configs/fgvc/inat21_metaformer2_384.yaml data.root=/data/inat21

Our checkpoints carry their training config (model, data, classes); an official
MetaFormer file does not, so pass the recipe with ``-c`` (it is loaded through
``fgvc.models.load_pretrained``). Any key can be overridden (``data.root=...``).

Reports, in ``eval.out_dir`` (default ``<checkpoint folder>/eval_<split>``):

* ``summary.json``: top-1 / top-5 with meta, with meta zeroed (the official "mask-meta"
  test) and with each meta group dropped;
* ``per_class.csv``: images, top-1 with meta and with meta zeroed, per class;
* ``confusion.png`` (row-normalised, up to ``eval.max_confusion_classes`` classes) and
  ``top_confusions.csv`` (the most frequent true -> predicted mistakes, any class count);
* a wandb run (offline by default) with the metrics and a Table of predictions with the
  image, readable meta values, label, prediction and confidence.

Deterministic: fixed eval transform, fixed caption for text meta, no sampling; the same
checkpoint and data give the same numbers.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import copy  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sparse_mim.utils.checkpoint import load_checkpoint  # noqa: E402
from sparse_mim.utils.config import Config, ConfigError, load_config, merge_config  # noqa: E402

import train_fgvc  # noqa: E402  (tools/ is on sys.path when run as a script)

EVAL_DEFAULTS = {
    "split": "test",                 # test | val (the held-out part of train, as in training)
    "out_dir": "",
    "batch_size": 0,                 # 0 = data.eval_batch_size
    "num_workers": -1,               # -1 = data.num_workers
    "max_confusion_classes": 200,
    "top_confusions": 50,
    "table_rows": 200,               # predictions in the wandb Table (0 = none)
    "per_group": True,               # also evaluate with each meta group dropped
}

USAGE = "usage: eval_fgvc.py CHECKPOINT [-c CONFIG.yaml] [key=value ...]"


def parse_args(argv: List[str]):
    """CHECKPOINT, optional -c config, overrides -> (checkpoint path, checkpoint dict, Config)."""
    ckpt_path, config_file, overrides, i = None, None, [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("-c", "--config"):
            config_file = argv[i + 1]
            i += 2
            continue
        if a in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        if a.startswith("--") and "=" not in a and i + 1 < len(argv):
            overrides.append(f"{a[2:]}={argv[i + 1]}")
            i += 2
            continue
        if "=" not in a and ckpt_path is None:
            ckpt_path = a
        else:
            overrides.append(a.lstrip("-"))
        i += 1
    if ckpt_path is None:
        raise SystemExit(f"{USAGE}\nerror: no checkpoint given (e.g. outputs/fgvc_demo/best.pth)")
    try:
        ckpt = load_checkpoint(ckpt_path)
    except RuntimeError as e:
        raise SystemExit(
            f"{e}\nAn official MetaFormer file that pickles its yacs config cannot be read safely; extract the "
            f"weights once (trusted file only):\n  python -c \"import torch; c = torch.load('{ckpt_path}', "
            f"weights_only=False); torch.save({{'model': c['model']}}, 'weights.pth')\"")
    defaults = Config(copy.deepcopy(train_fgvc.DEFAULTS))
    defaults["eval"] = copy.deepcopy(EVAL_DEFAULTS)
    # ours: the training config + class list + meta layout; anything else is a foreign weights file
    ours = isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and "classes" in ckpt
    stored = ckpt["config"] if ours else None
    if stored:
        merge_config(defaults, {k: v for k, v in stored.items() if k != "eval"}, source=f"{ckpt_path} (stored config)")
    elif not config_file:
        raise SystemExit(f"{USAGE}\nerror: {ckpt_path} holds no training config (an official MetaFormer file?): "
                         f"pass the recipe with -c configs/fgvc/<recipe>.yaml and data.root=...")
    try:
        cfg = load_config(defaults, config_file, overrides)
    except ConfigError as e:
        raise SystemExit(f"{USAGE}\nerror: {e}")
    return ckpt_path, ckpt, cfg, bool(stored)


def build_eval_model(cfg: Config, ckpt: Dict, ours: bool, num_classes: int, groups):
    from fgvc.models import load_pretrained
    model = train_fgvc.build_model(cfg, num_classes, groups, init_weights=False)
    if ours:
        model.load_state_dict(ckpt["model"])
    else:
        notes = load_pretrained(model, ckpt)
        for n in notes:
            print(f"[load] {n}")
    return model.eval()


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
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


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
    confidence, correct, readable meta per group (and the prediction with meta zeroed)."""
    from fgvc.data.dataset import load_image
    from fgvc.data.meta import describe_meta
    columns = ["image", "label", "prediction", "confidence", "correct"] + [f"meta/{g.name}" for g in groups]
    if pred0 is not None:
        columns.append("prediction_meta_zeroed")
    rows = []
    for j in range(min(max_rows, len(index))):
        r = int(index[j])
        try:
            image = load_image(rec.paths[r])
            image.thumbnail((128, 128))
        except Exception:
            image = None
        meta_text = describe_meta(groups, rec.meta[r], rec.meta_present[r]) if groups else {}
        row = [image, classes[labels[j]], classes[pred[j]], float(conf[j]), bool(pred[j] == labels[j])]
        row += [meta_text.get(g.name, "") for g in groups]
        if pred0 is not None:
            row.append(classes[pred0[j]])
        rows.append(row)
    return columns, rows


def _write_csv(path: str, rows: List[Dict], fieldnames: List[str]):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def run_eval(ckpt_path: str, ckpt: Dict, cfg: Config, ours: bool, log=print) -> Dict:
    from torch.utils.data import DataLoader
    from fgvc.data import FGVCDataset, build_transform, collate_skip_bad
    from fgvc.engine import predict, topk_accuracy

    torch.manual_seed(0)
    device = torch.device("cuda" if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    e = cfg.eval
    data_cfg = train_fgvc.prepare_data_config(cfg)
    train_rec, val_rec, test_rec = train_fgvc.build_splits(data_cfg, log)
    if e.split == "val":
        if val_rec is None:
            raise SystemExit("eval.split=val needs data.val_split > 0 (the held-out part of train)")
        rec = val_rec
    elif e.split == "test":
        rec = test_rec
    else:
        raise SystemExit(f"eval.split must be 'test' or 'val', got {e.split!r}")
    classes = list(ckpt.get("classes") or rec.classes) if ours else rec.classes
    if ours and list(classes) != list(rec.classes):
        raise SystemExit(f"the checkpoint's {len(classes)} classes differ from the dataset's {len(rec.classes)} "
                         f"(another dataset or class list?)")
    groups = rec.meta_groups
    if ours and "meta_groups" in ckpt:
        want = [(g["name"], int(g["dim"]), int(g["tokens"])) for g in ckpt["meta_groups"]]
        have = [(g.name, g.dim, g.tokens) for g in groups]
        if want != have:
            raise SystemExit(f"meta groups differ: checkpoint {want}, dataset {have} (data.use_meta / meta config?)")
    model = build_eval_model(cfg, ckpt, ours, len(classes), groups).to(device)
    out_dir = e.out_dir or os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), f"eval_{e.split}")
    os.makedirs(out_dir, exist_ok=True)

    loader = DataLoader(FGVCDataset(rec, build_transform(False, cfg.model.img_size), train=False),
                        batch_size=e.batch_size or data_cfg["eval_batch_size"], shuffle=False,
                        num_workers=data_cfg["num_workers"] if e.num_workers < 0 else e.num_workers,
                        collate_fn=collate_skip_bad)
    amp = bool(cfg.train.amp) and device.type == "cuda"
    meta_sizes = [g.dim * g.tokens for g in groups]
    conditions = [("with_meta", "full", ())]
    if groups:
        conditions.append(("meta_zeroed", "zero", ()))
        if e.per_group and len(groups) > 1:
            conditions += [(f"without_{g.name}", "drop", (i,)) for i, g in enumerate(groups)]
    results, outputs = {}, {}
    for name, mode, drop in conditions:
        out = predict(model, loader, device, mode, drop, meta_sizes, amp=amp, progress=True, desc=name)
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

    rows = per_class_table(pred, pred0, labels, classes)
    _write_csv(os.path.join(out_dir, "per_class.csv"), rows, list(rows[0].keys()))
    cm = confusion_matrix(pred, labels, len(classes))
    confusions = top_confusions(cm, classes, e.top_confusions)
    _write_csv(os.path.join(out_dir, "top_confusions.csv"), confusions,
               ["true", "predicted", "count", "fraction_of_true"])
    if len(classes) <= e.max_confusion_classes:
        save_confusion_png(cm, classes, os.path.join(out_dir, "confusion.png"),
                           f"{rec.name}: top-1 {results['with_meta']['top1']:.2f} (with meta)")
    summary = {"checkpoint": os.path.abspath(ckpt_path), "dataset": rec.name, "split": e.split,
               "num_classes": len(classes), "meta_groups": [g.name for g in groups],
               "skipped_images": int(main["skipped"]), "results": results,
               "mean_per_class_top1": float(np.nanmean([r["top1"] for r in rows])),
               "top_confusions": confusions[:10]}
    if "meta_zeroed" in results:
        summary["meta_gain_top1"] = results["with_meta"]["top1"] - results["meta_zeroed"]["top1"]
        log(f"[eval] meta gain (with meta - meta zeroed): {summary['meta_gain_top1']:+.2f} top-1 points")
    tmp = os.path.join(out_dir, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "summary.json"))
    log(f"[eval] wrote {out_dir}/summary.json, per_class.csv, top_confusions.csv"
        + (", confusion.png" if len(classes) <= e.max_confusion_classes else ""))

    # wandb: metrics + a Table of predictions (images, meta, label, prediction, confidence)
    from sparse_mim.utils.logger import RunLogger
    if not cfg.wandb.enabled:
        os.environ["WANDB_MODE"] = "disabled"
    logger = RunLogger(out_dir, cfg, project=cfg.wandb.project, name=(cfg.wandb.name or "") + "-eval" if cfg.wandb.name
                       else None, entity=cfg.wandb.entity or None, enabled=True, job_type="fgvc-eval")
    flat = {f"eval/{c}/{k}": v for c, r in results.items() for k, v in r.items() if k != "n"}
    logger.summary(flat)
    if logger.run is not None and e.table_rows > 0:
        import wandb
        columns, rows = prediction_rows(rec, classes, groups, main["index"].numpy(), labels, pred, conf.numpy(),
                                        pred0, e.table_rows)
        table = wandb.Table(columns=columns)
        for row in rows:
            row[0] = wandb.Image(row[0]) if row[0] is not None else None
            table.add_data(*row)
        logger.run.log({"eval/predictions": table})
    logger.finish()
    return summary


def main(argv: Optional[List[str]] = None):
    ckpt_path, ckpt, cfg, ours = parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_eval(ckpt_path, ckpt, cfg, ours)


if __name__ == "__main__":
    main()
