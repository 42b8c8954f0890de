"""Benchmark: sparse backbone vs SparK's dense-masked simulation of the same weights.

For each model it measures, on the same weights, images and SparK mask:

* the share of the forward pass's multiply-adds that run on sparse kernels
  (`sparse_mim.sparse.report.mac_report`; the rest are dense ops on pooled maps and
  exact dense fallbacks);
* the forward + backward time of a training step (train mode, as in pre-training) of
  both twins, median of ``repeats`` runs after one warm-up, the two interleaved in one
  process;
* the peak memory of one step. On CPU: the growth of the resident set in a fresh
  subprocess (``python -m sparse_mim.backbones.benchmark --child ...``) that builds the
  model, runs one warm-up step (the conv autotuner times its candidates there), returns
  freed memory to the kernel (fixed glibc mmap threshold, ``malloc_trim``), resets the
  kernel's RSS high-water mark (``/proc/self/clear_refs`` <- 5), runs one step and
  reports ``VmHWM - VmRSS(before)``. On CUDA:
  ``torch.cuda.max_memory_allocated`` growth in this process.

`run_benchmark` returns one row per model; `format_table` renders them as a Markdown
table. ``tools/benchmark_backbone.py`` is the command line.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["FAMILIES", "build_twins", "train_step", "time_twins", "sparse_mac_share", "peak_memory",
           "run_benchmark", "format_table"]

# One model per family (the timm convnets SparK is meant to cover, plus the registered ResNet / ConvNeXt).
FAMILIES = ["resnet50", "resnet50d", "res2net50_26w_4s", "resnext50_32x4d", "seresnet50", "densenet121",
            "regnetx_002", "efficientnet_b0", "mobilenetv3_large_100", "cspresnet50", "repvgg_a0", "vgg11",
            "convnext_tiny", "convnextv2_tiny"]


def build_twins(name: str, input_size: int, batch_size: int, mask_ratio: float, device: str = "cpu", seed: int = 0):
    """Sparse and dense-masked twins sharing weights, plus images and a SparK mask (drop-path off)."""
    import sparse_mim
    from ..testing import random_visible_mask

    torch.manual_seed(seed)
    sparse = sparse_mim.create_backbone(name, sparse=True, drop_path_rate=0.0).to(device).train()
    dense = sparse_mim.create_backbone(name, sparse=False, drop_path_rate=0.0).to(device).train()
    dense.load_state_dict(sparse.state_dict())
    f = input_size // 32
    images = torch.randn(batch_size, 3, input_size, input_size, device=device)
    visible = random_visible_mask(batch_size, f, f, mask_ratio, torch.Generator().manual_seed(seed)).to(device)
    return sparse, dense, images, visible


def train_step(model, images, visible) -> None:
    """One forward + backward of a scalar loss over the four maps."""
    model.zero_grad(set_to_none=True)
    maps = model(images, visible)
    sum(m.float().square().mean() for m in maps).backward()


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_twins(sparse, dense, images, visible, repeats: int, device: str = "cpu") -> tuple[float, float]:
    """Median fwd+bwd seconds of (sparse, dense-masked) over ``repeats`` runs after one warm-up, interleaved."""
    times: dict[str, list[float]] = {"sparse": [], "dense": []}
    for i in range(repeats + 1):  # first round = warm-up (also lets the conv autotuner settle)
        for label, model in (("sparse", sparse), ("dense", dense)):
            _sync(device)
            t0 = time.perf_counter()
            train_step(model, images, visible)
            _sync(device)
            if i:
                times[label].append(time.perf_counter() - t0)
    return statistics.median(times["sparse"]), statistics.median(times["dense"])


def sparse_mac_share(sparse, images, visible) -> tuple[float, list[dict]]:
    """(share of forward MACs on sparse kernels, fallback rows) of one forward of the sparse twin."""
    try:
        from ..sparse.report import mac_report
    except ImportError:  # an engine without MAC accounting
        return math.nan, []
    with torch.no_grad(), mac_report() as rep:
        sparse(images, visible)
    return rep.sparse_share, rep.fallback_rows()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (peak memory on CPU needs Linux)")


def _release_free_memory() -> None:
    """Hand freed heap pages back to the kernel (glibc), so that RSS growth counts the measured step only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _child(argv: Sequence[str]) -> None:
    """Fresh-process peak memory of one step of one variant; prints {"peak_mib": ...} as JSON."""
    p = argparse.ArgumentParser()
    for key in ("--model", "--variant"):
        p.add_argument(key, required=True)
    p.add_argument("--input-size", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--mask-ratio", type=float, required=True)
    p.add_argument("--threads", type=int, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    sparse, dense, images, visible = build_twins(a.model, a.input_size, a.batch_size, a.mask_ratio)
    model = sparse if a.variant == "sparse" else dense
    del sparse, dense
    train_step(model, images, visible)  # warm-up: autotuner, caches
    model.zero_grad(set_to_none=True)
    gc.collect()
    _release_free_memory()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the RSS high-water mark
    train_step(model, images, visible)
    print(json.dumps({"peak_mib": (_status_kb("VmHWM") - before) / 1024}))


def peak_memory(name: str, variant: str, input_size: int, batch_size: int, mask_ratio: float, device: str = "cpu",
                threads: Optional[int] = None) -> float:
    """Peak memory (MiB) of one training step of the ``variant`` ("sparse" / "dense") twin."""
    if str(device).startswith("cuda"):
        sparse, dense, images, visible = build_twins(name, input_size, batch_size, mask_ratio, device)
        model = sparse if variant == "sparse" else dense
        train_step(model, images, visible)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, images, visible)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    cmd = [sys.executable, "-m", "sparse_mim.backbones.benchmark", "--child", "--model", name, "--variant", variant,
           "--input-size", str(input_size), "--batch-size", str(batch_size), "--mask-ratio", str(mask_ratio),
           "--threads", str(threads or torch.get_num_threads())]
    # A fixed mmap threshold: glibc returns every large freed block at once (no growing threshold that
    # keeps the warm-up step's blocks in the heap, which would hide the measured step's peak).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"peak-memory subprocess for {name} ({variant}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def run_benchmark(models: Sequence[str] = FAMILIES, input_size: int = 128, batch_size: int = 4,
                  mask_ratio: float = 0.6, repeats: int = 2, device: str = "cpu", memory: bool = True,
                  on_row: Optional[Callable[[dict], Any]] = None) -> list[dict]:
    """One row per model: MAC share, times, peak memories and their sparse / dense-masked ratios."""
    from tqdm import tqdm

    rows = []
    for name in tqdm(models, desc="backbones", disable=on_row is not None and len(models) < 2):
        sparse, dense, images, visible = build_twins(name, input_size, batch_size, mask_ratio, device)
        share, fallbacks = sparse_mac_share(sparse, images, visible)
        t_sparse, t_dense = time_twins(sparse, dense, images, visible, repeats, device)
        del sparse, dense, images, visible
        m_sparse = m_dense = math.nan
        if memory:
            m_sparse = peak_memory(name, "sparse", input_size, batch_size, mask_ratio, device)
            m_dense = peak_memory(name, "dense", input_size, batch_size, mask_ratio, device)
        row = {"model": name, "sparse_mac_share": share, "fallbacks": fallbacks, "time_sparse": t_sparse,
               "time_dense": t_dense, "time_ratio": t_sparse / t_dense, "mem_sparse": m_sparse,
               "mem_dense": m_dense, "mem_ratio": m_sparse / m_dense if m_dense else math.nan}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


TABLE_HEADER = ("| model | MACs on sparse kernels | sparse fwd+bwd (s) | dense-masked fwd+bwd (s) | time ratio | "
                "sparse peak (MiB) | dense-masked peak (MiB) | memory ratio |\n|" + "---|" * 8)


def format_row(r: dict) -> str:
    return (f"| {r['model']} | {r['sparse_mac_share']:.1%} | {r['time_sparse']:.2f} | {r['time_dense']:.2f} | "
            f"{r['time_ratio']:.2f}x | {r['mem_sparse']:.0f} | {r['mem_dense']:.0f} | {r['mem_ratio']:.2f}x |")


def format_table(rows: Sequence[dict]) -> str:
    return "\n".join([TABLE_HEADER] + [format_row(r) for r in rows])


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    _child(sys.argv[2:])
