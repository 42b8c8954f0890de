"""Survey a timm convnet on the sparse engine: its MAC shares, and its distance to the dense-masked twin.

Used by ``tools/sparse_survey.py`` (the tables of docs/sparse_engine.md); plain functions, no timing.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .convert import active_mask, dense_masked, mask_at, sparsify
from .report import MacReport, mac_report
from .tensor import SparseMap

__all__ = ["timm_trunk", "random_patch_mask", "mac_shares", "compare_with_dense_masked"]


def timm_trunk(name: str, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    """``timm.create_model(name, num_classes=0, global_pool="")`` (no weights), in ``dtype``."""
    import timm
    return timm.create_model(name, num_classes=0, global_pool="", **kwargs).to(dtype)


def random_patch_mask(batch: int, gh: int, gw: int, mask_ratio: float, seed: int = 0) -> torch.Tensor:
    """SparK masking: each image keeps round(gh*gw*(1-ratio)) (at least 1) random patches; True = visible."""
    g = torch.Generator().manual_seed(seed)
    keep = max(1, round(gh * gw * (1 - mask_ratio)))
    order = torch.rand(batch, gh * gw, generator=g).argsort(1)
    m = torch.zeros(batch, gh * gw, dtype=torch.bool)
    m.scatter_(1, order[:, :keep], True)
    return m.view(batch, gh, gw)


def _features(model: nn.Module, x):
    return model.forward_features(x) if hasattr(model, "forward_features") else model(x)


def mac_shares(model: nn.Module, images: torch.Tensor, visible: torch.Tensor) -> MacReport:
    """One forward pass of ``sparsify(copy of model)`` under `mac_report` (no gradients)."""
    sparse = sparsify(copy.deepcopy(model)).eval()
    with torch.no_grad(), mac_report() as rep:
        _features(sparse, SparseMap.from_dense(images, visible, patch_size=images.shape[-1] // visible.shape[-1]))
    return rep


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-8) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor))


def compare_with_dense_masked(model: nn.Module, images: torch.Tensor, visible: torch.Tensor,
                              seed: int = 0) -> dict[str, Any]:
    """Sparse twin vs dense-masked twin of (copies of) ``model`` in its current mode (train: BN batch stats).

    Returns max relative errors of the output, the input gradient, the parameter gradients (each against
    its own largest value, at least 1e-8, and against the model's largest gradient), the floating buffers
    (against the largest buffer value), and the MAC report of the sparse forward pass.
    """
    sparse, masked = sparsify(copy.deepcopy(model)), dense_masked(copy.deepcopy(model))
    xs, xd = images.clone().requires_grad_(), images.clone().requires_grad_()
    patch = images.shape[-1] // visible.shape[-1]
    with mac_report() as rep:
        out_s = _features(sparse, SparseMap.from_dense(xs, visible, patch_size=patch))
    with active_mask(visible):
        out_d = _features(masked, xd * mask_at(xd))
        out_d = out_d * mask_at(out_d)
    dense_s = out_s.dense() if isinstance(out_s, SparseMap) else out_s
    g = torch.randn(out_d.shape, dtype=out_d.dtype, generator=torch.Generator().manual_seed(seed))
    (dense_s * g).sum().backward()
    (out_d * g).sum().backward()
    pairs = [(p_s.grad, p_d.grad) for p_s, p_d in zip(sparse.parameters(), masked.parameters())
             if p_d.grad is not None]
    scale = max((float(b.abs().max()) for _, b in pairs), default=1.0)
    bufs = [(b_s.double(), b_d.double()) for b_s, b_d in zip(sparse.buffers(), masked.buffers())
            if b_s.is_floating_point()]
    bscale = max((float(b.abs().max()) for _, b in bufs), default=1.0)
    return {
        "output": _rel(dense_s, out_d),
        "input_grad": _rel(xs.grad, xd.grad),
        "param_grad": max((_rel(a, b) for a, b in pairs), default=0.0),
        "param_grad_vs_largest": max((float((a - b).abs().max()) / scale for a, b in pairs), default=0.0),
        "buffers_vs_largest": max((float((a - b).abs().max()) / bscale for a, b in bufs), default=0.0),
        "sparse_output": isinstance(out_s, SparseMap),
        "report": rep,
    }
