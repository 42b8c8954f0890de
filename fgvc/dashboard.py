"""What a training run reports at every evaluation, for the wandb dashboard and metrics.jsonl.

:func:`evaluate_detailed` is :func:`fgvc.eval_loop.evaluate` plus the per-class correct / total counts,
the confusion matrix (up to ``confusion_max`` classes) and a few sample predictions, with the
counts summed over processes under torch.distributed. :func:`evaluation_row` turns it into the
scalars of the epoch row (top-1 / top-5 / loss, mean per-class top-1, many / medium / few-shot
top-1). :func:`log_evaluation` writes the figures: one ``metrics.jsonl`` line holding the per-class
top-1, the confusion matrix and the sample predictions as plain JSON, and in wandb (when a run is
live) the tables ``<split>/per_class`` and ``<split>/samples`` (real thumbnails, ``wandb.Image``)
and the plot ``<split>/confusion_matrix`` (``wandb.plot.confusion_matrix``). The keys are listed in
docs/fgvc_training.md ("The wandb dashboard").
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["evaluate_detailed", "evaluation_row", "log_evaluation", "confusion_pairs", "thumbnail"]


def evaluate_detailed(model: torch.nn.Module, loader, device: torch.device, num_classes: int, amp=None,
                      confusion_max: int = 100, samples: int = 16, meta_mode: str = "full") -> Dict:
    """top-1 / top-5 / loss / n / skipped as :func:`fgvc.eval_loop.evaluate`, plus ``per_class_correct``
    and ``per_class_total`` (numpy, length ``num_classes``), ``confusion`` (``[true, predicted]``
    counts, numpy, or None above ``confusion_max`` classes) and ``samples`` (this process's first
    ``samples`` images: record index, label, prediction, confidence)."""
    from sparse_mim.utils.distributed import all_reduce_sum, is_distributed
    from .eval_loop import predict
    out = predict(model, loader, device, meta_mode=meta_mode, amp=amp, allow_empty=is_distributed())
    logits, labels = out["logits"], out["labels"]
    k = int(num_classes)
    with_cm = 0 < k <= confusion_max
    sums = torch.zeros(5 + 2 * k + (k * k if with_cm else 0), dtype=torch.float64)
    sample_rows: List[Dict] = []
    if labels.numel():
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        pred = top[:, 0]
        sums[0] = float((pred == labels).sum())
        sums[1] = float((top == labels[:, None]).any(1).sum())
        sums[2] = float(F.cross_entropy(logits, labels, reduction="sum"))
        sums[3] = labels.numel()
        sums[5:5 + k] = torch.bincount(labels[pred == labels], minlength=k).double()
        sums[5 + k:5 + 2 * k] = torch.bincount(labels, minlength=k).double()
        if with_cm:
            sums[5 + 2 * k:] = torch.bincount(labels * k + pred, minlength=k * k).double()
        conf = logits.softmax(1).max(1).values
        for j in range(min(samples, labels.numel())):
            sample_rows.append({"index": int(out["index"][j]), "label": int(labels[j]), "prediction": int(pred[j]),
                                "confidence": float(conf[j])})
    sums[4] = out["skipped"]
    sums = all_reduce_sum(sums.to(device if device.type == "cuda" else torch.device("cpu"))).cpu()
    n = max(sums[3].item(), 1.0)
    return {"top1": 100.0 * sums[0].item() / n, "top5": 100.0 * sums[1].item() / n, "loss": sums[2].item() / n,
            "n": int(sums[3].item()), "skipped": int(sums[4].item()),
            "per_class_correct": sums[5:5 + k].numpy().astype(np.int64),
            "per_class_total": sums[5 + k:5 + 2 * k].numpy().astype(np.int64),
            "confusion": sums[5 + 2 * k:].numpy().astype(np.int64).reshape(k, k) if with_cm else None,
            "samples": sample_rows}


def evaluation_row(ev: Dict, prefix: str, train_counts: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """The scalars of one evaluation: ``<prefix>/top1``, ``top5``, ``loss``, ``images``,
    ``mean_per_class_top1`` and, with the training class counts, ``many_shot`` / ``medium_shot`` /
    ``few_shot`` (a split without classes is left out)."""
    from .longtail import SHOT_SPLITS, shot_accuracy
    row = {f"{prefix}/top1": ev["top1"], f"{prefix}/top5": ev["top5"], f"{prefix}/loss": ev["loss"],
           f"{prefix}/images": ev["n"]}
    total = ev["per_class_total"]
    seen = total > 0
    if seen.any():
        row[f"{prefix}/mean_per_class_top1"] = float(100.0 * np.mean(ev["per_class_correct"][seen] / total[seen]))
    if train_counts is not None:
        shots = shot_accuracy(ev["per_class_correct"], total, train_counts)
        row.update({f"{prefix}/{s}": shots[s] for s in SHOT_SPLITS if shots[s] is not None})
    return row


def confusion_pairs(cm: np.ndarray):
    """(true labels, predictions) lists that give the confusion matrix ``cm`` back (for wandb's plot)."""
    t, p = np.nonzero(cm)
    reps = cm[t, p]
    return np.repeat(t, reps).tolist(), np.repeat(p, reps).tolist()


def _per_class_top1(ev: Dict) -> List[Optional[float]]:
    total = ev["per_class_total"]
    return [round(100.0 * float(c) / float(n), 4) if n else None for c, n in zip(ev["per_class_correct"], total)]


def log_evaluation(logger, ev: Dict, prefix: str, step: int, classes: Sequence[str], records=None,
                   train_counts: Optional[Sequence[int]] = None) -> Dict:
    """Write the figures of one evaluation (module docstring); returns the metrics.jsonl row."""
    from .longtail import shot_of
    if not getattr(logger, "enabled", False):
        return {}
    per_class = _per_class_top1(ev)
    samples = [dict(s, label=classes[s["label"]], prediction=classes[s["prediction"]],
                    path=records.paths[s["index"]] if records is not None else "") for s in ev["samples"]]
    row = {"step": int(step), f"{prefix}/per_class_top1": per_class,
           f"{prefix}/per_class_images": ev["per_class_total"].tolist(), f"{prefix}/samples": samples}
    if ev["confusion"] is not None:
        row[f"{prefix}/confusion"] = ev["confusion"].tolist()
    with open(logger.metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if logger.run is None:
        return row
    import wandb
    shots = shot_of(train_counts) if train_counts is not None else [""] * len(classes)
    table = wandb.Table(columns=["class_index", "class", "train_images", "shot", "images", "top1"])
    for c, name in enumerate(classes):
        table.add_data(c, name, int(train_counts[c]) if train_counts is not None else None, str(shots[c]),
                       int(ev["per_class_total"][c]), per_class[c])
    media = {f"{prefix}/per_class": table}
    if ev["confusion"] is not None:
        y_true, preds = confusion_pairs(ev["confusion"])
        media[f"{prefix}/confusion_matrix"] = wandb.plot.confusion_matrix(
            y_true=y_true, preds=preds, class_names=list(classes), title=f"{prefix} confusion (step {step})")
    if samples and records is not None:
        st = wandb.Table(columns=["image", "label", "prediction", "confidence", "correct"])
        strip = []
        for s in samples:
            image = thumbnail(s["path"])
            st.add_data(wandb.Image(image) if image is not None else None, s["label"], s["prediction"],
                        s["confidence"], s["label"] == s["prediction"])
            if image is not None:
                strip.append(wandb.Image(image, caption=f"{s['label']} -> {s['prediction']} ({s['confidence']:.2f})"))
        media[f"{prefix}/samples"] = st
        media[f"{prefix}/sample_images"] = strip
    logger.run.log(media, step=int(step))
    return row


def thumbnail(path: str, size: int = 128):
    """The image at ``path`` as an RGB PIL thumbnail (at most ``size`` pixels a side), None if unreadable."""
    from fgvc.data.dataset import load_image
    try:
        image = load_image(path).convert("RGB")
        image.thumbnail((size, size))
        return image
    except Exception:  # noqa: BLE001 - a thumbnail is optional
        return None
