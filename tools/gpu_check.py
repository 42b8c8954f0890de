#!/usr/bin/env python
"""Numerical checks of the sparse engine and SparK on a GPU (or, for testing this script, on the CPU).

Run by ``tools/gpu_check.sh`` on the lent GPU machine (Python 3.12, spconv-cu126 in
/tmp/site, no wandb: nothing here imports wandb). Each check prints PASS / WARN /
FAIL / SKIP with the measured numbers and never stops the others:

* ``env``: versions, the device, spconv's import and algorithm.
* ``backbone[<conv backend>]``: a sparse ResNet-18 and ConvNeXt-V2-atto on the device,
  with each stride-1 conv implementation of the engine (``spconv`` = implicit GEMM on
  CUDA), against the dense-masked twin on the device and the sparse model on the CPU
  (train-mode outputs; eval-mode outputs and parameter gradients).
* ``spark``: SparK-ResNet-50 at 224: sparse vs dense-masked loss and gradients on the device.
* ``amp``: fp16 autocast + GradScaler step (spconv.md item 10): loss close to fp32,
  finite gradients, parameters updated.

TF32 is switched off for the equivalence checks (it would change the dense reference
by ~1e-3). Tolerances: PASS <= 1e-4 relative, WARN <= 1e-2 (reported, e.g. a TF32
kernel inside spconv), FAIL above.

    python tools/gpu_check.py --device cuda --out $OUT/gpu_check
    python tools/gpu_check.py --device cpu --quick          # exercise the script without a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=r"`torch.cuda.amp.custom_(fwd|bwd)", category=FutureWarning)
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

PASS_TOL, WARN_TOL = 1e-4, 1e-2
RESULTS: list[dict] = []


def record(name: str, status: str, detail: str, **numbers) -> None:
    RESULTS.append({"check": name, "status": status, "detail": detail, **numbers})
    print(f"[{status}] {name}: {detail}", flush=True)


def grade(err: float) -> str:
    if err != err:  # NaN
        return "FAIL"
    return "PASS" if err <= PASS_TOL else "WARN" if err <= WARN_TOL else "FAIL"


def worst(*grades: str) -> str:
    order = ["PASS", "SKIP", "WARN", "FAIL"]
    return max(grades, key=order.index)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_check(name, fn, *args):
    t = time.perf_counter()
    try:
        fn(name, *args)
    except Exception as e:  # noqa: BLE001 - a failing check must not stop the others
        record(name, "FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:400])
        traceback.print_exc()
    print(f"    ({time.perf_counter() - t:.1f}s)", flush=True)


# ---------------------------------------------------------------------------- checks
def check_env(name, device):
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        if not torch.cuda.is_available():
            record(name, "FAIL", f"CUDA not available (torch {torch.__version__})", **info)
            return
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    for module in ("torchvision", "timm", "spconv", "cumm", "yaml", "PIL", "tqdm"):
        try:
            info[module] = getattr(__import__(module), "__version__", "ok")
        except Exception as e:  # noqa: BLE001
            info[module] = f"missing ({type(e).__name__})"
    try:
        from sparse_mim.sparse.spconv_backend import spconv_available
        info["spconv_usable"] = spconv_available()
    except Exception as e:  # noqa: BLE001
        info["spconv_usable"] = f"no ({e})"
    status = "PASS" if info.get("spconv_usable") is True or device.type == "cpu" else "WARN"
    record(name, status, ", ".join(f"{k}={v}" for k, v in info.items()), **{k: str(v) for k, v in info.items()})


def _conv_backends(device, quick):
    try:
        from sparse_mim.sparse.functional import set_conv_backend  # noqa: F401
    except ImportError:
        return [None]
    if quick:
        return ["auto"]
    return ["auto", "spconv", "gather", "windows", "dense"]


class _backend:
    def __init__(self, name):
        self.name, self.previous = name, None

    def __enter__(self):
        if self.name is not None:
            from sparse_mim.sparse.functional import set_conv_backend
            self.previous = set_conv_backend(self.name)

    def __exit__(self, *exc):
        if self.name is not None:
            from sparse_mim.sparse.functional import set_conv_backend
            set_conv_backend(self.previous)


def _backbone_run(model, images, visible, weights):
    outs = model(images, visible)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads


def check_backbone(name, device, backend, quick):
    from sparse_mim.backbones import create_backbone
    if backend == "spconv":
        from sparse_mim.sparse.spconv_backend import spconv_available
        if not spconv_available():
            record(name, "SKIP", "spconv is not importable here")
            return
    grades, parts = [], []
    nets = [("resnet18", (64, 96))] if quick else [("resnet18", (96, 128)), ("convnextv2_atto", (128, 96))]
    for net, size in nets:
        torch.manual_seed(0)
        sparse = create_backbone(net, sparse=True, drop_path_rate=0.0)
        dense = create_backbone(net, sparse=False, drop_path_rate=0.0)
        dense.load_state_dict(sparse.state_dict())
        sparse_cpu = create_backbone(net, sparse=True, drop_path_rate=0.0)
        sparse_cpu.load_state_dict(sparse.state_dict())
        sparse.to(device), dense.to(device)
        B = 4
        g = torch.Generator().manual_seed(1)
        images = torch.randn(B, 3, *size, generator=g)
        keep = round(size[0] * size[1] / 1024 * 0.4)
        visible = torch.zeros(B, size[0] * size[1] // 1024, dtype=torch.bool)
        visible.scatter_(1, torch.rand(B, visible.shape[1], generator=g).argsort(1)[:, :keep], True)
        visible = visible.view(B, size[0] // 32, size[1] // 32)
        weights = [torch.randn(B, c, size[0] // s, size[1] // s, generator=g)
                   for c, s in zip(sparse.channels, (4, 8, 16, 32))]
        dev = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        with _backend(backend):
            # train mode: batch statistics over visible sites (forward compared; see the SparK tests on
            # why train-mode gradients are compared in float64 only)
            for m in (sparse, dense, sparse_cpu):
                m.train()
            with torch.no_grad():
                out_s = sparse(images.to(device), visible.to(device))
                out_d = dense(images.to(device), visible.to(device))
                out_c = sparse_cpu(images, visible)
            e_train = max(rel(a, b) for a, b in zip(out_s, out_d))
            e_train_cpu = max(rel(a, b) for a, b in zip(out_s, out_c))
            for m in (sparse, dense, sparse_cpu):
                m.eval()
            out_s, g_s = _backbone_run(sparse, images.to(device), visible.to(device), dev(weights))
            out_d, g_d = _backbone_run(dense, images.to(device), visible.to(device), dev(weights))
            out_c, g_c = _backbone_run(sparse_cpu, images, visible, weights)
        e_eval = max(rel(a, b) for a, b in zip(out_s, out_d))
        e_grad = max(rel(g_s[n], g_d[n]) for n in g_d)
        e_grad_cpu = max(rel(g_s[n], g_c[n]) for n in g_c)
        e = max(e_train, e_train_cpu, e_eval, e_grad, e_grad_cpu)
        grades.append(grade(e))
        parts.append(f"{net} {size[0]}x{size[1]}: vs dense-masked train {e_train:.1e} eval {e_eval:.1e} "
                     f"grads {e_grad:.1e}; vs CPU sparse train {e_train_cpu:.1e} grads {e_grad_cpu:.1e}")
    record(name, worst(*grades), "; ".join(parts))


def check_spark(name, device, quick):
    from sparse_mim.spark import SparK
    net, size, B = ("resnet18", (64, 64), 2) if quick else ("resnet50", (224, 224), 4)
    torch.manual_seed(0)
    sparse = SparK(net, input_size=size, drop_path_rate=0.0).to(device)
    dense = sparse.dense_reference()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, *size, generator=g).to(device)
    visible = sparse.mask(B, device, generator=g)
    results = {}
    for mode in ("train", "eval"):
        for key, m in (("sparse", sparse), ("dense", dense)):
            m.train(mode == "train")
            m.zero_grad(set_to_none=True)
            loss, rec, _ = m(images, visible)
            loss.backward()
            results[mode, key] = (loss.detach(), rec.detach(),
                                  {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    e_loss = max(abs(results[m, "sparse"][0] - results[m, "dense"][0]).item() / results[m, "dense"][0].item()
                 for m in ("train", "eval"))
    e_rec = max(rel(results[m, "sparse"][1], results[m, "dense"][1]) for m in ("train", "eval"))
    gs, gd = results["eval", "sparse"][2], results["eval", "dense"][2]
    e_grad = max(rel(gs[n], gd[n]) for n in gd)
    gs_t, gd_t = results["train", "sparse"][2], results["train", "dense"][2]
    e_grad_train = max(rel(gs_t[n], gd_t[n]) for n in gd_t)
    status = worst(grade(e_loss), grade(e_rec), grade(e_grad))
    record(name, status, f"SparK-{net} {size[0]}x{size[1]} batch {B}: loss {e_loss:.1e}, reconstruction "
           f"{e_rec:.1e}, eval grads {e_grad:.1e} (train-mode grads {e_grad_train:.1e}, informative only: "
           f"ill-conditioned BN statistics at small batch)")


def check_amp(name, device, quick):
    if device.type != "cuda":
        record(name, "SKIP", "fp16 autocast + GradScaler is the CUDA recipe; nothing to check on CPU")
        return
    from timm.optim import Lamb
    from sparse_mim.spark import SparK, param_groups
    parts, grades = [], []
    for net in (["resnet18"] if quick else ["resnet50", "convnextv2_atto"]):
        torch.manual_seed(0)
        model = SparK(net, input_size=224 if net == "resnet50" else 128, drop_path_rate=0.0).to(device).train()
        ref = model.dense_reference().train()  # keeps the fp32 weights for the fp32 loss below
        g = torch.Generator().manual_seed(0)
        B = 8
        images = torch.randn(B, 3, *model.input_size, generator=g).to(device)
        visible = model.mask(B, device, generator=g)
        with torch.no_grad():
            loss32, _, _ = ref(images, visible)
        opt = Lamb(param_groups(model, 0.04), lr=1e-3, betas=(0.9, 0.95))
        scaler = torch.amp.GradScaler("cuda")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.autocast("cuda", dtype=torch.float16):
            loss16, rec, _ = model(images, visible)
        scaler.scale(loss16).backward()
        scaler.unscale_(opt)
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        scaler.step(opt)
        scaler.update()
        changed = sum(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.grad is not None)
        e = abs(loss16.float() - loss32).item() / loss32.item()
        ok = finite and changed > 0 and e <= 1e-2 and rec.dtype == torch.float16
        grades.append("PASS" if ok else "FAIL")
        parts.append(f"{net}: fp16 loss {loss16.item():.5f} vs fp32 {loss32.item():.5f} (rel {e:.1e}), grads "
                     f"finite {finite}, {changed} params updated, scale {scaler.get_scale():g}, output {rec.dtype}")
    record(name, worst(*grades), "; ".join(parts))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small models / shapes only (CPU self-test)")
    p.add_argument("--out", default=None, help="folder for results.json")
    p.add_argument("--only", nargs="*", default=None, help="run only these checks (env backbone spark amp)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    wanted = set(args.only or ["env", "backbone", "spark", "amp"])
    t0 = time.perf_counter()
    if "env" in wanted:
        run_check("env", check_env, device)
    if device.type == "cuda" and not torch.cuda.is_available():
        record("all", "FAIL", "no CUDA device: nothing else can run")
    else:
        if "backbone" in wanted:
            for backend in _conv_backends(device, args.quick):
                run_check(f"backbone[{backend or 'default'}]", check_backbone, device, backend, args.quick)
        if "spark" in wanted:
            run_check("spark", check_spark, device, args.quick)
        if "amp" in wanted:
            run_check("amp", check_amp, device, args.quick)
    print(f"\n=== gpu_check.py ({time.perf_counter() - t0:.0f}s) ===")
    for r in RESULTS:
        print(f"{r['status']:5s} {r['check']}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
    return 1 if any(r["status"] == "FAIL" for r in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
