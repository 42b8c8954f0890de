"""Numerical and speed checks of the sparse engine and SparK on a GPU (or, to test them, on the CPU).

Run by ``tools/gpu_check.sh`` (or ``python tools/gpu_check.py``, whose command line is `main`). Each check
prints PASS / WARN / FAIL / SKIP with the measured numbers and never stops the others:

* ``env``: versions, the device, whether spconv imports.
* ``backbone[<conv mode>]``: a sparse ResNet-18 and ConvNeXt-V2-atto on the device
  under each conv mode (``autotune``, ``table`` and every forced path; ``spconv`` =
  implicit GEMM on CUDA), against the dense-masked twin on the device and the
  sparse model on the CPU (train-mode outputs; eval-mode outputs and parameter
  gradients).
* ``spark``: SparK-ResNet-50 at 224: sparse vs dense-masked loss and gradients.
* ``amp``: what ``amp=auto`` picks on the device, then bf16 and fp16 (where the
  device runs them; fp16 with a GradScaler): one SparK step through the trainers'
  ``optimizer_step``: loss against fp32, sparse vs dense-masked under the same
  autocast, fp32 gradients, parameters updated.
* ``autotune``: full SparK pre-training steps (ResNet-50 and ConvNeXt-S at 224)
  under fp16 and bf16 autocast: the autotuner's choice per scale with every
  candidate's time, and the step time of ``autotune``, ``table`` and the
  dense-masked twin (the ratio that says whether the sparse engine pays on this
  GPU). Tables go to ``<out>/autotune.md``.

TF32 is switched off for the equivalence checks (it would change the dense
reference by ~1e-3) and back on (torch's default for cuDNN) for the timings.
Tolerances: PASS <= 1e-4 relative, WARN <= 1e-2 (reported, e.g. a TF32 kernel
inside spconv), FAIL above.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

PASS_TOL, WARN_TOL = 1e-4, 1e-2
RESULTS: list[dict] = []


_OUT: dict = {"dir": None}


def record(name: str, status: str, detail: str, **numbers) -> None:
    """Print a check's result and write it at once (``results.jsonl`` appended, ``results.json`` rewritten), so a
    run stopped by a time limit keeps every result it had."""
    entry = {"check": name, "status": status, "detail": detail, **numbers}
    RESULTS.append(entry)
    print(f"[{status}] {name}: {detail}", flush=True)
    out = _OUT["dir"]
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.jsonl"), "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
        tmp = os.path.join(out, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
        os.replace(tmp, os.path.join(out, "results.json"))


def grade(err: float) -> str:
    if err != err:  # NaN
        return "FAIL"
    return "PASS" if err <= PASS_TOL else "WARN" if err <= WARN_TOL else "FAIL"


def worst(*grades: str) -> str:
    order = ["PASS", "SKIP", "WARN", "FAIL"]
    return max(grades, key=order.index)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU (tensors from any device)."""
    from sparse_mim.testing import relative_error
    return relative_error(a.detach().double().cpu(), b.detach().double().cpu())


def run_check(name, fn, *args):
    t = time.perf_counter()
    try:
        fn(name, *args)
    except Exception as e:  # noqa: BLE001 - a failing check must not stop the others
        record(name, "FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:400])
        traceback.print_exc()
    print(f"    ({time.perf_counter() - t:.1f}s)", flush=True)


# ---------------------------------------------------------------------------- checks
def build_runs_on(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build compiled for ``arch_list`` (``torch.cuda.get_arch_list()``: ``sm_75``, ...,
    ``compute_90``) has kernels for a GPU of ``capability``: a cubin of the same major version and a minor
    version not above the GPU's, or PTX (``compute_XY``) of a version not above it (JIT-compiled)."""
    major, minor = capability
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def _driver_version() -> str:
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, IndexError, Exception):  # noqa: BLE001 - no nvidia-smi: say so
        return "unknown (no nvidia-smi)"


def unsupported_gpu_message(capability: tuple[int, int], arch_list: list[str], gpu: str = "this GPU") -> str:
    """The refusal (with the fix) for a torch build without kernels for the GPU."""
    sm = f"sm_{capability[0]}{capability[1]}"
    fix = ("bash tools/setup_env.sh (it detects the GPU and installs the CUDA 12.6 torch build, which has sm_50 to "
           "sm_90 kernels, V100 included), or pip install 'torch==" + torch.__version__.split("+")[0] +
           "' --index-url https://download.pytorch.org/whl/cu126; see docs/gpu.md, 'GPU generations'")
    return (f"this torch build ({torch.__version__}, CUDA {torch.version.cuda}) has kernels for "
            f"{' '.join(arch_list) or 'no GPU'}, none for {gpu} ({sm}); every CUDA kernel would fail. Fix: {fix}")


def check_env(name, device):
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "device": str(device),
            "torch_cuda": torch.version.cuda or "none (CPU build)"}
    if device.type == "cuda":
        if not torch.cuda.is_available():
            record(name, "FAIL", f"CUDA not available (torch {torch.__version__}, built for CUDA "
                                 f"{torch.version.cuda})", **info)
            return False
        cap = torch.cuda.get_device_capability(device)
        arch = torch.cuda.get_arch_list()
        info.update(gpu=torch.cuda.get_device_name(device), capability=f"{cap[0]}.{cap[1]}",
                    gpus_visible=torch.cuda.device_count(), driver=_driver_version(), arch_list=" ".join(arch))
        if not build_runs_on(cap, arch):
            record(name, "FAIL", unsupported_gpu_message(cap, arch, info["gpu"]), **info)
            return False
        try:
            info["cudnn"] = torch.backends.cudnn.version()
        except RuntimeError as e:  # e.g. cuDNN 9.11+ refuses GPUs below sm_75
            record(name, "FAIL", f"cuDNN cannot run on this GPU: {str(e).splitlines()[0][:300]}", **info)
            return False
        from sparse_mim.utils.amp import cuda_auto_rule, resolve_amp
        info["amp_auto"] = f"{resolve_amp('auto', device).name} ({cuda_auto_rule(cap).generation})"
    from sparse_mim.sparse.autotune import _spconv_version
    info["spconv_build"] = _spconv_version()
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
    return True


def _conv_backends(device, quick):
    if quick:
        return ["autotune"]
    return ["autotune", "table", "spconv", "gather", "windows", "dense"]


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
        from sparse_mim.spark import random_visible_mask  # the one SparK mask generator
        visible = random_visible_mask(B, (size[0] // 32, size[1] // 32), keep, generator=g)
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
    """Every ``amp`` setting on the device (sparse_mim.utils.amp): what ``auto`` picks, then one SparK step per
    precision through the trainers' ``optimizer_step``: loss against fp32, sparse vs dense-masked under the same
    autocast, finite fp32 gradients, parameters updated, output dtype."""
    from timm.optim import Lamb
    from sparse_mim.spark import SparK, param_groups
    from sparse_mim.utils.amp import AmpError, optimizer_step, resolve_amp
    parts, grades = [f"auto -> {resolve_amp('auto', device).describe()}"], []
    for setting in ("bf16", "fp16"):
        try:
            policy = resolve_amp(setting, device)
        except AmpError as e:
            parts.append(f"{setting}: not run ({e})")
            continue
        if device.type == "cpu" and setting == "fp16":
            parts.append("fp16: skipped on CPU (bf16 is the CPU precision)")
            continue
        eps = torch.finfo(policy.dtype).eps
        for net in (["resnet18"] if quick or device.type == "cpu" else ["resnet50", "convnextv2_atto"]):
            size = 64 if device.type == "cpu" else (224 if net == "resnet50" else 128)
            torch.manual_seed(0)
            model = SparK(net, input_size=size, drop_path_rate=0.0).to(device).eval()
            ref = model.dense_reference().eval()  # same weights, dense-masked
            g = torch.Generator().manual_seed(0)
            B = 2 if device.type == "cpu" else 8
            images = torch.randn(B, 3, size, size, generator=g).to(device)
            visible = model.mask(B, device, generator=g)
            with torch.no_grad():
                loss32, _, _ = model(images, visible)
                with policy.autocast():
                    loss_ref, rec_ref, _ = ref(images, visible)
            opt = Lamb(param_groups(model, 0.04), lr=1e-3, betas=(0.9, 0.95))
            scaler = policy.make_scaler()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            with policy.autocast():
                loss, rec, _ = model(images, visible)
            res = optimizer_step(loss, opt, scaler=scaler, clip_grad=5.0, zero_grad=False)
            grads_fp32 = all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
            changed = sum(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.grad is not None)
            e32 = abs(loss.float() - loss32).item() / loss32.item()
            e_twin = abs(loss.float() - loss_ref.float()).item() / loss_ref.float().item()
            e_rec = rel(rec.float(), rec_ref.float())
            ok = (not res.skipped and changed > 0 and grads_fp32 and rec.dtype == policy.dtype
                  and loss.dtype == torch.float32 and e32 <= 1e-2 and e_twin <= 2 * eps and e_rec <= 8 * eps)
            grades.append("PASS" if ok else "FAIL")
            parts.append(f"{net} {setting}: loss {loss.item():.5f} vs fp32 {loss32.item():.5f} (rel {e32:.1e}), sparse vs "
                         f"dense-masked loss {e_twin:.1e} / reconstruction {e_rec:.1e} (eps {eps:.1e}), grad norm "
                         f"{res.grad_norm:.3g}, {'skipped' if res.skipped else 'stepped'}, {changed} params updated, "
                         f"scale {res.scale:g}, output {rec.dtype}")
    record(name, worst(*grades) if grades else "SKIP", "; ".join(parts))


def check_autotune(name, device, quick, out_dir=None):
    """Autotuned full steps vs the fixed table vs dense-masked, under fp16 and bf16 autocast."""
    from repotools.benchmark_sparse import pretrain_benchmark
    from sparse_mim.sparse import autotune
    from sparse_mim.utils.device_perf import apply_perf_settings
    lines = []
    torch.backends.cuda.matmul.allow_tf32 = True  # timings with torch's default cuDNN settings
    torch.backends.cudnn.allow_tf32 = True
    apply_perf_settings(device)  # cudnn.benchmark / channels-last: what training uses
    try:
        if quick:
            kwargs = dict(backbones=["resnet18"], batch=2, input_size=[64], steps=1, warmup=1, decoder_width=64)
            amps = ["off"] if device.type == "cpu" else ["fp16"]
        else:
            kwargs = dict(backbones=["resnet50", "convnext_small"], batch=32, input_size=[224], steps=3, warmup=1)
            amps = ["fp16", "bf16"] if device.type == "cuda" and torch.cuda.is_bf16_supported() else ["fp16"]
        result = pretrain_benchmark(device=str(device), modes=("autotune", "table", "dense"), amp=amps,
                                    print_fn=lines.append, autotune_cache=False, **kwargs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
    text = "\n".join(lines)
    print(text, flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "autotune.md"), "w") as f:
            f.write(text + "\n")
    parts = []
    for (net, amp), r in result["results"].items():
        med = r["median"]
        chosen = {}
        for c in r["choices"].values():
            chosen[c["path"]] = chosen.get(c["path"], 0) + 1
        parts.append(f"{net} {amp}: step autotune/dense {med['autotune']['step'] / med['dense']['step']:.2f}x, "
                     f"table/dense {med['table']['step'] / med['dense']['step']:.2f}x, tuning {r['tuning_s']:.1f}s, "
                     f"paths {chosen}")
    record(name, "PASS", "; ".join(parts), log=autotune.log_dict())


# ---------------------------------------------------------------------------- precision (amp=auto by measurement)
PRECISIONS = (("fp32", "off", False), ("fp32+tf32", "off", True), ("fp16", "fp16", True), ("bf16", "bf16", True))


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def check_precision(name, device, quick, out_dir=None):
    """The full pre-training step under fp32 (TF32 off and on), fp16 (spconv eligible) and bf16 (own kernels),
    each sparse-autotuned and dense-masked; then which precision ``amp=auto`` should take on this GPU, against
    the table in code (`sparse_mim.utils.amp.CUDA_AUTO_TABLE`)."""
    from repotools.benchmark_sparse import pretrain_benchmark
    from sparse_mim.utils.device_perf import apply_perf_settings
    apply_perf_settings(device)
    if quick:
        kwargs = dict(backbones=["resnet18"], batch=2, input_size=[64], steps=1, warmup=1, decoder_width=64)
    else:
        kwargs = dict(backbones=["resnet50", "convnext_small"], batch=32, input_size=[224], steps=3, warmup=1)
    runs = [p for p in PRECISIONS if device.type == "cuda" or p[1] == "off"]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        runs = [p for p in runs if p[1] != "bf16"]
    if device.type == "cpu":
        runs = runs[:1]  # the dry run: one precision exercises the code
    steps: dict = {}
    lines = []
    from sparse_mim.sparse import autotune
    budget = autotune.get_budget()
    # 8 (backbone, precision) pairs, each tuned from scratch: a smaller tuning budget keeps the section within
    # its time on one H100 (past the budget the fixed table decides, and the table says so)
    autotune.set_budget(per_config_s=1.0, total_s=25.0)
    try:
        for label, amp, tf32 in runs:
            _set_tf32(tf32)
            modes = ("autotune", "table", "dense") if amp != "off" else ("autotune", "dense")
            try:
                result = pretrain_benchmark(device=str(device), modes=modes, amp=[amp],
                                            print_fn=lines.append, autotune_cache=False, **kwargs)
            finally:
                _set_tf32(False)
            for (net, _), r in result["results"].items():
                med = r["median"]
                steps[net, label] = (med["autotune"]["step"], med["dense"]["step"])
                print(f"    {net} {label}: step sparse {med['autotune']['step']:.3f}s, dense-masked "
                      f"{med['dense']['step']:.3f}s", flush=True)
    finally:
        autotune.set_budget(per_config_s=budget["per_config_s"], total_s=budget["total_s"])
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "precision.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    parts, verdicts = [], []
    nets = sorted({n for n, _ in steps})
    for net in nets:
        row = {label: steps[net, label] for label, _, _ in runs if (net, label) in steps}
        best = min(row, key=lambda k: min(row[k]))  # the fastest step, sparse or dense-masked
        parts.append(f"{net}: " + ", ".join(f"{k} {v[0]:.3f}s/{v[1]:.3f}s" for k, v in row.items())
                     + f" (sparse/dense-masked); fastest {best}")
        verdicts.append(best)
    detail = "; ".join(parts)
    status = "PASS"
    if device.type == "cuda":
        agree, text = amp_verdict(verdicts, torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
        detail += ". " + text
        status = "PASS" if agree else "WARN"
    record(name, status, detail, steps={f"{n} {l}": v for (n, l), v in steps.items()})


_AMP_OF = {"fp32": "off", "fp32+tf32": "off", "fp16": "fp16", "bf16": "bf16"}


def amp_verdict(fastest: list[str], capability: tuple[int, int], gpu: str) -> tuple[bool, str]:
    """(agrees, sentence): the precision the measurements favour (the fastest step per backbone, majority)
    against `CUDA_AUTO_TABLE`'s line for this GPU generation, with the one-line update when they disagree."""
    from sparse_mim.utils.amp import cuda_auto_rule
    rule = cuda_auto_rule(capability)
    measured = _AMP_OF[max(sorted(set(fastest)), key=fastest.count)]
    agree = measured == rule.choice
    text = (f"amp=auto should take {measured} on {rule.generation} (sm_{capability[0]}{capability[1]}) by this "
            f"measurement; the table in code says {rule.choice}: ")
    if agree:
        return True, text + "AGREES"
    return False, text + (f"DISAGREES: update its {rule.generation} line in sparse_mim/utils/amp.py (CUDA_AUTO_TABLE) to "
                          f"choice=\"{measured}\", measured=\"{gpu}, {time.strftime('%Y-%m-%d')}, tools/gpu_check.sh\"")


# spconv 2.3 picks its fp16 kernels with use_f32_as_accum forced to false (spconv/csrc/sparse/convops.py,
# get_all_available): kernels that accumulate in fp16 stay eligible, whatever fp32_accum says. Measured here
# at the 3x3 channel counts of ResNet-50 and ConvNeXt-S against the dense-masked twin (cuDNN, fp32 accumulation).
CONV_SHAPES = {"resnet50": ((64, 56), (128, 28), (256, 14), (512, 7)),
               "convnext_small": ((96, 56), (192, 28), (384, 14), (768, 7))}


def check_fp16_convs(name, device, quick):
    from sparse_mim.sparse import SparseMap
    from sparse_mim.sparse import functional as SF
    from sparse_mim.sparse.spconv_backend import spconv_available
    from sparse_mim.spark import random_visible_mask
    if not spconv_available():
        record(name, "SKIP", "spconv is not importable here")
        return
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # spconv's CPU path has no fp16
    B = 2 if quick else 8
    shapes = {k: v[:1] for k, v in CONV_SHAPES.items()} if quick else CONV_SHAPES
    parts, grades = [], []
    for net, convs in shapes.items():
        for c, side in convs:
            side = min(side, 16) if quick else side
            g = torch.Generator().manual_seed(c)
            x64 = torch.randn(B, c, side, side, generator=g, dtype=torch.float64)
            w64 = torch.randn(c, c, 3, 3, generator=g, dtype=torch.float64) / (3 * c ** 0.5)
            grid = 2 if quick else 7  # the patch grid of a 224 image: 7x7 at every scale
            visible = random_visible_mask(B, (grid, grid), max(1, round(grid * grid * 0.4)), generator=g)
            ref = SF.conv2d(SparseMap.from_dense(x64, visible), w64, padding=1).features  # float64 reference
            errs = {}
            for path in ("spconv", "dense"):
                previous = SF.set_conv_backend(path)
                try:
                    xm = SparseMap.from_dense(x64.to(device, dtype), visible.to(device))
                    out = SF.conv2d(xm, w64.to(device, dtype), padding=1).features
                finally:
                    SF.set_conv_backend(previous)
                errs[path] = rel(out.double(), ref)
            ratio = errs["spconv"] / max(errs["dense"], 1e-30)
            eps = torch.finfo(dtype).eps
            grade_ = "PASS" if errs["spconv"] <= 4 * errs["dense"] + eps else (
                "WARN" if errs["spconv"] <= 32 * errs["dense"] + eps else "FAIL")
            grades.append(grade_)
            parts.append(f"{net} 3x3 {c}ch @{side}: spconv {errs['spconv']:.1e} vs dense-masked {errs['dense']:.1e} "
                         f"({ratio:.1f}x)")
    record(name, worst(*grades), f"{str(dtype).replace('torch.', '')} sparse conv error against float64, spconv vs "
           "the dense-masked twin (PASS <= 4x, WARN <= 32x: fp16 accumulation shows as tens of x): " + "; ".join(parts))


def check_syncs(name, device, quick):
    """Host-device synchronisations of one full pre-training step after a warm-up: on CUDA counted by the
    driver (``torch.cuda.set_sync_debug_mode('warn')``) and by the aten recorder; on the CPU by the recorder."""
    import warnings as _w
    from timm.optim import Lamb
    from sparse_mim.spark import SparK, param_groups
    from sparse_mim.utils.amp import optimizer_step, resolve_amp
    from sparse_mim.utils.host_sync import record_host_syncs
    net, size, B = ("resnet18", 64, 2) if quick else ("resnet50", 224, 16)
    torch.manual_seed(0)
    model = SparK(net, input_size=size, **({"decoder_width": 64} if quick else {})).to(device)
    opt = Lamb(param_groups(model, 0.04), lr=1e-4, max_grad_norm=None)
    policy = resolve_amp("auto", device)
    scaler = policy.make_scaler()
    images = torch.randn(B, 3, size, size).to(device)
    visible = model.mask(B, device)

    def step():
        with policy.autocast():
            loss, _, _ = model(images, visible)
        optimizer_step(loss, opt, scaler=scaler, clip_grad=5.0)
    step()
    driver = None
    with record_host_syncs(host=lambda t: any(t is gr.get("step") for gr in opt.param_groups)) as rec:
        if device.type == "cuda":
            torch.cuda.synchronize()
            with _w.catch_warnings(record=True) as caught:
                _w.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            driver = sum("synchroniz" in str(c.message).lower() for c in caught)
        else:
            step()
    by_where: dict = {}
    for reason, where in rec.syncs:
        key = f"{reason} [{where.split(' <- ')[0]}]"
        by_where[key] = by_where.get(key, 0) + 1
    per_scale = 4 * 6  # a few index builds per scale (4 scales), each image batch
    status = "PASS" if len(rec.syncs) <= per_scale else "WARN"
    record(name, status, f"one SparK-{net} step ({policy.name}): {len(rec.syncs)} synchronising aten calls"
           + (f", {driver} reported by CUDA's sync debug mode" if driver is not None else "")
           + f" (index builds once per scale and the step's one read-back are expected): "
           + ", ".join(f"{k} x{v}" for k, v in sorted(by_where.items(), key=lambda kv: -kv[1])[:12]))


def run_checks(device: str | torch.device = "cuda", quick: bool = False, out: str | None = None,
               only: list[str] | None = None) -> int:
    """Run the checks (``only`` a subset of env backbone spark amp autotune); returns 1 if any FAILed, else 0."""
    device = torch.device(device)
    RESULTS.clear()
    _OUT["dir"] = out
    if out and os.path.exists(os.path.join(out, "results.jsonl")):
        os.remove(os.path.join(out, "results.jsonl"))  # a rerun in the same folder starts its own record
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    wanted = set(only or CHECKS)
    t0 = time.perf_counter()
    usable = True
    if "env" in wanted or device.type == "cuda":  # on CUDA the build / GPU check always runs first
        usable = check_env("env", device) is not False
    if not usable:
        print("gpu_check: stopped after env (see the FAIL line above: it says how to fix it)", flush=True)
    elif device.type == "cuda" and not torch.cuda.is_available():
        record("all", "FAIL", "no CUDA device: nothing else can run")
    else:
        if "precision" in wanted:
            run_check("precision", check_precision, device, quick, out)
        if "convs" in wanted:
            run_check("fp16_convs", check_fp16_convs, device, quick)
        if "syncs" in wanted:
            run_check("syncs", check_syncs, device, quick)
        if "backbone" in wanted:
            for backend in _conv_backends(device, quick):
                run_check(f"backbone[{backend or 'default'}]", check_backbone, device, backend, quick)
        if "spark" in wanted:
            run_check("spark", check_spark, device, quick)
        if "amp" in wanted:
            run_check("amp", check_amp, device, quick)
        if "autotune" in wanted:
            run_check("autotune", check_autotune, device, quick, out)
    print(f"\n=== gpu_check.py ({time.perf_counter() - t0:.0f}s) ===")
    for r in RESULTS:
        print(f"{r['status']:5s} {r['check']}")
    return 1 if any(r["status"] == "FAIL" for r in RESULTS) else 0


CHECKS = ("env", "precision", "convs", "syncs", "backbone", "spark", "amp", "autotune")


def main(argv=None) -> int:
    """``tools/gpu_check.py``: the checks named by ``--only`` (default all) on ``--device``; status 1 if any failed.

    python tools/gpu_check.py --out gpu_check_out             # on a CUDA machine
    python tools/gpu_check.py --device cpu --quick            # exercise the script without a GPU
    python tools/gpu_check.py --only env autotune             # just the autotuner's answer
    """
    import argparse
    import warnings
    warnings.filterwarnings("ignore", message=r"`torch.cuda.amp.custom_(fwd|bwd)", category=FutureWarning)
    os.environ.setdefault("WANDB_MODE", "disabled")
    p = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small models / shapes only (CPU self-test)")
    p.add_argument("--out", default=None, help="folder for results.json and autotune.md")
    p.add_argument("--only", nargs="*", default=None, choices=list(CHECKS), help="run only these checks")
    args = p.parse_args(argv)
    return run_checks(args.device, quick=args.quick, out=args.out, only=args.only)
