"""Fault injection for the fgvc trainer: kills, signals, damaged files, bad configs, divergence.

    python -m tests.fgvc.fault_injection            # from the repository root; ~5-10 min on 2 CPU cores
    python -m tests.fgvc.fault_injection --quick    # one case per class
    python -m tests.fgvc.fault_injection --only kill  # only the classes whose name contains "kill"

Every scenario runs a small training on generated data (the tiny MetaFormer, 32 px) in a scratch
folder and checks the promise of its class; runs that are resumed are compared tensor by tensor with
one uninterrupted reference run. Prints one line per scenario and a table: scenarios tried / passed
and the optimizer steps lost (work that had to be redone after the fault). Exit status 0 when every
scenario passed. Each subprocess is bounded (300 s); nothing outside the scratch folder is touched.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

os.environ.setdefault("WANDB_MODE", "disabled")

STEPS_PER_EPOCH = 8          # 128 training images (4 classes x 32), batch 16
EPOCHS = 2
COMMON = ["train.epochs=2", "data.val_split=0", "data.batch_size=16", "optim.lr_base_batch=16",
          "log.progress=false", "wandb.enabled=false", "train.warmup_epochs=0", "log.every=1",
          "aug.mixup=0.8", "aug.cutmix=1.0", "aug.reprob=0.25", "aug.rand_augment=rand-m9-mstd0.5",
          "model.drop_path_rate=0.1", "train.ema=true", "train.ema_decay=0.9", "checkpoint.every_steps=1",
          "checkpoint.keep_every_steps=4", "train.cpu_threads=1"]


def _demo_yaml() -> str:
    from sparse_mim.utils.config import shipped_recipes_dir
    return os.path.join(shipped_recipes_dir(), "fgvc", "demo.yaml")


def _args(root: str, out: str, *extra: str) -> list:
    return [f"data.root={root}", f"output_dir={out}", *COMMON, *extra]


def _train(root, out, *extra):
    from fgvc.train import DEFAULTS, train, validate_config
    from sparse_mim.utils.config import load_config
    cfg = load_config(DEFAULTS, _demo_yaml(), _args(root, out, *extra), validate=validate_config)
    return train(cfg, log=lambda *a: None)


def _last(out):
    return torch.load(os.path.join(out, "last.pth"), weights_only=True)


def _same_as_reference(ref, out) -> bool:
    a, b = _last(ref), _last(out)
    if a["train_state"] != b["train_state"]:
        return False
    return all(torch.equal(a[p][k], b[p][k]) for p in ("model", "model_ema") for k in a[p])


def _launch(root, out, *extra):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "fgvc.cli", "train", "-c", _demo_yaml(), *_args(root, out, *extra)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, out, step, timeout=300.0):
    """Poll metrics.jsonl until the run logged ``step``; returns the newest logged step (None if it ended)."""
    path, deadline = os.path.join(out, "metrics.jsonl"), time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(path):
            steps = [json.loads(line)["step"] for line in open(path) if line.strip().endswith("}")]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.01)
    return None


# ------------------------------------------------------------------------------------------- scenarios
def stop_resume(ctx, step):
    """train.stop_at_step (the in-process pre-emption path) at a step, then resume=auto to the end."""
    out = ctx.fresh()
    r = _train(ctx.root, out, f"train.stop_at_step={step}")
    assert r["stopped"] and _last(out)["train_state"]["step"] == step
    _train(ctx.root, out, "resume=auto")
    assert _same_as_reference(ctx.ref, out), "resumed weights differ from the uninterrupted run"
    return 0


def signal_resume(ctx, step, sig):
    """A real signal to a training process: it finishes the step, writes last.pth, exits 75."""
    from sparse_mim.utils.preemption import PREEMPTED_EXIT_CODE
    out = ctx.fresh()
    proc = _launch(ctx.root, out)
    seen = _wait_for_step(proc, out, step)
    if seen is None:
        ended = proc.poll() is not None
        proc.kill()
        raise AssertionError("the run ended before the signal could be sent" if ended else
                             f"step {step} not reached within 300 s (machine too busy?)")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, f"exit status {proc.returncode}: {err[-300:]}"
    saved = _last(out)["train_state"]["step"]
    assert saved >= seen, f"checkpoint at step {saved}, signal after step {seen}"
    _train(ctx.root, out, "resume=auto")
    assert _same_as_reference(ctx.ref, out), "resumed weights differ from the uninterrupted run"
    return 0


def hard_kill(ctx, step):
    """SIGKILL (no chance to save): resume=auto from the last periodic checkpoint (every step here)."""
    out = ctx.fresh()
    proc = _launch(ctx.root, out)
    seen = _wait_for_step(proc, out, step)
    ended = proc.poll() is not None
    proc.kill()
    proc.communicate(timeout=60)
    if seen is None:
        raise AssertionError("the run ended before it could be killed" if ended else
                             f"step {step} not reached within 300 s (machine too busy?)")
    saved = _last(out)["train_state"]["step"]
    _train(ctx.root, out, "resume=auto")
    assert _same_as_reference(ctx.ref, out), "resumed weights differ from the uninterrupted run"
    return max(0, seen - saved)


def damaged_last(ctx, step):
    """last.pth truncated (a torn copy, a bad disk): resume=auto falls back to the newest keep."""
    out = ctx.fresh()
    _train(ctx.root, out, f"train.stop_at_step={step}")
    with open(os.path.join(out, "last.pth"), "r+b") as f:
        f.truncate(1000)
    keep = (step // 4) * 4
    _train(ctx.root, out, "resume=auto")
    assert _same_as_reference(ctx.ref, out), "resumed weights differ from the uninterrupted run"
    return step - keep


def orphan_temp(ctx, step):
    """A writer killed mid-write leaves a temporary file: removed at the next start, resume unaffected."""
    out = ctx.fresh()
    _train(ctx.root, out, f"train.stop_at_step={step}")
    orphan = os.path.join(out, ".last.pth.abc123.tmp")
    with open(orphan, "wb") as f:
        f.write(b"PK\x03\x04 partial")
    _train(ctx.root, out, "resume=auto")
    assert not os.path.exists(orphan), "orphan temporary file left behind"
    assert _same_as_reference(ctx.ref, out)
    return 0


def rerun_finished(ctx):
    """The same command again on a finished run: refused, nothing rewritten."""
    from sparse_mim.utils.rundir import RunDirError
    stamp = {f: os.path.getmtime(os.path.join(ctx.ref, f)) for f in ("last.pth", "best.pth", "final.json")}
    try:
        _train(ctx.root, ctx.ref)
    except RunDirError as e:
        assert "resume=auto" in str(e)
    else:
        raise AssertionError("a finished run was trained over")
    assert stamp == {f: os.path.getmtime(os.path.join(ctx.ref, f)) for f in stamp}
    return 0


def diverging(ctx):
    """lr 1e30: the run stops with a message and no checkpoint on disk holds NaN / inf."""
    from sparse_mim.utils.checkpoint import load_checkpoint
    out = ctx.fresh()
    try:
        _train(ctx.root, out, "optim.lr=1e30", "optim.clip_grad=0")
    except FloatingPointError:
        pass
    else:
        raise AssertionError("a diverging run finished without a word")
    for name in os.listdir(out):
        if name.endswith(".pth"):
            load_checkpoint(os.path.join(out, name), check_finite=True)
    return 0


BAD_CONFIGS = ["train.eval_every=0", "aug.smoothing=1.5", "data.val_split=-0.5", "train.epochs=0", "train.epochs=-1",
               "optim.betas=[0.9]", "optim.betas=[0.9,1.5]", "aug.scale=[1.0,0.5]", "data.batch_size=0",
               "optim.accum_steps=0", "log.every=0", "train.stop_at_step=-1", "train.warmup_epochs=400",
               "model.img_size=100", "train.amp=fp8", "optim.lr=0"]


def bad_config(ctx, override):
    """A bad value is refused when the config loads, naming the key (before any work)."""
    from fgvc.train import DEFAULTS, validate_config
    from sparse_mim.utils.config import ConfigError, load_config
    try:
        load_config(DEFAULTS, _demo_yaml(), [override], validate=validate_config)
    except ConfigError as e:
        assert override.split("=")[0] in str(e), str(e)
        return 0
    raise AssertionError(f"{override} was accepted")


def demo_into_user_folder(ctx):
    """data.demo=true pointed at a user's folder: refused, the folder untouched."""
    out, user = ctx.fresh(), ctx.fresh()
    with open(os.path.join(user, "images.txt"), "w") as f:
        f.write("1 a.jpg\n")
    try:
        _train(user, out)
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("trained on / wrote into a user folder")
    assert os.listdir(user) == ["images.txt"]
    return 0


class _Ctx:
    def __init__(self, base):
        self.base, self.n = base, 0
        self.root = os.path.join(base, "data")
        self.ref = os.path.join(base, "reference")

    def fresh(self):
        self.n += 1
        path = os.path.join(self.base, f"run{self.n:02d}")
        os.makedirs(path)
        return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one case per class")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--only", default="", help="run only the scenario classes containing this text (e.g. 'kill')")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from fgvc.demo import make_demo_dataset
    base = tempfile.mkdtemp(prefix="fgvc_faults_")
    ctx = _Ctx(base)
    make_demo_dataset(ctx.root, n_looks=2, train_per_class=32, test_per_class=16, image_size=32, seed=1)
    t0 = time.time()
    _train(ctx.root, ctx.ref)
    total = STEPS_PER_EPOCH * EPOCHS
    q = args.quick
    scenarios = [("stop + resume", f"step {s}", stop_resume, (s,)) for s in ((5,) if q else (1, 5, 8, 13))]
    scenarios += [("signal + resume", f"{signal.Signals(sig).name} after step {s}", signal_resume, (s, sig))
                  for s, sig in (((3, signal.SIGTERM),) if q else ((3, signal.SIGTERM), (10, signal.SIGUSR1)))]
    scenarios += [("hard kill + resume", f"SIGKILL after step {s}", hard_kill, (s,)) for s in ((6,) if q else (2, 11))]
    scenarios += [("damaged last.pth", f"truncated at step {s}", damaged_last, (s,)) for s in ((6,) if q else (6, 10))]
    scenarios += [("orphan temp file", "killed writer", orphan_temp, (3,)),
                  ("rerun finished run", "same command", rerun_finished, ()),
                  ("diverging run", "lr 1e30", diverging, ()),
                  ("demo into user folder", "data.root=user folder", demo_into_user_folder, ())]
    scenarios += [("bad config", o, bad_config, (o,)) for o in (BAD_CONFIGS[:3] if q else BAD_CONFIGS)]
    scenarios = [sc for sc in scenarios if args.only in sc[0]]
    results = []
    for cls, case, fn, fargs in scenarios:
        t = time.time()
        try:
            lost = fn(ctx, *fargs)
            ok, note = True, ""
        except Exception as e:  # noqa: BLE001 - a failed scenario is a result, not a crash
            ok, lost, note = False, None, f"{type(e).__name__}: {e}".splitlines()[0][:160]
            if os.environ.get("FAULTS_DEBUG"):
                traceback.print_exc()
        results.append((cls, case, ok, lost))
        print(f"[{'pass' if ok else 'FAIL'}] {cls:<22s} {case:<28s} steps lost {lost if lost is not None else '-':<3}"
              f" ({time.time() - t:.1f} s) {note}", flush=True)
    print(f"\nfgvc trainer, {total}-step reference run, {time.time() - t0:.0f} s in all")
    print(f"{'class':<22s} {'tried':>5s} {'passed':>6s} {'steps lost (max)':>17s}")
    for cls in dict.fromkeys(r[0] for r in results):
        rows = [r for r in results if r[0] == cls]
        lost = [r[3] for r in rows if r[3] is not None]
        print(f"{cls:<22s} {len(rows):>5d} {sum(r[2] for r in rows):>6d} {max(lost) if lost else '-':>17}")
    tried, passed = len(results), sum(r[2] for r in results)
    print(f"{'total':<22s} {tried:>5d} {passed:>6d}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"scratch folder kept: {base}")
    return 0 if passed == tried else 1


if __name__ == "__main__":
    sys.exit(main())
