"""Small training helpers: running averages, throughput, a NaN/inf guard, memory."""
from __future__ import annotations

import math
import time
from collections import deque

import torch

__all__ = ["AverageMeter", "Throughput", "NonFiniteLossError", "check_finite", "peak_memory_mb", "count_parameters",
           "to_pair"]


def to_pair(value, what: str = "value") -> tuple[int, int]:
    """``(h, w)`` from an int, a one-item or a two-item sequence (kernel sizes, strides, image sizes);
    anything else is a ValueError naming ``what``. The one such helper of the project."""
    items = list(value) if isinstance(value, (tuple, list)) else [value]
    if len(items) == 1:
        items = items * 2
    if len(items) != 2:
        raise ValueError(f"{what} must be an int or (height, width), got {value!r}")
    return int(items[0]), int(items[1])


class AverageMeter:
    """Running mean of a scalar (``update(value, n)``), plus the last value and a windowed mean."""

    def __init__(self, window: int = 20):
        self.window = deque(maxlen=window)
        self.reset()

    def reset(self):
        self.val, self.sum, self.count = 0.0, 0.0, 0
        self.window.clear()

    def update(self, value, n: int = 1):
        value = float(value)
        self.val = value
        self.sum += value * n
        self.count += n
        self.window.append(value)

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)

    @property
    def smooth(self) -> float:
        """Mean of the last ``window`` values (what a progress bar shows)."""
        return sum(self.window) / max(len(self.window), 1)


class Throughput:
    """Items per second over a sliding window of recent steps (``update(n)`` after each step)."""

    def __init__(self, window: int = 20):
        self.times = deque(maxlen=window + 1)
        self.counts = deque(maxlen=window)
        self.times.append(time.perf_counter())

    def update(self, n: int, now: float | None = None) -> float:
        self.times.append(time.perf_counter() if now is None else now)
        self.counts.append(n)
        return self.rate

    @property
    def rate(self) -> float:
        if len(self.times) < 2:
            return 0.0
        dt = self.times[-1] - self.times[0]
        return sum(list(self.counts)[-(len(self.times) - 1):]) / dt if dt > 0 else 0.0


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss (or another watched value) is NaN or infinite."""


def check_finite(value, name: str = "loss", step: int | None = None, hint: str = "") -> float:
    """Return ``float(value)``; raise NonFiniteLossError with a clear message if it is NaN or inf."""
    v = float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        where = f" at step {step}" if step is not None else ""
        raise NonFiniteLossError(
            f"{name} is {v}{where}: training stopped. {hint or ''}".rstrip() +
            " Usual fixes: lower the learning rate (optim.lr), keep gradient clipping on (optim.clip_grad), or "
            "train.amp=off; then resume from the last good checkpoint with resume=auto.")
    return v


def peak_memory_mb(device: torch.device | str | None = None) -> float:
    """Peak memory in MiB: allocated CUDA memory on a CUDA ``device``, else the process's peak RSS."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
        import sys
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - Windows
        return 0.0


def count_parameters(module: torch.nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
