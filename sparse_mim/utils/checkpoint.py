"""Atomic, resumable checkpoints that load with ``torch.load(weights_only=True)``.

A training checkpoint is a dict of tensors and plain containers only (no pickled
objects), so it loads with ``weights_only=True``: RNG states are stored as tensors
and lists, the config as a plain dict. Files are written to a temporary file in the
same folder, fsync'ed, then moved into place with ``os.replace``: a run killed while
saving leaves the previous ``last.pth`` intact, never a truncated file.

Layout in the output folder: ``last.pth`` (rewritten every N steps and at epoch
end) and ``checkpoint-<step>.pth`` (periodic keeps). ``find_last`` picks ``last.pth``
or else the newest keep; ``resolve_resume("auto", out_dir)`` is what ``--resume auto``
calls.
"""
from __future__ import annotations

import glob
import os
import random
import re
import tempfile
from typing import Any, Mapping

import numpy as np
import torch

__all__ = [
    "save_checkpoint", "load_checkpoint", "find_last", "resolve_resume", "checkpoint_name",
    "get_rng_state", "set_rng_state", "unwrap_model",
]

LAST_NAME = "last.pth"
_KEEP_RE = re.compile(r"checkpoint-(\d+)\.pth$")


def checkpoint_name(step: int) -> str:
    """File name of a periodic keep (sorted by step)."""
    return f"checkpoint-{step:08d}.pth"


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


def save_checkpoint(state: Mapping[str, Any], path: str) -> str:
    """Write ``state`` to ``path`` atomically: temp file in the same dir + fsync + os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)
    return path


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs on load)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; check the path or use resume=auto")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a pickled object, a truncated file, ...
        raise RuntimeError(
            f"could not load checkpoint {path!r} with torch.load(weights_only=True): {e}\n"
            "Checkpoints must hold tensors and plain containers only; a truncated file means the "
            "writer was killed (ours are written atomically, so use last.pth or a checkpoint-*.pth keep).") from e


def find_last(out_dir: str) -> str | None:
    """Newest checkpoint in ``out_dir``: ``last.pth`` if present, else the highest-step keep."""
    last = os.path.join(out_dir, LAST_NAME)
    if os.path.isfile(last):
        return last
    keeps = []
    for p in glob.glob(os.path.join(out_dir, "checkpoint-*.pth")):
        m = _KEEP_RE.search(os.path.basename(p))
        if m:
            keeps.append((int(m.group(1)), p))
    return max(keeps)[1] if keeps else None


def resolve_resume(resume: str | None, out_dir: str) -> str | None:
    """Turn the ``resume`` option into a file: "" / None -> None, "auto" -> find_last, else the path."""
    if not resume:
        return None
    if resume == "auto":
        return find_last(out_dir)
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint; use resume=auto or a path to a .pth file")
    return resume


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers (whose state_dict names are the plain ones)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def get_rng_state() -> dict:
    """All RNG states as tensors / plain lists (loadable with weights_only=True)."""
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
