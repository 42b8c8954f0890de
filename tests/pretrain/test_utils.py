"""Tests for sparse_mim.utils: checkpoint, distributed env mapping, logger, schedules, misc."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch

from sparse_mim.utils import checkpoint as ckpt
from sparse_mim.utils.distributed import launcher_env, parse_slurm_nodelist, init_distributed, seed_everything
from sparse_mim.utils.logger import RunLogger
from sparse_mim.utils.misc import AverageMeter, NonFiniteLossError, Throughput, check_finite
from sparse_mim.utils.schedules import WarmupCosine, cosine_weight_decay, set_optimizer_values


# ----------------------------------------------------------------------------- checkpoint
def test_checkpoint_atomic_roundtrip_and_find_last(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7,
             "config": {"seed": 0, "optim": {"lr": 1e-4}}, "rng": ckpt.get_rng_state(), "wandb_run_id": "abc"}
    assert ckpt.find_last(str(tmp_path)) is None
    ckpt.save_checkpoint(state, str(tmp_path / ckpt.checkpoint_name(5)))
    ckpt.save_checkpoint(state, str(tmp_path / ckpt.checkpoint_name(12)))
    assert ckpt.find_last(str(tmp_path)).endswith("checkpoint-00000012.pth")
    ckpt.save_checkpoint(state, str(tmp_path / "last.pth"))
    assert ckpt.resolve_resume("auto", str(tmp_path)) == str(tmp_path / "last.pth")
    assert ckpt.resolve_resume("", str(tmp_path)) is None
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temp files left behind
    loaded = ckpt.load_checkpoint(str(tmp_path / "last.pth"))  # weights_only=True inside
    assert loaded["step"] == 7 and loaded["wandb_run_id"] == "abc"
    torch.testing.assert_close(loaded["model"]["weight"], model.weight)
    with pytest.raises(FileNotFoundError, match="resume=auto"):
        ckpt.resolve_resume(str(tmp_path / "nope.pth"), str(tmp_path))


class _Thing:  # a pickled object that weights_only loading must refuse
    pass


def test_checkpoint_rejects_pickled_objects(tmp_path):
    p = tmp_path / "bad.pth"
    torch.save({"x": _Thing()}, p)
    with pytest.raises(ckpt.CheckpointError, match="pickles Python objects"):
        ckpt.load_checkpoint(str(p))


def test_checkpoint_failed_write_keeps_previous(tmp_path, monkeypatch):
    p = str(tmp_path / "last.pth")
    ckpt.save_checkpoint({"step": 1}, p)

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while saving")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"step": 2}, p)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(p)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]


def test_rng_state_roundtrip_through_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = ckpt.get_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.save_checkpoint({"rng": state}, str(tmp_path / "r.pth"))
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.set_rng_state(ckpt.load_checkpoint(str(tmp_path / "r.pth"))["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]


# ----------------------------------------------------------------------------- distributed
def test_slurm_nodelist_parsing():
    assert parse_slurm_nodelist("node[01-04]") == ["node01", "node02", "node03", "node04"]
    assert parse_slurm_nodelist("gpu[1,3-5],cpu7") == ["gpu1", "gpu3", "gpu4", "gpu5", "cpu7"]
    assert parse_slurm_nodelist("rack1-node[08-09]") == ["rack1-node08", "rack1-node09"]
    assert parse_slurm_nodelist("single") == ["single"]


def test_launcher_env_mapping():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "n[07-10]",
           "SLURM_JOB_ID": "12345"}
    info = launcher_env(env)
    assert (info["rank"], info["world_size"], info["local_rank"], info["launcher"]) == (5, 8, 1, "slurm")
    assert info["master_addr"] == "n07" and info["master_port"] == str(29500 + 345)
    tr = launcher_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (tr["rank"], tr["world_size"], tr["launcher"]) == (1, 2, "torchrun")
    # an sbatch shell without srun (one task) is a single process
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})["launcher"] == "none"
    assert launcher_env({})["world_size"] == 1


def test_single_process_fallback(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.distributed, info.device.type) == (0, 1, False, "cpu")
    assert seed_everything(10, rank=3) == 13


# ----------------------------------------------------------------------------- logger
def test_logger_disabled_writes_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log = RunLogger(str(tmp_path), config={"a": 1}, run_id="abcd1234")
    log.log({"loss": torch.tensor(0.5), "lr": 1e-3}, step=3)
    png = log.log_image("recon", torch.rand(3, 8, 16), step=3)
    log.log_artifact(png, "x")  # no-op without wandb
    log.finish()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().strip())
    assert row == {"step": 3, "loss": 0.5, "lr": 1e-3}
    from PIL import Image
    assert Image.open(png).size == (16, 8)
    # non-zero ranks do nothing at all
    other = RunLogger(str(tmp_path / "r1"), enabled=False)
    other.log({"loss": 1.0}, 0)
    assert not (tmp_path / "r1").exists()


def test_logger_offline_wandb_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLogger(str(tmp_path), config={"a": 1}, project="t", run_id="resume01")
    log.log({"loss": 1.0}, step=1)
    log.log_image("recon", np.zeros((4, 4, 3), np.uint8), step=1)
    log.finish()
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run")]
    assert runs and runs[0].endswith("resume01")


# ----------------------------------------------------------------------------- schedules
def test_warmup_cosine_values():
    s = WarmupCosine(base=1.0, final=0.01, total_steps=110, warmup_steps=10, warmup_start=0.005)
    assert s(0) == pytest.approx(0.005)
    assert s(5) == pytest.approx(0.005 + 0.995 * 0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the cosine
    assert s(110) == pytest.approx(0.01) and s(500) == pytest.approx(0.01)
    vals = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    wd = cosine_weight_decay(0.04, 0.2, 100)
    assert wd(0) == pytest.approx(0.04) and wd(100) == pytest.approx(0.2) and wd(50) == pytest.approx(0.12)


def test_set_optimizer_values_keeps_no_decay_groups():
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.05}, {"params": [b], "weight_decay": 0.0}])
    set_optimizer_values(opt, lr=0.5, weight_decay=0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]


# ----------------------------------------------------------------------------- misc
def test_meters_and_nan_guard():
    m = AverageMeter(window=2)
    for v in (1.0, 2.0, 6.0):
        m.update(v)
    assert m.avg == pytest.approx(3.0) and m.smooth == pytest.approx(4.0) and m.val == 6.0
    t = Throughput()
    t.times[0] = 0.0
    t.update(8, now=1.0)
    assert t.update(8, now=2.0) == pytest.approx(8.0)
    assert check_finite(torch.tensor(1.5)) == 1.5
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteLossError, match="step 3.*resume=auto"):
            check_finite(torch.tensor(bad), step=3)
    assert isinstance(NonFiniteLossError("x"), FloatingPointError) and math.isfinite(1.0)
    from sparse_mim.utils.misc import peak_memory_mb
    assert 10 < peak_memory_mb("cpu") < 1e6  # the process's peak RSS in MiB




_SLURM_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from sparse_mim.utils.distributed import init_distributed, all_reduce_sum, get_world_size, cleanup
info = init_distributed(device="cpu")
total = all_reduce_sum(torch.tensor([float(info.rank + 1)]))
print(info.launcher, info.rank, info.world_size, info.local_rank, info.backend, int(total.item()), get_world_size())
cleanup()
"""


def test_slurm_variables_start_a_real_process_group(tmp_path):
    """Two processes started the way srun starts them (SLURM_* only) form a gloo group and all-reduce."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "child.py"
    script.write_text(_SLURM_CHILD.format(root=root))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_"))}
    procs = []
    for rank in range(2):
        env = dict(base, SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   SLURM_NODELIST="localhost", SLURM_JOB_ID="7", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    lines = sorted(out.strip().splitlines()[-1] for out, _ in outs)
    assert lines == ["slurm 0 2 0 gloo 3 2", "slurm 1 2 1 gloo 3 2"]


def _hung_peer_worker(rank, init_file, out_dir):
    import time
    from sparse_mim.utils import distributed as du
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    du.check_peers(30, "start")  # both arrive
    if rank == 1:
        time.sleep(8)  # hung
        return
    try:
        du.check_peers(2, "step 7")
        msg = "no error"
    except du.DeadPeerError as e:
        msg = str(e)
    with open(os.path.join(out_dir, "rank0.txt"), "w") as f:
        f.write(msg)


def test_dead_peer_named_within_timeout(tmp_path):
    """A hung rank: the others stop after train.dist_timeout with an error naming it (gloo, 2 CPU processes)."""
    import torch.multiprocessing as mp
    mp.start_processes(_hung_peer_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    msg = (tmp_path / "rank0.txt").read_text()
    assert "rank(s) 1 did not answer within train.dist_timeout=2 s at step 7" in msg, msg
