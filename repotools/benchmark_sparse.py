"""Benchmarks of the sparse engine: ``tools/benchmark_sparse_ops.py`` (`main_ops`) and
``tools/benchmark_pretrain.py`` (`main_pretrain`), whose command lines live here too.

Every benchmark measures the sparse code and its dense-masked twin in the same
process, interleaved so that load from other processes hits both alike, and
prints Markdown tables with ratios against the dense-masked baseline. The conv
path choice is a *mode* (`sparse_mim.sparse.autotune`): ``autotune`` (time
every exact implementation once per configuration, keep the fastest),
``table`` (fixed rules) or one forced path; several modes run side by side.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import statistics
import sys
import time
from typing import Callable, Sequence

import torch
from torch import nn

from sparse_mim.sparse import SparseMap, active_mask, autotune, dense_masked, mask_at, sparsify
from sparse_mim.sparse import functional as SF

__all__ = ["SPARSE_OP_CASES", "run_op_case", "sparse_ops_benchmark", "pretrain_benchmark", "AMP_DTYPES", "main_ops",
           "main_pretrain"]

AMP_DTYPES = {"off": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ==================================================================================================== sparse ops
class _ChannelsLast(nn.Module):
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
    return _ChannelsLast(g)


def _ln(c):
    return _ChannelsLast(nn.LayerNorm(c))


# (name, input side at 224, input channels, layer factory): ResNet-50 (stem 112, stages 56/28/14/7) and ConvNeXt-S
SPARSE_OP_CASES = [
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
# ops with more than one exact implementation (the modes differ there) and their forced paths
TUNABLE = {"conv3x3": ("gather", "windows", "dense", "spconv"), "dw7x7": ("gather", "windows", "dense"),
           "stem7x7s2": ("gather", "dense"), "conv3x3s2": ("gather", "dense"), "conv1x1s2": ("gather", "dense"),
           "conv2x2s2": ("gather", "dense"), "stem4x4s4": ("gather", "dense")}


def _saved_bytes(fn) -> tuple[int, object]:
    """Bytes of the distinct storages autograd keeps for backward (activation memory of training)."""
    seen = {}

    def pack(t):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _time(fn, device, clock=time.perf_counter) -> float:
    _sync(device)
    t = clock()
    fn()
    _sync(device)
    return clock() - t


def _clock(clock: str, device: torch.device):
    """Process CPU time (all threads; robust to other processes on a shared machine) or wall time."""
    return time.process_time if clock == "cpu" or (clock == "auto" and device.type == "cpu") else time.perf_counter


def run_op_case(name: str, side: int, channels: int, factory: Callable, batch: int = 16, size: int = 224,
                mask_ratio: float = 0.6, repeats: int = 5, device: str | torch.device = "cpu",
                mode: str = "autotune", clock: str = "auto") -> dict:
    """One op, sparse (under conv mode ``mode``) vs dense-masked: median times, memory, errors, chosen path."""
    device = torch.device(device)
    torch.manual_seed(0)
    grid = size // 32
    from sparse_mim.spark import random_visible_mask  # the one SparK mask generator
    visible = random_visible_mask(batch, (grid, grid), round(grid * grid * (1 - mask_ratio)), device=device)
    factor = side // grid
    up = visible.repeat_interleave(factor, 1).repeat_interleave(factor, 2)[:, None]
    x = torch.randn(batch, channels, side, side, device=device)
    if name.startswith("maxpool"):
        x = x.relu()
    x = x * up

    layer = factory(channels).to(device).train()
    sparse_layer = sparsify(copy.deepcopy(layer))
    masked_layer = dense_masked(copy.deepcopy(layer))
    previous = SF.set_conv_backend(mode)
    try:
        # the sparse input is built once, so its index tables are built by the first call and reused, as every
        # later layer at the same scale of a model reuses them
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

        # equivalence, and warm-up: index tables built, the fwd+bwd configuration tuned (autotune)
        tuned_before = autotune.tuning_seconds()
        autotune._S.last_path = None
        out_s = sparse_map().dense()
        path = autotune.last_path() or "-"
        tune_ms = (autotune.tuning_seconds() - tuned_before) * 1000
        out_d = dense_fwd()
        g = torch.randn_like(out_d)
        (out_s * g).sum().backward()
        (out_d * g).sum().backward()

        def err(a, b):
            return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

        fwd_err = err(out_s.detach(), out_d.detach())
        grad_errs = [err(xs.grad, xd.grad.permute(0, 2, 3, 1)[up[:, 0]])]  # compared at the visible sites
        for ps, pd in zip(sparse_layer.parameters(), masked_layer.parameters()):
            grad_errs.append(err(ps.grad, pd.grad))

        sparse_mem, _ = _saved_bytes(sparse_fwd)
        dense_mem, _ = _saved_bytes(dense_fwd)
        timings = {k: [] for k in ("sf", "df", "sb", "db")}
        fns = {"sf": no_grad(sparse_fwd), "df": no_grad(dense_fwd), "sb": fwd_bwd(sparse_fwd),
               "db": fwd_bwd(dense_fwd)}
        for fn in fns.values():  # (the forward-only configuration is tuned here)
            fn()
        tune_ms = (autotune.tuning_seconds() - tuned_before) * 1000
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            fns["sb"]()
            sparse_mem = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fns["db"]()
            dense_mem = torch.cuda.max_memory_allocated()
        for _ in range(repeats):  # interleaved, so load changes hit both sides alike
            for key, fn in fns.items():
                timings[key].append(_time(fn, device, _clock(clock, device)) * 1000)
    finally:
        SF.set_conv_backend(previous)
    med = {k: statistics.median(v) for k, v in timings.items()}
    return {"op": name, "shape": f"{side}x{side}x{channels}", "mode": mode, "path": path, "tune_ms": tune_ms,
            **med, "mem_s": sparse_mem / 2 ** 20, "mem_d": dense_mem / 2 ** 20, "fwd_err": fwd_err,
            "grad_err": max(grad_errs)}


def sparse_ops_benchmark(batch: int = 16, size: int = 224, mask_ratio: float = 0.6, repeats: int = 5,
                         device: str = "cpu", only: Sequence[str] | None = None,
                         modes: Sequence[str] = ("autotune", "table"), all_paths: bool = False,
                         clock: str = "auto", print_fn: Callable[[str], object] = print) -> list[dict]:
    """Every op of `SPARSE_OP_CASES` against its dense-masked twin, under each conv mode; prints a table."""
    only = set(only) if only else None
    scale = size / 224
    autotune.reset()
    from sparse_mim.utils.device_perf import apply_perf_settings
    apply_perf_settings(device)  # cudnn.benchmark as training sets it
    print_fn(f"# sparse vs dense-masked: batch {batch}, {size}px, mask ratio {mask_ratio}, device {device}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {repeats}; "
             f"{'process CPU' if _clock(clock, torch.device(device)) is time.process_time else 'wall'} ms; "
             f"autotune cache {autotune.cache_file(device) or 'off'}")
    print_fn("| op | input (HxWxC) | mode | path | fwd sparse ms | fwd dense ms | fwd ratio | fwd+bwd sparse ms | "
             "fwd+bwd dense ms | fwd+bwd ratio | act. mem sparse / dense MB | tuning ms | fwd err | grad err |")
    print_fn("|" + "---|" * 14)
    rows = []
    for name, side, channels, factory in SPARSE_OP_CASES:
        if only and name not in only:
            continue
        side = int(round(side * scale))
        run_modes = list(modes) if name in TUNABLE else [modes[0] if modes else "autotune"]
        if all_paths and name in TUNABLE:
            run_modes += [p for p in TUNABLE[name] if p not in run_modes]
        for mode in run_modes:
            try:
                r = run_op_case(name, side, channels, factory, batch, size, mask_ratio, repeats, device, mode,
                                clock)
            except Exception as e:  # noqa: BLE001 - report and go on with the other ops
                print_fn(f"| {name} | {side}x{side}x{channels} | {mode} | failed: {type(e).__name__}: {e} |")
                continue
            rows.append(r)
            label = mode if name in TUNABLE else "-"
            print_fn(f"| {r['op']} | {r['shape']} | {label} | {r['path']} | {r['sf']:.1f} | {r['df']:.1f} | "
                     f"{r['sf'] / r['df']:.2f} | {r['sb']:.1f} | {r['db']:.1f} | **{r['sb'] / r['db']:.2f}** | "
                     f"{r['mem_s']:.0f} / {r['mem_d']:.0f} | {r['tune_ms']:.0f} | {r['fwd_err']:.1e} | "
                     f"{r['grad_err']:.1e} |")
    if autotune.choices():
        print_fn("")
        print_fn(autotune.format_table())
    return rows


# ==================================================================================================== pre-training step
PARTS = ("encoder", "densify", "decoder")


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward (activation memory), parameters excluded."""

    def __init__(self, model):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages = {}

    def pack(self, t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.param_ptrs:
                self.storages[ptr] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @contextlib.contextmanager
    def track(self):
        self.storages = {}
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield

    @property
    def total(self):
        return sum(self.storages.values())


def _detach_maps(maps):
    return [m.replace_features(m.features.detach().requires_grad_()) if isinstance(m, SparseMap)
            else m.detach().requires_grad_() for m in maps]


def _tensors(maps):
    return [m.features if isinstance(m, SparseMap) else m for m in maps]


def timed_step(model, optimizer, scaler, images, visible, device, amp_dtype, clock=time.perf_counter):
    """One step, split at the encoder/densify and densify/decoder boundaries. Returns times (s), bytes, loss."""
    saved = _SavedBytes(model)
    times, mem = {}, {}
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t = clock()
    with autocast:
        with saved.track():
            features = model.forward_encoder(images, visible)
        mem["encoder"] = saved.total
        _sync(device)
        times["fwd_encoder"] = clock() - t
        t = clock()
        features_in = _detach_maps(features)
        with saved.track():
            to_decoder = model.densify(features_in, visible)
        mem["densify"] = saved.total
        _sync(device)
        times["fwd_densify"] = clock() - t
        t = clock()
        to_decoder_in = [x.detach().requires_grad_() for x in to_decoder]
        with saved.track():
            reconstruction = model.forward_decoder(to_decoder_in)
            loss = model.forward_loss(images, reconstruction.float(), visible)
        mem["decoder"] = saved.total
        _sync(device)
        times["fwd_decoder"] = clock() - t
    t = clock()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    _sync(device)
    times["bwd_decoder"] = clock() - t
    t = clock()
    torch.autograd.backward(to_decoder, [x.grad for x in to_decoder_in])
    _sync(device)
    times["bwd_densify"] = clock() - t
    t = clock()
    torch.autograd.backward(_tensors(features), [x.grad for x in _tensors(features_in)])
    _sync(device)
    times["bwd_encoder"] = clock() - t
    t = clock()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    _sync(device)
    times["optimizer"] = clock() - t
    times["step"] = sum(times.values())
    if device.type == "cuda":
        mem["peak_cuda"] = torch.cuda.max_memory_allocated(device)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    return times, mem, loss.item()


def count_macs(model, size, device) -> dict:
    """Multiply-adds per image of the dense model's forward, split by part (FlopCounterMode counts 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode
    images = torch.randn(1, 3, *size, device=device)
    visible = model.mask(1, device, generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images, visible)
    counts = counter.get_flop_counts()

    def total(pattern):
        return sum(sum(ops.values()) for name, ops in counts.items() if re.fullmatch(pattern, name)) / 2 / 1e9
    return {"encoder": total(r"SparK\.sparse_encoder\.sp_cnn"), "densify": total(r"SparK\.densify_(projs|norms)\.\d+"),
            "decoder": total(r"SparK\.dense_decoder"), "total": total(r"Global")}


def _fmt_s(x):
    return f"{x:.3f}" if x < 10 else f"{x:.2f}"


def _fmt_mb(x):
    return f"{x / 2 ** 20:.0f}"


def pretrain_benchmark(backbones: Sequence[str] = ("resnet50", "convnext_small"), batch: int = 16,
                       input_size: Sequence[int] = (224,), mask_ratio: float = 0.6, decoder_width: int = 768,
                       steps: int = 3, warmup: int = 1, device: str = "cpu",
                       modes: Sequence[str] = ("autotune", "table", "dense"), amp: Sequence[str] = ("off",),
                       channels_last: bool | None = None, flops: bool = False, seed: int = 0, clock: str = "auto",
                       autotune_cache: str | bool = False, print_fn: Callable[[str], object] = print,
                       progress: Callable[[str], object] | None = None) -> dict:
    """Full SparK steps (fwd, bwd, LAMB) under each conv mode and the dense-masked twin, interleaved.

    ``modes``: conv modes of the sparse model (``autotune``, ``table``, ``gather``, ...) and ``dense`` (the
    dense-masked twin, the baseline of every ratio). ``amp``: precisions (``off`` | ``bf16`` | ``fp16``), each
    a block of rows. The autotuner starts empty for every backbone (``autotune_cache=False``) so its tuning
    overhead is measured: the extra time of its first step over the table's first step, and how many steps
    of its gain pay it back. Returns the medians and the summaries.
    """
    from timm.optim import Lamb
    from sparse_mim.spark import SparK, param_groups

    if progress is None:
        def progress(line):
            print(line, file=sys.stderr, flush=True)
    device = torch.device(device)
    from sparse_mim.utils.device_perf import apply_perf_settings  # cudnn.benchmark / channels-last as training sets them
    perf = apply_perf_settings(device)
    if channels_last is None:
        channels_last = perf.channels_last
    perf = dataclasses.replace(perf, channels_last=channels_last)
    use_cpu_clock = clock == "cpu" or (clock == "auto" and device.type == "cpu")
    clk = _clock(clock, device)
    for m in modes:
        if m != "dense" and autotune.ALIASES.get(m, m) not in autotune.MODES:
            raise ValueError(f"unknown mode {m!r}: use dense or a conv mode {autotune.MODES}")
    for a in amp:
        if a not in AMP_DTYPES:
            raise ValueError(f"unknown amp setting {a!r}: use one of {tuple(AMP_DTYPES)}")
    size = tuple(input_size) * (2 if len(input_size) == 1 else 1)
    previous_cache = autotune._S.cache_setting
    autotune.set_cache(autotune_cache)
    print_fn(f"# SparK pre-training step: batch {batch}, {size[0]}x{size[1]}, mask ratio {mask_ratio}, decoder "
             f"width {decoder_width}, device {device}"
             f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, channels_last {channels_last}; "
             f"{'process CPU' if use_cpu_clock else 'wall'} seconds, median of {steps} steps after {warmup} "
             f"warm-up; autotune cache {autotune.cache_file(device) or 'off'}")
    header = ("| backbone | amp | mode | fwd enc | fwd densify | fwd dec+loss | bwd dec+loss | bwd densify | bwd enc | "
              "optim | step (s) | step ratio | vs fp32 dense-masked | first step (s) | act. MB enc / densify / dec | "
              "enc act. ratio |"
              + (" peak MB |" if device.type == "cuda" else ""))
    rows, summaries, results_all = [], [], {}
    previous_mode = autotune.get_mode()
    try:
        for name in backbones:
            autotune.reset()
            torch.manual_seed(seed)
            base = SparK(name, input_size=size, mask_ratio=mask_ratio, decoder_width=decoder_width)
            models = {}
            for mode in modes:
                models[mode] = base.dense_reference() if mode == "dense" else copy.deepcopy(base)
            for a in amp:
                autotune.reset()
                dtype = AMP_DTYPES[a]
                opts, scalers = {}, {}
                run_models = {m: copy.deepcopy(model) for m, model in models.items()} if len(amp) > 1 else models
                for mode, model in run_models.items():
                    model.to(device).train()
                    perf.prepare_model(model)
                    beta2 = 0.95 if "resnet" in name else 0.999
                    opts[mode] = Lamb(param_groups(model, 0.04), lr=2e-4 * batch / 256, betas=(0.9, beta2),
                                      max_grad_norm=5.0)
                    scalers[mode] = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
                results = {mode: [] for mode in run_models}
                first = {}
                tuning_s = 0.0
                gen = torch.Generator().manual_seed(seed)
                for step in range(warmup + steps):
                    images = torch.randn(batch, 3, *size, generator=gen).to(device)
                    visible = base.mask(batch, device, generator=gen)
                    for mode, model in run_models.items():
                        if mode != "dense":
                            autotune.set_mode(mode)
                        before = autotune.tuning_seconds()
                        times, mem, loss = timed_step(model, opts[mode], scalers[mode], images, visible, device,
                                                      dtype, clk)
                        if mode == "autotune":
                            tuning_s += autotune.tuning_seconds() - before
                        if step == 0:
                            first[mode] = times["step"]
                        if step >= warmup:
                            results[mode].append((times, mem))
                        progress(f"  {name} {a} {mode} step {step}: {times['step']:.2f}s loss {loss:.4f}")
                med = {mode: {k: statistics.median(r[0][k] for r in res) for k in res[0][0]}
                       for mode, res in results.items()}
                mem = {mode: res[-1][1] for mode, res in results.items()}
                results_all[(name, a)] = {"median": med, "first": first, "tuning_s": tuning_s,
                                          "choices": autotune.choices()}
                for mode in run_models:
                    t, m = med[mode], mem[mode]
                    ratio = t["step"] / med["dense"]["step"] if "dense" in med else float("nan")
                    # against the fp32 dense-masked step of this backbone (the `off` block, when it ran)
                    fp32_dense = results_all.get((name, "off"), results_all.get((name, "fp32"), {}))
                    fp32_dense = fp32_dense.get("median", {}).get("dense", {}).get("step")
                    vs_fp32 = f"{t['step'] / fp32_dense:.2f}x" if fp32_dense else "-"
                    enc_ratio = m["encoder"] / mem["dense"]["encoder"] if "dense" in mem else float("nan")
                    label = "dense-masked" if mode == "dense" else f"sparse, {mode}"
                    row = (f"| {name} | {a} | {label} | " + " | ".join(_fmt_s(t[k]) for k in (
                        "fwd_encoder", "fwd_densify", "fwd_decoder", "bwd_decoder", "bwd_densify", "bwd_encoder",
                        "optimizer", "step")) + f" | **{ratio:.2f}x** | {vs_fp32} | {_fmt_s(first[mode])} | "
                        f"{_fmt_mb(m['encoder'])} / {_fmt_mb(m['densify'])} / {_fmt_mb(m['decoder'])} | "
                        f"{enc_ratio:.2f}x |")
                    if device.type == "cuda":
                        row += f" {_fmt_mb(m['peak_cuda'])} |"
                    rows.append(row)
                if "autotune" in med and "table" in med:
                    saved = med["table"]["step"] - med["autotune"]["step"]
                    overhead = first["autotune"] - first["table"]
                    line = (f"{name} ({a}): autotune step {med['autotune']['step']:.2f}s vs table "
                            f"{med['table']['step']:.2f}s ({med['autotune']['step'] / med['table']['step']:.3f}x); "
                            f"tuning {tuning_s:.1f}s wall, first step {overhead:+.2f}s over the table's "
                            f"({overhead / med['autotune']['step']:.1f} steps)")
                    line += (f"; paid back after {max(overhead, 0) / saved:.1f} steps" if saved > 0 else
                             "; no gain to pay it back on this machine (same or slower choices)")
                    summaries.append(line)
                if "autotune" in run_models:
                    summaries.append(f"{name} ({a}) autotune choices:\n\n" + autotune.format_table() + "\n")
                keep = base.num_visible / (base.patch_grid[0] * base.patch_grid[1])
                if "dense" in med:
                    d = med["dense"]
                    enc_time = d["fwd_encoder"] + d["bwd_encoder"]
                    bound = (d["step"] - enc_time * (1 - keep)) / d["step"]
                    summaries.append(f"{name} ({a}): encoder share of the dense step {enc_time / d['step']:.0%}; a "
                                     f"sparse encoder at {keep:.0%} of the sites bounds the step at {bound:.2f}x "
                                     "(time-based)")
                del opts, run_models
            if flops:
                macs = count_macs(base.dense_reference().to(device).eval(), size, device)
                keep = base.num_visible / (base.patch_grid[0] * base.patch_grid[1])
                bound = (macs["encoder"] * keep + macs["total"] - macs["encoder"]) / macs["total"]
                summaries.append(f"{name}: dense-masked GMACs per image: encoder {macs['encoder']:.2f}, densify "
                                 f"{macs['densify']:.2f}, decoder {macs['decoder']:.2f}, total {macs['total']:.2f}; "
                                 f"MAC bound of a sparse encoder {bound:.2f}x")
            del models, base
    finally:
        autotune.set_mode(previous_mode)
        autotune.set_cache(previous_cache)
    print_fn(header)
    print_fn("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        print_fn(row)
    print_fn("")
    for line in summaries:
        print_fn(f"- {line}")
    return {"results": results_all, "summaries": summaries, "rows": rows}


# ------------------------------------------------------------------------------------------ command lines
OPS_DESCRIPTION = """Benchmark every sparse op against its dense-masked twin at ResNet-50 / ConvNeXt shapes.

For each op: the sparse twin on a `SparseMap` vs the dense-masked baseline
(SparK's simulation: the dense op on the zero-filled map, output multiplied by
the mask; BatchNorm with visible-site statistics), measured in the same process,
interleaved, median of ``--repeats`` runs. Ops with more than one exact
implementation run once per conv mode (``--modes``, default autotune and table),
with the path each mode ran. Columns: forward and forward+backward times, their
ratio (sparse / dense-masked; < 1 is a gain), activation memory kept for
backward (CPU) or peak memory (CUDA), the autotuner's time on that op, and the
equivalence error. The autotuner's choices follow as a second table.

    python tools/benchmark_sparse_ops.py                      # batch 16, 224 px, mask ratio 0.6
    python tools/benchmark_sparse_ops.py --paths all          # also every forced path
    python tools/benchmark_sparse_ops.py --only conv3x3,dw7x7 --repeats 9
"""

PRETRAIN_DESCRIPTION = """Full SparK pre-training steps: the sparse encoder under each conv mode vs the dense-masked simulation.

For each backbone: forward, backward and a LAMB optimizer step (timm) of
``SparK(backbone, sparse=True)`` under each conv mode (``autotune``: every exact
implementation timed once per configuration, the fastest kept; ``table``: the
fixed rules; or a forced path) and of its dense-masked twin (``dense``), same
weights, images and masks; the models' steps alternate so that load from other
processes hits all alike; the table shows medians. ``--amp`` adds a block of rows
per precision (``off``, ``bf16``, ``fp16``; the autotuner tunes under each).

The step is cut into its parts by detaching at the two boundaries (encoder ->
densify -> decoder) and running the three backward passes one after another:
the same work as ``loss.backward()``, but each part timed on its own. Columns:
forward / backward time of each part, optimizer, the whole step, the step ratio
against dense-masked, the first step (autotune: tuning included), activation
memory (bytes autograd saves for backward) per part; peak memory on CUDA. Below
the table: the tuning overhead and after how many steps it is paid back, the
autotuner's choice per scale, and the time bound of a sparse encoder.

    python tools/benchmark_pretrain.py                                  # R50 + ConvNeXt-S, batch 16, 224, mask .6
    python tools/benchmark_pretrain.py --backbones resnet50 --batch 8 --steps 3 --flops
    python tools/benchmark_pretrain.py --device cuda --amp fp16 bf16    # GPU, both autocast dtypes
"""


def main_ops(argv=None) -> int:
    """``tools/benchmark_sparse_ops.py``."""
    import argparse
    import warnings
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.custom_(fwd|bwd).*")
    parser = argparse.ArgumentParser(description=OPS_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224, help="image side (multiple of 32)")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default=None, help="comma-separated op names (e.g. conv3x3,dw7x7)")
    parser.add_argument("--modes", nargs="+", default=["autotune", "table"], choices=autotune.MODES,
                        help="conv modes to compare (autotune, table, or a forced path)")
    parser.add_argument("--paths", default="modes", choices=("modes", "all"),
                        help="'all': also every forced implementation of each op")
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                        help="process CPU time (robust on a shared machine) or wall; auto: cpu on the CPU")
    parser.add_argument("--autotune-cache", default="off",
                        help="autotune cache (directory or .json file; 'off': tune afresh, the default here)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    autotune.set_cache(args.autotune_cache)
    sparse_ops_benchmark(batch=args.batch, size=args.size, mask_ratio=args.mask_ratio, repeats=args.repeats,
                         device=args.device, only=args.only.split(",") if args.only else None, modes=args.modes,
                         all_paths=args.paths == "all", clock=args.clock)
    return 0


def main_pretrain(argv=None) -> int:
    """``tools/benchmark_pretrain.py``."""
    import argparse
    import warnings
    warnings.filterwarnings("ignore", message=r"`torch.cuda.amp.custom_(fwd|bwd)", category=FutureWarning)
    p = argparse.ArgumentParser(description=PRETRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["resnet50", "convnext_small"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-size", type=int, nargs="+", default=[224], help="H [W]")
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--decoder-width", type=int, default=768)
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--amp", nargs="*", default=None, choices=list(AMP_DTYPES),
                   help="precisions to run, each a block of rows (default off; '--amp' alone: fp16 with a "
                        "GradScaler)")
    p.add_argument("--modes", nargs="+", default=["autotune", "table", "dense"],
                   choices=list(autotune.MODES) + ["dense"],
                   help="conv modes of the sparse model, and dense = the dense-masked twin (the baseline)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="dense convs (decoder, densify projections, dense-masked backbone) in channels_last memory; "
                        "default: what training uses on the device (sparse_mim.utils.device_perf)")
    p.add_argument("--flops", action="store_true", help="count the dense model's MACs per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                   help="wall time, or process CPU time (all threads; robust to other processes on a shared "
                        "machine); auto: cpu on the CPU, wall on CUDA")
    p.add_argument("--autotune-cache", default="off",
                   help="autotune cache (directory or .json file); default off, so the tuning cost is measured")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = ["off"] if args.amp is None else (args.amp or ["fp16"])
    cache = False if args.autotune_cache.lower() in ("off", "none", "0", "false") else args.autotune_cache
    pretrain_benchmark(backbones=args.backbones, batch=args.batch, input_size=args.input_size,
                       mask_ratio=args.mask_ratio, decoder_width=args.decoder_width, steps=args.steps,
                       warmup=args.warmup, device=args.device, modes=args.modes, amp=amp,
                       channels_last=args.channels_last, flops=args.flops, seed=args.seed, clock=args.clock,
                       autotune_cache=cache)
    return 0
