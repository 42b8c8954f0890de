"""Benchmark: sparse backbone vs SparK's dense-masked simulation of the same weights.

For each model (default ResNet-50 and ConvNeXt-S at 224, batch 16, mask ratio 0.6,
train mode as in pre-training) it prints the forward + backward time of both, measured
in this process on the same weights and inputs (median of --repeats runs after one
warm-up, the two variants interleaved), and the peak memory of one forward + backward.

Peak memory on CPU is the growth of the resident set: each configuration runs in a
fresh subprocess that builds the model and the inputs, resets the kernel's RSS
high-water mark (``/proc/self/clear_refs`` <- 5), runs one step, and reports
``VmHWM - VmRSS(before)`` from ``/proc/self/status``. On CUDA (``--device cuda``) it is
``torch.cuda.max_memory_allocated`` growth, measured in this process.

    python tools/benchmark_backbone.py                       # the table in README.md, "Backbones"
    python tools/benchmark_backbone.py --models resnet18 --batch-size 4 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=r"`torch.cuda.amp.custom_(fwd|bwd)", category=FutureWarning)

import torch  # noqa: E402

import sparse_mim  # noqa: E402
from sparse_mim.backbones._testing import random_visible_mask  # noqa: E402


def build(name: str, input_size: int, batch_size: int, mask_ratio: float, device: str, seed: int = 0):
    """Sparse and dense-masked twins sharing weights, images, a SparK mask, per-map loss weights."""
    torch.manual_seed(seed)
    sparse = sparse_mim.create_backbone(name, sparse=True).to(device).train()
    dense = sparse_mim.create_backbone(name, sparse=False).to(device).train()
    dense.load_state_dict(sparse.state_dict())
    f = input_size // 32
    images = torch.randn(batch_size, 3, input_size, input_size, device=device)
    visible = random_visible_mask(batch_size, f, f, mask_ratio, torch.Generator().manual_seed(seed)).to(device)
    return sparse, dense, images, visible


def step(model, images, visible) -> None:
    """One forward + backward of a scalar loss over the four maps."""
    model.zero_grad(set_to_none=True)
    maps = model(images, visible)
    sum(m.float().square().mean() for m in maps).backward()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pair(sparse, dense, images, visible, repeats: int, device: str) -> tuple[float, float]:
    times = {"sparse": [], "dense": []}
    for i in range(repeats + 1):  # first round = warm-up
        for label, model in (("sparse", sparse), ("dense", dense)):
            sync(device)
            t0 = time.perf_counter()
            step(model, images, visible)
            sync(device)
            if i:
                times[label].append(time.perf_counter() - t0)
    return statistics.median(times["sparse"]), statistics.median(times["dense"])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def peak_memory_child(args) -> None:
    """Run in a fresh process: one step of one variant; print the RSS growth in MiB as JSON."""
    sparse, dense, images, visible = build(args.child_model, args.input_size, args.batch_size, args.mask_ratio, "cpu")
    model = sparse if args.child_variant == "sparse" else dense
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the RSS high-water mark
    step(model, images, visible)
    print(json.dumps({"peak_mib": (_status_kb("VmHWM") - before) / 1024}))


def peak_memory(name: str, variant: str, args) -> float:
    if args.device.startswith("cuda"):
        sparse, dense, images, visible = build(name, args.input_size, args.batch_size, args.mask_ratio, args.device)
        model = sparse if variant == "sparse" else dense
        step(model, images, visible)  # warm-up (caches, allocator)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, images, visible)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    cmd = [sys.executable, os.path.abspath(__file__), "--child-model", name, "--child-variant", variant,
           "--input-size", str(args.input_size), "--batch-size", str(args.batch_size),
           "--mask-ratio", str(args.mask_ratio), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory subprocess failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_small"])
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (after one warm-up)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    p.add_argument("--child-variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_model:
        return peak_memory_child(args)

    print(f"# backbone fwd+bwd, train mode, {args.input_size}px, batch {args.batch_size}, mask ratio "
          f"{args.mask_ratio}, device {args.device}, {args.threads} threads, torch {torch.__version__}")
    mem_how = "CUDA max_memory_allocated growth" if args.device.startswith("cuda") else \
        "RSS high-water-mark growth, fresh subprocess per variant"
    print(f"# time: median of {args.repeats} runs after 1 warm-up, same process; peak memory: {mem_how}")
    header = "| model | sparse time (s) | dense-masked time (s) | time ratio | sparse peak (MiB) | " \
             "dense-masked peak (MiB) | memory ratio |"
    print(header)
    print("|" + "---|" * 7)
    for name in args.models:
        sparse, dense, images, visible = build(name, args.input_size, args.batch_size, args.mask_ratio, args.device)
        t_sparse, t_dense = time_pair(sparse, dense, images, visible, args.repeats, args.device)
        del sparse, dense, images, visible
        if args.no_memory:
            m_sparse = m_dense = float("nan")
        else:
            m_sparse, m_dense = peak_memory(name, "sparse", args), peak_memory(name, "dense", args)
        print(f"| {name} | {t_sparse:.2f} | {t_dense:.2f} | {t_sparse / t_dense:.2f}x | {m_sparse:.0f} | "
              f"{m_dense:.0f} | {m_sparse / m_dense:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
