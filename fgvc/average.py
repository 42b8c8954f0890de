"""Weight averaging: the EMA's time constant check and checkpoint averaging (``fgvc-average``).

An EMA with decay ``d`` averages over roughly its last ``1 / (1 - d)`` optimizer steps; with
``train.ema_warmup`` (timm ``ModelEmaV3``'s warm-up) the decay at step ``t`` is
``min(d, 1 - (1 + t) ** -2/3)``, so the average never reaches further back than the run
allows. :func:`ema_warning` says when the decay at the last step still averages over more
steps than the run has (the EMA then still holds much of the initial weights: a 75-step run
with decay 0.9998 and no warm-up ends near the random initialisation).

:func:`average_checkpoints` averages the weights of several checkpoints of one run (e.g. the
``checkpoint-<step>.pth`` copies of ``checkpoint.keep_every_steps``, or ``best.pth`` of several
seeds of one recipe), as in "model soups" / SWA-style averaging: floating-point tensors are
averaged (in float64, stored in their dtype), integer buffers (BatchNorm's step counters) taken
from the first. Every file must hold the same model, classes and meta layout. The result is
an ordinary fgvc checkpoint: ``fgvc-eval`` / ``fgvc-predict`` / ``fgvc-export`` read it. The command
line (``fgvc-average``) is parsed in :mod:`fgvc.cli`.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["ema_time_constant", "ema_warning", "average_checkpoints"]


def ema_time_constant(decay: float) -> float:
    """Steps an EMA of decay ``decay`` averages over (``1 / (1 - decay)``; inf at decay 1)."""
    return float("inf") if decay >= 1.0 else 1.0 / (1.0 - decay)


def ema_warning(ema, total_steps: int) -> Optional[str]:
    """A warning when the EMA's decay at the run's last step has a time constant longer than the run."""
    last = ema.get_decay(total_steps) if hasattr(ema, "get_decay") else ema.decay
    tc = ema_time_constant(last)
    if tc <= total_steps:
        return None
    warm = getattr(ema, "use_warmup", False)
    return (f"train.ema_decay={ema.decay} averages over ~{tc:.0f} steps at the last step (decay {last:.6f}"
            f"{', with the warm-up' if warm else ''}) but the run has {total_steps}: the EMA will still hold much "
            f"of the initial weights. Use train.ema_warmup=true, a lower train.ema_decay (e.g. "
            f"{max(0.0, 1.0 - 5.0 / max(total_steps, 1)):.4g}) or a longer run")


def average_checkpoints(paths: Sequence[str], out: str, use_ema: bool = False, log: Callable = print) -> Dict:
    """Average the weights of ``paths`` (fgvc training checkpoints) into ``out``; returns the written dict.

    ``use_ema``: average each file's ``model_ema`` (``last.pth`` / ``checkpoint-<step>.pth`` of an EMA
    run) instead of its ``model``. The first file's config, classes and meta layout are kept.
    """
    from sparse_mim.utils.checkpoint import save_checkpoint
    from .predict import check_same_classes, read_fgvc_checkpoint
    if len(paths) < 2:
        raise ValueError(f"checkpoint averaging needs at least two checkpoints, got {len(paths)}")
    if os.path.abspath(out) in {os.path.abspath(p) for p in paths}:
        raise ValueError(f"the output {out} is one of the inputs; write the average to a new file")
    first: Optional[Dict] = None
    sums: Dict[str, torch.Tensor] = {}
    names: List[str] = []
    for p in paths:
        ck = read_fgvc_checkpoint(p)
        if use_ema:
            if "model_ema" not in ck:
                raise ValueError(f"{p} holds no EMA weights (model_ema; only last.pth / checkpoint-<step>.pth of a "
                                 f"train.ema=true run do); drop --ema to average its model weights")
            weights = ck["model_ema"]
        else:
            weights = ck["model"]
        if first is None:
            first = ck
            sums = {k: v.double().clone() if v.is_floating_point() else v.clone() for k, v in weights.items()}
            dtypes = {k: v.dtype for k, v in weights.items()}
        else:
            model_a, model_b = first["config"].get("model", {}).get("name"), ck["config"].get("model", {}).get("name")
            if model_a != model_b:
                raise ValueError(f"{p} is a {model_b} checkpoint, {paths[0]} a {model_a}: average one model only")
            check_same_classes(first["classes"], ck["classes"], paths[0], p)
            if first.get("meta_groups") != ck.get("meta_groups"):
                raise ValueError(f"{p} has meta groups {ck.get('meta_groups')}, {paths[0]} {first.get('meta_groups')}")
            if set(weights) != set(sums) or any(weights[k].shape != sums[k].shape for k in sums):
                raise ValueError(f"the weights in {p} do not have the keys / shapes of {paths[0]} "
                                 f"(another model.kwargs?)")
            for k, v in weights.items():
                if v.is_floating_point():
                    sums[k] += v.double()
        names.append(os.path.basename(p))
    n = len(paths)
    averaged = {k: (v / n).to(dtypes[k]) if v.is_floating_point() else v for k, v in sums.items()}
    keep = {k: first[k] for k in ("config", "classes", "meta_groups", "train_class_counts", "wandb_group")
            if k in first}
    result = dict(keep, model=averaged, averaged_from=[os.path.abspath(p) for p in paths],
                  averaged_weights="model_ema" if use_ema else "model")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_checkpoint(result, out)
    log(f"[average] {n} checkpoints ({', '.join(names)}{', EMA weights' if use_ema else ''}) -> {out}")
    return result
