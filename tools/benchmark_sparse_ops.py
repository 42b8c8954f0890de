#!/usr/bin/env python
"""Benchmark every sparse op against its dense-masked twin at ResNet-50 / ConvNeXt shapes.

For each op: the sparse twin on a `SparseMap` vs the dense-masked baseline
(SparK's simulation: the dense op on the zero-filled map, output multiplied by
the mask; BatchNorm with visible-site statistics), measured in the same process,
interleaved, median of ``--repeats`` runs. Forward and forward+backward times,
their ratio (sparse / dense; < 1 is a gain), the activation memory kept for
backward (CPU) or the peak memory (CUDA), and the equivalence error (max
relative error of the output and of the input / weight gradients).

    python tools/benchmark_sparse_ops.py                      # batch 16, 224 px, mask ratio 0.6
    python tools/benchmark_sparse_ops.py --paths all          # also every forced stride-1 conv path
    python tools/benchmark_sparse_ops.py --only conv3x3 --repeats 9
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.custom_(fwd|bwd).*")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from sparse_mim.sparse import SparseMap, active_mask, dense_masked, functional as SF, mask_at, sparsify  # noqa: E402


class ChannelsLast(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _grn(c):
    from timm.layers.grn import GlobalResponseNorm
    g = GlobalResponseNorm(c, channels_last=True)
    nn.init.normal_(g.weight)
    nn.init.normal_(g.bias)
    return ChannelsLast(g)


def _ln(c):
    return ChannelsLast(nn.LayerNorm(c))


# (name, input side, input channels, layer factory): ResNet-50 at 224 (stem 112, stages 56/28/14/7) and ConvNeXt-S
CASES = [
    ("conv3x3", 56, 64, lambda c: nn.Conv2d(c, 64, 3, padding=1, bias=False)),
    ("conv3x3", 28, 128, lambda c: nn.Conv2d(c, 128, 3, padding=1, bias=False)),
    ("conv3x3", 14, 256, lambda c: nn.Conv2d(c, 256, 3, padding=1, bias=False)),
    ("conv3x3", 7, 512, lambda c: nn.Conv2d(c, 512, 3, padding=1, bias=False)),
    ("conv1x1", 56, 64, lambda c: nn.Conv2d(c, 256, 1, bias=False)),
    ("conv1x1", 56, 256, lambda c: nn.Conv2d(c, 64, 1, bias=False)),
    ("conv1x1", 28, 128, lambda c: nn.Conv2d(c, 512, 1, bias=False)),
    ("conv1x1", 14, 256, lambda c: nn.Conv2d(c, 1024, 1, bias=False)),
    ("conv1x1", 7, 512, lambda c: nn.Conv2d(c, 2048, 1, bias=False)),
    ("stem7x7s2", 224, 3, lambda c: nn.Conv2d(c, 64, 7, 2, 3, bias=False)),
    ("conv3x3s2", 56, 128, lambda c: nn.Conv2d(c, 128, 3, 2, 1, bias=False)),
    ("conv1x1s2", 56, 256, lambda c: nn.Conv2d(c, 512, 1, 2, bias=False)),
    ("conv2x2s2", 56, 96, lambda c: nn.Conv2d(c, 192, 2, 2)),
    ("stem4x4s4", 224, 3, lambda c: nn.Conv2d(c, 96, 4, 4)),
    ("dw7x7", 56, 96, lambda c: nn.Conv2d(c, c, 7, padding=3, groups=c)),
    ("dw7x7", 28, 192, lambda c: nn.Conv2d(c, c, 7, padding=3, groups=c)),
    ("dw7x7", 14, 384, lambda c: nn.Conv2d(c, c, 7, padding=3, groups=c)),
    ("dw7x7", 7, 768, lambda c: nn.Conv2d(c, c, 7, padding=3, groups=c)),
    ("bn", 56, 256, lambda c: nn.BatchNorm2d(c)),
    ("bn", 14, 1024, lambda c: nn.BatchNorm2d(c)),
    ("ln", 56, 96, _ln),
    ("grn", 56, 384, _grn),
    ("maxpool3x3s2", 112, 64, lambda c: nn.MaxPool2d(3, 2, 1)),
]
STRIDE1_PATHS = {"conv3x3": ("gather", "windows", "dense", "spconv"), "dw7x7": ("gather", "windows", "dense")}


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward (activation memory of training)."""
    seen = {}

    def pack(t):
        try:
            ptr = t.untyped_storage().data_ptr()
            seen[ptr] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _time(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def run_case(name, side, channels, factory, args, path=None):
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    B, grid = args.batch, args.size // 32
    keep = round(grid * grid * (1 - args.mask_ratio))
    visible = torch.zeros(B, grid * grid, dtype=torch.bool)
    visible.scatter_(1, torch.rand(B, grid * grid).argsort(1)[:, :keep], True)
    visible = visible.view(B, grid, grid).to(device)
    factor = side // grid
    up = visible.repeat_interleave(factor, 1).repeat_interleave(factor, 2)[:, None]
    x = torch.randn(B, channels, side, side, device=device)
    if name.startswith("maxpool"):
        x = x.relu()
    x = x * up

    layer = factory(channels).to(device).train()
    sparse_layer = sparsify(copy.deepcopy(layer))
    masked_layer = dense_masked(copy.deepcopy(layer))
    previous = SF.set_conv_backend(path or "auto")

    # the sparse input is built once, so its index tables (neighbour tables, coarse masks, spconv pairs) are
    # built by the first call and reused, as every later layer at the same scale of a model reuses them
    base = SparseMap.from_dense(x, visible)
    xs = base.features.clone().requires_grad_()
    xd = x.clone().requires_grad_()

    def sparse_map():
        return sparse_layer(base.replace_features(xs))

    def sparse_fwd():
        return sparse_map().features

    def dense_fwd():
        with active_mask(visible):
            if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
                y = type(layer).forward(masked_layer, xd)  # dense op on the zero-filled input, then the mask
            else:
                y = masked_layer(xd)
            return y * mask_at(y)

    def fwd_bwd(fwd):
        def run():
            y = fwd()
            y.backward(torch.ones_like(y))
        return run

    def no_grad(fwd):
        def run():
            with torch.no_grad():
                fwd()
        return run

    # equivalence (and warm-up: index tables are built here, once per scale, as in a model)
    out_s = sparse_map().dense()
    out_d = dense_fwd()
    g = torch.randn_like(out_d)
    (out_s * g).sum().backward()
    (out_d * g).sum().backward()
    err = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))  # noqa: E731
    fwd_err = err(out_s.detach(), out_d.detach())
    grad_errs = [err(xs.grad, xd.grad.permute(0, 2, 3, 1)[up[:, 0]])]  # compared at the visible sites
    for ps, pd in zip(sparse_layer.parameters(), masked_layer.parameters()):
        grad_errs.append(err(ps.grad, pd.grad))

    sparse_mem, _ = _saved_bytes(sparse_fwd)
    dense_mem, _ = _saved_bytes(dense_fwd)
    timings = {k: [] for k in ("sf", "df", "sb", "db")}
    fns = {"sf": no_grad(sparse_fwd), "df": no_grad(dense_fwd), "sb": fwd_bwd(sparse_fwd), "db": fwd_bwd(dense_fwd)}
    for fn in fns.values():
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fns["sb"]()
        sparse_mem = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fns["db"]()
        dense_mem = torch.cuda.max_memory_allocated()
    for _ in range(args.repeats):  # interleaved, so load changes hit both sides alike
        for key, fn in fns.items():
            timings[key].append(_time(fn, sync) * 1000)
    SF.set_conv_backend(previous)
    med = {k: statistics.median(v) for k, v in timings.items()}
    return {
        "op": name, "shape": f"{side}x{side}x{channels}", "path": path or "auto",
        "sf": med["sf"], "df": med["df"], "sb": med["sb"], "db": med["db"],
        "mem_s": sparse_mem / 2 ** 20, "mem_d": dense_mem / 2 ** 20, "fwd_err": fwd_err, "grad_err": max(grad_errs),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224, help="image side (multiple of 32)")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default=None, help="comma-separated op names (e.g. conv3x3,dw7x7)")
    parser.add_argument("--paths", default="auto", choices=("auto", "all"),
                        help="'all': also time every forced stride-1 conv implementation")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else None
    scale = args.size / 224
    print(f"# sparse vs dense-masked: batch {args.batch}, {args.size}px, mask ratio {args.mask_ratio}, "
          f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, median of "
          f"{args.repeats}")
    header = ("| op | input (HxWxC) | path | fwd sparse ms | fwd dense ms | fwd ratio | fwd+bwd sparse ms | "
              "fwd+bwd dense ms | fwd+bwd ratio | act. mem sparse / dense MB | fwd err | grad err |")
    print(header)
    print("|" + "---|" * 12)
    for name, side, channels, factory in CASES:
        if only and name not in only:
            continue
        side = int(round(side * scale))
        paths = [None]
        if args.paths == "all" and name in STRIDE1_PATHS:
            paths += list(STRIDE1_PATHS[name])
        for path in paths:
            try:
                r = run_case(name, side, channels, factory, args, path)
            except Exception as e:  # noqa: BLE001 - report and go on with the other ops
                print(f"| {name} | {side}x{side}x{channels} | {path or 'auto'} | failed: {type(e).__name__}: {e} |")
                continue
            print(f"| {r['op']} | {r['shape']} | {r['path']} | {r['sf']:.1f} | {r['df']:.1f} | {r['sf'] / r['df']:.2f} "
                  f"| {r['sb']:.1f} | {r['db']:.1f} | {r['sb'] / r['db']:.2f} | {r['mem_s']:.0f} / {r['mem_d']:.0f} "
                  f"| {r['fwd_err']:.1e} | {r['grad_err']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
