"""Fault injection for both trainers: kill, pre-empt, interrupt, corrupt, fill the disk, diverge, misconfigure,
feed hostile files (recipes, checkpoints, .pt2 programs, CSVs, images, the other half's checkpoints) and
share a cache between concurrent writers; then resume.

``run_fault_injection(workdir, trainers=("pretrain", "fgvc"))`` runs every scenario on a tiny
CPU configuration of each trainer (SparK ResNet-18 on generated images; the fgvc demo recipe)
in subprocesses started like a user would (``spark-pretrain`` / ``fgvc-train`` entry points),
and returns one ``Result`` per scenario: passed or not, and whether data was lost. The command
line is ``tools/fault_injection.py`` (prints the table; docs/pretraining.md has the figures).

Definitions. A scenario *passes* when the trainer behaves as promised: the fault is reported
in one line with the right exit status, nothing non-finite or partial is left as a checkpoint,
and ``resume=auto`` (where the scenario continues) finishes with weights bit-identical to an
uninterrupted run. *Data lost* means progress that had been checkpointed was gone afterwards
(an intact checkpoint became unusable, a resume started earlier than the newest good
checkpoint, or the resumed run ended with different weights). Steps redone after a SIGKILL
since the last periodic checkpoint are expected and reported, not counted as lost.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

__all__ = ["Result", "Target", "TARGETS", "run_fault_injection", "format_report"]

# a child process that runs one trainer CLI, optionally with a fault patched in first
_CHILD = r"""
import errno, os, sys
fault, limit = os.environ.get("FI_FAULT", ""), int(os.environ.get("FI_LIMIT", "0"))
if fault == "disk_full":  # the disk fills 4 KiB into a save: torch's own writer meets ENOSPC from write()
    import torch
    _save, calls = torch.save, [0]
    class _Full:
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, b):
            self.n += len(b)
            if self.n > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)
        def __getattr__(self, k):
            return getattr(self.f, k)
    def save(obj, f, *a, **k):
        calls[0] += 1
        return _save(obj, _Full(f) if calls[0] > limit and hasattr(f, "write") else f, *a, **k)
    torch.save = save
elif fault == "disk_full_images":  # the disk fills while images are written (the fgvc demo data)
    from PIL import Image
    _isave, calls = Image.Image.save, [0]
    def isave(self, fp, *a, **k):
        calls[0] += 1
        if calls[0] > limit:
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return _isave(self, fp, *a, **k)
    Image.Image.save = isave
elif fault == "slow_step":  # optimizer step number `limit` takes 2 s: time to press Ctrl-C once or twice
    import time
    import sparse_mim.utils.amp as amp
    _step, calls = amp.optimizer_step, [0]
    def optimizer_step(loss, optimizer, **k):
        r = _step(loss, optimizer, **k)
        if r.stepped:
            calls[0] += 1
            if calls[0] == limit:
                print("FI: slow step", flush=True)
                time.sleep(2.0)
        return r
    amp.optimizer_step = optimizer_step
elif fault == "non_finite":
    import sparse_mim.utils.amp as amp
    _step, calls = amp.optimizer_step, [0]
    def optimizer_step(loss, optimizer, **k):
        r = _step(loss, optimizer, **k)
        if r.stepped:
            calls[0] += 1
            if calls[0] == limit:  # a moment of the optimizer state overflows; weights and loss stay finite
                for st in optimizer.state.values():
                    if "exp_avg_sq" in st:
                        st["exp_avg_sq"].fill_(float("inf"))
                        break
        return r
    amp.optimizer_step = optimizer_step
module, fn = sys.argv[1].split(":")
import importlib
sys.exit(getattr(importlib.import_module(module), fn)(sys.argv[2:]))
"""


@dataclass
class Result:
    trainer: str
    scenario: str
    passed: bool
    data_lost: bool = False
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Target:
    """How to run one trainer in its smallest configuration."""
    name: str
    entry: str                          # "module:function" of the CLI
    args: list[str]                     # a tiny, fast, deterministic configuration
    kill_step: int                      # kill / signal once this many steps are logged
    bad_configs: list[tuple[str, str]] = field(default_factory=list)  # (override, text the error must hold)
    supports_ddp: bool = False


TARGETS = {
    "pretrain": Target(
        "pretrain", "sparse_mim.cli:pretrain",
        ["train.cpu_threads=1", "model.backbone=resnet18", "model.backbone_kwargs={depths: [1, 1, 1, 1]}",
         "model.img_size=64", "model.decoder_width=64", "model.drop_path_rate=0.1", "data.builtin_images=24",
         "data.batch_size=2", "optim.accum_steps=2", "train.epochs=1", "train.warmup_epochs=0.5", "train.amp=off",
         "log.every=1", "log.progress=false", "log.vis_every=0", "log.vis_images=2", "checkpoint.every_steps=2",
         "checkpoint.keep_every_steps=2", "wandb.enabled=false", "optim.lr=0.05"],
        kill_step=3, supports_ddp=True,
        bad_configs=[("data.batch_size=0", "data.batch_size=0"), ("optim.accum_steps=0", "optim.accum_steps=0"),
                     ("log.every=0", "log.every=0"), ("optim.betas=[0.9]", "optim.betas"),
                     ("optim.betas=[0.9,1.5]", "optim.betas"), ("aug.scale=[1.0,0.5]", "aug.scale"),
                     ("model.decoder_width=0", "model.decoder_width"), ("model.mask_ratio=0.0", "model.mask_ratio"),
                     ("train.epochs=0", "train.epochs"), ("train.epochs=-1", "train.epochs"),
                     ("train.stop_at_step=-1", "train.stop_at_step"), ("log.vis_images=-1", "log.vis_images"),
                     ("model.img_size=[70,100]", "model.img_size"), ("data.atributes=1", "unknown config key"),
                     ("model.backbone=resnet05", "resnet50")]),
    "fgvc": Target(
        "fgvc", "fgvc.cli:train",
        ["-c", "fgvc/demo.yaml", "train.epochs=1", "checkpoint.every_steps=3", "checkpoint.keep_every_steps=3",
         "log.every=1", "log.progress=false", "wandb.enabled=false"],
        kill_step=4,
        bad_configs=[("data.batch_size=0", "data.batch_size=0"), ("train.eval_every=0", "train.eval_every"),
                     ("aug.smoothing=1.5", "aug.smoothing"), ("data.val_split=-0.5", "data.val_split"),
                     ("optim.betas=[0.9,1.5]", "optim.betas"), ("train.epochs=0", "train.epochs"),
                     ("data.atributes=1", "unknown config key")]),
}


# ---------------------------------------------------------------------------- helpers
def _env() -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "FI_FAULT", "FI_LIMIT"):
        env.pop(k, None)
    return env


def _start(target: Target, out: str, extra: Sequence[str] = (), fault: str = "", limit: int = 0,
           log_path: str | None = None) -> subprocess.Popen:
    env = _env()
    if fault:
        env.update(FI_FAULT=fault, FI_LIMIT=str(limit))
    log = open(log_path or os.path.join(os.path.dirname(out), os.path.basename(out) + ".log"), "a")
    cmd = [sys.executable, "-c", _CHILD, target.entry, *target.args, f"output_dir={out}", *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _run(target: Target, out: str, extra: Sequence[str] = (), fault: str = "", limit: int = 0,
         timeout: float = 900) -> tuple[int, str]:
    log_path = out + ".log"
    p = _start(target, out, extra, fault, limit, log_path)
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        rc = p.wait()
    with open(log_path) as f:
        return rc, f.read()


def _steps_logged(out: str) -> int:
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return max([json.loads(line).get("step", 0) for line in f if line.strip()] or [0])
    except (OSError, ValueError):
        return 0


def _wait_steps(p: subprocess.Popen, out: str, steps: int, timeout: float = 600) -> int:
    end = time.time() + timeout
    while time.time() < end and p.poll() is None:
        n = _steps_logged(out)
        if n >= steps:
            return n
        time.sleep(0.05)
    return _steps_logged(out)


def _ckpt(path: str):
    from sparse_mim.utils.checkpoint import load_checkpoint
    try:
        return load_checkpoint(path, check_finite=True)
    except Exception:  # noqa: BLE001 - any unusable file counts as unusable
        return None


def _step_of(ck) -> int | None:
    return None if ck is None else int(ck["train_state"]["step"])


def _same_weights(a_path: str, b_path: str) -> tuple[bool, str]:
    a, b = _ckpt(a_path), _ckpt(b_path)
    if a is None or b is None:
        return False, "final checkpoint missing or unusable"
    diff = [k for k in a["model"] if not _equal(a["model"][k], b["model"].get(k))]
    return not diff, (f"{len(diff)} of {len(a['model'])} tensors differ" if diff else "bit-identical to the "
                      "uninterrupted run")


def _equal(x, y) -> bool:
    import torch
    return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)


def _non_finite_files(out: str) -> list[str]:
    from sparse_mim.utils.checkpoint import load_checkpoint, non_finite_tensors
    bad = []
    for p in glob.glob(os.path.join(out, "*.pth")):
        try:
            if non_finite_tensors(load_checkpoint(p)):
                bad.append(os.path.basename(p))
        except Exception:  # noqa: BLE001
            bad.append(os.path.basename(p) + " (unreadable)")
    return bad


def _temps(out: str) -> list[str]:
    return [os.path.basename(p) for p in glob.glob(os.path.join(out, ".*.tmp"))]


def _last_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "error" in ln.lower()]
    return lines[-1].strip() if lines else (text.strip().splitlines() or [""])[-1]


# ---------------------------------------------------------------------------- scenarios
def _resume_and_compare(target: Target, out: str, ref: str, before_step: int | None) -> tuple[bool, bool, str]:
    """resume=auto to the end; (passed, data_lost, detail)."""
    rc, text = _run(target, out, ["resume=auto"])
    if rc != 0:
        return False, True, f"resume failed (rc {rc}): {_last_error_line(text)}"
    same, how = _same_weights(os.path.join(ref, "last.pth"), os.path.join(out, "last.pth"))
    orphans = _temps(out)
    lost = not same
    detail = how + (f"; orphan temp files left: {orphans}" if orphans else "")
    return same and not orphans, lost, detail


def _kill(target: Target, work: str, ref: str, sig: int, name: str, delay: float = 0.0) -> Result:
    out = os.path.join(work, f"{target.name}-{name}")
    p = _start(target, out)
    reached = _wait_steps(p, out, target.kill_step)
    if delay:
        time.sleep(delay)
    if p.poll() is not None:
        return Result(target.name, name, False, False, f"the run ended before the fault (rc {p.returncode})")
    os.kill(p.pid, sig)
    try:
        rc = p.wait(300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        return Result(target.name, name, False, False, "did not stop within 300 s of the signal")
    ck = _ckpt(os.path.join(out, "last.pth"))
    saved = _step_of(ck)
    notes = [f"signal after step {reached}, last.pth at step {saved}"]
    ok = True
    if sig in (signal.SIGTERM, signal.SIGUSR1):
        from sparse_mim.utils.preemption import PREEMPTED_EXIT_CODE
        if rc != PREEMPTED_EXIT_CODE:
            ok = False
            notes.append(f"exit status {rc}, expected {PREEMPTED_EXIT_CODE}")
        if saved is None or saved < reached:
            ok = False
            notes.append("the checkpoint does not hold the steps done before the signal")
    else:
        notes.append(f"orphan temp files after the kill: {len(_temps(out))}")
    passed, lost, detail = _resume_and_compare(target, out, ref, saved)
    return Result(target.name, name, ok and passed, lost, "; ".join(notes + [detail]))


def _wait_text(p: subprocess.Popen, log_path: str, text: str, timeout: float = 600) -> bool:
    end = time.time() + timeout
    while time.time() < end and p.poll() is None:
        try:
            with open(log_path) as f:
                if text in f.read():
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _interrupt(target: Target, work: str, ref: str, presses: int) -> Result:
    """Ctrl-C (SIGINT) during a step: once = finish the step, write last.pth, exit 130; twice = abort at once."""
    from sparse_mim.utils.preemption import INTERRUPTED_EXIT_CODE
    name = "Ctrl-C once" if presses == 1 else "Ctrl-C twice"
    out = os.path.join(work, f"{target.name}-ctrl_c_{presses}")
    log_path = out + ".log"
    p = _start(target, out, ["checkpoint.every_steps=0", "checkpoint.keep_every_steps=0"], fault="slow_step",
               limit=target.kill_step, log_path=log_path)
    if not _wait_text(p, log_path, "FI: slow step"):
        p.wait()
        return Result(target.name, name, False, False, f"the run ended before the fault (rc {p.returncode})")
    t0 = time.time()
    for i in range(presses):
        if i:
            time.sleep(0.3)
        os.kill(p.pid, signal.SIGINT)
    try:
        rc = p.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        return Result(target.name, name, False, False, "did not stop within 120 s of Ctrl-C")
    took = time.time() - t0
    text = open(log_path).read()
    saved = _step_of(_ckpt(os.path.join(out, "last.pth")))
    said = "interrupted (Ctrl-C)" in text
    notes = [f"rc {rc} after {took:.1f} s", f"last.pth at step {saved}", f"said so: {said}"]
    if presses == 1:
        ok = rc == INTERRUPTED_EXIT_CODE and said and saved == target.kill_step and "last.pth" in text
    else:  # aborted inside the slow step: nothing new written, nothing partial left
        ok = rc == INTERRUPTED_EXIT_CODE and said and saved is None and not _temps(out)
    passed, lost, detail = _resume_and_compare(target, out, ref, saved)
    return Result(target.name, name, ok and passed, lost, "; ".join(notes + [detail]))


def _disk_full_images(target: Target, work: str, ref: str) -> Result:
    """The disk fills while the demo data is generated: one line, no partial demo_data; a rerun finishes."""
    out = os.path.join(work, f"{target.name}-disk_full_demo")
    rc, text = _run(target, out, fault="disk_full_images", limit=20)
    line = _last_error_line(text)
    left = sorted(n for n in (os.listdir(out) if os.path.isdir(out) else []) if "demo_data" in n)
    ok = rc == 1 and "no space left on device while writing" in line and not left
    notes = [f"rc {rc}: {line[:160]}", f"demo data left behind: {left or 'none'}"]
    passed, lost, detail = _resume_and_compare(target, out, ref, None)
    return Result(target.name, "disk full while writing the demo data", ok and passed, lost,
                  "; ".join(notes + [detail]))


def _truncated_last(target: Target, work: str, ref: str) -> Result:
    out = os.path.join(work, f"{target.name}-truncated_last")
    rc, text = _run(target, out, ["train.stop_at_step=" + str(target.kill_step)])
    last = os.path.join(out, "last.pth")
    if not os.path.isfile(last):
        return Result(target.name, "truncated last.pth", False, True, f"no last.pth after the first part (rc {rc})")
    data = open(last, "rb").read()
    with open(last, "wb") as f:
        f.write(data[: len(data) // 2])
    keeps = sorted(glob.glob(os.path.join(out, "checkpoint-*.pth")))
    rc, text = _run(target, out, ["resume=auto"])
    said = "skipping" in text and ("truncated" in text or "damaged" in text)
    if rc != 0:
        return Result(target.name, "truncated last.pth", False, True, f"resume failed (rc {rc}): "
                      f"{_last_error_line(text)}")
    same, how = _same_weights(os.path.join(ref, "last.pth"), last)
    return Result(target.name, "truncated last.pth", same and (said or not keeps), not same,
                  f"keeps available: {len(keeps)}; fallback announced: {said}; {how}")


def _disk_full(target: Target, work: str, ref: str) -> Result:
    out = os.path.join(work, f"{target.name}-disk_full")
    rc, text = _run(target, out, fault="disk_full", limit=2)
    line = _last_error_line(text)
    ck_before = _ckpt(os.path.join(out, "last.pth"))
    ok = rc == 1 and "no space left on device while writing" in line and not _temps(out)
    intact = ck_before is not None or not os.path.exists(os.path.join(out, "last.pth"))
    notes = [f"rc {rc}: {line[:160]}", f"previous last.pth intact: {intact}", f"temp files: {len(_temps(out))}"]
    passed, lost, detail = _resume_and_compare(target, out, ref, _step_of(ck_before))
    return Result(target.name, "disk full while checkpointing", ok and intact and passed, lost or not intact,
                  "; ".join(notes + [detail]))


def _non_finite(target: Target, work: str, ref: str) -> Result:
    out = os.path.join(work, f"{target.name}-non_finite")
    rc, text = _run(target, out, fault="non_finite", limit=3)
    line = _last_error_line(text)
    bad = _non_finite_files(out)
    ok = rc == 1 and not bad and ("non-finite" in line or "NaN" in line or "nan" in line)
    notes = [f"rc {rc}: {line[:160]}", f"checkpoints with NaN/inf on disk: {bad or 'none'}"]
    passed, lost, detail = _resume_and_compare(target, out, ref, None)
    return Result(target.name, "non-finite optimizer state", ok and passed, lost, "; ".join(notes + [detail]))


def _bad_configs(target: Target, work: str) -> list[Result]:
    import importlib
    module, fn = target.entry.split(":")
    cli = getattr(importlib.import_module(module), fn)
    results = []
    for override, must in target.bad_configs:
        out = os.path.join(work, f"{target.name}-badcfg-{len(results)}")
        err = io.StringIO()
        t0 = time.time()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli([*target.args, f"output_dir={out}", override])
        text = err.getvalue().strip()
        ok = rc == 2 and must in text and len(text.splitlines()) == 1 and "Traceback" not in text \
            and not os.path.exists(os.path.join(out, "last.pth"))
        results.append(Result(target.name, f"bad config {override}", ok, False, text[:160], time.time() - t0))
    return results


def _ddp_one_rank_signalled(target: Target, work: str) -> Result:
    """torchrun, 2 processes: SIGTERM to rank 1 only; both must stop after the same step, rank 0 writes."""
    out = os.path.join(work, f"{target.name}-ddp_sigterm")
    port = str(random.randint(20000, 40000))
    log = open(out + ".log", "a")
    code = "import sys; from sparse_mim.cli import pretrain; sys.exit(pretrain(sys.argv[1:]))"
    script = os.path.join(work, "_pretrain_entry.py")
    with open(script, "w") as f:
        f.write(code + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", script,
           *target.args, "data.batch_size=1", f"output_dir={out}"]
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    reached = _wait_steps(p, out, target.kill_step)
    ranks = _children_running(p.pid, "_pretrain_entry.py")
    if p.poll() is not None or len(ranks) != 2:
        p.wait()
        return Result(target.name, "DDP: SIGTERM to one rank", False, False, f"could not find the 2 ranks ({ranks})")
    os.kill(sorted(ranks)[1], signal.SIGTERM)
    try:
        rc = p.wait(300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        return Result(target.name, "DDP: SIGTERM to one rank", False, False, "ranks did not stop together")
    saved = _step_of(_ckpt(os.path.join(out, "last.pth")))
    ok = rc != 0 and saved is not None and saved >= reached
    text = open(out + ".log").read()
    # the stop line of the rank that was not signalled: it stopped because another rank was
    agreed = re.search(r"\[stop\] (SIG[A-Z0-9]+|signal on another rank): stopped after step", text) is not None
    return Result(target.name, "DDP: SIGTERM to one rank", ok and agreed, saved is None,
                  f"signal after step {reached}; torchrun rc {rc}; last.pth at step {saved}; ranks agreed: {agreed}")


def _children_running(pid: int, needle: str) -> list[int]:
    found = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(os.path.join(d, "cmdline"), "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(os.path.join(d, "stat")) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and needle in cmd:
            found.append(int(os.path.basename(d)))
    return found


def _hostile_data(target: Target, work: str) -> Result:
    """A folder with a symlink loop, a 16-bit PNG, an oversized image and a corrupt file: trained, counted."""
    import numpy as np
    from PIL import Image
    from sparse_mim.data import generate_image
    root = os.path.join(work, "hostile_images")
    os.makedirs(os.path.join(root, "a"), exist_ok=True)
    for i in range(8):
        Image.fromarray(generate_image(i, 72)).save(os.path.join(root, "a", f"{i}.png"))
    Image.fromarray((np.arange(72 * 72).reshape(72, 72) * 12).astype(np.uint16)).save(os.path.join(root, "deep.png"))
    Image.new("L", (900, 900)).save(os.path.join(root, "huge.png"))
    with open(os.path.join(root, "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not a jpeg")
    for link, dest in (("loop", root), ("again", os.path.join(root, "a"))):
        if not os.path.lexists(os.path.join(root, "a", link)):
            os.symlink(dest, os.path.join(root, "a", link))
    out = os.path.join(work, f"{target.name}-hostile_data")
    rc, text = _run(target, out, [f"data.root={root}", "data.max_pixels=500000", "train.epochs=1"])
    counted = "11 images" in text  # 8 + the 16-bit, the oversized and the corrupt file, each once
    ok = rc == 0 and counted
    return Result(target.name, "hostile data folder", ok, False,
                  f"rc {rc}; 11 files counted once despite 2 link loops: {counted}; "
                  + (_last_error_line(text)[:120] if rc else "finished"))


# ---------------------------------------------------------------------------- hostile files (every file read is untrusted)
_MARKER_PAYLOAD = r"""
class Payload:
    def __init__(self, marker):
        self.marker = marker
    def __reduce__(self):
        return (exec, ("open(%r, 'w').write('code ran')" % self.marker,))
"""


def _payload(marker: str):
    namespace: dict = {}
    exec(_MARKER_PAYLOAD, namespace)  # noqa: S102 - the test payload class, defined here on purpose
    return namespace["Payload"](marker)


def _run_measured(target: Target, out: str, argv: Sequence[str], timeout: float = 120) -> tuple[int, str, float, float]:
    """Run the trainer CLI with exactly ``argv`` (no default args); (rc, output, seconds, peak RSS in MiB)."""
    log_path = out + ".log"
    env = _env()
    cmd = [sys.executable, "-c", _CHILD, target.entry, *argv]
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    end = t0 + timeout
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.time() > end:
            os.killpg(p.pid, signal.SIGKILL)
            _, status, usage = os.wait4(p.pid, 0)
            rc = -9
            break
        time.sleep(0.05)
    p.returncode = rc
    with open(log_path) as f:
        return rc, f.read(), time.time() - t0, usage.ru_maxrss / 1024


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ": error: " in ln]


def _base_args(target: Target) -> list[str]:
    """The target's arguments without its recipe (``-c X``), for scenarios that bring their own."""
    args, skip = [], False
    for a in target.args:
        if skip:
            skip = False
        elif a in ("-c", "--config"):
            skip = True
        else:
            args.append(a)
    return args


def _hostile_recipes(target: Target, work: str) -> list[Result]:
    """Alias bomb inside a valid key, a 33 MB recipe, duplicate keys, bytes that are not UTF-8: each one line
    naming the file, exit 2, in seconds and little memory."""
    folder = os.path.join(work, "recipes")
    os.makedirs(folder, exist_ok=True)
    items = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    key = "model:\n  img_size: " if target.name == "pretrain" else "aug:\n  scale: "
    cases = {"alias bomb (10^9 values)": ("bomb.yaml", (key + "[" + ", ".join(items) + "]\n").encode(), "aliases"),
             "duplicate keys": ("dup.yaml", b"seed: 1\noptim:\n  lr: 0.1\n  lr: 0.2\n", "lines 3 and 4"),
             "not UTF-8": ("latin1.yaml", "wandb:\n  name: caf\xe9\n".encode("latin-1"), "not UTF-8")}
    big = os.path.join(folder, "huge.yaml")
    if not os.path.isfile(big):
        with open(big, "w") as f:
            for i in range(330_000):
                f.write(f"k{i}: [" + "1, " * 30 + "1]\n")
    results = []
    for name, (fname, data, must) in list(cases.items()) + [("33 MB recipe", ("huge.yaml", None, "MiB"))]:
        path = os.path.join(folder, fname)
        if data is not None:
            with open(path, "wb") as f:
                f.write(data)
        out = os.path.join(work, f"{target.name}-recipe-{fname}")
        rc, text, secs, peak = _run_measured(target, out, ["-c", path, *_base_args(target), f"output_dir={out}"])
        lines = _error_lines(text)
        ok = rc == 2 and len(lines) == 1 and path in lines[0] and must in lines[0] and secs < 60 and peak < 2048
        results.append(Result(target.name, f"hostile recipe: {name}", ok, False,
                              f"rc {rc} in {secs:.1f} s, peak {peak:.0f} MiB: {(lines or [text[-160:]])[0][:160]}",
                              secs))
    return results


def _hostile_checkpoint(target: Target, work: str) -> Result:
    """resume=<a checkpoint whose pickle runs code>: refused, nothing ran."""
    import torch
    out = os.path.join(work, f"{target.name}-hostile_ckpt")
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(work, f"{target.name}-code_ran.txt")
    bad = os.path.join(work, f"{target.name}-hostile.pth")
    torch.save({"model": {}, "train_state": _payload(marker)}, bad)
    rc, text, secs, _ = _run_measured(target, out, [*target.args, f"output_dir={out}", f"resume={bad}"])
    lines = _error_lines(text)
    ran = os.path.exists(marker)
    ok = rc == 1 and not ran and len(lines) == 1 and "pickles Python objects" in lines[0]
    return Result(target.name, "hostile checkpoint (pickle that runs code) as resume", ok, False,
                  f"rc {rc}; code ran: {ran}; {(lines or [''])[0][:160]}", secs)


def _hostile_program(work: str) -> Result:
    """fgvc.export.load_program on a .pt2 whose weights are a pickle that runs code: refused, nothing ran."""
    import io as _io
    import zipfile
    import torch
    marker = os.path.join(work, "pt2-code_ran.txt")
    ep = torch.export.export(torch.nn.Linear(3, 2).eval(), (torch.randn(2, 3),))
    buf = _io.BytesIO()
    torch.export.save(ep, buf)
    src, dst_buf = zipfile.ZipFile(_io.BytesIO(buf.getvalue())), _io.BytesIO()
    payload = _io.BytesIO()
    torch.save(_payload(marker), payload)
    with zipfile.ZipFile(dst_buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename.endswith("model_weights_config.json"):
                cfg = json.loads(body)
                cfg["config"]["weight"]["use_pickle"] = True
                body = json.dumps(cfg).encode()
            elif info.filename.endswith("data/weights/weight_0"):
                body = payload.getvalue()
            dst.writestr(info.filename, body)
    path = os.path.join(work, "hostile.pt2")
    with open(path, "wb") as f:
        f.write(dst_buf.getvalue())
    code = ("import sys\nfrom fgvc.export import load_program\ntry:\n    load_program(sys.argv[1])\n"
            "except Exception as e:\n    print('error:', e)\n    sys.exit(1)\n")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, env=_env(), timeout=300)
    ran = os.path.exists(marker)
    ok = r.returncode == 1 and not ran and path in r.stdout and "nothing in it was run" in r.stdout
    return Result("fgvc", "hostile .pt2 (pickled weights that run code) through load_program", ok, False,
                  f"rc {r.returncode}; code ran: {ran}; {r.stdout.strip()[:160]}", time.time() - t0)


def _unreadable_resume(target: Target, work: str) -> Result:
    """resume=auto where the only checkpoint cannot be read: stop, name it, never overwrite it."""
    out = os.path.join(work, f"{target.name}-unreadable_resume")
    os.makedirs(out, exist_ok=True)
    last = os.path.join(out, "last.pth")
    with open(last, "wb") as f:
        f.write(b"PK\x03\x04 half a checkpoint")
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1}\n')
    before = open(last, "rb").read()
    rc, text, secs, _ = _run_measured(target, out, [*target.args, f"output_dir={out}", "resume=auto"])
    lines = _error_lines(text)
    kept = open(last, "rb").read() == before
    ok = rc == 1 and kept and len(lines) == 1 and "last.pth" in lines[0] and "nothing was overwritten" in lines[0]
    return Result(target.name, "resume=auto with an unreadable last.pth", ok, not kept,
                  f"rc {rc}; damaged file kept as it was: {kept}; {(lines or [''])[0][:160]}", secs)


def _cross_half(target: Target, work: str, other_ckpt: str) -> Result:
    """resume=<a checkpoint of the other half>: named as such, the file untouched, nothing written."""
    out = os.path.join(work, f"{target.name}-cross_half")
    before = open(other_ckpt, "rb").read()
    rc, text, secs, _ = _run_measured(target, out, [*target.args, f"output_dir={out}", f"resume={other_ckpt}"])
    lines = _error_lines(text)
    kept = open(other_ckpt, "rb").read() == before
    what = "an fgvc training checkpoint" if target.name == "pretrain" else "a SparK pre-training checkpoint"
    ok = rc == 1 and kept and len(lines) == 1 and f"is {what}" in lines[0] \
        and not os.path.exists(os.path.join(out, "last.pth"))
    return Result(target.name, "resume=<a checkpoint of the other half>", ok, not kept,
                  f"rc {rc}; {(lines or [''])[0][:200]}", secs)


_CACHE_CHILD = r"""
import json, sys, time, torch
from sparse_mim.sparse import SparseMap, autotune, functional as SF
from sparse_mim.testing import patch_mask
torch.set_num_threads(1)
cache, idx, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
autotune.set_mode("autotune")
autotune.set_cache(cache)
c = 8 + 8 * idx
sm = SparseMap.from_dense(torch.randn(2, c, 16, 16, dtype=torch.float64), patch_mask(2, 4, 4, 0.5))
while time.time() < start:
    time.sleep(0.002)
SF.conv2d(sm, torch.randn(c, 1, 3, 3, dtype=torch.float64), None, 1, 1, groups=c)
for j in range(25):
    autotune._save_disk(torch.device("cpu"), f"p{idx}-{j}",
                        autotune.Choice("gather", {"gather": 1.0}, "tuned", 0.0, {"op": "x"}))
print("KEYS " + json.dumps(list(autotune.choices())))
"""


def _concurrent_cache(work: str) -> Result:
    """Four processes tuning into one autotune cache at once (plus a malformed file before them): every entry
    kept, the bad file reported once per process and rebuilt."""
    cache = os.path.join(work, "shared_autotune.json")
    with open(cache, "w") as f:
        f.write('[1, 2, "a list, not a cache"]')
    start = time.time() + 8
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", _CACHE_CHILD, cache, str(i), str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(_env(), PYTHONWARNINGS="default"))
             for i in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    tuned = {k for out, _ in outs for ln in out.splitlines() if ln.startswith("KEYS ") for k in json.loads(ln[5:])}
    try:
        entries = json.load(open(cache))["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        entries = {}
    expected = {f"p{i}-{j}" for i in range(4) for j in range(25)} | tuned
    missing = expected - set(entries)
    reported = sum(err.count(cache) for _, err in outs)
    ok = all(p.returncode == 0 for p in procs) and not missing and len(tuned) == 4 and reported >= 1
    return Result("pretrain", "4 processes tuning into one autotune cache (malformed at start)", ok, bool(missing),
                  f"{len(entries)} of {len(expected)} entries kept; the bad file reported {reported} time(s)",
                  time.time() - t0)


def _hostile_csvs(work: str) -> list[Result]:
    """fgvc on custom CSVs: a BOM (Excel) trains, an image listed twice / non-UTF-8 bytes are one line naming
    the file; a phone photo with an EXIF orientation (and one with a damaged EXIF block) is read."""
    from PIL import Image
    import numpy as np
    target = TARGETS["fgvc"]
    root = os.path.join(work, "custom_csv")
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rows = []
    for i in range(24):
        arr = np.full((40, 56, 3), (30 + 200 * (i % 2), 60, 90), np.uint8)
        exif = Image.Exif()
        exif[0x0112] = 6 if i % 3 == 0 else 1
        Image.fromarray(arr).save(os.path.join(root, "img", f"{i}.jpg"), exif=exif.tobytes())
        rows.append(f"img/{i}.jpg,{i % 2},{10 + i},{20 + i}")
    with open(os.path.join(root, "img", "23.jpg"), "r+b") as f:  # damage the EXIF block of one photo
        data = f.read()
        k = data.find(b"Exif")
        if k > 0:
            f.seek(k + 10)
            f.write(b"\xff" * 8)
    header = "path,label,lat,lon\n"
    cases = {"CSV saved by Excel (BOM), EXIF photos": (b"\xef\xbb\xbf" + (header + "\n".join(rows) + "\n").encode(), 0,
                                                       ""),
             "an image listed twice": ((header + "\n".join(rows + [rows[3]]) + "\n").encode(), 1, "lines 5 and 26"),
             "bytes that are not UTF-8": ((header + "\n".join(rows) + "\nimg/caf\xe9.jpg,1,0,0\n").encode("latin-1"),
                                          1, "not UTF-8")}
    results = []
    for name, (data, want_rc, must) in cases.items():
        tag = str(len(results))
        csv_path = os.path.join(root, f"train{tag}.csv")
        with open(csv_path, "wb") as f:
            f.write(data)
        out = os.path.join(work, f"fgvc-csv{tag}")
        argv = [*_base_args(target), "data.dataset=custom", f"data.root={root}", f"data.train_csv=train{tag}.csv",
                f"data.test_csv=train{tag}.csv", "data.meta_groups=[{name: where, type: latlon, columns: [lat, lon]}]",
                "data.val_split=0", "data.batch_size=8", "data.num_workers=0", "model.name=metaformer_tiny",
                "model.img_size=32", "aug.rand_augment=", "train.epochs=1", "train.warmup_epochs=0",
                f"output_dir={out}"]
        rc, text, secs, _ = _run_measured(target, out, argv, timeout=600)
        lines = _error_lines(text)
        if want_rc == 0:
            ok = rc == 0 and not lines
        else:
            ok = rc == want_rc and len(lines) == 1 and csv_path in lines[0] and must in lines[0]
        results.append(Result("fgvc", f"hostile CSV: {name}", ok, False,
                              f"rc {rc}: {(lines or ['trained'])[0][:180]}", secs))
    return results


# ---------------------------------------------------------------------------- driver
def run_fault_injection(workdir: str, trainers: Sequence[str] = ("pretrain", "fgvc"), quick: bool = False,
                        log: Callable[[str], None] = print, only: str = "") -> list[Result]:
    """Run every scenario for each trainer under ``workdir`` (created; left for inspection).

    ``only``: run just the scenarios whose function or name contains this text (e.g. ``truncated``).
    """
    os.makedirs(workdir, exist_ok=True)
    results: list[Result] = []
    refs: dict = {}  # trainer -> (target, work, reference run): the other half's checkpoint for the cross-half case

    def record(fn, *a):
        if only and only not in fn.__name__ and only not in " ".join(map(str, a)):
            return
        t0 = time.time()
        out = fn(*a)
        for r in (out if isinstance(out, list) else [out]):
            r.seconds = r.seconds or time.time() - t0
            results.append(r)
            log(f"[{r.trainer}] {'PASS' if r.passed else 'FAIL'}{' DATA LOST' if r.data_lost else ''} "
                f"{r.scenario}: {r.detail} ({r.seconds:.0f} s)")

    for name in trainers:
        target = TARGETS[name]
        work = os.path.join(workdir, name)
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        ref = os.path.join(work, f"{name}-reference")
        rc, text = _run(target, ref)
        if rc != 0:
            results.append(Result(name, "uninterrupted reference run", False, False, _last_error_line(text)))
            log(f"[{name}] reference run failed (rc {rc}); skipping its scenarios:\n{text[-2000:]}")
            continue
        log(f"[{name}] reference run done ({_step_of(_ckpt(os.path.join(ref, 'last.pth')))} steps)")
        record(_bad_configs, target, work)
        record(_kill, target, work, ref, signal.SIGTERM, "SIGTERM mid-run")
        record(_kill, target, work, ref, signal.SIGKILL, "SIGKILL mid-run")
        if not quick:
            record(_kill, target, work, ref, signal.SIGUSR1, "SIGUSR1 mid-run")
            for i, delay in enumerate((0.1, 0.3)):
                record(_kill, target, work, ref, signal.SIGKILL, f"SIGKILL at a random point {i + 1}", delay)
            record(_truncated_last, target, work, ref)
            record(_disk_full, target, work, ref)
            record(_non_finite, target, work, ref)
            record(_interrupt, target, work, ref, 1)
            record(_interrupt, target, work, ref, 2)
            if name == "fgvc":
                record(_disk_full_images, target, work, ref)
            if name == "pretrain":
                record(_hostile_data, target, work)
                record(_ddp_one_rank_signalled, target, work)
        record(_hostile_recipes, target, work)
        record(_hostile_checkpoint, target, work)
        record(_unreadable_resume, target, work)
        if name == "fgvc":
            record(_hostile_program, work)
            record(_hostile_csvs, work)
        else:
            record(_concurrent_cache, work)
        refs[name] = (target, work, ref)
    for name, (target, work, _) in refs.items():  # each trainer given the other half's reference checkpoint
        other = [r for n, (_, _, r) in refs.items() if n != name]
        if other:
            record(_cross_half, target, work, os.path.join(other[0], "last.pth"))
    return results


def format_report(results: Sequence[Result]) -> str:
    lines = ["| trainer | scenario | result | data lost | detail |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.trainer} | {r.scenario} | {'pass' if r.passed else 'FAIL'} | "
                     f"{'yes' if r.data_lost else 'no'} | {r.detail.replace('|', '/')} |")
    lines.append("")
    for name in dict.fromkeys(r.trainer for r in results):
        rs = [r for r in results if r.trainer == name]
        lines.append(f"{name}: {len(rs)} scenarios tried, {sum(r.passed for r in rs)} passed, "
                     f"{sum(r.data_lost for r in rs)} with data lost")
    lines.append(f"total: {len(results)} tried, {sum(r.passed for r in results)} passed, "
                 f"{sum(r.data_lost for r in results)} with data lost")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/fault_injection.py``: run the scenarios, print the table; status 1 if any failed or lost data."""
    import argparse
    import tempfile
    p = argparse.ArgumentParser(description="Fault injection for the pre-training and fgvc trainers.")
    p.add_argument("--trainers", nargs="+", default=["pretrain", "fgvc"], choices=sorted(TARGETS))
    p.add_argument("--quick", action="store_true", help="only bad configs, one SIGTERM and one SIGKILL per trainer")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fault_injection"),
                   help="scratch folder (runs are left there for inspection)")
    p.add_argument("--report", default="", help="also write the table to this Markdown file")
    p.add_argument("--only", default="", help="only scenarios whose name contains this text (e.g. truncated, SIGTERM)")
    args = p.parse_args(argv)
    t0 = time.time()
    results = run_fault_injection(args.workdir, args.trainers, quick=args.quick, only=args.only)
    table = format_report(results)
    print("\n" + table + f"\n({(time.time() - t0) / 60:.1f} min)")
    if args.report:
        from sparse_mim.utils.checkpoint import atomic_write_text
        atomic_write_text(args.report, table + "\n")
    return 0 if all(r.passed and not r.data_lost for r in results) else 1
