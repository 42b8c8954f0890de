"""The one checkpoint module of the toolkit (pre-training and fgvc): write, read, unwrap, resume.

Writing (``atomic_write`` / ``save_checkpoint``): the bytes go to a temporary file in
the destination folder (``.<name>.<random>.tmp``), are flushed and fsync'ed, the
file gets mode 0644 (like every other output) and is moved into place with
``os.replace``: a run killed while saving leaves the previous file intact, never a
truncated one. Orphan temporary files of a killed writer are removed by
``remove_orphan_temps`` (trainers call it at start-up) and after every write. A full
disk is reported as "no space left on device while writing PATH; the previous
checkpoint is intact" (``DiskFullError``). ``save_checkpoint`` first checks that
every floating-point tensor in the state (parameters, buffers such as BatchNorm
running statistics, optimizer moments) is finite and refuses to write otherwise
(``NonFiniteStateError``): a "last good checkpoint" is always good.

Reading (``load_checkpoint``): ``torch.load(weights_only=True)`` only (no code in
a file ever runs), with distinct messages for a missing path, a folder, an empty
or truncated file, a file that pickles Python objects, and ``check_finite=True``
to refuse NaN / inf weights. ``unwrap_state_dict`` finds the weights inside the
usual wrappers (``model`` / ``state_dict`` / ``state_dict_ema`` / ``module`` and
``module.`` prefixes).

A training checkpoint is a dict of tensors and plain containers (``FORMAT_VERSION``
under ``format_version``): RNG states as tensors / lists, the config as a plain
dict. Layout in an output folder: ``last.pth`` (rewritten every N steps, at epoch
ends and on pre-emption) and ``checkpoint-<step>.pth`` (periodic keeps);
``find_resumable`` picks the newest *loadable* one.
"""
from __future__ import annotations

import errno
import glob
import os
import random
import re
import tempfile
import time
import zipfile
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from .misc import NonFiniteLossError

__all__ = [
    "FORMAT_VERSION", "CheckpointError", "DiskFullError", "NonFiniteStateError",
    "atomic_write", "atomic_write_text", "save_checkpoint", "load_checkpoint", "find_last", "find_resumable",
    "resolve_resume", "checkpoint_name", "remove_orphan_temps", "non_finite_tensors", "check_state_finite",
    "get_rng_state", "set_rng_state", "unwrap_model", "unwrap_state_dict", "compare_state_dicts", "format_keys",
    "read_pt2_checked", "resume_auto", "disk_full_error", "is_orphan_temp", "is_disk_full",
    "atomic_write_dir", "CHECKPOINT_KINDS", "checkpoint_kind", "require_checkpoint_kind",
]

FORMAT_VERSION = 1
LAST_NAME = "last.pth"
FILE_MODE = 0o644
_KEEP_RE = re.compile(r"checkpoint-(\d+)\.pth$")
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, foreign, pickled objects); the message says which."""


class DiskFullError(OSError):
    """No space left while writing; the previous file at the path is intact."""


class NonFiniteStateError(NonFiniteLossError):
    """A state (model, buffers, optimizer) with NaN / inf values: refused on write and on read."""


def checkpoint_name(step: int) -> str:
    """File name of a periodic keep (sorted by step)."""
    return f"checkpoint-{step:08d}.pth"


# ---------------------------------------------------------------------------- writing
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform / file system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception chain: torch's C++ writer turns the OSError of the
    file's ``write`` into ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``,
    with the OSError as its context."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        text = str(e).lower()  # torch's C++ writer: "PytorchStreamWriter failed writing file ...: file write failed"
        if isinstance(e, RuntimeError) and ("file write failed" in text or "no space left" in text):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(path: str, what: str | None = None) -> DiskFullError:
    """The one "no space left on device while writing PATH; ..." error of every writer."""
    if what is None:
        what = "the previous file is intact" if os.path.exists(path) else "nothing was written"
        if os.path.exists(path) and path.endswith(".pth"):
            what = "the previous checkpoint is intact"
    err = DiskFullError(f"no space left on device while writing {path}; {what}. "
                        "Free space (or point output_dir elsewhere) and resume with resume=auto")
    err.errno = errno.ENOSPC
    return err


ORPHAN_AGE_S = 3600  # a temp file of another host untouched this long has no live writer (writes keep it fresh)


def _host_tag() -> str:
    import socket
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _temp_prefix(path: str) -> str:
    """``.<name>.<pid>@<host>.``: the writer's identity, so a sweep can tell a live writer's file."""
    return "." + os.path.basename(path) + f".{os.getpid()}@{_host_tag()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def is_orphan_temp(path: str, now: float | None = None) -> bool:
    """Whether a temp file can have no live writer: its owner (pid on this host) is dead, or it
    belongs to another host and was not touched for ``ORPHAN_AGE_S``; a name without an owner
    (written by an older version of the toolkit) counts as orphaned."""
    m = re.search(r"\.(\d+)@([A-Za-z0-9-]+)\.[^.]*\.tmp$", os.path.basename(path))
    if m is None:
        return True
    if m.group(2) == _host_tag():
        return not _pid_alive(int(m.group(1)))
    try:
        return (now or time.time()) - os.path.getmtime(path) > ORPHAN_AGE_S
    except OSError:
        return False


def remove_orphan_temps(folder: str, name: str | None = None) -> list[str]:
    """Delete temporary files left by killed writers (``.<name>.*.tmp``; any name if None); returns them.

    Only provable orphans go (``is_orphan_temp``): concurrent writers of one file (processes
    sharing a cache) never delete each other's files in flight."""
    pattern = os.path.join(glob.escape(folder), (glob.escape("." + name + ".") if name else ".*.") + "*.tmp")
    removed = []
    now = time.time()
    for p in glob.glob(pattern):
        if os.path.islink(p) or not is_orphan_temp(p, now):
            continue
        try:
            if os.path.isdir(p):  # a folder written by atomic_write_dir
                import shutil
                shutil.rmtree(p)
            else:
                os.remove(p)
            removed.append(p)
        except OSError:
            pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True,
                 mode: int = FILE_MODE) -> str:
    """Write a file atomically: ``write(f)`` into a temp file in the same folder, fsync, chmod, os.replace.

    On any failure the temp file is removed and the previous file at ``path`` is left
    as it was; a full disk raises ``DiskFullError`` with a one-line message.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if is_disk_full(e):
            raise disk_full_error(path) from e
        raise
    _fsync_dir(folder)
    remove_orphan_temps(folder, os.path.basename(path))
    return path


def atomic_write_dir(path: str | os.PathLike, fill: Callable[[str], None]) -> str:
    """Create a folder atomically: ``fill(tmp)`` writes its contents into a temp folder next to ``path``
    (``.<name>.<pid>@<host>.<random>.tmp``), which then takes the place of ``path`` (an earlier
    folder there is replaced). On any failure the temp folder is removed and ``path`` is left as it
    was; a full disk raises ``DiskFullError``."""
    import shutil
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=parent)
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        if os.path.lexists(path):
            aside = tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=parent)
            os.replace(path, os.path.join(aside, "old"))
            os.replace(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full_error(path, "nothing was left behind") from e
        raise
    _fsync_dir(parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = FILE_MODE) -> str:
    """``atomic_write`` for a text file (JSON, YAML, CSV)."""
    return atomic_write(path, lambda f: f.write(text), binary=False, mode=mode)


def non_finite_tensors(state: Any, prefix: str = "", limit: int = 1000) -> list[str]:
    """Dotted names of the floating-point tensors in a nested dict / list that hold NaN or inf."""
    bad: list[str] = []

    def walk(obj, name):
        if len(bad) >= limit:
            return
        if isinstance(obj, torch.Tensor):
            if (obj.is_floating_point() or obj.is_complex()) and obj.numel() and not bool(torch.isfinite(obj).all()):
                bad.append(name or "<tensor>")
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(state, prefix)
    return bad


def check_state_finite(state: Any, what: str, skip: Iterable[str] = ()) -> None:
    """Raise ``NonFiniteStateError`` naming the first offending tensors if any is NaN / inf."""
    skip = tuple(skip)
    bad = [n for n in non_finite_tensors(state) if not n.startswith(skip)] if skip else non_finite_tensors(state)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteStateError(f"{what}: {len(bad)} tensor(s) hold NaN or inf values ({shown})")


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike, check_finite: bool = True) -> str:
    """Write ``state`` (plus ``format_version``) to ``path`` atomically, after checking every tensor is finite.

    The RNG states (``rng``) are not checked (they are integer / byte tensors anyway).
    Raises ``NonFiniteStateError`` (nothing written, the previous file kept) or ``DiskFullError``.
    """
    path = os.fspath(path)
    state = dict(state)
    state.setdefault("format_version", FORMAT_VERSION)
    if check_finite:
        intact = "the previous checkpoint is intact" if os.path.exists(path) else "no checkpoint was written"
        check_state_finite({k: v for k, v in state.items() if k != "rng"},
                           f"refusing to write {path}; {intact}")
    return atomic_write(path, lambda f: torch.save(state, f))


# ---------------------------------------------------------------------------- reading
def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", check_finite: bool = False,
                    allowed_globals: Iterable[Any] = ()) -> Any:
    """Load with ``torch.load(weights_only=True)`` (no code runs); clear errors for every kind of bad file.

    ``check_finite``: refuse a file whose weights hold NaN / inf (``NonFiniteStateError``).
    ``allowed_globals``: extra classes the weights-only unpickler may build, as for
    ``torch.serialization.safe_globals`` (a class, or ``(stand_in, "module.Name")`` to read a
    pickled class as a harmless stand-in, e.g. a config object of another code base);
    everything else stays refused.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith(".pth"))[:3]
        hint = ("give a .pth file in it: " + ", ".join(os.path.join(path, n) for n in found)) if found else \
            "it holds no .pth file; give the path of a checkpoint file"
        raise IsADirectoryError(f"checkpoint {path!r} is a folder; {hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; check the path")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): the writer was killed or the disk was full")
    allowed = list(allowed_globals)
    try:
        if allowed:
            with torch.serialization.safe_globals(allowed):
                obj = torch.load(path, map_location=map_location, weights_only=True)
        else:
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a pickled object, a truncated file, ...
        first = _load_error_detail(e)
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "WeightsUnpickler" in str(e):
            why = ("it pickles Python objects besides tensors, which could run code when loaded; this toolkit "
                   "reads tensors and plain containers only (the object was refused, nothing ran). Re-save the "
                   "weights alone (torch.save(model.state_dict(), path)) where the file came from")
        elif zipfile.is_zipfile(path) or _looks_truncated(path):
            why = "it is truncated or damaged (a writer killed mid-way, a partial copy or download)"
        else:
            why = "it is not a PyTorch file"
        raise CheckpointError(f"cannot read checkpoint {path!r} (torch.load with weights_only=True): {why} "
                              f"({first})") from e
    if check_finite:
        check_state_finite(obj, f"checkpoint {path!r} is not usable")
    return obj


def _load_error_detail(e: BaseException) -> str:
    """The informative line of a ``torch.load`` error: for a refused object the global it names
    (torch's own text around it recommends unsafe loading, which is never repeated here)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "Can only" in ln or "whose module" in ln:
            return ln
    lines = [ln for ln in lines if "weights_only" not in ln and "Weights only load failed" not in ln]
    return lines[0] if lines else type(e).__name__


def _looks_truncated(path: str) -> bool:
    """A zip-format torch file cut short still starts with the zip magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _keeps(out_dir: str) -> list[tuple[int, str]]:
    keeps = []
    for p in glob.glob(os.path.join(glob.escape(out_dir), "checkpoint-*.pth")):
        m = _KEEP_RE.search(os.path.basename(p))
        if m:
            keeps.append((int(m.group(1)), p))
    return sorted(keeps, reverse=True)


def find_last(out_dir: str) -> str | None:
    """Newest checkpoint file in ``out_dir``: ``last.pth`` if present, else the highest-step keep."""
    last = os.path.join(out_dir, LAST_NAME)
    if os.path.isfile(last):
        return last
    keeps = _keeps(out_dir)
    return keeps[0][1] if keeps else None


def _step_of(ck: Mapping) -> int:
    ts = ck.get("train_state") if isinstance(ck, Mapping) else None
    if isinstance(ts, Mapping):
        return int(ts.get("step", ts.get("epoch", -1)))
    return -1


def find_resumable(out_dir: str, log: Callable[[str], None] | None = print,
                   validate: Callable[[Any], None] | None = None) -> tuple[str | None, Any]:
    """The newest checkpoint in ``out_dir`` that loads (and is finite): ``(path, loaded)`` or ``(None, None)``.

    Candidates: ``last.pth`` and every ``checkpoint-<step>.pth``, newest step first.
    An unreadable or non-finite file is skipped with a message (``log``), so a
    truncated ``last.pth`` next to a good keep resumes from the keep and says so.
    ``validate(loaded)`` may raise to reject a candidate as well.
    """
    def attempt(p):
        try:
            ck = load_checkpoint(p, check_finite=True)
            if validate is not None:
                validate(ck)
            return ck
        except (CheckpointError, NonFiniteStateError, ValueError, OSError) as e:
            if log:
                log(f"resume=auto: skipping {p}: {e}")
            return None

    # one file in memory at a time: last.pth first, then only keeps newer than it (newest first)
    last = os.path.join(out_dir, LAST_NAME)
    best_step, best_path, best = -1, None, None
    if os.path.isfile(last):
        ck = attempt(last)
        if ck is not None:
            best_step, best_path, best = _step_of(ck), last, ck
    for step, p in _keeps(out_dir):  # sorted by step, newest first
        if step <= best_step:
            break
        ck = attempt(p)
        if ck is not None:
            best_step, best_path, best = _step_of(ck), p, ck
            break
    if best_path is None:
        return None, None
    if log and best_path != last:
        log(f"resume=auto: resuming from {best_path} (step {best_step}), the newest loadable checkpoint")
    return best_path, best


def resume_auto(out_dir: str, log: Callable[[str], None] | None = print,
                validate: Callable[[Any], None] | None = None) -> tuple[str | None, Any]:
    """``resume=auto`` for both trainers: ``find_resumable``, and when checkpoints exist but none
    loads, a ``CheckpointError`` naming them (never "starting from scratch": a new run would
    overwrite the damaged files, which may still be recoverable). ``(None, None)`` only for a
    folder without any checkpoint."""
    path, ck = find_resumable(out_dir, log=log, validate=validate)
    if path is not None:
        return path, ck
    found = [p for p in [os.path.join(out_dir, LAST_NAME)] + [p for _, p in _keeps(out_dir)] if os.path.exists(p)]
    if found:
        raise CheckpointError(
            f"resume=auto: none of the checkpoints in {out_dir} ({', '.join(os.path.basename(p) for p in found)}) "
            f"can be loaded (see the messages above); nothing was overwritten or removed. Resume from a good copy "
            f"with resume=<path>, or start a new run with another output_dir")
    return None, None


def resolve_resume(resume: str | None, out_dir: str) -> str | None:
    """Turn the ``resume`` option into a file: "" / None -> None, "auto" -> find_last, else the path."""
    if not resume:
        return None
    if resume == "auto":
        return find_last(out_dir)
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint; use resume=auto or a path to a .pth file")
    return resume


# ---------------------------------------------------------------------------- unwrapping
def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers (whose state_dict names are the plain ones)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


_WRAPPERS = ("model", "state_dict", "module", "model_state")


def compare_state_dicts(state: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, list[str]]:
    """How a checkpoint's state dict differs from a model's: ``missing`` (the model's keys the
    checkpoint lacks, in the model's order), ``unexpected`` (keys the model does not have) and
    ``wrong_shape`` (``"key: checkpoint (..) vs model (..)"``, both in the checkpoint's order). The
    one key comparison behind every mismatch message (backbones, SparK, MetaFormer)."""
    return {
        "missing": [k for k in expected if k not in state],
        "unexpected": [k for k in state if k not in expected],
        "wrong_shape": [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)],
    }


def format_keys(keys: list[str], limit: int = 12) -> str:
    """The first ``limit`` keys, comma-separated, and how many more there are (for mismatch errors)."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def unwrap_state_dict(checkpoint: Mapping[str, Any], prefer_ema: bool = False,
                      prefixes: Iterable[str] = ("module.",)) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint: ``model`` / ``state_dict`` / ``state_dict_ema`` / ``module`` wrappers
    (nested up to three deep) and DDP's ``module.`` prefix (or other ``prefixes``) stripped.

    ``prefer_ema``: take ``state_dict_ema`` / ``model_ema`` when present. Non-tensor entries are dropped.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    obj = checkpoint
    order = (("state_dict_ema", "model_ema") if prefer_ema else ()) + _WRAPPERS + ("state_dict_ema", "model_ema")
    for _ in range(3):
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        nested = [k for k in order if isinstance(obj.get(k), Mapping)]
        if not nested:
            break
        obj = obj[nested[0]]
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for p in prefixes:
        if state and all(k.startswith(p) for k in state):
            state = {k[len(p):]: v for k, v in state.items()}
    if not state:
        raise ValueError(f"the checkpoint holds no weights; top-level keys: {list(checkpoint)[:10]}")
    return state


# ---------------------------------------------------------------------------- RNG
def get_rng_state() -> dict:
    """All global RNG states as tensors / plain lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore the states captured by :func:`get_rng_state`."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------- torch.export programs (.pt2)
_PT2_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}


def read_pt2_checked(path: str | os.PathLike) -> bytes:
    """The bytes of a ``torch.export`` ``.pt2`` file, after checking nothing in it can run code when loaded.

    ``torch.export.load`` unpickles payloads marked ``use_pickle`` (tensor subclasses), custom and
    opaque objects and legacy ``.pt`` members with ``weights_only=False``, and falls back to
    ``weights_only=False`` for sample inputs. This reads the file once (memory bounded by its size),
    and refuses, naming the file and the member, anything but: raw weight / constant bytes,
    their JSON configs with no pickled payload, the program JSON, extra files, and sample inputs
    that load with ``torch.load(weights_only=True)``. Compressed members (a decompression bomb)
    and the pre-2.7 archive layout are refused too. Load the returned bytes (``io.BytesIO``), not
    the path, so the checked bytes are the loaded ones. Raises ``CheckpointError``.
    """
    import io
    import json
    path = os.fspath(path)
    if os.path.isdir(path) or not os.path.isfile(path):
        raise FileNotFoundError(f"program {path!r} does not exist or is not a file; give the path of a .pt2 file")
    with open(path, "rb") as f:
        data = f.read()

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"refusing to load program {path!r}: {why}; nothing in it was run. Re-export the "
                               "model with fgvc-export (its .pt2 files hold plain tensors only)")

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"cannot read program {path!r}: it is not a .pt2 (zip) file or it is truncated "
                              f"({e})") from None
    names = {i.filename for i in infos}
    root = next((n[: -len("archive_format")] for n in names if n.endswith("archive_format")
                 and n.count("/") <= 1), None)
    if root is None:
        raise refuse("it is not a torch.export archive of the current layout (no archive_format member; the "
                     "older layout unpickles its contents)")
    configs = []
    for info in infos:
        name = info.filename
        if info.compress_type != zipfile.ZIP_STORED:
            raise refuse(f"member {name!r} is compressed (torch.export stores members uncompressed)")
        if not name.startswith(root) or ".." in name.split("/"):
            raise refuse(f"member {name!r} lies outside the archive folder {root!r}")
        rel = name[len(root):]
        if rel.endswith("/") or rel in _PT2_FIXED or rel.startswith("extra/"):
            continue
        if re.fullmatch(r"models/[\w.-]+\.json", rel):
            continue
        if re.fullmatch(r"data/(weights|constants)/[\w.-]+_(weights|constants)_config\.json", rel):
            configs.append(rel)
            continue
        if re.fullmatch(r"data/weights/weight_\d+|data/constants/tensor_\d+", rel):
            continue  # raw tensor bytes, read with as_strided (no unpickling)
        if re.fullmatch(r"data/sample_inputs/[\w.-]+\.pt", rel):
            try:
                torch.load(io.BytesIO(zf.read(info)), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any refusal means torch would retry with weights_only=False
                raise refuse(f"its sample inputs {rel!r} pickle Python objects besides tensors "
                             f"({_load_error_detail(e)})") from None
            continue
        raise refuse(f"member {rel!r} is not a plain weight, constant, program or extra file (pickled or "
                     "compiled payloads are not accepted)")
    for rel in configs:
        try:
            config = json.loads(zf.read(root + rel)).get("config")
        except (ValueError, AttributeError) as e:
            raise refuse(f"{rel!r} is not valid JSON ({e})") from None
        if not isinstance(config, Mapping):
            raise refuse(f"{rel!r} holds no 'config' mapping")
        for fqn, meta in config.items():
            if not isinstance(meta, Mapping) or meta.get("use_pickle") is not False or \
                    not re.fullmatch(r"weight_\d+|tensor_\d+", str(meta.get("path_name", ""))):
                fqn_s = str(fqn)[:80]
                raise refuse(f"{fqn_s!r} in {rel!r} is a pickled payload (use_pickle / custom or opaque object), "
                             "which torch.export.load unpickles with weights_only=False")
    return data


# ---------------------------------------------------------------------------- which half wrote a checkpoint
CHECKPOINT_KINDS = {
    "spark-pretrain": "a SparK pre-training checkpoint",
    "spark-weights": "SparK weights (encoder and decoder)",
    "backbone": "a backbone-only state dict",
    "fgvc": "an fgvc training checkpoint",
    "metaformer-weights": "MetaFormer weights",
    "unknown": "a file this toolkit did not write",
}
_KIND_USES = {
    "spark-pretrain": "spark-pretrain resume=PATH continues it; spark-visualize / spark-export read it; its encoder "
                      "(spark-export PATH backbone.pth) is what fgvc-train takes as model.init_backbone",
    "spark-weights": "spark-pretrain takes it as model.pretrained; spark-visualize / spark-export read it",
    "backbone": "fgvc-train takes it as model.init_backbone (convnet hybrids); it has no decoder and no training "
                "state, so it cannot be resumed, visualised or fine-tuned as a MetaFormer",
    "fgvc": "fgvc-eval / fgvc-predict / fgvc-export read it and fgvc-train resume=PATH continues its run (last.pth)",
    "metaformer-weights": "fgvc-train takes it as model.pretrained; fgvc-eval reads it with its recipe (-c)",
    "unknown": "",
}
_BACKBONE_MARKS = (("conv1.weight", "layer1."), ("stem.", "stages."), ("downsample_layers.", "stages."))
_METAFORMER_MARKS = ("cl_1_fc.", "aggregate.", "stage_1.", "stage_2.", "meta_")


def checkpoint_kind(obj: Any) -> tuple[str, str]:
    """``(kind, description)`` of a loaded checkpoint: which half of the toolkit (or which model) it is for.

    Kinds (``CHECKPOINT_KINDS``): ``spark-pretrain`` (a pre-training run's last.pth / keeps),
    ``spark-weights`` (SparK encoder + decoder weights, e.g. an official ``*_withdecoder_*`` file),
    ``backbone`` (an exported encoder: torchvision / timm names), ``fgvc`` (an fgvc run's best.pth /
    last.pth), ``metaformer-weights`` (official MetaFormer files, plain MetaFormer state dicts) and
    ``unknown``. The description adds what the file says about itself (backbone, model, classes, step).
    """
    if not isinstance(obj, Mapping):
        return "unknown", f"{CHECKPOINT_KINDS['unknown']} (a {type(obj).__name__})"
    ts = obj.get("train_state") if isinstance(obj.get("train_state"), Mapping) else {}
    cfg = obj.get("config") if isinstance(obj.get("config"), Mapping) else {}
    model_cfg = cfg.get("model") if isinstance(cfg.get("model"), Mapping) else {}
    if obj.get("format") == "sparse_mim.pretrain" or (isinstance(obj.get("spark"), Mapping) and ts):
        spark = obj.get("spark") if isinstance(obj.get("spark"), Mapping) else {}
        name = spark.get("backbone") or model_cfg.get("backbone") or "?"
        return "spark-pretrain", f"{CHECKPOINT_KINDS['spark-pretrain']} (backbone {name}, step {ts.get('step', '?')})"
    if obj.get("classes") is not None and "meta_groups" in obj:
        extra = "" if "optimizer" in obj else ", weights only"
        return "fgvc", (f"{CHECKPOINT_KINDS['fgvc']} ({model_cfg.get('name', '?')}, {len(obj['classes'])} classes, "
                        f"epoch {ts.get('epoch', '?')}{extra})")
    try:
        keys = [str(k) for k in unwrap_state_dict(obj, prefixes=("module.",))]
    except ValueError:
        keys = []
    if any(k.startswith(("sparse_encoder.", "dense_decoder.")) for k in keys):
        return "spark-weights", f"{CHECKPOINT_KINDS['spark-weights']} ({len(keys)} tensors)"
    if any(k.startswith(_METAFORMER_MARKS) for k in keys):
        return "metaformer-weights", f"{CHECKPOINT_KINDS['metaformer-weights']} ({len(keys)} tensors)"
    if any(all(any(k.startswith(m) for k in keys) for m in marks) for marks in _BACKBONE_MARKS):
        return "backbone", f"{CHECKPOINT_KINDS['backbone']} ({len(keys)} tensors, e.g. {keys[0]})"
    shown = ", ".join(keys[:3] or [str(k) for k in list(obj)[:3]])
    return "unknown", f"{CHECKPOINT_KINDS['unknown']} (keys: {shown[:160]}{', ...' if len(keys) > 3 else ''})"


def require_checkpoint_kind(obj: Any, path: str, accept: Iterable[str], use: str,
                            error: type = CheckpointError) -> str:
    """The one check of every command that takes a checkpoint: the file is of a kind ``use`` accepts
    (``"unknown"`` among them leaves files of no known kind to the reader's own checks), else ``error``
    naming what it is (the other half, another model) and where it does belong."""
    accept = tuple(accept)
    kind, desc = checkpoint_kind(obj)
    if kind in accept:
        return kind
    wanted = " or ".join(CHECKPOINT_KINDS[k] for k in accept if k != "unknown")
    where = f"; {_KIND_USES[kind]}" if _KIND_USES[kind] else ""
    raise error(f"{use}: {path} is {desc}, not {wanted}{where}")
