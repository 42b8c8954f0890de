"""One run skeleton, one answer per case, in both trainers (SparK pre-training and fgvc fine-tuning).

Each policy of ``sparse_mim.utils.training_run.TrainingRun`` is run through both trainers with tiny
CPU configurations: resume with no checkpoint yet / none loadable / a finished run / a shorter
schedule, stops (``train.stop_at_step`` and a pre-emption guard) that write ``last.pth`` and resume to
the uninterrupted result, the same checkpoint keys, non-finite states refused on write, and
checkpoints written before the wandb key was unified (``wandb_id``) resuming their wandb run.
"""
import os

import pytest
import torch

from sparse_mim.utils.checkpoint import CheckpointError, NonFiniteStateError, load_checkpoint
from sparse_mim.utils.config import ConfigError, load_config
from sparse_mim.utils.preemption import PreemptionGuard
from sparse_mim.utils.training_run import TrainingRun
from tests.pretrain.test_faults import TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAINERS = ["pretrain", "fgvc"]
STEPS = {"pretrain": 4, "fgvc": 8}            # total steps of the configurations below (2 epochs each)
PRETRAIN = TINY + ["data.builtin_images=4", "data.batch_size=2", "train.epochs=2", "checkpoint.every_steps=0",
                   "checkpoint.keep_every_steps=0", "model.drop_path_rate=0.1"]
FGVC = ["data.val_split=0", "data.batch_size=8", "optim.lr_base_batch=8", "log.progress=false",
        "wandb.enabled=false", "train.warmup_epochs=0", "train.epochs=2", "data.num_workers=0",
        "checkpoint.every_steps=0", "checkpoint.keep_every_steps=0", "model.drop_path_rate=0.1"]


@pytest.fixture(scope="module")
def fgvc_root(tmp_path_factory):
    from fgvc.demo import make_demo_dataset
    root = str(tmp_path_factory.mktemp("skeleton") / "data")
    make_demo_dataset(root, n_looks=2, train_per_class=8, test_per_class=4, image_size=32, seed=1)
    return root


@pytest.fixture
def run(fgvc_root, monkeypatch):
    """``run(trainer, out, *overrides, guard=None)``: one tiny run of either trainer; returns its summary."""
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def go(name, out, *overrides, guard=None, log=None):
        if name == "pretrain":
            from sparse_mim.train import DEFAULTS, pretrain, validate_config
            cfg = load_config(DEFAULTS, None, PRETRAIN + [f"output_dir={out}", *overrides], validate=validate_config)
            return pretrain(cfg, guard=guard)
        from fgvc.train import DEFAULTS, train, validate_config
        cfg = load_config(DEFAULTS, "fgvc/demo.yaml", FGVC + [f"data.root={fgvc_root}", f"output_dir={out}",
                                                              *overrides], validate=validate_config)
        return train(cfg, log=log or (lambda *a: None), guard=guard)
    return go


def _step(path):
    return load_checkpoint(path)["train_state"]["step"]


def _same_model(a, b):
    ma, mb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("name", TRAINERS)
def test_no_checkpoint_yet_starts_a_new_run_and_says_so(run, name, tmp_path, capsys):
    lines = []
    s = run(name, tmp_path, "resume=auto", log=lines.append)
    said = "\n".join(lines) + capsys.readouterr().out
    assert f"resume=auto: no checkpoint in {tmp_path} yet, starting a new run" in said
    assert s["step"] == STEPS[name] and not s["stopped"] and _step(tmp_path / "last.pth") == STEPS[name]


@pytest.mark.parametrize("name", TRAINERS)
def test_none_loadable_raises_naming_them_and_touches_nothing(run, name, tmp_path):
    run(name, tmp_path, "train.stop_at_step=1")
    data = (tmp_path / "last.pth").read_bytes()
    (tmp_path / "last.pth").write_bytes(data[:200])
    before = sorted(os.listdir(tmp_path)), (tmp_path / "last.pth").read_bytes()
    with pytest.raises(CheckpointError, match=r"none of the checkpoints in .* \(last.pth\) can be loaded.*nothing was "
                                              r"overwritten"):
        run(name, tmp_path, "resume=auto")
    assert (sorted(os.listdir(tmp_path)), (tmp_path / "last.pth").read_bytes()) == before


@pytest.mark.parametrize("name", TRAINERS)
def test_finished_run_returns_its_stored_summary(run, name, tmp_path, capsys):
    first = run(name, tmp_path)
    assert os.path.isfile(tmp_path / "final.json")
    stamp = {f: os.path.getmtime(tmp_path / f) for f in ("last.pth", "final.json", "metrics.jsonl")}
    lines = []
    again = run(name, tmp_path, "resume=auto", log=lines.append)
    said = "\n".join(lines) + capsys.readouterr().out
    assert again["already_finished"] and "holds a finished run" in said and "nothing to do" in said
    assert again["step"] == first["step"] == STEPS[name] and again["wandb_run_id"] == first["wandb_run_id"]
    assert stamp == {f: os.path.getmtime(tmp_path / f) for f in stamp}


@pytest.mark.parametrize("name", TRAINERS)
def test_checkpoint_past_a_shorter_schedule_is_refused(run, name, tmp_path):
    stop = STEPS[name] // 2 + 1                       # inside the second epoch
    run(name, tmp_path, f"train.stop_at_step={stop}")
    with pytest.raises(ConfigError, match=rf"step {stop}, past the end of this schedule \({STEPS[name] // 2} steps: "
                                          r"train.epochs=1"):
        run(name, tmp_path, "resume=auto", "train.epochs=1")
    assert _step(tmp_path / "last.pth") == stop


@pytest.mark.parametrize("name", TRAINERS)
def test_stops_write_last_and_resume_to_the_uninterrupted_result(run, name, tmp_path, monkeypatch):
    """train.stop_at_step mid-epoch, then a pre-emption guard (passed in the same way to both trainers)
    requested at the next step: each writes last.pth at its step; resumed, the run equals one that never stopped."""
    full = run(name, tmp_path / "full")
    out = tmp_path / "cut"
    s = run(name, out, "train.stop_at_step=1")
    assert (s["stopped"], s["stopped_early"], s["preempted"], s["stop_signal"], s["step"]) == (True, True, False,
                                                                                             None, 1)
    assert _step(out / "last.pth") == 1 and not os.path.exists(out / "final.json")
    guard = PreemptionGuard()
    real = TrainingRun.on_step

    def on_step(self, state):
        real(self, state)
        if state.step == 3:
            guard.request("SIGTERM")
    monkeypatch.setattr(TrainingRun, "on_step", on_step)
    s = run(name, out, "resume=auto", guard=guard)
    assert (s["stopped"], s["preempted"], s["stop_signal"], s["step"]) == (True, True, "SIGTERM", 3)
    assert _step(out / "last.pth") == 3
    monkeypatch.undo()
    done = run(name, out, "resume=auto")
    assert done["step"] == full["step"] == STEPS[name] and not done["stopped"]
    assert _same_model(tmp_path / "full" / "last.pth", out / "last.pth")


def test_both_trainers_write_the_same_checkpoint_keys(run, tmp_path):
    shared = {"model", "optimizer", "train_state", "config", "wandb_run_id", "format", "format_version",
              "world_size", "global_batch", "steps_per_epoch", "total_steps"}
    keys, states = {}, {}
    for name in TRAINERS:
        run(name, tmp_path / name, "train.stop_at_step=1")
        ck = load_checkpoint(tmp_path / name / "last.pth")
        keys[name], states[name] = set(ck), set(ck["train_state"])
        assert ck["total_steps"] == STEPS[name] and ck["wandb_run_id"]
    assert shared <= keys["pretrain"] and shared <= keys["fgvc"]
    assert "wandb_id" not in keys["pretrain"] | keys["fgvc"]
    assert states["pretrain"] == states["fgvc"] >= {"step", "epoch", "batch", "best", "history"}


@pytest.mark.parametrize("name", TRAINERS)
def test_non_finite_state_is_refused_on_write(run, name, tmp_path, monkeypatch):
    real = TrainingRun.on_step

    def on_step(self, state):
        if state.step == 2:
            next(p for p in self.model.parameters() if p.is_floating_point()).data.fill_(float("inf"))
        real(self, state)
    monkeypatch.setattr(TrainingRun, "on_step", on_step)
    with pytest.raises(NonFiniteStateError, match=r"step 2: the training state became non-finite.*nothing was "
                                                  r"written, the last good checkpoint is .*last.pth \(step 1\)"):
        run(name, tmp_path, "checkpoint.every_steps=1")
    ck = load_checkpoint(tmp_path / "last.pth", check_finite=True)
    assert ck["train_state"]["step"] == 1


@pytest.mark.parametrize("name", TRAINERS)
def test_checkpoint_with_the_old_wandb_id_key_resumes_its_wandb_run(run, name, tmp_path):
    run(name, tmp_path, "train.stop_at_step=2")
    path = str(tmp_path / "last.pth")
    ck = load_checkpoint(path)
    ck["wandb_id"] = "old0run1"               # as fgvc checkpoints stored it before the key was unified
    del ck["wandb_run_id"]
    torch.save(ck, path)
    s = run(name, tmp_path, "resume=auto")
    assert s["step"] == STEPS[name] and s["wandb_run_id"] == "old0run1"
    assert load_checkpoint(path)["wandb_run_id"] == "old0run1"


# ------------------------------------------------------------------------------------------- units
def test_train_state_reads_both_earlier_layouts():
    from sparse_mim.utils.training_run import TrainState
    pre = TrainState()
    pre.load_state_dict({"step": 7, "epoch": 1, "images_seen": 56, "failed_images": 2, "skipped_steps": 1,
                         "first_loss": 1.0, "last_loss": 0.5, "history": [[1, 1.0], [5, 0.6]]})
    assert (pre.step, pre.epoch, pre.batch, pre.images_seen, pre.failed_images, pre.skipped_steps) == (7, 1, 0, 56, 2, 1)
    assert pre.history == [(1, 1.0), (5, 0.6)] and pre.best == {"top1": -1.0, "epoch": -1}
    fine = TrainState()
    fine.load_state_dict({"epoch": 2, "step": 9, "batch": 6, "best": {"top1": 87.5, "top5": 100.0, "epoch": 2}})
    assert (fine.epoch, fine.step, fine.batch, fine.best["top1"], fine.history) == (2, 9, 6, 87.5, [])
    again = TrainState()
    again.load_state_dict(fine.state_dict())
    assert again == fine


def test_one_seed_derivation_keeps_pretraining_numbers():
    """stream_seed is the BLAKE2b derivation pre-training always used (drop path, per-sample seeds), and
    fgvc's streams are views on it."""
    import hashlib
    from sparse_mim.data import sample_seed
    from sparse_mim.utils.streams import RandomStreams, stream_seed

    def blake(text):
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
    assert RandomStreams(5, rank=1).seed_for("drop_path", 12, 3) == stream_seed(5, "drop_path", 1, 12, 3) \
        == blake("5:drop_path:1:12:3")
    assert sample_seed(5, 2, 40) == stream_seed(5, 2, 40) == blake("5:2:40")
    assert stream_seed(5, "init") == blake("5:init")
    g1, g2 = RandomStreams(5).generator("mixup", 1, 2), RandomStreams(5).generator("mixup", 1, 2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    assert RandomStreams(5, rank=0).seed_for("aug", 1) != RandomStreams(5, rank=1).seed_for("aug", 1)


@pytest.mark.parametrize("name", TRAINERS)
def test_two_process_stop_writes_last_and_resumes(name, fgvc_root, tmp_path):
    """torchrun, 2 CPU processes (gloo): train.stop_at_step right after a periodic save stops both ranks after
    the same step (the stop's checks are collective on both), rank 0 has last.pth, both exit 0; resume=auto
    then runs to the end."""
    import socket
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore",
               PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    args = (["-m", "sparse_mim.cli"] + PRETRAIN + ["data.builtin_images=8"] if name == "pretrain" else
            ["-m", "fgvc.cli", "train", "-c", "fgvc/demo.yaml", f"data.root={fgvc_root}"] + FGVC)
    out = tmp_path / "ddp"
    for extra in (["train.stop_at_step=1", "checkpoint.every_steps=1"], ["resume=auto"]):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               *args, f"output_dir={out}", "train.cpu_threads=1", *extra]
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        if extra[0].startswith("train.stop_at_step"):
            assert _step(out / "last.pth") == 1 and "[stop] train.stop_at_step=1" in r.stdout
    ck = load_checkpoint(out / "last.pth")
    assert ck["world_size"] == 2 and ck["train_state"]["step"] == ck["total_steps"] == 4  # 2 steps per epoch
    assert os.path.isfile(out / "final.json")
