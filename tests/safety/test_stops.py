"""Every stop keeps its work: resume=auto never starts over a checkpoint it cannot read, Ctrl-C finishes
the step and writes last.pth (twice aborts at once), a full disk gives one line and leaves nothing partial,
concurrent writers of one file never delete each other's temp files. Subprocesses and signals are real."""
import errno
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from repotools import fault_injection as fi
from sparse_mim.utils import checkpoint as ckpt
from sparse_mim.utils.preemption import INTERRUPTED_EXIT_CODE
from tests.pretrain.test_faults import TINY, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRETRAIN_QUICK = TINY + ["data.builtin_images=8", "data.batch_size=2", "train.epochs=2", "checkpoint.every_steps=0",
                         "checkpoint.keep_every_steps=0", "wandb.enabled=false"]
FGVC_QUICK = ["-c", "fgvc/demo.yaml", "train.epochs=2", "data.batch_size=8", "data.num_workers=0",
              "data.val_split=0", "log.every=1", "log.progress=false", "wandb.enabled=false",
              "checkpoint.every_steps=0", "checkpoint.keep_every_steps=0"]


# ----------------------------------------------------------------------------- resume=auto
def test_pretrain_resume_auto_refuses_an_unreadable_checkpoint_and_keeps_it(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "last.pth").write_bytes(b"PK\x03\x04 half a checkpoint")
    before = (tmp_path / "last.pth").read_bytes()
    with pytest.raises(ckpt.CheckpointError) as e:
        run(PRETRAIN_QUICK + [f"output_dir={tmp_path}", "resume=auto"])
    assert "last.pth" in str(e.value) and "nothing was overwritten" in str(e.value)
    assert (tmp_path / "last.pth").read_bytes() == before


# ----------------------------------------------------------------------------- Ctrl-C
def _target(name, extra_args):
    t = fi.TARGETS[name]
    entry = t.entry
    return fi.Target(name, entry, extra_args, kill_step=2)


def _interrupt(tmp_path, name, args, presses):
    target = _target(name, args)
    out = str(tmp_path / "run")
    log = str(tmp_path / "run.log")
    p = fi._start(target, out, fault="slow_step", limit=2, log_path=log)
    try:
        assert fi._wait_text(p, log, "FI: slow step", timeout=300), open(log).read()[-3000:]
        for i in range(presses):
            if i:
                time.sleep(0.3)
            os.killpg(p.pid, signal.SIGINT)  # the whole process group, loader workers included, as a terminal does
        rc = p.wait(120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return rc, open(log).read(), out


@pytest.mark.parametrize("name,args", [("pretrain", PRETRAIN_QUICK + ["data.num_workers=2"]), ("fgvc", FGVC_QUICK)])
def test_first_ctrl_c_finishes_the_step_and_writes_last(tmp_path, name, args):
    rc, text, out = _interrupt(tmp_path, name, args, 1)
    assert rc == INTERRUPTED_EXIT_CODE, text[-3000:]
    assert "interrupted (Ctrl-C): finishing the current step, then writing last.pth" in text
    assert ckpt.load_checkpoint(os.path.join(out, "last.pth"))["train_state"]["step"] == 2  # the step it was in


def test_second_ctrl_c_aborts_at_once(tmp_path):
    rc, text, out = _interrupt(tmp_path, "pretrain", PRETRAIN_QUICK, 2)
    assert rc == INTERRUPTED_EXIT_CODE, text[-3000:]
    assert "interrupted (Ctrl-C)" in text
    assert not os.path.exists(os.path.join(out, "last.pth"))  # aborted inside the step: no new checkpoint
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


# ----------------------------------------------------------------------------- full disk

def _fill_disk_after(monkeypatch, nbytes):
    """torch.save's file object raises ENOSPC after ``nbytes``: torch's own writer meets a full disk."""
    real = torch.save

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > nbytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real(obj, Full(f), *a, **k))


def test_full_disk_inside_torch_writer_is_the_documented_line(tmp_path, monkeypatch):
    p = str(tmp_path / "last.pth")
    ckpt.save_checkpoint({"w": torch.ones(3)}, p)
    _fill_disk_after(monkeypatch, 64)
    with pytest.raises(ckpt.DiskFullError, match=r"no space left on device while writing .*last.pth; the previous "
                                                 r"checkpoint is intact"):
        ckpt.save_checkpoint({"w": torch.zeros(10000)}, p)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pth"] and torch.equal(ckpt.load_checkpoint(p)["w"], torch.ones(3))


def test_pretrain_full_disk_one_line_and_nothing_partial(tmp_path, monkeypatch, capsys):
    from sparse_mim.cli import pretrain as cli
    _fill_disk_after(monkeypatch, 4096)
    rc = cli(PRETRAIN_QUICK + [f"output_dir={tmp_path}", "checkpoint.every_steps=1"])
    text = capsys.readouterr().err
    err = [ln for ln in text.splitlines() if ln.startswith("spark-pretrain:")]
    assert rc == 1 and len(err) == 1 and "Traceback" not in text
    assert "no space left on device while writing" in err[0] and "last.pth" in err[0] and "inline_container" \
        not in err[0]
    assert not os.path.exists(tmp_path / "last.pth") and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_fgvc_demo_data_full_disk_leaves_no_partial_folder(tmp_path, monkeypatch, capsys):
    from PIL import Image
    from fgvc.cli import train as cli
    real, calls = Image.Image.save, [0]

    def save(self, fp, *a, **k):
        calls[0] += 1
        if calls[0] > 10:
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real(self, fp, *a, **k)
    monkeypatch.setattr(Image.Image, "save", save)
    rc = cli(FGVC_QUICK + [f"output_dir={tmp_path}"])
    text = capsys.readouterr().err
    err = [ln for ln in text.splitlines() if ln.startswith("fgvc-train:")]
    assert rc == 1 and len(err) == 1 and "Traceback" not in text and "no space left on device while writing" in err[0], err
    assert "demo_data" in err[0]
    assert not [n for n in os.listdir(tmp_path) if "demo_data" in n]
    monkeypatch.undo()
    from fgvc.demo import make_demo_dataset
    root = tmp_path / "again"
    make_demo_dataset(str(root), n_looks=1, train_per_class=2, test_per_class=1, image_size=32)
    assert sorted(os.listdir(root)) == ["demo.json", "images", "test.csv", "train.csv"]


def test_metrics_line_is_whole_or_absent(tmp_path, monkeypatch):
    from sparse_mim.utils.logger import RunLogger
    logger = RunLogger(str(tmp_path), {}, enabled=True, use_wandb=False)
    logger.log({"loss": 1.0}, 1)
    good = (tmp_path / "metrics.jsonl").read_bytes()
    from sparse_mim.utils import logger as logger_mod

    class HalfWritten:  # the disk fills 5 bytes into the line
        def __init__(self, f):
            self.f = f

        def write(self, b):
            self.f.write(b[:5])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(logger_mod, "open", lambda *a, **k: HalfWritten(open(*a, **k)), raising=False)
    with pytest.raises(ckpt.DiskFullError, match="metrics.jsonl"):
        logger.log({"loss": 0.5}, 2)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == good


def test_run_cli_names_a_full_disk_from_any_layer(capsys):
    from sparse_mim.utils.cli import run_cli

    def fn(argv):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.png")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from e
    assert run_cli(fn, [], prog="tool") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tool: error: DiskFullError: no space left on device while writing /data/run/metrics.png")


# ----------------------------------------------------------------------------- temp files of concurrent writers
def test_sweep_removes_only_provable_orphans(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = ckpt._host_tag()
    live = tmp_path / f".cache.json.{os.getpid()}@{host}.abc123.tmp"       # this process: writing now
    orphan = tmp_path / f".cache.json.{dead.pid}@{host}.abc124.tmp"        # its writer is gone
    remote_fresh = tmp_path / ".cache.json.77@otherhost.abc125.tmp"         # another host, touched just now
    remote_old = tmp_path / ".cache.json.78@otherhost.abc126.tmp"           # another host, untouched for 2 h
    for p in (live, orphan, remote_fresh, remote_old):
        p.write_bytes(b"{}")
    old = time.time() - 2 * 3600
    os.utime(remote_old, (old, old))
    removed = ckpt.remove_orphan_temps(str(tmp_path), "cache.json")
    assert sorted(os.path.basename(p) for p in removed) == sorted([orphan.name, remote_old.name])
    assert live.exists() and remote_fresh.exists()
    ckpt.atomic_write_text(tmp_path / "cache.json", "{}")  # a write sweeps the same way
    assert live.exists() and remote_fresh.exists()
