"""MetaFormer speed: precisions (fp32 / bf16 / fp16) and attention paths (fused SDPA / explicit) in one run.

Every configuration (attention path x precision) runs on the SAME model in the same
process, interleaved repeat by repeat with the order alternating, so load from other
processes hits all alike; the tables show medians. On the CPU the clock is the
process CPU time (all threads of this process, robust to a shared machine); on CUDA
wall time with synchronisation.

Per configuration: inference images/s (eval mode, ``torch.inference_mode``), one
training step (forward + backward + AdamW step, fp16 with a GradScaler), the bytes
autograd saves for backward in the training forward (activation memory), and the
eval logits against the fp32 logits of the same attention path: largest absolute
difference and the fraction of images whose top-1 class agrees. Ratios: speed-up
against fp32 of the same attention path, and the attention path against ``explicit``
at the same precision. A second table times one stage-3 attention layer alone.

``metaformer_benchmark`` returns the rows; `main` is the command line (``tools/benchmark_fgvc.py``).

    python tools/benchmark_fgvc.py                                   # MetaFormer-0/1, 224 and 384, fp32 + bf16
    python tools/benchmark_fgvc.py --models metaformer_0 --sizes 224 --threads 1 --attn sdpa
    python tools/benchmark_fgvc.py --device cuda --amp off bf16 fp16 # a GPU, all three precisions
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["metaformer_benchmark", "AMP_SETTINGS", "main"]

AMP_SETTINGS = ("off", "bf16", "fp16")
_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device, clock: str) -> Callable[[], float]:
    if clock == "cpu" or (clock == "auto" and device.type == "cpu"):
        return time.process_time
    return time.perf_counter


def _autocast(device: torch.device, amp: str):
    dtype = _DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs (each storage once)."""
    seen, total = set(), [0]

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except RuntimeError:  # tensors without storage (e.g. some views of wrapper subclasses)
            key = (id(t), t.numel() * t.element_size())
        if key not in seen:
            seen.add(key)
            total[0] += key[1]
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def _order(configs: list, rep: int) -> list:
    return configs if rep % 2 == 0 else configs[::-1]


def bench_model(name: str, size: int, batch: int = 8, meta_dims: Sequence[int] = (4, 3), num_classes: int = 1000,
                model_kwargs: Optional[dict] = None, device: str | torch.device = "cpu",
                amp: Sequence[str] = ("off", "bf16"), attn: Sequence[str] = ("sdpa",), repeats: int = 3,
                warmup: int = 1, train: bool = True, attn_layer: bool = True, attn_repeats: int = 6,
                clock: str = "auto", progress: Optional[Callable[[str], object]] = None) -> List[Dict]:
    """Rows (dicts) for one model and input size: one per (attention path, precision), then the same for
    one stage-3 attention layer alone (``kind`` = "model" / "attention layer")."""
    import fgvc

    device = torch.device(device)
    for a in amp:
        if a not in _DTYPES:
            raise ValueError(f"unknown amp setting {a!r}: use one of {AMP_SETTINGS}")
    clk = _clock(device, clock)
    torch.manual_seed(0)
    model = fgvc.create_model(name, num_classes=num_classes, img_size=size, meta_dims=list(meta_dims),
                              drop_path_rate=0., **(model_kwargs or {})).to(device)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    meta = torch.randn(batch, sum(meta_dims), generator=g).to(device) if meta_dims else None
    targets = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    configs = [(impl, a) for impl in attn for a in amp]

    def timed(fn) -> float:
        _sync(device)
        t = clk()
        fn()
        _sync(device)
        return clk() - t

    # logits of every configuration (eval mode, same weights)
    model.eval()
    logits = {}
    with torch.inference_mode():
        for impl, a in configs:
            with _autocast(device, a):
                logits[(impl, a)] = model.set_attn_impl(impl)(images, meta).float()

    def infer(a):
        def run():
            with torch.inference_mode(), _autocast(device, a):
                model(images, meta)
        return run

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5) if train else None
    scalers = {a: torch.amp.GradScaler(device.type) if a == "fp16" else None for a in amp}

    def forward_loss(a):
        with _autocast(device, a):
            return torch.nn.functional.cross_entropy(model(images, meta).float(), targets)

    def train_step(a):
        def run():
            loss = forward_loss(a)
            optimizer.zero_grad(set_to_none=True)
            if scalers[a] is not None:
                scalers[a].scale(loss).backward()
                scalers[a].step(optimizer)
                scalers[a].update()
            else:
                loss.backward()
                optimizer.step()
        return run

    results = {c: {"infer": [], "train": []} for c in configs}
    activations = {}
    phases = [("infer", infer, "eval")] + ([("train", train_step, "train")] if train else [])
    for phase, make, mode in phases:
        getattr(model, mode)()
        for impl, a in configs:
            model.set_attn_impl(impl)
            for _ in range(warmup):
                make(a)()
            if phase == "train":
                activations[(impl, a)] = _saved_bytes(lambda: forward_loss(a))
                optimizer.zero_grad(set_to_none=True)
        for rep in range(repeats):
            for impl, a in _order(configs, rep):
                model.set_attn_impl(impl)
                results[(impl, a)][phase].append(timed(make(a)))
                if progress is not None:
                    progress(f"  {name} {size} {impl} {a} {phase} {rep}: {results[(impl, a)][phase][-1]:.3f}s")
    rows = []
    for impl, a in configs:
        r = results[(impl, a)]
        ref = logits[(impl, "off")] if (impl, "off") in logits else logits[configs[0]]
        diff = (logits[(impl, a)] - ref).abs().max().item()
        agree = (logits[(impl, a)].argmax(1) == ref.argmax(1)).float().mean().item()
        expl = logits.get(("explicit", a))
        rows.append(dict(kind="model", model=name, size=size, attn=impl, amp=a,
                         diff_vs_explicit=float("nan") if expl is None else (logits[(impl, a)] - expl).abs().max().item(),
                         infer_ips=batch / statistics.median(r["infer"]),
                         train_s=statistics.median(r["train"]) if r["train"] else float("nan"),
                         act_mb=activations.get((impl, a), float("nan")) / 2 ** 20, max_diff=diff, top1_agree=agree))

    if attn_layer:
        layer = model.stage_3[-1].attn
        tokens = torch.randn(batch, layer.grid_size[0] * layer.grid_size[1] + 1 + len(meta_dims),
                             model.attn_embed_dims[0], generator=g).to(device)
        layer_res = {c: {"infer": [], "train": []} for c in configs}

        def layer_infer(a):
            def run():
                with torch.inference_mode(), _autocast(device, a):
                    layer(tokens)
            return run

        def layer_train(a):
            def run():
                with _autocast(device, a):
                    out = layer(tokens.detach().requires_grad_())
                out.float().square().mean().backward()
            return run

        outs = {}
        with torch.inference_mode():
            for impl, a in configs:
                layer.attn_impl = impl
                with _autocast(device, a):
                    outs[(impl, a)] = layer(tokens).float()
        for phase, make in (("infer", layer_infer), ("train", layer_train)):
            for impl, a in configs:
                layer.attn_impl = impl
                make(a)()
            for rep in range(attn_repeats):
                for impl, a in _order(configs, rep):
                    layer.attn_impl = impl
                    layer_res[(impl, a)][phase].append(timed(make(a)))
        for impl, a in configs:
            ref = outs[(impl, "off")] if (impl, "off") in outs else outs[configs[0]]
            expl = outs.get(("explicit", a))
            rows.append(dict(kind="attention layer", model=f"{name} stage-3 attention", size=size, attn=impl, amp=a,
                             diff_vs_explicit=float("nan") if expl is None else (outs[(impl, a)] - expl).abs().max().item(),
                             infer_ips=batch / statistics.median(layer_res[(impl, a)]["infer"]),
                             train_s=statistics.median(layer_res[(impl, a)]["train"]), act_mb=float("nan"),
                             max_diff=(outs[(impl, a)] - ref).abs().max().item(), top1_agree=float("nan")))

    # ratios: against fp32 of the same attention path, and against `explicit` at the same precision
    for row in rows:
        same = [r for r in rows if r["kind"] == row["kind"] and r["attn"] == row["attn"]]
        base = next((r for r in same if r["amp"] == "off"), None)
        row["infer_vs_fp32"] = row["infer_ips"] / base["infer_ips"] if base else float("nan")
        row["train_vs_fp32"] = base["train_s"] / row["train_s"] if base else float("nan")
        expl = next((r for r in rows if r["kind"] == row["kind"] and r["amp"] == row["amp"]
                     and r["attn"] == "explicit"), None)
        row["infer_vs_explicit"] = row["infer_ips"] / expl["infer_ips"] if expl else float("nan")
        row["train_vs_explicit"] = expl["train_s"] / row["train_s"] if expl else float("nan")
    del model, optimizer
    return rows


def _fmt(x: float, spec: str, suffix: str = "") -> str:
    return "-" if x != x else f"{x:{spec}}{suffix}"  # NaN -> '-'


def format_row(r: Dict) -> str:
    agree = "-" if r["top1_agree"] != r["top1_agree"] else f"{100 * r['top1_agree']:.0f}%"
    return (f"| {r['model']} | {r['size']} | {r['attn']} | {r['amp']} | {r['infer_ips']:.1f} | "
            f"{_fmt(r['infer_vs_fp32'], '.2f', 'x')} | {_fmt(r['train_s'], '.3f')} | {_fmt(r['train_vs_fp32'], '.2f', 'x')} | "
            f"{_fmt(r['act_mb'], '.0f')} | {_fmt(r['infer_vs_explicit'], '.2f', 'x')} | "
            f"{_fmt(r['train_vs_explicit'], '.2f', 'x')} | {r['max_diff']:.1e} | {agree} |")


HEADER = ("| model | size | attention | amp | infer img/s | infer vs fp32 | train step (s) | train vs fp32 | "
          "act. MB | infer vs explicit | train vs explicit | max abs diff vs fp32 | top-1 agrees |")


def metaformer_benchmark(models: Sequence[str] = ("metaformer_0", "metaformer_1"), sizes: Sequence[int] = (224, 384),
                         batch: int = 8, meta_dims: Sequence[int] = (4, 3), num_classes: int = 1000,
                         model_kwargs: Optional[dict] = None, device: str = "auto",
                         amp: Sequence[str] = ("off", "bf16"), attn: Sequence[str] = ("sdpa", "explicit"),
                         repeats: int = 3, warmup: int = 1, train: bool = True, attn_layer: bool = True,
                         attn_repeats: int = 6, clock: str = "auto", print_fn: Callable[[str], object] = print,
                         progress: Optional[Callable[[str], object]] = None) -> List[Dict]:
    """Print the table (markdown) for every model and size; returns all rows."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda":
        desc = torch.cuda.get_device_name(dev)
    else:
        from sparse_mim.utils.amp import cpu_bf16_support
        desc = f"CPU ({cpu_bf16_support()[1]}), {torch.get_num_threads()} threads"
    clk = "process CPU" if _clock(dev, clock) is time.process_time else "wall"
    print_fn(f"# MetaFormer benchmark: {desc}, torch {torch.__version__}, batch {batch}, meta_dims "
             f"{list(meta_dims)}, model kwargs {json.dumps(model_kwargs or {})}; {clk} seconds, median of {repeats} "
             f"after {warmup} warm-up, configurations interleaved")
    print_fn(HEADER)
    print_fn("|" + "---|" * (HEADER.count("|") - 1))
    rows = []
    for name in models:
        for size in sizes:
            new = bench_model(name, int(size), batch=batch, meta_dims=meta_dims, num_classes=num_classes,
                              model_kwargs=model_kwargs, device=dev, amp=amp, attn=attn, repeats=repeats,
                              warmup=warmup, train=train, attn_layer=attn_layer, attn_repeats=attn_repeats,
                              clock=clock, progress=progress)
            for r in new:
                print_fn(format_row(r))
            rows.extend(new)
    return rows


def parse_args(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="metaformer_0,metaformer_1", help="comma-separated registry names")
    p.add_argument("--sizes", default="224,384", help="comma-separated input sizes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--meta-dims", default="4,3", help="meta groups ('' for image only)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--model-kwargs", default="{}", help='extra create_model kwargs as JSON, e.g. \'{"attn_depths": [2, 2]}\'')
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--amp", nargs="+", default=["off", "bf16"], choices=list(AMP_SETTINGS),
                   help="precisions to compare (off = fp32, the baseline of the 'vs fp32' columns)")
    p.add_argument("--attn", nargs="+", default=["sdpa", "explicit"], choices=["sdpa", "explicit"],
                   help="attention paths to compare")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attn-repeats", type=int, default=6, help="timed repeats of the attention layer alone")
    p.add_argument("--no-attn-layer", action="store_true", help="skip the attention-layer-alone rows")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                   help="auto: process CPU time on the CPU, wall time on CUDA")
    p.add_argument("--progress", action="store_true", help="print each timed run to stderr")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """``tools/benchmark_fgvc.py``."""
    import sys
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    metaformer_benchmark(
        models=args.models.split(","), sizes=[int(s) for s in args.sizes.split(",")], batch=args.batch,
        meta_dims=[int(d) for d in args.meta_dims.split(",") if d], num_classes=args.num_classes,
        model_kwargs=json.loads(args.model_kwargs), device=args.device, amp=args.amp, attn=args.attn,
        repeats=args.repeats, warmup=args.warmup, train=not args.no_train, attn_layer=not args.no_attn_layer,
        attn_repeats=args.attn_repeats, clock=args.clock,
        progress=(lambda line: print(line, file=sys.stderr, flush=True)) if args.progress else None)
    return 0

