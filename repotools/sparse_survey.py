"""Survey a timm convnet on the sparse engine: its MAC shares, and its distance to the dense-masked twin.

The tables of docs/sparse_engine.md; plain functions, no timing. `main` is ``tools/sparse_survey.py``:

    python tools/sparse_survey.py --models resnet50d,efficientnet_b0            # MAC shares at 224 px
    python tools/sparse_survey.py --models regnetx_002 --check --size 64x96      # equivalence, float64
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from sparse_mim.sparse import MacReport, SparseMap, active_mask, dense_masked, mac_report, mask_at, sparsify

__all__ = ["timm_trunk", "random_patch_mask", "mac_shares", "compare_with_dense_masked", "main"]


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


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def main(argv=None) -> int:
    """``tools/sparse_survey.py``: one table row per model."""
    import argparse
    from sparse_mim.sparse import functional as SF
    from repotools.benchmark_backbone import FAMILIES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(FAMILIES),
                        help="comma-separated timm model names (default: one per family, as the backbone benchmark)")
    parser.add_argument("--size", type=_size, default=(224, 224), help="H or HxW, multiples of 32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--check", action="store_true", help="compare with the dense-masked twin (float64)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--conv-backend", default="gather", help="conv path mode (see docs/autotune.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    SF.set_conv_backend(args.conv_backend)
    (H, W), B = args.size, args.batch
    if H % 32 or W % 32:
        parser.error(f"--size {H}x{W}: sides must be multiples of 32")
    visible = random_patch_mask(B, H // 32, W // 32, args.mask_ratio)
    dtype = torch.float64 if args.check else torch.float32
    print(f"# batch {B}, {H}x{W}, mask ratio {args.mask_ratio} ({int(visible[0].sum())} of {visible[0].numel()} "
          f"patches visible), {dtype}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    if args.check:
        print("| model | output | input grad | param grads (own max, floor 1e-8) | param grads (model max) | "
              "BN buffers (largest) | fallback ops |")
        print("|---|---|---|---|---|---|---|")
    else:
        print("| model | MACs (G) | sparse kernels | dense (pooled SE vectors) | exact fallback | fallback ops |")
        print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm_trunk(name, dtype)
        images = torch.randn(B, 3, H, W, dtype=dtype)
        if args.check:
            r = compare_with_dense_masked(model.train(), images, visible)
            ops = ", ".join(sorted({row["op"] for row in r["report"].fallback_rows()})) or "-"
            print(f"| {name} | {r['output']:.1e} | {r['input_grad']:.1e} | {r['param_grad']:.1e} | "
                  f"{r['param_grad_vs_largest']:.1e} | {r['buffers_vs_largest']:.1e} | {ops} |", flush=True)
        else:
            rep = mac_shares(model, images, visible)
            t = max(rep.total_macs, 1)
            ops = ", ".join(sorted({row["op"] for row in rep.fallback_rows()})) or "-"
            print(f"| {name} | {t / 1e9:.2f} | {rep.macs('sparse') / t:.1%} | {rep.macs('dense') / t:.2%} | "
                  f"{rep.macs('fallback') / t:.2%} | {ops} |", flush=True)
    return 0
