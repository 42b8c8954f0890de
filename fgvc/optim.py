"""Fine-tuning controls: optimizer, layer-wise lr decay, backbone lr multiplier, lr schedule.

Built from timm's pieces, as timm's ``train.py`` does:

* parameter groups from ``timm.optim.param_groups_layer_decay`` (``optim.layer_decay`` < 1, the
  ``--layer-decay`` of timm / BEiT: layer ``i`` of ``L`` gets ``lr * layer_decay ** (L - i)``,
  the layers being :meth:`fgvc.models.MetaFormer.group_matcher`'s: the stem, every conv /
  token block, then the top, i.e. meta heads, class-token aggregation, norms and head) or
  ``param_groups_weight_decay`` (no decay); both exclude biases, norms and the class tokens
  from weight decay;
* ``optim.backbone_lr_mult`` multiplies the lr of the conv part (MetaFormer's stem and MBConv
  stages; a hybrid's convnet trunk, e.g. a SparK pre-trained ResNet under freshly initialised
  token stages), on top of the layer decay;
* the optimizer from ``timm.optim.create_optimizer_v2`` (``adamw``, ``sgd`` = SGD with Nesterov
  momentum as timm names it, ``momentum`` = plain SGD with momentum, ``lamb``).

Each group carries an ``lr_scale``; the training loop sets ``lr * lr_scale`` on every group at
every step (:func:`sparse_mim.utils.schedules.set_optimizer_values`). The lr itself is a pure
function of the optimizer step (:class:`WarmupStep` or the cosine
:class:`sparse_mim.utils.schedules.WarmupCosine`), so a resumed run gets exactly the lr it
would have had.
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import torch

__all__ = ["build_param_groups", "build_optimizer", "build_lr_schedule", "WarmupStep", "describe_param_groups",
           "backbone_prefixes", "OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("adamw", "sgd", "momentum", "lamb")
SCHEDULES = ("cosine", "step")


def backbone_prefixes(model: torch.nn.Module) -> List[str]:
    """Parameter-name prefixes of the model's conv part (what ``optim.backbone_lr_mult`` scales)."""
    if not hasattr(model, "_conv_stages"):
        raise ValueError(f"{type(model).__name__} has no conv part known to fgvc.optim (a MetaFormer or hybrid has)")
    return [p for stage in model._conv_stages() for block in stage for p in block]


def build_param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0,
                       backbone_lr_mult: float = 1.0) -> List[Dict]:
    """timm's parameter groups with ``lr_scale`` = layer decay x backbone multiplier (see the module doc)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay < 1.0:
        if not hasattr(model, "group_matcher"):
            raise ValueError(f"optim.layer_decay needs a model with group_matcher(); {type(model).__name__} has none")
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    if backbone_lr_mult == 1.0:
        return groups
    prefixes = tuple(backbone_prefixes(model))
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in groups:  # split each group into its backbone and other parameters
        parts = {True: [], False: []}
        for p in g["params"]:
            parts[names[id(p)].startswith(prefixes)].append(p)
        for is_backbone, params in parts.items():
            if params:
                out.append({**g, "params": params,
                            "lr_scale": g["lr_scale"] * (backbone_lr_mult if is_backbone else 1.0)})
    return out


def build_optimizer(model: torch.nn.Module, optim_cfg: Mapping, lr: float) -> torch.optim.Optimizer:
    """The ``optim`` section's optimizer over :func:`build_param_groups` (timm ``create_optimizer_v2``)."""
    from timm.optim import create_optimizer_v2
    name = optim_cfg.get("opt", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.opt={name!r}: choose one of {', '.join(OPTIMIZERS)}")
    groups = build_param_groups(model, optim_cfg["weight_decay"], optim_cfg.get("layer_decay", 1.0),
                                optim_cfg.get("backbone_lr_mult", 1.0))
    kwargs = {}
    if name in ("adamw", "lamb"):
        kwargs.update(betas=tuple(optim_cfg["betas"]), eps=optim_cfg["eps"])
    else:
        kwargs["momentum"] = optim_cfg.get("momentum", 0.9)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=optim_cfg["weight_decay"], **kwargs)


def describe_param_groups(optimizer: torch.optim.Optimizer) -> str:
    """One line: optimizer, group count, the range of lr scales (to check a layer decay did what was meant)."""
    scales = sorted({round(float(g.get("lr_scale", 1.0)), 6) for g in optimizer.param_groups})
    n = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    rng = f"{scales[0]:.3g}" if len(scales) == 1 else f"{scales[0]:.3g} .. {scales[-1]:.3g} ({len(scales)} values)"
    return f"{type(optimizer).__name__}: {len(optimizer.param_groups)} groups, {n / 1e6:.2f}M params, lr scale {rng}"


class WarmupStep:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then ``base`` times
    ``decay_rate`` every ``decay_steps`` optimizer steps (timm's ``step`` schedule, per update)."""

    def __init__(self, base: float, decay_steps: int, decay_rate: float, warmup_steps: int = 0,
                 warmup_start: float = 0.0):
        if decay_steps <= 0:
            raise ValueError(f"decay_steps must be positive, got {decay_steps}")
        self.base, self.decay_steps, self.decay_rate = float(base), int(decay_steps), float(decay_rate)
        self.warmup_steps, self.warmup_start = int(warmup_steps), float(warmup_start)

    def __call__(self, step: int) -> float:
        step = int(step)
        if step < self.warmup_steps:
            return self.warmup_start + (self.base - self.warmup_start) * step / self.warmup_steps
        return self.base * self.decay_rate ** ((step - self.warmup_steps) // self.decay_steps)

    def __repr__(self):
        return (f"WarmupStep(base={self.base}, decay_steps={self.decay_steps}, decay_rate={self.decay_rate}, "
                f"warmup_steps={self.warmup_steps}, warmup_start={self.warmup_start})")


def build_lr_schedule(optim_cfg: Mapping, lr: float, min_lr: float, warmup_lr: float, total_steps: int,
                      warmup_steps: int, updates_per_epoch: int):
    """The per-step lr of ``optim.sched``: cosine (lr -> min_lr) or step (x ``decay_rate`` every
    ``decay_epochs`` epochs after the warm-up), both after a linear warm-up from ``warmup_lr``."""
    from sparse_mim.utils.schedules import WarmupCosine
    sched = optim_cfg.get("sched", "cosine")
    if sched == "cosine":
        return WarmupCosine(lr, min_lr, total_steps, warmup_steps, warmup_start=warmup_lr)
    if sched == "step":
        return WarmupStep(lr, max(1, optim_cfg["decay_epochs"] * updates_per_epoch), optim_cfg["decay_rate"],
                          warmup_steps, warmup_start=warmup_lr)
    raise ValueError(f"optim.sched={sched!r}: choose one of {', '.join(SCHEDULES)}")
