"""Count the aten ops that make the host wait for the device (a read-back or a data-dependent shape).

On CUDA each of them stalls the CPU until the GPU has caught up, so the CPU can no longer queue
work ahead and the GPU idles between kernels; the cost does not show when ops are timed between
synchronisations (the autotuner does that), only in a whole step. On the CPU nothing waits, but the
same aten calls are made, so recording them on the CPU tells where a CUDA run would synchronise:

* ``_local_scalar_dense`` / ``is_nonzero`` / ``equal``: ``.item()``, ``float(t)``, ``bool(t)``, ``if t:``;
* ``nonzero``, ``masked_select``, ``unique*``, ``repeat_interleave`` with a tensor of repeats: an output
  whose size depends on the data;
* ``index`` / ``index_put`` with a bool index: indexing by a mask (a ``nonzero`` inside);
* ``segment_reduce`` without ``unsafe=True``: it checks its lengths with two read-backs;
* a copy from the device to the host (``.cpu()``, ``.tolist()`` of a CUDA tensor); `read_back`, the one
  sanctioned way to bring scalars to the host (several in one transfer), is counted too.

`HostSyncRecorder` is a ``TorchDispatchMode`` (it sees every aten op of forward and backward,
autograd's included); `record_host_syncs` is the context-manager form::

    with record_host_syncs() as rec:
        loss = model(x); loss.backward()
    assert not rec.syncs, rec.summary()

On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` gives the same answer from the driver's side;
the GPU check uses both.
"""
from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncRecorder", "record_host_syncs", "read_back", "sync_reason", "SYNC_OPS"]

_aten = torch.ops.aten
SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique",
                      "_unique2", "unique_dim", "unique_consecutive", "item"})


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()))


def sync_reason(func, args, kwargs) -> str | None:
    """Why this aten call makes the host wait for the device, or None."""
    name = func._schema.name.split("::")[-1]
    if name in SYNC_OPS:
        return name
    if name in ("index", "_unsafe_index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"):
        if _has_bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
            return f"{name} with a bool mask"
    if name == "repeat_interleave" and isinstance(args[0] if args else None, torch.Tensor) \
            and "output_size" not in kwargs:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) or (args[0].dtype in (torch.int32, torch.int64) and len(args) == 1):
            return "repeat_interleave with tensor repeats"
    if name in ("_to_copy", "copy_") and args and isinstance(args[0], torch.Tensor):
        src, dst = (args[0], kwargs.get("device")) if name == "_to_copy" else (args[1], args[0].device)
        if src.device.type not in ("cpu", "meta") and dst is not None and torch.device(dst).type == "cpu":
            return "copy to the host"
    if name == "segment_reduce" and not kwargs.get("unsafe", args[6] if len(args) > 6 else False):
        return "segment_reduce without unsafe=True"
    return None


_ACTIVE: list = []


def read_back(values) -> list[float]:
    """The one sanctioned read-back: device scalars (a list of 0-d tensors or one 1-d tensor) to host floats in
    a single transfer (one synchronisation however many values). Recorders count it as one sync."""
    t = values if isinstance(values, torch.Tensor) else torch.stack([v.detach().float().reshape(()) for v in values])
    for rec in _ACTIVE:
        rec.note("read_back")
    return t.detach().float().cpu().tolist()


@dataclass
class HostSyncRecorder(TorchDispatchMode):
    """Records every aten call that synchronises (see the module docstring); ``syncs``: (reason, where)."""

    stacks: bool = False
    syncs: list = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)
    # tensors that live on the host in a CUDA run too (an optimizer's step counter): reading them waits for nothing
    host: Callable[[torch.Tensor], bool] | None = None

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[func._schema.name.split("::")[-1]] += 1
        reason = sync_reason(func, args, kwargs)
        if reason is not None and self.host is not None and args and isinstance(args[0], torch.Tensor) \
                and self.host(args[0]):
            reason = None
        if reason is not None:
            self.note(reason)
        return func(*args, **kwargs)

    def note(self, reason: str) -> None:
        self.syncs.append((reason, self._where() if self.stacks else ""))

    @staticmethod
    def _where() -> str:
        stack = traceback.StackSummary.extract(traceback.walk_stack(None), lookup_lines=False)  # innermost first
        frames = [f for f in stack if "sparse_mim" in f.filename and "host_sync" not in f.filename]
        return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in frames[:4])

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def summary(self) -> str:
        counts = Counter(self.syncs)
        return "\n".join(f"{n:4d} x {reason}  [{where}]" for (reason, where), n in counts.most_common()) or "none"


@contextlib.contextmanager
def record_host_syncs(stacks: bool = True, host: Callable[[torch.Tensor], bool] | None = None
                      ) -> Iterator[HostSyncRecorder]:
    """``with record_host_syncs() as rec:`` records the synchronising aten calls made inside (forward and backward).

    ``host(t)``: True for tensors that stay on the host in a CUDA run (reading them is no synchronisation)."""
    rec = HostSyncRecorder(stacks=stacks, host=host)
    with rec:
        yield rec
