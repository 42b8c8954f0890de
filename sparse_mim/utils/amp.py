"""Mixed precision: one ``amp`` setting for every entry point, and one optimizer-step block.

``resolve_amp(setting, device)`` turns the user's ``amp`` setting (``auto | bf16 | fp16 | off``)
into an `AmpPolicy`:

=====================  ==============================================================
device                 ``auto`` picks
=====================  ==============================================================
CUDA                   per GPU generation, `CUDA_AUTO_TABLE` (one line each, with the
                       reason printed at run start): bf16 on Ampere and newer, fp16 +
                       ``GradScaler`` on Volta / Turing, fp32 before Volta
CPU with bf16 instr.   bf16 autocast (x86 AVX512-BF16 / AMX-BF16, Arm BF16 extension)
any other CPU, MPS...  fp32 (bf16 there is emulated and slower than fp32)
=====================  ==============================================================

An explicit ``bf16`` is honoured wherever the device can compute it at all (on a CPU
without bf16 instructions it is emulated: correct, but slower than fp32, and the
policy's ``reason`` says so); on a CUDA device without bf16 support it raises
`AmpError`. An explicit ``fp16`` always gets a gradient scaler. ``off`` is fp32.

Only the forward (and the loss) runs under ``policy.autocast()``; master weights,
optimizer state, gradients and checkpoints stay fp32, so a run can be resumed under
another ``amp`` setting (`load_scaler_state` tolerates a missing / extra scaler state).

`optimizer_step` is the single backward / accumulate / unscale / clip / step / scaler
update block both trainers use::

    policy = resolve_amp(cfg.train.amp, device)
    scaler = policy.make_scaler()
    for i, batch in enumerate(loader):
        with policy.autocast():
            loss = criterion(model(batch), target)
        check_finite(loss.detach(), "loss", step)            # the NaN guard, every mode
        res = optimizer_step(loss, optimizer, scaler=scaler, clip_grad=5.0,
                             accum_steps=accum, boundary=(i + 1) % accum == 0)
        if res.stepped and not res.skipped: ...
"""
from __future__ import annotations

import contextlib
import functools
import math
import platform
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from .host_sync import read_back

__all__ = ["AmpError", "AmpPolicy", "StepResult", "AMP_CHOICES", "resolve_amp", "cpu_bf16_support",
           "cuda_capability", "CUDA_AUTO_TABLE", "CudaAutoRule", "cuda_auto_rule", "optimizer_step", "grad_norm", "load_scaler_state"]

AMP_CHOICES = ("auto", "bf16", "fp16", "off")

# spellings people bring from torch / timm (``--amp-dtype bfloat16``) and older configs (bool ``amp``)
_ALIASES = {
    "auto": "auto", "true": "auto", "on": "auto", "yes": "auto",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "off": "off", "false": "off", "no": "off", "none": "off", "fp32": "off", "float32": "off",
    "torch.float32": "off",
}

_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class AmpError(ValueError):
    """An ``amp`` setting that cannot run on the chosen device (the message says what to use instead)."""


@dataclass(frozen=True)
class AmpPolicy:
    """The resolved mixed-precision choice for one device.

    name: ``"bf16"``, ``"fp16"`` or ``"fp32"``; dtype: the autocast dtype (None for fp32);
    use_scaler: whether gradients need a ``GradScaler`` (fp16 only); reason: one line
    saying why (printed at start, stored in the run config).
    """

    name: str
    dtype: Optional[torch.dtype]
    use_scaler: bool
    device_type: str
    reason: str
    setting: str = "auto"

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        """``torch.autocast`` for this device and dtype; a no-op context under fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> Optional["torch.amp.GradScaler"]:
        """A fresh ``torch.amp.GradScaler`` for fp16, None otherwise."""
        if not self.use_scaler:
            return None
        return torch.amp.GradScaler(self.device_type)

    def describe(self) -> str:
        """``"amp: bf16 (auto: CPU has bf16 instructions (avx512_bf16, amx_bf16))"``."""
        return f"amp: {self.name} ({self.setting}: {self.reason})"

    def as_dict(self) -> dict:
        """Plain values for the run config / wandb summary."""
        return {"amp": self.name, "amp_setting": self.setting, "amp_reason": self.reason,
                "amp_scaler": self.use_scaler}

    def __str__(self) -> str:
        return self.describe()


# ---------------------------------------------------------------------------- hardware probes
def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86 / Arm spelling
                    return set(value.split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> tuple[bool, str]:
    """(native, evidence): whether this CPU has bf16 *compute* instructions.

    Checked in order: torch's own probes (``torch.cpu._is_avx512_bf16_supported`` /
    ``_is_amx_tile_supported``, the same ones oneDNN dispatches on), then the kernel's
    CPU flags (x86 ``avx512_bf16`` / ``amx_bf16``, Arm ``bf16``), then macOS sysctl on
    Apple silicon. AVX512 without the BF16 extension does *not* count: oneDNN runs bf16
    there by conversion, slower than fp32.
    """
    found = []
    probes = (("_is_avx512_bf16_supported", "avx512_bf16"), ("_is_amx_tile_supported", "amx"))
    for fn, label in probes:
        probe = getattr(torch.cpu, fn, None)
        try:
            if probe is not None and probe():
                found.append(label)
        except Exception:  # noqa: BLE001 - a probe missing on this build is not an error
            pass
    if found:
        return True, "torch reports " + ", ".join(found)
    flags = _cpuinfo_flags()
    hits = [f for f in _X86_BF16_FLAGS if f in flags]
    if hits:
        return True, "CPU flags " + ", ".join(hits)
    if platform.machine().lower() in ("aarch64", "arm64") and "bf16" in flags:
        return True, "Arm BF16 extension"
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        try:
            import subprocess
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=2).stdout.strip()
            if out == "1":
                return True, "Apple FEAT_BF16"
        except Exception:  # noqa: BLE001
            pass
    return False, "no bf16 instructions (no avx512_bf16 / amx_bf16 / Arm bf16)"


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _normalise(setting: Any) -> str:
    if isinstance(setting, bool):
        return "auto" if setting else "off"
    if setting is None:
        return "off"
    if isinstance(setting, torch.dtype):
        setting = str(setting)
    key = str(setting).strip().lower()
    if key not in _ALIASES:
        raise AmpError(f"amp={setting!r}: must be one of {', '.join(AMP_CHOICES)} "
                       "(auto picks bf16 / fp16 / fp32 from the hardware; off is fp32)")
    return _ALIASES[key]


# ---------------------------------------------------------------------------- amp=auto on CUDA
@dataclass(frozen=True)
class CudaAutoRule:
    """What ``amp=auto`` picks on one GPU generation, and why. ``measured``: where the choice was measured
    (None: chosen by reasoning; tools/gpu_check.sh, section ``precision``, measures it and prints whether the
    numbers agree with this table, so a run on that generation can update its line)."""

    min_capability: tuple[int, int]
    generation: str
    choice: str  # bf16 | fp16 | off
    reason: str
    measured: Optional[str] = None


_BF16_REASON = ("bf16 needs no loss scaling, and every sparse path (gather GEMM, patch windows, cuDNN on the "
                "zero-filled map) accumulates in fp32; spconv has no bf16 kernels, so it does not run, and its fp16 "
                "kernels may accumulate in fp16 (spconv 2.3 hard-codes use_f32_as_accum=false)")
# One line per generation, newest first; the first rule whose capability is <= the GPU's applies.
CUDA_AUTO_TABLE: tuple[CudaAutoRule, ...] = (
    CudaAutoRule((10, 0), "Blackwell", "bf16", _BF16_REASON),
    CudaAutoRule((9, 0), "Hopper", "bf16", _BF16_REASON),
    CudaAutoRule((8, 9), "Ada", "bf16", _BF16_REASON),
    CudaAutoRule((8, 0), "Ampere", "bf16", _BF16_REASON),
    CudaAutoRule((7, 5), "Turing", "fp16", "no bf16 tensor cores: fp16 with a gradient scaler (spconv eligible)"),
    CudaAutoRule((7, 0), "Volta", "fp16", "no bf16 tensor cores: fp16 with a gradient scaler (spconv eligible)"),
    CudaAutoRule((0, 0), "Pascal or older", "off", "no tensor cores: fp16 / bf16 would not be faster than fp32"),
)


def cuda_auto_rule(capability: tuple[int, int]) -> CudaAutoRule:
    """The `CUDA_AUTO_TABLE` line for a GPU of compute ``capability``."""
    return next(r for r in CUDA_AUTO_TABLE if tuple(capability) >= r.min_capability)


# ---------------------------------------------------------------------------- resolution
def resolve_amp(setting: Any, device: torch.device | str) -> AmpPolicy:
    """The `AmpPolicy` for ``setting`` (auto | bf16 | fp16 | off) on ``device``.

    Raises `AmpError` for an unknown setting or bf16 on a CUDA device without it.
    """
    s = _normalise(setting)
    device = torch.device(device)
    dt = device.type
    if s == "off":
        return AmpPolicy("fp32", None, False, dt, "amp off", s)

    if dt == "cuda":
        major, minor = cuda_capability(device)
        cc = f"compute capability {major}.{minor}"
        if s == "fp16":
            return AmpPolicy("fp16", torch.float16, True, dt, f"fp16 requested ({cc}); gradients scaled", s)
        if s == "bf16":
            if major < 8 and not torch.cuda.is_bf16_supported(including_emulation=False):
                raise AmpError(f"amp=bf16 on a CUDA device with {cc}: bf16 needs 8.0 or newer (Ampere+); "
                               "use amp=fp16 (with a gradient scaler) or amp=auto")
            return AmpPolicy("bf16", torch.bfloat16, False, dt, f"bf16 requested ({cc})", s)
        rule = cuda_auto_rule((major, minor))
        why = (f"{rule.generation}, {cc}: {rule.reason}; "
               + (f"measured: {rule.measured}" if rule.measured else
                  "not measured on this generation yet (tools/gpu_check.sh, section precision)"))
        if rule.choice == "bf16":
            return AmpPolicy("bf16", torch.bfloat16, False, dt, why, s)
        if rule.choice == "fp16":
            return AmpPolicy("fp16", torch.float16, True, dt, why, s)
        return AmpPolicy("fp32", None, False, dt, why, s)

    if dt == "cpu":
        native, evidence = cpu_bf16_support()
        if s == "bf16":
            note = evidence if native else f"{evidence}: emulated, expect it slower than fp32"
            return AmpPolicy("bf16", torch.bfloat16, False, dt, f"bf16 requested ({note})", s)
        if s == "fp16":
            return AmpPolicy("fp16", torch.float16, True, dt,
                             "fp16 requested on CPU (gradients scaled; bf16 is the usual CPU choice)", s)
        if native:
            return AmpPolicy("bf16", torch.bfloat16, False, dt, f"CPU has bf16 instructions ({evidence})", s)
        return AmpPolicy("fp32", None, False, dt, f"CPU has {evidence}: fp32", s)

    # mps, xpu, ...: only what the user asks for explicitly
    if s == "auto":
        return AmpPolicy("fp32", None, False, dt, f"no native-precision rule for device type {dt!r}: fp32", s)
    dtype = torch.bfloat16 if s == "bf16" else torch.float16
    return AmpPolicy(s, dtype, s == "fp16", dt, f"{s} requested on {dt}", s)


# ---------------------------------------------------------------------------- optimizer step
@dataclass
class StepResult:
    """What `optimizer_step` did: ``stepped`` (an accumulation boundary was reached),
    ``skipped`` (boundary reached but the update was not applied: non-finite gradients),
    ``grad_norm`` (global L2 norm of the unscaled gradients before clipping; NaN off-boundary),
    ``scale`` (the loss scale used for this step; 1.0 without a scaler)."""

    stepped: bool
    skipped: bool = False
    grad_norm: float = math.nan
    scale: float = 1.0
    extra: tuple = ()  # the values of ``read_with``, read back with the gradient norm


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients (fp32; 0 when no parameter has a gradient)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def optimizer_step(loss: Optional[torch.Tensor], optimizer: torch.optim.Optimizer, *,
                   scaler: Optional["torch.amp.GradScaler"] = None,
                   params: Optional[Iterable[torch.Tensor]] = None,
                   clip_grad: float = 0.0, accum_steps: int = 1, boundary: bool = True,
                   zero_grad: bool = True, read_with: Sequence[torch.Tensor] = ()) -> StepResult:
    """Backward of one micro-batch and, at an accumulation boundary, the optimizer step.

    loss: this micro-batch's mean loss (divided by ``accum_steps`` here; pass None when the
    backward was already done). At ``boundary``: unscale (fp16), global-norm clip to
    ``clip_grad`` (0 = measure only), step, scaler update, zero the gradients.

    Non-finite gradients never reach the weights, in every mode: with a scaler the step
    is skipped and the scale lowered (the usual fp16 overflow handling); without one
    (bf16 / fp32) the step is skipped as well and ``skipped`` is reported, so the trainer
    can count or stop.

    Host read-backs: one per step. The gradient norm (the skip decision needs it on the host before the
    optimizer runs), the loss scale and any scalars in ``read_with`` (the trainer's loss and counts) come
    back in one transfer (`sparse_mim.utils.host_sync.read_back`); their values are ``StepResult.extra``.
    (torch's ``GradScaler.step`` adds its own read of the inf flag for non-fused optimizers.)
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    if loss is not None:
        scaled = loss / accum_steps if accum_steps > 1 else loss
        if scaler is not None:
            scaled = scaler.scale(scaled)
        scaled.backward()
    if not boundary:
        return StepResult(stepped=False)

    params = _optimizer_params(optimizer) if params is None else [p for p in params]
    scale_t = scaler._get_scale_async() if scaler is not None and scaler.is_enabled() else None
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad and clip_grad > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, float(clip_grad), error_if_nonfinite=False)
    else:
        norm = grad_norm(params)
    pack = [norm] + ([scale_t] if scale_t is not None else []) + list(read_with)
    device = next((t.device for t in pack if t.device.type != "cpu"), norm.device)
    values = read_back([t.detach().float().reshape(()).to(device) for t in pack])  # one transfer
    norm_value = values[0]
    scale = values[1] if scale_t is not None else (float(scaler.get_scale()) if scaler is not None else 1.0)
    # (scale_t is None only before the scaler's first scale(): get_scale() then returns its initial value, no read)
    extra = tuple(values[1 + (scale_t is not None):])
    finite = math.isfinite(norm_value)
    if scaler is not None:
        scaler.step(optimizer)  # skips by itself when unscale_ found inf / nan
        scaler.update()
    elif finite:
        optimizer.step()
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    return StepResult(stepped=True, skipped=not finite, grad_norm=norm_value, scale=scale, extra=extra)


def load_scaler_state(scaler: Optional["torch.amp.GradScaler"], state: Optional[Mapping]) -> bool:
    """Restore a scaler from a checkpoint's ``scaler`` entry when both exist.

    Resuming under another ``amp`` setting is allowed: an fp16 run resumed as bf16 / fp32
    drops the saved scale, a bf16 / fp32 run resumed as fp16 starts a fresh scale.
    Returns whether a state was loaded.
    """
    if scaler is None or not state:
        return False
    scaler.load_state_dict(dict(state))
    return True
