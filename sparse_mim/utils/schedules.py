"""Per-step schedules: linear warm-up + cosine learning rate, cosine weight decay.

Values are pure functions of the global step, so a resumed run gets exactly the lr
and weight decay it would have had (nothing to store but the step). Follows the
official SparK / MAE / ConvNeXt-V2 recipes, stepped per optimizer update instead of
per epoch.
"""
from __future__ import annotations

import math
import torch

__all__ = ["WarmupCosine", "cosine_weight_decay", "set_optimizer_values"]


class WarmupCosine:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then cosine to ``final``.

    ``value(step)`` for step in [0, total_steps); steps past the end stay at ``final``.
    """

    def __init__(self, base: float, final: float, total_steps: int, warmup_steps: int = 0,
                 warmup_start: float = 0.0):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]")
        self.base, self.final = float(base), float(final)
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.warmup_start = float(warmup_start)

    def __call__(self, step: int) -> float:
        step = int(step)
        if step < self.warmup_steps:
            return self.warmup_start + (self.base - self.warmup_start) * step / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 0:
            return self.base
        t = min(max(step - self.warmup_steps, 0), decay_steps) / decay_steps
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * t))

    def state_dict(self) -> dict:
        return dict(base=self.base, final=self.final, total_steps=self.total_steps,
                    warmup_steps=self.warmup_steps, warmup_start=self.warmup_start)

    def __repr__(self):
        return f"WarmupCosine({self.state_dict()})"


def cosine_weight_decay(wd: float, wd_end: float, total_steps: int) -> WarmupCosine:
    """Weight decay following a half cosine from ``wd`` to ``wd_end`` (SparK: 0.04 -> 0.2)."""
    return WarmupCosine(wd, wd_end, total_steps, warmup_steps=0)


def set_optimizer_values(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Set lr (times each group's ``lr_scale``) and weight decay (times ``wd_scale``) on every group.

    A group flagged ``apply_weight_decay=False`` (``sparse_mim.spark.param_groups``) or
    created with weight_decay == 0 (biases, norms, mask tokens, gamma) gets ``wd_scale``
    0 the first time it is seen, so it keeps no decay while the others follow the schedule.
    """
    for group in optimizer.param_groups:
        if "wd_scale" not in group:
            if "apply_weight_decay" in group:
                group["wd_scale"] = 1.0 if group["apply_weight_decay"] else 0.0
            else:
                group["wd_scale"] = 0.0 if group.get("weight_decay", 0.0) == 0.0 else 1.0
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if weight_decay is not None:
            group["weight_decay"] = weight_decay * group["wd_scale"]
