"""Benchmark: sparse backbone vs SparK's dense-masked simulation of the same weights.

For each model it measures, on the same weights, images and SparK mask:

* the share of the forward pass's multiply-adds that run on sparse kernels
  (`sparse_mim.sparse.report.mac_report`; the rest are dense ops on pooled maps and
  exact dense fallbacks);
* the forward + backward time of a training step (train mode, as in pre-training) of
  both twins, median of ``repeats`` runs after one warm-up, the two interleaved in one
  process;
* the peak memory of one step, after the timed runs, in the same process. On CPU: the
  growth of the resident set during the step, read from the kernel's RSS high-water mark
  (``/proc/self/clear_refs`` <- 5, then ``VmHWM - VmRSS(before)``), with glibc set to
  hand every large freed block back to the kernel (``M_MMAP_THRESHOLD`` fixed at
  128 KiB when the benchmark starts) so that memory freed by an earlier step cannot
  hide the peak. On CUDA: ``torch.cuda.max_memory_allocated`` growth.

`run_benchmark` returns one row per model; `format_table` renders them as a Markdown
table; `main` is the command line (``tools/benchmark_backbone.py``).

    python tools/benchmark_backbone.py                                   # every family, 128 px, batch 4
    python tools/benchmark_backbone.py --models resnet50 convnext_small --input-size 224 --batch-size 16
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["FAMILIES", "build_twins", "train_step", "time_twins", "sparse_mac_share", "peak_memory",
           "run_benchmark", "format_table", "main"]

# One model per family (the timm convnets SparK is meant to cover, plus the registered ResNet / ConvNeXt).
FAMILIES = ["resnet50", "resnet50d", "res2net50_26w_4s", "resnext50_32x4d", "seresnet50", "densenet121",
            "regnetx_002", "efficientnet_b0", "mobilenetv3_large_100", "cspresnet50", "repvgg_a0", "vgg11",
            "convnext_tiny", "convnextv2_tiny"]


def build_twins(name: str, input_size: int, batch_size: int, mask_ratio: float, device: str = "cpu", seed: int = 0):
    """Sparse and dense-masked twins sharing weights, plus images and a SparK mask (drop-path off)."""
    import sparse_mim
    from sparse_mim.testing import random_visible_mask

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
        from sparse_mim.sparse import mac_report
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


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _fix_mmap_threshold() -> None:
    """glibc: serve every block >= 128 KiB by mmap and return it to the kernel when freed (M_MMAP_THRESHOLD).

    Without this the threshold grows as blocks are freed and the heap keeps them, so a
    step that reuses memory freed by an earlier one would not show in the RSS.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD




def peak_memory(model, images, visible, device: str = "cpu") -> float:
    """Peak memory (MiB) that one training step of ``model`` adds to what is allocated before it.

    CPU: growth of the resident set, measured with the kernel's RSS high-water mark
    (reset through ``/proc/self/clear_refs``); with glibc's mmap threshold fixed (as
    `run_benchmark` does) freed large blocks are back with the kernel. Needs Linux. CUDA: ``torch.cuda.max_memory_allocated`` growth.
    """
    model.zero_grad(set_to_none=True)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, images, visible)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        gc.collect()
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark
        train_step(model, images, visible)
        peak = (_status_kb("VmHWM") - before) / 1024
    model.zero_grad(set_to_none=True)
    return peak


def run_benchmark(models: Sequence[str] = FAMILIES, input_size: int = 128, batch_size: int = 4,
                  mask_ratio: float = 0.6, repeats: int = 2, device: str = "cpu", memory: bool = True,
                  on_row: Optional[Callable[[dict], Any]] = None) -> list[dict]:
    """One row per model: MAC share, times, peak memories and their sparse / dense-masked ratios."""
    from tqdm import tqdm

    if not str(device).startswith("cuda"):
        _fix_mmap_threshold()  # once, before the models are built
    from sparse_mim.utils.device_perf import apply_perf_settings
    perf = apply_perf_settings(device)  # cudnn.benchmark / channels-last as training sets them
    rows = []
    for name in tqdm(models, desc="backbones", disable=on_row is not None and len(models) < 2):
        sparse, dense, images, visible = build_twins(name, input_size, batch_size, mask_ratio, device)
        perf.prepare_model(dense)
        share, fallbacks = sparse_mac_share(sparse, images, visible)
        t_sparse, t_dense = time_twins(sparse, dense, images, visible, repeats, device)
        m_sparse = m_dense = math.nan
        if memory:  # after the timed runs: caches and the conv autotuner are warm
            m_sparse = peak_memory(sparse, images, visible, device)
            m_dense = peak_memory(dense, images, visible, device)
        del sparse, dense, images, visible
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


def main(argv=None) -> int:
    """``tools/benchmark_backbone.py``: print the header, then one table row per model as it is measured."""
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=FAMILIES, help="registered or timm model names")
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per variant (after one warm-up)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# backbone fwd+bwd, train mode, {args.input_size}px, batch {args.batch_size}, mask ratio "
          f"{args.mask_ratio}, device {args.device}, {args.threads} threads, torch {torch.__version__}")
    print(f"# time: median of {args.repeats} runs after 1 warm-up, same process; MAC share: one forward; peak "
          "memory: " + ("CUDA max_memory_allocated growth" if args.device.startswith("cuda") else
                        "RSS high-water-mark growth of one step after the timed runs, same process"))
    print(TABLE_HEADER, flush=True)
    run_benchmark(args.models, args.input_size, args.batch_size, args.mask_ratio, args.repeats, args.device,
                  memory=not args.no_memory, on_row=lambda r: print(format_row(r), flush=True))
    return 0
