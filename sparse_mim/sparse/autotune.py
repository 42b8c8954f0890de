"""Autotuning of the sparse ops: time every exact implementation on the real tensors, keep the fastest.

Several sparse ops have more than one exact implementation (the stride-1 k x k
conv: neighbour-table gather + GEMM, patch windows, the dense conv on the
zero-filled map, spconv; a strided conv: gather + GEMM or the dense strided
conv read back at the coarse sites; ...). Every implementation returns the
dense-masked numbers, so the choice only changes the speed, and which one is
fastest depends on the device, the shape and the sparsity. As with
``torch.backends.cudnn.benchmark`` and Triton's autotuner, the first time a
*configuration* is met the op times each candidate (forward and backward) on
the tensors of that call and remembers the fastest:

* configuration (the key): op kind, kernel, stride, dilation, groups, channels
  in and out, spatial size, patch factor, number of active sites (bucketed to a
  power of two), dtype, device (type and name, never the index: every rank of a
  job has the same keys), autocast dtype, whether gradients are needed, and the
  torch thread count on the CPU;
* candidates: a small registry, op kind -> {name: `Candidate`}; the dense
  candidate is always one of them, so a tuned op is never slower than its
  dense-masked twin beyond timing noise. Ops register their candidates with
  `register_candidate` (see the bottom of `functional.py`);
* timing never touches the caller's tensors, autograd graph, RNG streams or
  BatchNorm statistics: only the op itself runs, on detached copies of its
  inputs, backward with a gradient of ones, no random draw;
* cost is bounded: a budget per configuration and one in total (warm-up and
  index-table builds included); past the total budget the fixed rules decide;
* choices are kept in memory and, unless switched off, in a small JSON file per
  device and torch / spconv versions (`set_cache`, env ``SPARSE_MIM_AUTOTUNE_CACHE``;
  default ``~/.cache/sparse_mim/autotune/``): a warm cache costs nothing.

Modes (`set_mode`, also ``functional.set_conv_backend``): ``"autotune"`` (default),
``"table"`` (the fixed rules, no timing; ``"auto"`` is an alias of it), or one
forced path for every op that has it (``"gather"``, ``"windows"``, ``"dense"``,
``"spconv"``; ops without that path use their gather path).

After the first training step call `settle()` (every rank): it makes all ranks
use rank 0's choices and prints the per-scale table once. `log_dict()` returns
the choices for the run's config / wandb.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..utils.checkpoint import atomic_write_text  # the one atomic writer (a full disk leaves no temp file)
from ..utils.config import K

__all__ = [
    "MODES", "Candidate", "OpCall", "register_candidate", "register_table_rule", "candidates", "choose",
    "set_mode", "get_mode", "set_cache", "cache_file", "set_budget", "get_budget", "reset", "choices",
    "log_dict", "format_table", "report", "sync_choices", "settle", "configure", "CONFIG_DEFAULTS",
    "tuning_seconds", "run_candidate", "last_path", "BackendError",
]

log = logging.getLogger("sparse_mim.autotune")

FORCED = ("gather", "windows", "dense", "spconv")
MODES = ("autotune", "table") + FORCED
ALIASES = {"auto": "table"}
ENV_CACHE = "SPARSE_MIM_AUTOTUNE_CACHE"
ENV_MODE = "SPARSE_MIM_CONV_BACKEND"
_OFF = ("off", "none", "0", "false", "no")


# ---------------------------------------------------------------------------------------------------- registry
@dataclass
class Candidate:
    """One exact implementation of an op kind: ``run(call) -> output features`` (no bias)."""

    name: str
    run: Callable[["OpCall"], Tensor]
    available: Callable[["OpCall"], bool] = lambda call: True


_REGISTRY: dict[str, dict[str, Candidate]] = {}
_TABLE_RULES: dict[str, Callable[["OpCall"], str]] = {}


def register_candidate(kind: str, name: str, run: Callable[["OpCall"], Tensor],
                       available: Callable[["OpCall"], bool] | None = None) -> None:
    """Add (or replace) implementation ``name`` of op ``kind``. It must return the dense-masked numbers."""
    _REGISTRY.setdefault(kind, {})[name] = Candidate(name, run, available or (lambda call: True))


def register_table_rule(kind: str, rule: Callable[["OpCall"], str]) -> None:
    """The fixed choice of op ``kind`` (mode ``"table"``, and past the tuning budget)."""
    _TABLE_RULES[kind] = rule


@dataclass
class OpCall:
    """One call of a sparse conv-like op, as the candidates see it.

    ``x``: the input map, features already in the compute dtype; ``weight``: torch
    layout, compute dtype (None for pooling); ``target``: the output sites (``x``
    itself for stride 1). ``extra``: anything else an op kind needs.
    """

    kind: str
    x: Any  # SparseMap
    weight: Tensor | None
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    target: Any  # SparseMap
    extra: dict = field(default_factory=dict)

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0]) if self.weight is not None else int(self.x.num_channels)

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.x.features.requires_grad or
                                            (self.weight is not None and self.weight.requires_grad))

    def describe(self) -> dict:
        """The configuration as plain values (the key's fields)."""
        feats = self.x.features
        dev = feats.device
        ac = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        n = int(self.x.num_sites)
        return {
            "op": self.kind, "kernel": list(self.kernel), "stride": list(self.stride),
            "dilation": list(self.dilation), "groups": int(self.groups), "in": int(self.x.num_channels),
            "out": self.out_channels, "size": list(self.x.spatial_shape), "patch": int(self.x.patch_factor),
            "sites": 1 << max(0, round(math.log2(max(n, 1)))), "dtype": str(feats.dtype).replace("torch.", ""),
            "device": _device_name(dev), "autocast": str(ac).replace("torch.", "") if ac is not None else "none",
            "grad": self.needs_grad, "threads": torch.get_num_threads() if dev.type == "cpu" else 0,
        }


def _key(desc: dict) -> str:
    d = desc
    return (f"{d['op']}|k{d['kernel'][0]}x{d['kernel'][1]}|s{d['stride'][0]}x{d['stride'][1]}"
            f"|d{d['dilation'][0]}x{d['dilation'][1]}|g{d['groups']}|c{d['in']}>{d['out']}"
            f"|{d['size'][0]}x{d['size'][1]}|f{d['patch']}|n{d['sites']}|{d['dtype']}|{d['device']}"
            f"|ac:{d['autocast']}|{'train' if d['grad'] else 'infer'}|t{d['threads']}")


def candidates(call: OpCall) -> list[str]:
    """Names of the candidates of ``call.kind`` that can run this call."""
    out = []
    for name, cand in _REGISTRY.get(call.kind, {}).items():
        try:
            if cand.available(call):
                out.append(name)
        except Exception:  # noqa: BLE001 - a candidate that cannot say is not a candidate
            continue
    return out


def _table_choice(call: OpCall, names: list[str]) -> str:
    rule = _TABLE_RULES.get(call.kind)
    name = rule(call) if rule is not None else None
    if name not in names:
        name = "gather" if "gather" in names else names[0]
    return name


class BackendError(RuntimeError):
    """A forced conv implementation (``conv_backend=spconv``, ...) failed on a layer; the message says which and
    what to do."""


def _fail_text(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}".rstrip(": ")


def run_candidate(call: OpCall, name: str) -> Tensor:
    """Run implementation ``name`` of ``call.kind`` (the one `choose` returned).

    When it raises (e.g. spconv has no fp16 kernel for a channel count), a forced mode stops with a one-line
    `BackendError` naming the layer's configuration and the fix; the table and autotune modes announce it once
    (a warning) and run the exact gather path, and `choose` never picks the failed implementation for that
    configuration again. Out-of-memory errors propagate unchanged (the fallback would only fail later).
    """
    _S.last_path = name
    try:
        return _REGISTRY[call.kind][name].run(call)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - an implementation that cannot run this layer
        if name == "gather" or not _usable(call, "gather"):
            raise
        desc = call.describe()
        where = (f"{desc['op']} {_short(desc)} {desc['in']}>{desc['out']} at {desc['size'][0]}x{desc['size'][1]} "
                 f"({desc['dtype']}{'' if desc['autocast'] == 'none' else ', autocast ' + desc['autocast']}, "
                 f"{desc['device']})")
        if _S.mode == name:
            raise BackendError(
                f"conv_backend={name}: the {name} implementation failed on a {where}: {_fail_text(e)}. Use "
                f"conv_backend=autotune or table (they run the exact gather path where {name} cannot), or change "
                "the precision (train.amp)") from e
        key = _key(desc)
        if key not in _S.failed:
            warnings.warn(f"sparse conv: {name} failed on a {where} ({_fail_text(e)}); this configuration runs the "
                          "exact gather path from now on", RuntimeWarning, stacklevel=2)
        _S.failed[key] = name
        _S.choices[key] = Choice("gather", {name: f"failed: {_fail_text(e)}"}, "fallback", 0.0, desc)
        _S.last_path = "gather"
        return _REGISTRY[call.kind]["gather"].run(call)


def last_path() -> str | None:
    """The implementation the latest sparse conv ran (benchmarks report it)."""
    return _S.last_path


# ---------------------------------------------------------------------------------------------------- state
@dataclass
class Choice:
    path: str
    times_ms: dict  # name -> float ms, or a string: "failed: ...", "skipped (budget)"
    source: str  # tuned | cache | rank 0 | budget | fallback (the chosen one raised), or the fixed mode (table | ...)
    tuning_s: float
    desc: dict


_FIXED_SOURCES = ("table",) + FORCED


@dataclass
class _State:
    mode: str = "autotune"
    cache_setting: Any = None  # None: env / default; False: off; str: path
    per_config_s: float = 4.0
    total_s: float = 120.0
    repeats: int = 5
    spent_s: float = 0.0
    choices: dict = field(default_factory=dict)  # key -> Choice
    reported: set = field(default_factory=set)
    disk: dict | None = None  # entries loaded from the cache file (lazily)
    disk_file: str | None = None
    warned_write: bool = False
    warned_files: set = field(default_factory=set)  # cache files already reported as malformed
    cpu_clock: str = "process"  # process | wall
    last_path: str | None = None
    failed: dict = field(default_factory=dict)  # key -> implementation that raised on it (run_candidate)


_S = _State()


def _initial_mode() -> str:
    env = os.environ.get(ENV_MODE, "").strip().lower()
    if env:
        env = ALIASES.get(env, env)
        if env not in MODES:
            raise ValueError(f"{ENV_MODE}={env!r} is not a conv backend; choose one of {MODES}")
        return env
    return "autotune"


_S.mode = _initial_mode()


def set_mode(mode: str) -> str:
    """Set the path-choice mode (see the module docstring); returns the previous one."""
    name = ALIASES.get(mode, mode)
    if name not in MODES:
        raise ValueError(f"unknown conv backend {mode!r}; choose one of {MODES + tuple(ALIASES)}")
    previous, _S.mode = _S.mode, name
    return previous


def get_mode() -> str:
    return _S.mode


def set_budget(per_config_s: float | None = None, total_s: float | None = None,
               repeats: int | None = None, cpu_clock: str | None = None) -> dict:
    """Tuning budget: seconds per configuration and in total (wall, warm-up included), timed runs per candidate
    (the fastest counts), and the clock candidates are compared with on the CPU (``process`` or ``wall``)."""
    if cpu_clock is not None:
        if cpu_clock not in ("process", "wall"):
            raise ValueError(f"cpu_clock must be 'process' or 'wall', got {cpu_clock!r}")
        _S.cpu_clock = cpu_clock
    if per_config_s is not None:
        if per_config_s <= 0:
            raise ValueError(f"per-configuration tuning budget must be > 0 s, got {per_config_s}")
        _S.per_config_s = float(per_config_s)
    if total_s is not None:
        if total_s < 0:
            raise ValueError(f"total tuning budget must be >= 0 s, got {total_s}")
        _S.total_s = float(total_s)
    if repeats is not None:
        if repeats < 1:
            raise ValueError(f"tuning repeats must be >= 1, got {repeats}")
        _S.repeats = int(repeats)
    return get_budget()


def get_budget() -> dict:
    return {"per_config_s": _S.per_config_s, "total_s": _S.total_s, "repeats": _S.repeats,
            "cpu_clock": _S.cpu_clock}


def tuning_seconds() -> float:
    """Seconds spent timing candidates in this process so far."""
    return _S.spent_s


def reset(memory: bool = True) -> None:
    """Forget the in-memory choices and the tuning time spent (tests, benchmarks). The cache file stays."""
    if memory:
        _S.choices.clear()
        _S.reported.clear()
        _S.failed.clear()
    _S.spent_s = 0.0
    _S.disk, _S.disk_file = None, None


# ---------------------------------------------------------------------------------------------------- cache file
def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        try:
            return "cuda " + torch.cuda.get_device_name(dev)
        except Exception:  # noqa: BLE001
            return "cuda"
    if dev.type == "cpu":
        return "cpu " + _cpu_name()
    return dev.type


_CPU_NAME: str | None = None


def _cpu_name() -> str:
    global _CPU_NAME
    if _CPU_NAME is None:
        name = ""
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        _CPU_NAME = re.sub(r"\s+", " ", name or platform.processor() or platform.machine() or "unknown")
    return _CPU_NAME


def _spconv_version() -> str:
    try:
        from importlib.metadata import distributions
        for dist in distributions():
            name = (dist.metadata["Name"] or "").lower()
            if name.startswith("spconv"):
                return f"{name}-{dist.version}"
    except Exception:  # noqa: BLE001
        pass
    return "none"


_VERSIONS: dict | None = None


def _versions() -> dict:
    global _VERSIONS
    if _VERSIONS is None:
        _VERSIONS = {"torch": torch.__version__, "spconv": _spconv_version()}
    return _VERSIONS


def set_cache(location: str | os.PathLike | bool | None) -> str | None:
    """Where choices are kept between runs: a directory (one file per device and versions) or a ``.json`` file.

    ``None``: the env variable ``SPARSE_MIM_AUTOTUNE_CACHE`` or else ``~/.cache/sparse_mim/autotune``;
    ``False`` or ``"off"``: memory only. Returns the file now in use (None when off).
    """
    if isinstance(location, str) and location.strip().lower() in _OFF:
        location = False
    if location is True:
        location = None
    _S.cache_setting = location if location is None or location is False else os.fspath(location)
    _S.disk, _S.disk_file = None, None
    return cache_file()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")[:80]


def cache_file(device: torch.device | str | None = None) -> str | None:
    """The JSON file used for ``device`` (default: CUDA if available, else CPU); None when the cache is off."""
    setting = _S.cache_setting
    if setting is None:
        env = os.environ.get(ENV_CACHE)
        if env is not None and env.strip():
            setting = False if env.strip().lower() in _OFF else env
        else:
            base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
            setting = os.path.join(base, "sparse_mim", "autotune")
    if setting is False:
        return None
    if str(setting).endswith(".json"):
        return str(setting)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    v = _versions()
    return os.path.join(str(setting), f"{_slug(_device_name(device))}__torch-{_slug(v['torch'])}__"
                                      f"{_slug(v['spconv'])}.json")


def _meta(device: torch.device) -> dict:
    return {"format": 1, "device": _device_name(device), **_versions()}


CACHE_MAX_BYTES = 16 << 20  # thousands of entries take a few hundred KB


def _warn_cache_once(path: str, problem: str) -> None:
    if path not in _S.warned_files:
        _S.warned_files.add(path)
        warnings.warn(f"autotune cache {path}: {problem}; ignoring what is wrong (the file is rewritten with "
                      "good entries at the next tuning)")


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("path"), str)
            and isinstance(entry.get("times_ms", {}), dict) and isinstance(entry.get("desc", {}), dict))


def _read_cache_file(path: str, device: torch.device) -> dict:
    """The well-formed entries of the cache file at ``path`` for this device and versions.

    Missing, or written for another device / versions: ``{}``. Any wrong shape (not JSON, not an
    object, ``entries`` not an object, an entry that is not ``{"path": str, ...}``, a file above
    ``CACHE_MAX_BYTES``) is reported once per file, naming it, and the bad part is ignored.
    """
    try:
        size = os.path.getsize(path)
    except OSError:
        return {}
    if size > CACHE_MAX_BYTES:
        _warn_cache_once(path, f"{size} bytes, above the {CACHE_MAX_BYTES} bytes a cache may have")
        return {}
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        _warn_cache_once(path, f"unreadable ({str(e)[:120]})")
        return {}
    if not isinstance(data, dict):
        _warn_cache_once(path, f"holds a JSON {type(data).__name__}, not an object with 'meta' and 'entries'")
        return {}
    if data.get("meta") != _meta(device):
        return {}  # another device or torch / spconv version: not ours to read (nor to report)
    entries = data.get("entries")
    if not isinstance(entries, dict):
        _warn_cache_once(path, f"'entries' is a JSON {type(entries).__name__}, not an object")
        return {}
    good = {k: v for k, v in entries.items() if _valid_entry(v)}
    if len(good) != len(entries):
        bad = next(k for k in entries if k not in good)
        _warn_cache_once(path, f"{len(entries) - len(good)} entr{'y' if len(entries) - len(good) == 1 else 'ies'} "
                               f"of the wrong shape (e.g. {bad[:80]!r}: {str(entries[bad])[:80]})")
    return good


def _load_disk(device: torch.device) -> dict:
    path = cache_file(device)
    if path != _S.disk_file or _S.disk is None:
        _S.disk_file, _S.disk = path, {}
        if path is not None:
            _S.disk = _read_cache_file(path, device)
    return _S.disk


@contextlib.contextmanager
def _locked(path: str, timeout_s: float = 30.0):
    """An exclusive advisory lock (``flock`` on ``.<name>.lock`` next to ``path``) around a read-merge-write,
    so concurrent writers of one cache keep every entry. Without ``fcntl``, or past ``timeout_s``, the
    write goes ahead unlocked (the atomic rename still leaves a whole file)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path = os.path.join(os.path.dirname(path) or ".", "." + os.path.basename(path) + ".lock")
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        end = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > end:
                    break
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the lock


def _is_rank0() -> bool:
    try:
        import torch.distributed as dist
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except Exception:  # noqa: BLE001
        return True


def _save_disk(device: torch.device, key: str, choice: Choice) -> None:
    path = cache_file(device)
    if path is None or not _is_rank0():
        return
    entries = dict(_load_disk(device))
    entries[key] = {"path": choice.path, "times_ms": choice.times_ms, "desc": choice.desc}
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with _locked(path):  # merge with what other processes wrote meanwhile, one writer at a time
            entries = {**_read_cache_file(path, device), **entries}
            atomic_write_text(path, json.dumps({"meta": _meta(device), "entries": entries}, indent=1,
                                               sort_keys=True))
        _S.disk = entries
    except OSError as e:
        if not _S.warned_write:
            _S.warned_write = True
            warnings.warn(f"cannot write the autotune cache {path} ({e}); choices stay in memory only. Set "
                          f"{ENV_CACHE}=<writable dir> or 'off' to silence this")


# ---------------------------------------------------------------------------------------------------- timing
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _detached(call: OpCall, grad: bool) -> OpCall:
    feats = call.x.features.detach().clone().requires_grad_(grad)
    weight = None if call.weight is None else call.weight.detach().clone().requires_grad_(grad)
    return dataclasses.replace(call, x=call.x.replace_features(feats), weight=weight)


def _clock(dev: torch.device) -> Callable[[], float]:
    """Wall time on CUDA (synchronised); on the CPU, process CPU time by default (`set_budget(cpu_clock=...)`).

    Process CPU time (all threads of this process) does not count the time other processes hold the cores,
    so a busy machine does not turn a scheduling hiccup into a wrong choice; on a dedicated machine it
    ranks implementations like wall time does, up to the threads' efficiency.
    """
    if dev.type == "cpu" and _S.cpu_clock == "process":
        return time.process_time
    return time.perf_counter


def _time_once(cand: Candidate, call: OpCall, grad: bool) -> float:
    dev = call.x.features.device
    clock = _clock(dev)
    call.x.features.grad = None
    if call.weight is not None:
        call.weight.grad = None
    _sync(dev)
    t = clock()
    with torch.enable_grad() if grad else torch.no_grad():
        out = cand.run(call)
        if grad:
            out.backward(torch.ones_like(out))
    _sync(dev)
    return clock() - t


def _tune(call: OpCall, names: list[str], table: str) -> tuple[str, dict, str]:
    """Time the candidates (table choice first, then dense, then the rest); returns (best, times, source)."""
    grad = call.needs_grad
    order = [table] + (["dense"] if "dense" in names and table != "dense" else [])
    order += [n for n in names if n not in order]
    cache = call.x.cache
    before = set(cache.keys())
    dev = call.x.features.device
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)
    start = time.perf_counter()
    times: dict[str, Any] = {}
    best, best_t = None, math.inf
    share = _S.per_config_s / len(order)  # each candidate's part of the configuration's budget
    for name in order:
        elapsed = time.perf_counter() - start
        # the table's choice and the dense candidate are always timed; the others while the budgets last
        if name not in order[:2] and (elapsed > _S.per_config_s or _S.spent_s + elapsed > _S.total_s):
            times[name] = "skipped (budget)"
            continue
        cand = _REGISTRY[call.kind][name]
        try:
            clone = _detached(call, grad)
            runs = []
            c_start = time.perf_counter()
            for i in range(1 + _S.repeats):  # the first run is the warm-up (index tables, kernel selection)
                dt = _time_once(cand, clone, grad)
                if i > 0:
                    runs.append(dt)
                used = time.perf_counter() - c_start
                if not runs and used > _S.per_config_s:  # the warm-up alone took it all: its time must do
                    runs.append(dt)
                if runs and used > share:
                    break
            t = min(runs)
            times[name] = round(t * 1000, 3)
            if t < best_t:
                best, best_t = name, t
        except Exception as e:  # noqa: BLE001 - a failing candidate (e.g. out of memory) is not chosen
            times[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            if call.x.features.is_cuda:
                torch.cuda.empty_cache()
    # no candidate should draw random numbers; if one did (e.g. a library initialising a module), undo it
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], dev)
    # index tables that only the losers built are dropped (the winner rebuilds its own on the real call)
    for k in set(cache.keys()) - before:
        cache.pop(k, None)
    _S.spent_s += time.perf_counter() - start
    if best is None:
        return table, times, "budget"
    return best, times, "tuned"


def _usable(call: OpCall, name: str | None) -> bool:
    cand = _REGISTRY.get(call.kind, {}).get(name)
    if cand is None:
        return False
    try:
        return bool(cand.available(call))
    except Exception:  # noqa: BLE001
        return False


def _fallback(call: OpCall) -> str:
    if _usable(call, "gather"):
        return "gather"
    names = candidates(call)
    if not names:
        raise NotImplementedError(f"no sparse implementation is registered for op kind {call.kind!r}")
    return names[0]


def choose(call: OpCall) -> str:
    """The implementation to run for ``call`` under the current mode (tuning it if it is new).

    Forced and table modes, and known configurations, only check the one candidate they return (no
    library import for candidates that are never run).
    """
    mode = _S.mode
    if mode in FORCED or mode == "table":
        if mode in FORCED:
            name = mode if _usable(call, mode) else _fallback(call)
        else:
            rule = _TABLE_RULES.get(call.kind)
            name = rule(call) if rule is not None else None
            name = name if _usable(call, name) else _fallback(call)
        desc = call.describe()
        key = _key(desc)
        if mode == "table" and _S.failed.get(key) == name:
            return "gather"  # run_candidate announced the fall-back
        if key not in _S.choices:  # recorded for the printed table only; autotune mode never reuses it
            _S.choices[key] = Choice(name, {}, mode, 0.0, desc)
        return name
    desc = call.describe()
    key = _key(desc)
    hit = _S.choices.get(key)
    if hit is not None and hit.source == "fallback":
        return hit.path
    if hit is not None and hit.source in _FIXED_SOURCES:
        hit = None  # recorded under a fixed mode: tune it now
    if hit is not None and _usable(call, hit.path):
        return hit.path
    dev = call.x.features.device
    disk = _load_disk(dev).get(key)
    if disk is not None and _usable(call, disk.get("path")):
        _S.choices[key] = Choice(disk["path"], disk.get("times_ms", {}), "cache", 0.0, desc)
        return disk["path"]
    names = candidates(call)
    if not names:
        raise NotImplementedError(f"no sparse implementation is registered for op kind {call.kind!r}")
    table = _table_choice(call, names)
    if len(names) == 1:
        return table
    if _S.spent_s >= _S.total_s:
        _S.choices[key] = Choice(table, {}, "budget", 0.0, desc)
        return table
    t0 = _S.spent_s
    path, times, source = _tune(call, names, table)
    choice = Choice(path, times, source, round(_S.spent_s - t0, 3), desc)
    _S.choices[key] = choice
    log.info("autotune %s: %s (%s)", key, path, times)
    if source == "tuned":
        _save_disk(dev, key, choice)
    return path


# ---------------------------------------------------------------------------------------------------- reporting
def choices() -> dict:
    """{key: {"path", "times_ms", "source", "tuning_s", **configuration}} of this process."""
    return {k: {**c.desc, "path": c.path, "times_ms": dict(c.times_ms), "source": c.source, "tuning_s": c.tuning_s}
            for k, c in _S.choices.items()}


def _short(d: dict) -> str:
    k, s, dl = d["kernel"], d["stride"], d["dilation"]
    text = f"{k[0]}x{k[1]}"
    if s != [1, 1]:
        text += f"/s{s[0]}" if s[0] == s[1] else f"/s{s[0]}x{s[1]}"
    if dl != [1, 1]:
        text += f" dil{dl[0]}"
    return text


def log_dict() -> dict:
    """Flat, JSON-able summary for a run's config / wandb: mode, cache file, tuning time, one entry per op."""
    ops = {}
    for c in _S.choices.values():
        d = c.desc
        name = f"{d['op']} {_short(d)} {d['in']}>{d['out']} @{d['size'][0]}x{d['size'][1]}"
        ops[name] = c.path
    dev = "cuda" if any(c.desc["device"].startswith("cuda") for c in _S.choices.values()) else "cpu"
    return {"mode": _S.mode, "cache": cache_file(dev) or "off", "tuning_s": round(_S.spent_s, 3),
            "configs": len(_S.choices), "tuned": sum(c.source == "tuned" for c in _S.choices.values()),
            "from_cache": sum(c.source == "cache" for c in _S.choices.values()), **get_budget(), "choices": ops}


def _fmt_time(v) -> str:
    if isinstance(v, (int, float)):
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return "fail" if str(v).startswith("failed") else "skip"


def format_table(keys: list[str] | None = None) -> str:
    """Markdown table of the choices (all, or ``keys``), finest scale first: op, shape, chosen path, times."""
    keys = list(_S.choices) if keys is None else keys
    rows = [(k, _S.choices[k]) for k in keys if k in _S.choices]
    rows.sort(key=lambda kc: (-kc[1].desc["size"][0] * kc[1].desc["size"][1], kc[1].desc["op"], kc[1].desc["in"]))
    names = []
    for _, c in rows:
        names += [n for n in c.times_ms if n not in names]
    head = (f"autotune choices (cache {log_dict()['cache']}; {len(_S.choices)} configurations, tuning "
            f"{_S.spent_s:.2f}s wall in total; candidate times: fastest of {_S.repeats} after a warm-up, ms of "
            f"{'process CPU time' if _S.cpu_clock == 'process' else 'wall time'} on the CPU, wall on CUDA)")
    lines = [head, "| scale | op | kernel | channels | sites | dtype | pass | chosen | "
             + " | ".join(f"{n} ms" for n in names) + " | source |", "|" + "---|" * (9 + len(names))]
    for _, c in rows:
        d = c.desc
        dtype = d["dtype"] if d["autocast"] == "none" else f"{d['dtype']} (autocast {d['autocast']})"
        cells = [_fmt_time(c.times_ms[n]) if n in c.times_ms else "-" for n in names]
        step = "fwd+bwd" if d["grad"] else "fwd"
        lines.append(f"| {d['size'][0]}x{d['size'][1]} | {d['op']} | {_short(d)} | {d['in']}>{d['out']} | "
                     f"~{d['sites']} | {dtype} | {step} | **{c.path}** | " + " | ".join(cells) + f" | {c.source} |")
    return "\n".join(lines)


def report(print_fn: Callable[[str], Any] | None = print, only_new: bool = True) -> str:
    """Print (once per configuration, with ``only_new``) the table of choices; returns the text ('' if none)."""
    keys = [k for k in _S.choices if not (only_new and k in _S.reported)]
    if not keys:
        return ""
    _S.reported.update(keys)
    text = format_table(keys)
    if print_fn is not None:
        print_fn(text)
    return text


def sync_choices(broadcast: Callable[[Any], Any] | None = None) -> int:
    """Make this rank use rank 0's choices (collective: call on every rank). Returns how many changed here.

    ``broadcast(obj) -> obj`` sends rank 0's object to every rank; by default
    ``torch.distributed.broadcast_object_list`` when a process group is initialised
    (no-op otherwise). Configurations rank 0 has not met keep this rank's choice.
    """
    if broadcast is None:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return 0

        def broadcast(obj):
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            return box[0]
    mine = {k: dataclasses.asdict(c) for k, c in _S.choices.items()}
    theirs = broadcast(mine)
    changed = 0
    for key, c in theirs.items():
        local = _S.choices.get(key)
        if local is None or local.path != c["path"]:
            changed += 1
            _S.choices[key] = Choice(c["path"], c["times_ms"], "rank 0", 0.0, c["desc"])
            _S.reported.discard(key)
    return changed


def settle(print_fn: Callable[[str], Any] | None = print) -> dict:
    """After the first step, on every rank: adopt rank 0's choices, print the new ones (rank 0), return `log_dict`."""
    sync_choices()
    if _is_rank0():
        report(print_fn)
    else:
        _S.reported.update(_S.choices)
    return log_dict()


# ---------------------------------------------------------------------------------------------------- config
# The ``train.*`` config keys of the autotuner (typed, range-checked entries of the config layer, which sits below
# the engine: `configure` applies them at the start of a run).
CONFIG_DEFAULTS = {
    "conv_backend": K("autotune", "sparse conv implementation: autotune (time each exact path once per shape, "
                      "keep the fastest) | table (fixed rules) | gather | windows | dense | spconv (forced)",
                      choices=MODES + tuple(ALIASES)),
    "autotune_cache": K("", "autotune cache: '' = $SPARSE_MIM_AUTOTUNE_CACHE or ~/.cache/sparse_mim/autotune; "
                        "a directory or .json file; 'off' = memory only"),
}


def configure(conv_backend: str = "autotune", autotune_cache: str | None = "") -> dict:
    """Apply the ``train.conv_backend`` / ``train.autotune_cache`` config keys at the start of a run; returns
    `log_dict()`. The run's first `settle` / `report` prints every choice again (choices made by an
    earlier run in the same process are reused, and still shown)."""
    set_mode(conv_backend)
    set_cache(None if autotune_cache in ("", None) else autotune_cache)
    _S.reported.clear()
    return log_dict()
