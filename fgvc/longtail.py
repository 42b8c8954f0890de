"""Long-tail training and reporting: class-aware sampling, logit-adjusted loss, shot splits.

* :class:`ClassAwareSampler` (``data.sampler``): ``uniform`` is the plain shuffled epoch;
  ``class_balanced`` draws every class with the same probability, ``sqrt`` with probability
  proportional to the square root of its image count (Kang et al. 2020, "Decoupling
  representation and classifier": instance-, class-balanced and square-root sampling are
  all ``p_j ~ n_j ** q`` with q = 1, 0, 1/2). Images are drawn with replacement, as many per
  epoch as the uniform epoch has, from a seed that depends only on (seed, epoch), so a
  resumed run draws the same images.
* :class:`LogitAdjustedLoss` (``train.loss``): Menon et al. 2021, "Long-tail learning via
  logit adjustment": the training loss sees ``logits + tau * log(prior)`` (prior = the
  training class frequencies), the model's raw logits are used at test time. ``tau = 1`` is
  the balanced softmax (Ren et al. 2020). Works with hard, smoothed and Mixup targets.
* :func:`shot_accuracy`: many-shot (> 100 training images), medium-shot (20-100) and few-shot
  (< 20) top-1, each the mean per-class top-1 of the classes in that split (the protocol of
  Liu et al. 2019 and Kang et al. 2020); a split with no class is ``None``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from sparse_mim.utils.streams import RandomStreams, ResumableSampler

__all__ = ["SAMPLERS", "class_counts", "sampling_weights", "ClassAwareSampler", "LogitAdjustedLoss",
           "build_loss", "shot_of", "shot_accuracy", "SHOT_SPLITS", "MANY_SHOT_MIN", "FEW_SHOT_MAX"]

SAMPLERS = ("uniform", "class_balanced", "sqrt")
MANY_SHOT_MIN = 100   # many-shot: more than 100 training images
FEW_SHOT_MAX = 20     # few-shot: fewer than 20
SHOT_SPLITS = ("many_shot", "medium_shot", "few_shot")


def class_counts(labels: Sequence[int], num_classes: int) -> np.ndarray:
    """Training images per class (int64, length ``num_classes``)."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.int64)


def sampling_weights(labels: Sequence[int], mode: str) -> np.ndarray:
    """Per-image probabilities of ``mode`` (they sum to 1): class j gets ``n_j ** q`` of the mass,
    q = 1 (uniform), 1/2 (sqrt), 0 (class_balanced), shared equally by its images."""
    q = {"uniform": 1.0, "sqrt": 0.5, "class_balanced": 0.0}.get(mode)
    if q is None:
        raise ValueError(f"data.sampler={mode!r}: choose one of {', '.join(SAMPLERS)}")
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    class_mass = np.where(counts > 0, counts.astype(np.float64) ** q, 0.0)
    w = class_mass[labels] / counts[labels]
    return w / w.sum()


class ClassAwareSampler(ResumableSampler):
    """Class-balanced or square-root sampling with replacement, sharded over processes and resumable.

    A :class:`~sparse_mim.utils.streams.ResumableSampler` (``set_epoch``, ``set_start``, ``indices``)
    whose epoch order is drawn, not shuffled: ``len(labels) // num_replicas`` indices per process (the
    uniform epoch's length) from ``sampling_weights(labels, mode)`` with a generator seeded by (seed,
    epoch); process r takes every ``num_replicas``-th index from r; ``set_start(n)`` skips the first n.
    """

    def __init__(self, labels: Sequence[int], mode: str, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.weights = torch.as_tensor(sampling_weights(labels, mode), dtype=torch.float64)
        super().__init__(len(self.weights), num_replicas, rank, seed)
        self.mode = mode

    def epoch_order(self) -> list:
        """The whole epoch's draw (all processes)."""
        g = RandomStreams(self.seed).generator("order", self.epoch)
        return torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True,
                                 generator=g).tolist()


class LogitAdjustedLoss(torch.nn.Module):
    """``base(logits + tau * log(prior), target)``: the logit-adjusted loss around any criterion
    (cross-entropy, label smoothing, soft targets). ``prior``: training class frequencies; a class
    with no training image gets the smallest non-zero frequency (its log stays finite)."""

    def __init__(self, base: torch.nn.Module, counts: Sequence[int], tau: float = 1.0):
        super().__init__()
        counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
        if counts.sum() <= 0:
            raise ValueError("the logit-adjusted loss needs the training class counts; all are zero")
        floor = counts[counts > 0].min()
        prior = torch.where(counts > 0, counts, floor) / counts.sum()
        self.base, self.tau = base, float(tau)
        self.register_buffer("log_prior", prior.log().float(), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        adjust = (self.tau * self.log_prior).to(device=logits.device, dtype=logits.dtype)
        return self.base(logits + adjust, target)


def build_loss(base: torch.nn.Module, loss: str, counts: Sequence[int], tau: float) -> torch.nn.Module:
    """The ``train.loss`` criterion around ``base`` (what :func:`fgvc.builders.build_mixup` picked)."""
    if loss == "ce":
        return base
    if loss == "logit_adjusted":
        return LogitAdjustedLoss(base, counts, tau)
    if loss == "balanced_softmax":
        return LogitAdjustedLoss(base, counts, 1.0)
    raise ValueError(f"train.loss={loss!r}: choose one of ce, logit_adjusted, balanced_softmax")


def shot_of(counts: Sequence[int]) -> np.ndarray:
    """Per class: "many_shot" (> 100 training images), "medium_shot" (20-100) or "few_shot" (< 20)."""
    counts = np.asarray(counts)
    return np.where(counts > MANY_SHOT_MIN, "many_shot", np.where(counts < FEW_SHOT_MAX, "few_shot", "medium_shot"))


def shot_accuracy(per_class_correct: Sequence[float], per_class_total: Sequence[float],
                  train_counts: Sequence[int]) -> Dict[str, Optional[float]]:
    """Many / medium / few-shot top-1 (percent): the mean per-class top-1 of the evaluated classes
    in each split (``None`` where the split has no evaluated class), and the class count of each
    (``many_shot_classes``, ...)."""
    correct, total = np.asarray(per_class_correct, np.float64), np.asarray(per_class_total, np.float64)
    if not (len(correct) == len(total) == len(train_counts)):
        raise ValueError(f"per-class counts of different lengths: {len(correct)}, {len(total)}, {len(train_counts)}")
    shots = shot_of(train_counts)
    out: Dict[str, Optional[float]] = {}
    for split in SHOT_SPLITS:
        m = (shots == split) & (total > 0)
        out[split] = float(100.0 * np.mean(correct[m] / total[m])) if m.any() else None
        out[f"{split}_classes"] = int(m.sum())
    return out
