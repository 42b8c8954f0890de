#!/usr/bin/env python
"""One full SparK pre-training step, sparse encoder vs the dense-masked simulation, in the same process.

For each backbone: forward, backward and a LAMB optimizer step (timm) of
``SparK(backbone, sparse=True)`` and of its dense-masked twin with the same
weights, on the same images and masks. Steps alternate between the two models so
that load from other processes hits both alike; the table shows medians.

The step is cut into its parts by detaching at the two boundaries (encoder ->
densify -> decoder) and running the three backward passes one after another:
the same work as ``loss.backward()``, but each part timed on its own.

Columns: forward / backward time of encoder, densify (norm, mask tokens,
projections) and decoder (+ loss); optimizer; the whole step; the step ratio
sparse / dense; activation memory (bytes autograd saves for backward, without
parameters) per part; peak allocated memory on CUDA. ``--flops`` adds the dense
model's multiply-adds per image (torch FlopCounterMode) and the step-time bound a
sparse encoder alone can reach.

    python tools/benchmark_pretrain.py                                  # R50 + ConvNeXt-S, batch 16, 224, mask .6
    python tools/benchmark_pretrain.py --backbones resnet50 --batch 8 --steps 3 --flops
    python tools/benchmark_pretrain.py --device cuda --amp              # GPU, fp16 autocast
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=r"`torch.cuda.amp.custom_(fwd|bwd)", category=FutureWarning)

import torch  # noqa: E402

PARTS = ("encoder", "densify", "decoder")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["resnet50", "convnext_small"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-size", type=int, nargs="+", default=[224], help="H [W]")
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--decoder-width", type=int, default=768)
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--amp", action="store_true", help="fp16 autocast + GradScaler (CUDA)")
    p.add_argument("--channels-last", action="store_true",
                   help="densify projections + decoder in channels_last memory format (both models)")
    p.add_argument("--flops", action="store_true", help="count the dense model's MACs per image")
    p.add_argument("--modes", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                   help="wall time, or process CPU time (all threads; robust to other processes on a shared "
                        "machine); auto: cpu on the CPU, wall on CUDA")
    return p.parse_args(argv)


clock = time.perf_counter  # set in main(): wall clock, or process CPU time (--clock cpu)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SavedBytes:
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
        except (RuntimeError, NotImplementedError):  # e.g. sparse / meta tensors
            pass
        return t

    @staticmethod
    def unpack(t):
        return t

    @contextlib.contextmanager
    def track(self):
        self.storages = {}
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield

    @property
    def total(self):
        return sum(self.storages.values())


def _detach_maps(maps):
    from sparse_mim.sparse.tensor import SparseMap
    out = []
    for m in maps:
        if isinstance(m, SparseMap):
            out.append(m.replace_features(m.features.detach().requires_grad_()))
        else:
            out.append(m.detach().requires_grad_())
    return out


def _tensors(maps):
    from sparse_mim.sparse.tensor import SparseMap
    return [m.features if isinstance(m, SparseMap) else m for m in maps]


def timed_step(model, optimizer, scaler, images, visible, device, amp):
    """One step, split at the encoder/densify and densify/decoder boundaries. Returns times (s) and bytes."""
    saved = SavedBytes(model)
    times, mem = {}, {}
    autocast = torch.autocast(device.type, dtype=torch.float16) if amp else contextlib.nullcontext()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t = clock()
    with autocast:
        with saved.track():
            features = model.forward_encoder(images, visible)
        mem["encoder"] = saved.total
        sync(device)
        times["fwd_encoder"] = clock() - t
        t = clock()
        features_in = _detach_maps(features)
        with saved.track():
            to_decoder = model.densify(features_in, visible)
        mem["densify"] = saved.total
        sync(device)
        times["fwd_densify"] = clock() - t
        t = clock()
        to_decoder_in = [x.detach().requires_grad_() for x in to_decoder]
        with saved.track():
            reconstruction = model.forward_decoder(to_decoder_in)
            loss = model.forward_loss(images, reconstruction.float(), visible)
        mem["decoder"] = saved.total
        sync(device)
        times["fwd_decoder"] = clock() - t
    t = clock()
    scaler.scale(loss).backward()
    sync(device)
    times["bwd_decoder"] = clock() - t
    t = clock()
    torch.autograd.backward(to_decoder, [x.grad for x in to_decoder_in])
    sync(device)
    times["bwd_densify"] = clock() - t
    t = clock()
    outs, ins = _tensors(features), _tensors(features_in)
    torch.autograd.backward(outs, [x.grad for x in ins])
    sync(device)
    times["bwd_encoder"] = clock() - t
    t = clock()
    scaler.step(optimizer)
    scaler.update()
    sync(device)
    times["optimizer"] = clock() - t
    times["step"] = sum(times.values())
    if device.type == "cuda":
        mem["peak_cuda"] = torch.cuda.max_memory_allocated(device)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    return times, mem, loss.item()


def count_macs(model, size, device):
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
    return {
        "encoder": total(r"SparK\.sparse_encoder\.sp_cnn"),
        "densify": total(r"SparK\.densify_(projs|norms)\.\d+"),
        "decoder": total(r"SparK\.dense_decoder"),
        "total": total(r"Global"),
    }


def fmt_s(x):
    return f"{x:.3f}" if x < 10 else f"{x:.2f}"


def fmt_mb(x):
    return f"{x / 2 ** 20:.0f}"


def main(argv=None):
    args = parse_args(argv)
    from timm.optim import Lamb
    from sparse_mim.spark import SparK, param_groups

    device = torch.device(args.device)
    global clock
    use_cpu_clock = args.clock == "cpu" or (args.clock == "auto" and device.type == "cpu")
    clock = time.process_time if use_cpu_clock else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(args.input_size) * (2 if len(args.input_size) == 1 else 1)
    print(f"# SparK pre-training step: batch {args.batch}, {size[0]}x{size[1]}, mask ratio {args.mask_ratio}, "
          f"decoder width {args.decoder_width}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, amp {args.amp}, "
          f"channels_last {args.channels_last}; {'process CPU' if use_cpu_clock else 'wall'} seconds, median of "
          f"{args.steps} steps after {args.warmup} warm-up")
    header = ("| backbone | mode | fwd enc | fwd densify | fwd dec+loss | bwd dec+loss | bwd densify | bwd enc | "
              "optim | step (s) | step ratio | act. MB enc / densify / dec | enc act. ratio |"
              + (" peak MB |" if device.type == "cuda" else ""))
    rows, summaries = [], []
    for name in args.backbones:
        torch.manual_seed(args.seed)
        sparse_model = SparK(name, input_size=size, mask_ratio=args.mask_ratio, decoder_width=args.decoder_width)
        models = {"sparse": sparse_model, "dense": sparse_model.dense_reference()}
        models = {m: models[m] for m in args.modes}
        opts, scalers = {}, {}
        for mode, model in models.items():
            model.to(device).train()
            if args.channels_last:
                model.dense_decoder.to(memory_format=torch.channels_last)
                model.densify_projs.to(memory_format=torch.channels_last)
            beta2 = 0.95 if "resnet" in name else 0.999
            opts[mode] = Lamb(param_groups(model, 0.04), lr=2e-4 * args.batch / 256, betas=(0.9, beta2),
                              max_grad_norm=5.0)
            scalers[mode] = torch.amp.GradScaler(device.type, enabled=args.amp)
        results = {mode: [] for mode in models}
        gen = torch.Generator().manual_seed(args.seed)
        for step in range(args.warmup + args.steps):
            images = torch.randn(args.batch, 3, *size, generator=gen).to(device)
            visible = sparse_model.mask(args.batch, device, generator=gen)
            for mode, model in models.items():
                times, mem, loss = timed_step(model, opts[mode], scalers[mode], images, visible, device, args.amp)
                if step >= args.warmup:
                    results[mode].append((times, mem))
                print(f"  {name} {mode} step {step}: {times['step']:.2f}s loss {loss:.4f}", file=sys.stderr)

        med = {mode: {k: statistics.median(r[0][k] for r in res) for k in res[0][0]}
               for mode, res in results.items()}
        mem = {mode: res[-1][1] for mode, res in results.items()}
        for mode in models:
            t, m = med[mode], mem[mode]
            ratio = t["step"] / med["dense"]["step"] if "dense" in med else float("nan")
            enc_ratio = m["encoder"] / mem["dense"]["encoder"] if "dense" in mem else float("nan")
            row = (f"| {name} | {mode} | " + " | ".join(fmt_s(t[k]) for k in (
                "fwd_encoder", "fwd_densify", "fwd_decoder", "bwd_decoder", "bwd_densify", "bwd_encoder",
                "optimizer", "step")) + f" | {ratio:.2f}x | {fmt_mb(m['encoder'])} / {fmt_mb(m['densify'])} / "
                f"{fmt_mb(m['decoder'])} | {enc_ratio:.2f}x |")
            if device.type == "cuda":
                row += f" {fmt_mb(m['peak_cuda'])} |"
            rows.append(row)
        keep = sparse_model.num_visible / (sparse_model.patch_grid[0] * sparse_model.patch_grid[1])
        if "dense" in med:
            d = med["dense"]
            enc_time = d["fwd_encoder"] + d["bwd_encoder"]
            time_bound = (d["step"] - enc_time * (1 - keep)) / d["step"]
            line = (f"{name}: encoder share of the dense step {enc_time / d['step']:.0%}; a sparse encoder at "
                    f"{keep:.0%} of the sites bounds the step at {time_bound:.2f}x (time-based)")
            if "sparse" in med:
                line += f"; measured {med['sparse']['step'] / d['step']:.2f}x"
            summaries.append(line)
        if args.flops:
            macs = count_macs(models.get("dense", sparse_model).eval() if "dense" in models
                              else sparse_model.dense_reference().to(device).eval(), size, device)
            bound = (macs["encoder"] * keep + macs["total"] - macs["encoder"]) / macs["total"]
            summaries.append(
                f"{name}: dense-masked GMACs per image: encoder {macs['encoder']:.2f}, densify {macs['densify']:.2f}, "
                f"decoder {macs['decoder']:.2f}, total {macs['total']:.2f}; MAC bound of a sparse encoder "
                f"{bound:.2f}x, issue goal (within 10%) {1.1 * bound:.2f}x")
        del models, opts
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        print(row)
    print()
    for line in summaries:
        print(f"- {line}")


if __name__ == "__main__":
    main()
