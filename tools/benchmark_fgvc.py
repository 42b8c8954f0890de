"""Benchmark MetaFormer attention: fused SDPA (relative bias as the mask) vs the explicit official path.

Both paths run on the SAME model in the same process (``model.set_attn_impl``),
interleaved repeat by repeat so machine noise hits both alike. Reports
inference images/s, one training step (forward + backward + AdamW step) and the
largest logit difference between the paths.

    python tools/benchmark_fgvc.py                                 # MetaFormer-0/1 at 224 and 384, batch 8, CPU
    python tools/benchmark_fgvc.py --device cuda --amp bf16        # on a GPU
    python tools/benchmark_fgvc.py --models metaformer_2 --sizes 384 --batch 16 --device cuda
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fgvc  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="metaformer_0,metaformer_1", help="comma-separated registry names")
    p.add_argument("--sizes", default="224,384", help="comma-separated input sizes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--meta-dims", default="4,3", help="meta groups ('' for image only)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--model-kwargs", default="{}", help='extra create_model kwargs as JSON, e.g. \'{"attn_depths": [2, 2]}\'')
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per path (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attn-repeats", type=int, default=6, help="timed repeats of the attention layer alone")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device, amp):
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def bench_model(name, size, args, device):
    meta_dims = [int(d) for d in args.meta_dims.split(",") if d]
    torch.manual_seed(0)
    model = fgvc.create_model(name, num_classes=args.num_classes, img_size=size, meta_dims=meta_dims,
                              drop_path_rate=0., **json.loads(args.model_kwargs)).to(device)
    images = torch.randn(args.batch, 3, size, size, device=device)
    meta = torch.randn(args.batch, sum(meta_dims), device=device) if meta_dims else None
    targets = torch.randint(0, args.num_classes, (args.batch,), device=device)
    impls = ("explicit", "sdpa")

    # Equal logits (eval mode, same weights).
    model.eval()
    logits = {}
    with torch.inference_mode(), _autocast(device, args.amp):
        for impl in impls:
            logits[impl] = model.set_attn_impl(impl)(images, meta).float()
    max_diff = (logits["sdpa"] - logits["explicit"]).abs().max().item()

    def infer():
        with torch.inference_mode(), _autocast(device, args.amp):
            model(images, meta)

    optimizer = None if args.no_train else torch.optim.AdamW(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    def train_step():
        with _autocast(device, args.amp):
            loss = torch.nn.functional.cross_entropy(model(images, meta), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def timed(fn):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t

    results = {impl: {"infer": [], "train": []} for impl in impls}
    for phase, fn, mode in (("infer", infer, "eval"), ("train", train_step, "train")):
        if phase == "train" and args.no_train:
            continue
        getattr(model, mode)()
        for impl in impls:
            model.set_attn_impl(impl)
            for _ in range(args.warmup):
                fn()
        for rep in range(args.repeats):  # interleaved, order alternating: explicit, sdpa, sdpa, explicit, ...
            for impl in (impls if rep % 2 == 0 else impls[::-1]):
                model.set_attn_impl(impl)
                results[impl][phase].append(timed(fn))
    rows = []
    # The attention layers alone (what the flag changes): one stage-3 layer, tokens as in the model.
    attn = model.stage_3[-1].attn
    tokens = torch.randn(args.batch, attn.grid_size[0] * attn.grid_size[1] + 1 + len(meta_dims),
                         model.attn_embed_dims[0], device=device)
    attn_results = {impl: {"infer": [], "train": []} for impl in impls}

    def attn_infer():
        with torch.inference_mode(), _autocast(device, args.amp):
            attn(tokens)

    def attn_train():
        with _autocast(device, args.amp):
            out = attn(tokens.requires_grad_())
        out.float().square().mean().backward()

    for phase, fn in (("infer", attn_infer), ("train", attn_train)):
        for impl in impls:
            attn.attn_impl = impl
            fn()
        for rep in range(args.attn_repeats):
            for impl in (impls if rep % 2 == 0 else impls[::-1]):
                attn.attn_impl = impl
                attn_results[impl][phase].append(timed(fn))
    for impl in impls:
        rows.append(dict(model=f"{name} stage-3 attention", size=size, impl=impl,
                         infer_ips=args.batch / statistics.median(attn_results[impl]["infer"]),
                         train_s=statistics.median(attn_results[impl]["train"])))
    for impl in impls:
        infer_s = statistics.median(results[impl]["infer"])
        train_s = statistics.median(results[impl]["train"]) if results[impl]["train"] else float("nan")
        rows.append(dict(model=name, size=size, impl=impl, infer_ips=args.batch / infer_s, train_s=train_s))
    with torch.inference_mode():
        outs = {}
        for impl in impls:
            attn.attn_impl = impl
            outs[impl] = attn(tokens).float()
    attn_diff = (outs["sdpa"] - outs["explicit"]).abs().max().item()
    rows = rows[2:] + rows[:2]  # whole model first, then the attention layer alone
    for (base, r), diff in zip(zip(rows[0::2], rows[1::2]), (max_diff, attn_diff)):  # (explicit, sdpa) pairs
        for row in (base, r):
            row["infer_speedup"] = row["infer_ips"] / base["infer_ips"]
            row["train_speedup"] = base["train_s"] / row["train_s"]
            row["max_diff"] = diff
    del model, optimizer
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    desc = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# MetaFormer attention benchmark: {desc}, torch {torch.__version__}, batch {args.batch}, "
          f"meta_dims [{args.meta_dims}], amp {args.amp}, median of {args.repeats}")
    print("| model | size | attention | infer img/s | vs explicit | train step (s) | vs explicit "
          "| max abs diff |")
    # rows "<model> stage-3 attention": one attention layer alone (forward; forward + backward as "train")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            for r in bench_model(name, size, args, device):
                train = (f"{r['train_s']:.3f} | {r['train_speedup']:.2f}x" if r["train_s"] == r["train_s"]
                         else "- | -")  # NaN: --no-train
                print(f"| {r['model']} | {r['size']} | {r['impl']} | {r['infer_ips']:.1f} | {r['infer_speedup']:.2f}x "
                      f"| {train} | {r['max_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
