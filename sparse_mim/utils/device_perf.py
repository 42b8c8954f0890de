"""cuDNN autotuning and memory format: decided here, once, for training, the benchmarks and the GPU check.

`perf_settings(device)` says what a run on ``device`` uses and why; `apply_perf_settings(device, model)`
sets it (``torch.backends.cudnn.benchmark``) and converts the model's dense convolutions to
channels-last where that is the choice. Both trainers, the benchmarks and the GPU check (``repotools``,
in a clone) call it, so what the benchmarks and the check measure is what training runs.

=================  ===================  ======================================================
device             cudnn.benchmark      channels-last (dense convs: decoder, densify, dense-masked twin)
=================  ===================  ======================================================
CUDA               on                   on
CPU, other         off (no effect)      off
=================  ===================  ======================================================

Why, on CUDA: every shape of a pre-training step is fixed by the config (image size, batch, the
scales of the backbone; the sparse engine's dense fallbacks run at those same shapes), so cuDNN's
one-time search per shape pays from the second step on. cuDNN's tensor-core kernels for fp16 / bf16
work in NHWC; an NCHW conv gets a transpose on each side. The sparse engine's features are [N, C]
rows, channels-last by nature, and its dense paths scatter them into NHWC memory already. On the CPU
cuDNN does not run and channels-last is left off: nothing here has measured a gain from it there
(``tools/benchmark_pretrain.py --channels-last`` measures it). Fine-grained training (fgvc) uses the
same settings for its convolutional stages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PerfSettings", "perf_settings", "apply_perf_settings"]


@dataclass(frozen=True)
class PerfSettings:
    device_type: str
    cudnn_benchmark: bool
    channels_last: bool
    reason: str

    def describe(self) -> str:
        return (f"cudnn.benchmark {'on' if self.cudnn_benchmark else 'off'}, channels-last "
                f"{'on' if self.channels_last else 'off'} ({self.reason})")

    def as_dict(self) -> dict:
        return {"cudnn_benchmark": self.cudnn_benchmark, "channels_last": self.channels_last,
                "perf_reason": self.reason}

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Put the dense convolutions of ``model`` in channels-last memory (in place; parameters keep their
        identity, so optimizers built before or after see the same tensors). A SparK model: its decoder, its
        densify projections and, for the dense-masked twin, its backbone (the sparse backbone's weights are
        read per layer by the sparse kernels, which set their own layout). Any other model: all of it."""
        if not self.channels_last:
            return model
        parts = [getattr(model, n) for n in ("dense_decoder", "densify_projs") if hasattr(model, n)]
        if parts:
            if not getattr(model, "is_sparse", True):
                parts.append(model.backbone)
        else:
            parts = [model]
        for part in parts:
            part.to(memory_format=torch.channels_last)
        return model


def perf_settings(device: torch.device | str) -> PerfSettings:
    """The settings for ``device`` (see the module docstring for the table and the reasons)."""
    dt = torch.device(device).type
    if dt == "cuda":
        return PerfSettings(dt, True, True, "CUDA: fixed shapes per run, so cuDNN's one-time search pays; tensor-core "
                                            "convs are NHWC")
    return PerfSettings(dt, False, False, f"{dt}: cuDNN does not run; channels-last not measured to pay here")


def apply_perf_settings(device: torch.device | str, model: nn.Module | None = None) -> PerfSettings:
    """Apply `perf_settings(device)`: set ``torch.backends.cudnn.benchmark``; convert ``model`` (if given)."""
    settings = perf_settings(device)
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    if model is not None:
        settings.prepare_model(model)
    return settings
