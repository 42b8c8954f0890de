"""A run's output folder is never overwritten: one check both trainers call before any work.

``prepare_run_dir(output_dir, resume)`` decides, before a model is built, what a run may
do with its folder:

* empty or missing folder -> a new run (``resume=auto`` on an empty folder also starts one,
  so the same command works for the first submission of a job and for its requeues);
* the folder already holds a run (a checkpoint, ``final.json``, ``metrics.jsonl``) and ``resume`` is empty -> :class:`RunDirError` naming ``resume=auto``
  and how to start a new run (another ``output_dir``), nothing touched;
* another process is training in the folder right now (a live ``run.lock`` on this host)
  -> :class:`RunDirError` whatever ``resume`` says.

The returned :class:`RunDir` holds ``run.lock`` (pid, host, Slurm job) until
:meth:`RunDir.release` (or the ``with`` block ends). A lock left by a killed process is
taken over: on this host when its pid is gone; from another host (a requeued Slurm job
lands elsewhere) when the run is resumed (``resume`` set), with a note.
"""
from __future__ import annotations

import glob
import json
import os
import socket
import time
from typing import Callable, Optional, Sequence

from .cli import UsageError

__all__ = ["RunDirError", "RunDir", "prepare_run_dir", "RUN_MARKERS", "LOCK_NAME"]

LOCK_NAME = "run.lock"
# files whose presence means "a run already lives here"
# (a folder with only a config.yaml is a run that failed before its first step: nothing to lose)
RUN_MARKERS: Sequence[str] = ("last.pth", "best.pth", "final.json", "metrics.jsonl", "checkpoint-*.pth", "backbone.pth")


class RunDirError(UsageError):
    """The output folder holds a run that this command would overwrite (message says what to do)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read_lock(path: str) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 16).decode("utf-8"))  # a lock is a few bytes; bounded either way
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None  # any other shape: treated as no lock (the run folder's other checks still apply)
    try:
        data["pid"] = int(data.get("pid", -1))
    except (TypeError, ValueError):
        data["pid"] = -1
    return data


def _existing_run(output_dir: str) -> list[str]:
    found = []
    for pattern in RUN_MARKERS:
        hits = glob.glob(os.path.join(glob.escape(output_dir), pattern))
        found += sorted(os.path.basename(h) for h in hits)
    return found


class RunDir:
    """A prepared output folder: ``path``, ``resuming`` (an existing run is continued) and the lock."""

    def __init__(self, path: str, resuming: bool, lock_path: Optional[str]):
        self.path, self.resuming, self.lock_path = path, resuming, lock_path

    def release(self) -> None:
        """Remove ``run.lock`` (only if it is still ours)."""
        if not self.lock_path:
            return
        info = _read_lock(self.lock_path)
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            try:
                os.remove(self.lock_path)
            except OSError:
                pass
        self.lock_path = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def prepare_run_dir(output_dir: str, resume: str = "", lock: bool = True,
                    log: Optional[Callable[[str], None]] = print) -> RunDir:
    """Check that a run may use ``output_dir`` (see the module docstring), create it, take the lock.

    ``resume``: the run's ``resume`` setting ("" = a new run, "auto" or a checkpoint path = continue).
    Call on the main process only; raises :class:`RunDirError` with the fix in the message.
    """
    if not output_dir:
        raise RunDirError("output_dir is empty: set output_dir=<folder for this run>")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RunDirError(f"output_dir={output_dir!r} is a file, not a folder; choose another output_dir")
    lock_path = os.path.join(output_dir, LOCK_NAME)
    info = _read_lock(lock_path) if os.path.isfile(lock_path) else None
    here = socket.gethostname()
    if info is not None:
        same_host = info.get("host") == here
        pid = int(info.get("pid", -1))
        if same_host and pid != os.getpid() and _pid_alive(pid):
            raise RunDirError(
                f"output_dir={output_dir!r} is in use by a running training process (pid {pid} on {here}, started "
                f"{info.get('started', '?')}); wait for it to finish or stop it, or start a new run with another "
                f"output_dir=...")
        if not same_host and not resume:
            raise RunDirError(
                f"output_dir={output_dir!r} has a run lock from host {info.get('host')!r} (pid {pid}); if that run "
                f"is still training, use another output_dir=...; if it was stopped, continue it with resume=auto")
        if log and not same_host:
            log(f"[run] taking over the run lock left by host {info.get('host')!r} (pid {pid}): resuming")
    existing = _existing_run(output_dir) if os.path.isdir(output_dir) else []
    if existing and not resume:
        finished = "final.json" in existing
        what = "a finished run" if finished else "a run (stopped or in progress)"
        base = output_dir.rstrip("/")
        raise RunDirError(
            f"output_dir={output_dir!r} already holds {what} ({', '.join(existing[:6])}); it is never overwritten. "
            f"Continue it with resume=auto, or start a new run with output_dir={base}_2 (or delete the folder)")
    os.makedirs(output_dir, exist_ok=True)
    if not lock:
        return RunDir(output_dir, bool(existing and resume), None)
    payload = {"pid": os.getpid(), "host": here, "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    from .checkpoint import atomic_write_text
    atomic_write_text(lock_path, json.dumps(payload))
    return RunDir(output_dir, bool(existing and resume), lock_path)
