"""Where a sparse model's multiply-adds go: sparse kernels, small dense ops, exact dense fallbacks.

Every op of a sparse model records its multiply-adds (MACs) under the name of
the innermost module running it:

* ``"sparse"``: a sparse kernel (conv, linear map of the features, pooling) on
  the active sites only;
* ``"dense"``: a dense op on a dense tensor that never was a feature map (the
  fully connected layers of a squeeze-excitation gate on its [B, C, 1, 1] input);
* ``"fallback"``: an op without a sparse kernel, run exactly by densifying its
  input (zeros at hidden sites), running the dense op and keeping the active
  sites of the output (`dispatch`). Its MACs are those of the dense op.

MACs count convolutions and linear maps exactly (output elements x inputs per
output); pooling as output elements x window taps; other fallback ops (resize,
pad, ...) as one per output element. Forward MACs only (backward is about
twice the forward for each op, so the shares hold for a training step).

Reading it:

* ``with mac_report() as rep: model(x)`` then ``rep.rows`` (one dict per
  module, op and kind: ``module``, ``op``, ``kind``, ``macs``, ``share`` of the
  pass's total), ``rep.fallback_rows()``, ``rep.sparse_share`` and
  ``print(rep.format())``;
* without asking: the first time a (module, op) falls back in a process, one
  warning on the ``sparse_mim.sparse`` logger names it with its MACs and share
  of that forward pass (logged when the next pass starts, i.e. at the next
  ``SparseMap.from_dense``, or at exit).

Module names come from forward hooks that `sparsify` / `dense_masked` put on
every submodule (`install_scopes`); the same scope stack tells the
dense-masked simulation which ops run inside a converted model.

Counters and scopes only: this module imports nothing of the engine. When an
op leaves the patch grid inside a module, `dispatch.mark_dense` enters its
dense counter on that module's scope and leaves the function that turns the
module's outputs back into maps (``on_exit``), which the scope calls when the
module returns.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["mac_report", "MacReport", "install_scopes", "current_scope", "role_of", "record", "new_pass", "reset_warnings",
           "dense_macs"]

logger = logging.getLogger("sparse_mim.sparse")

_ATTR = "_sparse_mim_scope"  # (qualified name, role) set on each module by the conversions


# ---------------------------------------------------------------------------------------------------- scopes
class _Frame:
    """One running module. ``dense_ref`` / ``counter`` / ``on_exit`` belong to `dispatch` (``mark_dense``): the
    map whose op left the patch grid inside this module, the mode it entered (exited here when the module
    returns) and ``on_exit(output)`` -> the module's output to use instead (its dense tensors made maps again)."""

    __slots__ = ("name", "module", "role", "dense_ref", "counter", "on_exit")

    def __init__(self, name: str, module: nn.Module, role: str):
        self.name, self.module, self.role = name, module, role
        self.dense_ref = None  # a SparseMap: an op inside produced an off-grid dense tensor (see dispatch)
        self.counter = None  # TorchFunctionMode counting dense MACs while dense_ref is set
        self.on_exit = None  # set with dense_ref by dispatch


_STACK: list[_Frame] = []


def _enter(module: nn.Module, args) -> None:
    scope = module.__dict__.get(_ATTR)
    if scope is not None:
        _STACK.append(_Frame(scope[0], module, scope[1]))


def _exit(module: nn.Module, args, output=None):
    if module.__dict__.get(_ATTR) is None:
        return None
    for i in range(len(_STACK) - 1, -1, -1):  # normally the top; deeper after an exception inside a child
        if _STACK[i].module is module:
            break
    else:
        return None
    frames = _STACK[i:]
    del _STACK[i:]
    for frame in reversed(frames):  # LIFO: each counter was entered while its frame was on top
        if frame.counter is not None:
            frame.counter.__exit__(None, None, None)
    top = frames[0]
    if top.on_exit is None or output is None:
        return None
    return top.on_exit(output)  # dispatch's: the output's dense on-grid tensors back to maps


def install_scopes(model: nn.Module, role: str) -> None:
    """Name every submodule of ``model`` for the report (role ``"sparse"``) or the simulation (``"masked"``).

    Adds a forward pre-hook and an always-called forward hook once per module;
    converting again only updates the name and role.
    """
    for name, m in model.named_modules():
        had = _ATTR in m.__dict__
        m.__dict__[_ATTR] = (name or type(m).__name__, role)
        if not had:
            m.register_forward_pre_hook(_enter)
            m.register_forward_hook(_exit, always_call=True)


def role_of(module: nn.Module) -> str | None:
    """``"sparse"`` / ``"masked"`` for a module of a model `sparsify` / `dense_masked` converted, else None."""
    scope = module.__dict__.get(_ATTR)
    return None if scope is None else scope[1]


def current_scope() -> _Frame | None:
    return _STACK[-1] if _STACK else None


def _scope_label() -> str:
    if not _STACK:
        return "<outside any module>"
    f = _STACK[-1]
    return f"{f.name} ({type(f.module).__name__})"


# ---------------------------------------------------------------------------------------------------- accounting
@dataclass
class MacReport:
    """Multiply-adds of the ops run while the report was open, by module, op and kind."""

    table: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)

    def add(self, module: str, op: str, kind: str, macs: int) -> None:
        row = self.table.get((module, op, kind))
        if row is None:
            self.table[(module, op, kind)] = [int(macs), 1]
        else:
            row[0] += int(macs)
            row[1] += 1

    @property
    def total_macs(self) -> int:
        return sum(v[0] for v in self.table.values())

    def macs(self, kind: str) -> int:
        return sum(v[0] for (_, _, k), v in self.table.items() if k == kind)

    @property
    def sparse_share(self) -> float:
        """Share of the MACs on sparse kernels (1.0 when nothing was counted)."""
        total = self.total_macs
        return self.macs("sparse") / total if total else 1.0

    @property
    def fallback_share(self) -> float:
        total = self.total_macs
        return self.macs("fallback") / total if total else 0.0

    @property
    def rows(self) -> list[dict[str, Any]]:
        total = max(self.total_macs, 1)
        return [{"module": m, "op": op, "kind": k, "macs": v[0], "calls": v[1], "share": v[0] / total}
                for (m, op, k), v in self.table.items()]

    def fallback_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] == "fallback"]

    def format(self, kinds: tuple[str, ...] = ("fallback", "dense")) -> str:
        lines = [f"MACs: {self.total_macs:,} total, sparse {self.sparse_share:.1%}, "
                 f"dense {self.macs('dense') / max(self.total_macs, 1):.1%}, fallback {self.fallback_share:.1%}"]
        rows = sorted((r for r in self.rows if r["kind"] in kinds), key=lambda r: -r["macs"])
        if rows:
            lines.append(f"{'kind':<9} {'share':>7} {'MACs':>15}  module (op)")
            lines += [f"{r['kind']:<9} {r['share']:>7.2%} {r['macs']:>15,}  {r['module']} ({r['op']})" for r in rows]
        return "\n".join(lines)


class _State:
    def __init__(self):
        self.reports: list[MacReport] = []
        self.current = MacReport()  # this forward pass (since the last SparseMap.from_dense)
        self.warned: set[tuple[str, str]] = set()


_STATE = _State()


def record(op: str, macs: int, kind: str = "sparse") -> None:
    """Count ``macs`` multiply-adds of ``op`` under the innermost module (cheap; always on)."""
    label = _scope_label()
    _STATE.current.add(label, op, kind, macs)
    for rep in _STATE.reports:
        rep.add(label, op, kind, macs)


def _flush_warnings() -> None:
    cur = _STATE.current
    new = [r for r in cur.fallback_rows() if (r["module"], r["op"]) not in _STATE.warned]
    for r in new:
        _STATE.warned.add((r["module"], r["op"]))
        logger.warning("sparse engine: %s runs %s through the exact dense fallback (densify, dense op, keep the "
                       "active sites): %s MACs, %.2f%% of that forward pass's multiply-adds",
                       r["module"], r["op"], f"{r['macs']:,}", 100 * r["share"])


def new_pass() -> None:
    """A new forward pass starts (called by `SparseMap.from_dense`): report the last pass's new fallbacks."""
    if _STATE.current.table:
        _flush_warnings()
        _STATE.current = MacReport()


def reset_warnings() -> None:
    """Forget which fallbacks were already reported (each is reported again once)."""
    _STATE.warned.clear()
    _STATE.current = MacReport()


atexit.register(lambda: _flush_warnings() if _STATE.current.table else None)


@contextlib.contextmanager
def mac_report() -> Iterator[MacReport]:
    """Collect the MACs of every op run inside: ``with mac_report() as rep: model(x)``; see `MacReport`."""
    rep = MacReport()
    _STATE.reports.append(rep)
    try:
        yield rep
    finally:
        _STATE.reports.remove(rep)


# ---------------------------------------------------------------------------------------------------- dense MACs
def dense_macs(name: str, args, out) -> int:
    """MACs of a dense op from its inputs and output (convs / linear exactly, else one per output element)."""
    if not isinstance(out, torch.Tensor):
        outs = [o for o in (out if isinstance(out, (tuple, list)) else ()) if isinstance(o, torch.Tensor)]
        return sum(o.numel() for o in outs)
    if name in ("conv1d", "conv2d", "conv3d") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return out.numel() * args[1][0].numel()
    if name == "conv_transpose2d" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return args[0].numel() * args[1][0].numel() if isinstance(args[0], torch.Tensor) else out.numel()
    if name in ("linear", "matmul", "mm", "bmm", "addmm", "__matmul__") and len(args) > 1:
        a = args[1] if name != "addmm" else args[1]
        inner = a.shape[-1] if name == "linear" else (args[0].shape[-1] if name != "addmm" else a.shape[-1])
        return out.numel() * int(inner)
    return out.numel()
