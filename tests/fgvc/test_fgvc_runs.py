"""Safe fgvc runs: exact resume after a stop at any step, pre-emption signals, runs never overwritten,
the demo never writes into a user's folder, every key checked at load, wandb kept in the run folder."""
import os
import signal

import pytest
import torch

from fgvc.cli import _train_argv, train as train_cli
from fgvc.demo import make_demo_dataset
from fgvc.evaluate import evaluate_checkpoint
from fgvc.builders import resolve_data_config
from fgvc.train import DEFAULTS, train, validate_config
from sparse_mim.utils.checkpoint import NonFiniteStateError
from sparse_mim.utils.config import ConfigError, load_config, parse_config, shipped_recipes_dir
from sparse_mim.utils.preemption import PREEMPTED_EXIT_CODE
from sparse_mim.utils.rundir import LOCK_NAME, RunDirError, prepare_run_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEMO_YAML = os.path.join(shipped_recipes_dir(), "fgvc", "demo.yaml")
QUIET = dict(log=lambda *a: None)


def _args(root, out, *overrides):
    return [f"data.root={root}", f"output_dir={out}", "data.val_split=0", "data.batch_size=16",
            "optim.lr_base_batch=16", "log.progress=false", "wandb.enabled=false", "train.warmup_epochs=0", *overrides]


def _cfg(root, out, *overrides):
    return load_config(DEFAULTS, DEMO_YAML, _args(root, out, *overrides), validate=validate_config)


# every stochastic option on: RandAugment, random erasing, Mixup + CutMix, drop path, meta dropout, EMA,
# gradient accumulation, a held-out split, a loader worker
STOCHASTIC = ["train.epochs=2", "data.batch_size=8", "optim.accum_steps=2", "aug.mixup=0.8", "aug.cutmix=1.0",
              "aug.reprob=0.25", "aug.rand_augment=rand-m9-mstd0.5", "train.ema=true", "train.ema_decay=0.9",
              "model.drop_path_rate=0.2", "train.meta_dropout=true", "data.val_split=0.25", "data.num_workers=1",
              "train.eval_meta_zeroed=false"]


def test_stop_and_resume_at_several_steps_is_exact(demo_root, tmp_path):
    """Uninterrupted == stopped after step 3 (mid-epoch), resumed, stopped after step 6 (an epoch end),
    resumed, stopped after step 9 (mid-epoch), resumed to the end: weights, EMA, optimizer, best."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(_cfg(demo_root, a, *STOCHASTIC), **QUIET)
    wandb_ids = []
    for k, stop in enumerate((3, 6, 9, 0)):
        torch.manual_seed(100 + k)  # the resumed run must not depend on the process's global RNG state
        out = train(_cfg(demo_root, b, *STOCHASTIC, f"train.stop_at_step={stop}", *(["resume=auto"] if k else [])),
                    **QUIET)
        ck = torch.load(os.path.join(b, "last.pth"), weights_only=True)
        wandb_ids.append(ck["wandb_run_id"])
        if stop:
            assert out["stopped"] and out["step"] == stop and out["preempted"] is False and out["stop_signal"] is None
            assert ck["train_state"]["step"] == stop and ck["train_state"]["batch"] == (2 * stop) % 12
    assert len(set(wandb_ids)) == 1                                   # one wandb run across the resumes
    ca = torch.load(os.path.join(a, "last.pth"), weights_only=True)
    cb = torch.load(os.path.join(b, "last.pth"), weights_only=True)
    assert ca["train_state"] == cb["train_state"] and ca["train_state"]["step"] == 12
    for part in ("model", "model_ema"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_preemption_signal_checkpoints_and_exits_with_requeue_status(demo_root, tmp_path, monkeypatch):
    """SIGTERM during training: the current step finishes, last.pth is written at that step, the command
    exits with the requeue status; resume=auto then finishes the run."""
    from sparse_mim.utils import logger as logger_mod
    out = str(tmp_path / "run")
    real_log = logger_mod.RunLogger.log

    def log_and_signal(self, metrics, step):
        real_log(self, metrics, step)
        if step == 2 and "train/loss_step" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(logger_mod.RunLogger, "log", log_and_signal)
    argv = ["-c", DEMO_YAML, *_args(demo_root, out, "train.epochs=2", "log.every=1")]
    assert train_cli(argv) == PREEMPTED_EXIT_CODE
    ck = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    assert ck["train_state"]["step"] == 2 and ck["train_state"]["epoch"] == 0
    assert not os.path.exists(os.path.join(out, LOCK_NAME))
    monkeypatch.setattr(logger_mod.RunLogger, "log", real_log)
    assert train_cli(argv) == 2                                      # no resume: refused, nothing touched
    assert train_cli(argv + ["resume=auto"]) == 0
    assert os.path.isfile(os.path.join(out, "final.json"))


def test_finished_run_is_never_overwritten(demo_root, tmp_path, capsys):
    out = str(tmp_path / "run")
    first = train(_cfg(demo_root, out, "train.epochs=1"), **QUIET)
    stamp = {f: os.path.getmtime(os.path.join(out, f)) for f in ("last.pth", "best.pth", "final.json", "metrics.jsonl")}
    with pytest.raises(RunDirError, match="resume=auto") as e:
        train(_cfg(demo_root, out, "train.epochs=1"), **QUIET)
    assert f"output_dir={out}_2" in str(e.value) and "finished" in str(e.value)
    again = train(_cfg(demo_root, out, "train.epochs=1", "resume=auto"), **QUIET)   # nothing left to do
    assert again["already_finished"] and again["test/top1"] == first["test/top1"]
    assert stamp == {f: os.path.getmtime(os.path.join(out, f)) for f in stamp}


def test_run_dir_lock(tmp_path):
    out = str(tmp_path / "run")
    rd = prepare_run_dir(out, "", log=None)
    assert os.path.isfile(os.path.join(out, LOCK_NAME))
    import json
    import socket
    with open(os.path.join(out, LOCK_NAME), "w") as f:              # another live process on this host
        json.dump({"pid": os.getppid(), "host": socket.gethostname()}, f)
    with pytest.raises(RunDirError, match="in use by a running training process"):
        prepare_run_dir(out, "auto", log=None)
    with open(os.path.join(out, LOCK_NAME), "w") as f:              # a killed one: taken over
        json.dump({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}, f)
    rd = prepare_run_dir(out, "", log=None)
    rd.release()
    assert not os.path.exists(os.path.join(out, LOCK_NAME))
    open(os.path.join(out, "metrics.jsonl"), "w").close()
    with pytest.raises(RunDirError, match="stopped or in progress"):
        prepare_run_dir(out, "", log=None)
    prepare_run_dir(out, "auto", log=None).release()


def test_unloadable_checkpoint_is_not_restarted_over(demo_root, tmp_path):
    out = str(tmp_path / "run")
    train(_cfg(demo_root, out, "train.epochs=2", "train.stop_at_step=1"), **QUIET)
    with open(os.path.join(out, "last.pth"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(RuntimeError, match="none of the checkpoints"):
        train(_cfg(demo_root, out, "train.epochs=2", "resume=auto"), **QUIET)


# ------------------------------------------------------------------------------------------- the demo stays put
def test_dataset_without_recipe_uses_its_defaults_never_the_demo(tmp_path):
    argv = _train_argv(["data.dataset=cub", "data.root=/data/CUB_200_2011"])
    cfg, _ = parse_config(DEFAULTS, argv, validate=validate_config)
    assert cfg.data.dataset == "cub" and not cfg.data.demo and cfg.model.name == "metaformer_0"
    assert cfg.optim.lr == 5e-5 and cfg.aug.mixup == 0.8                 # CUB's shipped defaults
    cfg, _ = parse_config(DEFAULTS, _train_argv([]), validate=validate_config)
    assert cfg.data.demo and cfg.model.name == "metaformer_tiny"         # no arguments: the demo
    assert train_cli(["data.root=/data/CUB_200_2011"]) == 2              # root without a dataset: refused


def test_demo_never_writes_into_a_user_folder(demo_root, tmp_path):
    user = tmp_path / "CUB"
    user.mkdir()
    (user / "images.txt").write_text("1 a.jpg\n")
    with pytest.raises(FileNotFoundError, match="demo_data"):
        resolve_data_config({"demo": True, "root": str(user)}, str(tmp_path / "run" / "demo_data"))
    with pytest.raises(FileExistsError):
        make_demo_dataset(str(user))
    assert os.listdir(user) == ["images.txt"]


def test_eval_of_demo_checkpoint_with_data_root_does_not_regenerate(demo_root, tmp_path):
    out = str(tmp_path / "run")
    train(_cfg(demo_root, out, "train.epochs=1"), **QUIET)
    typo = tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match="no generated demo dataset"):
        evaluate_checkpoint(os.path.join(out, "best.pth"), overrides=[f"data.root={typo}", "wandb.enabled=false"],
                            **QUIET)
    assert not typo.exists()


def test_eval_needs_no_training_annotations(demo_root, tmp_path):
    """Class names and ids come from the checkpoint: the test CSV alone is enough."""
    import shutil
    out = str(tmp_path / "run")
    train(_cfg(demo_root, out, "train.epochs=1"), **QUIET)
    data = tmp_path / "only_test"
    shutil.copytree(demo_root, data)
    os.remove(data / "train.csv")
    s = evaluate_checkpoint(os.path.join(out, "best.pth"), overrides=[
        f"data.root={data}", "wandb.enabled=false", "eval.per_group=false", "log.progress=false"], **QUIET)
    assert s["results"]["with_meta"]["n"] == 64


def test_eval_refuses_non_finite_weights(demo_root, tmp_path):
    out = str(tmp_path / "run")
    train(_cfg(demo_root, out, "train.epochs=1"), **QUIET)
    ck = torch.load(os.path.join(out, "best.pth"), weights_only=True)
    k = next(iter(ck["model"]))
    ck["model"][k] = torch.full_like(ck["model"][k], float("nan"))
    bad = str(tmp_path / "nan.pth")
    torch.save(ck, bad)
    with pytest.raises(NonFiniteStateError, match="NaN or inf"):
        evaluate_checkpoint(bad, overrides=["wandb.enabled=false"], **QUIET)


# ------------------------------------------------------------------------------------------- config checks
@pytest.mark.parametrize("override,key", [
    ("train.eval_every=0", "train.eval_every"), ("aug.smoothing=1.5", "aug.smoothing"),
    ("aug.smoothing=1.0", "aug.smoothing"), ("data.val_split=-0.5", "data.val_split"),
    ("data.val_split=1.0", "data.val_split"), ("train.epochs=0", "train.epochs"), ("train.epochs=-1", "train.epochs"),
    ("optim.betas=[0.9]", "optim.betas"), ("optim.betas=[0.9,1.5]", "optim.betas"), ("aug.scale=[1.0,0.5]", "aug.scale"),
    ("data.batch_size=0", "data.batch_size"), ("optim.accum_steps=0", "optim.accum_steps"), ("log.every=0", "log.every"),
    ("train.stop_at_step=-1", "train.stop_at_step"), ("train.warmup_epochs=400", "train.warmup_epochs"),
    ("model.img_size=100", "model.img_size"), ("train.amp=fp8", "train.amp"), ("optim.lr=0", "optim.lr"),
    ("wandb.log_model=always", "wandb.log_model"), ("model.drop_path_rate=1.0", "model.drop_path_rate"),
])
def test_bad_values_are_refused_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DEFAULTS, None, [override], validate=validate_config)


# ------------------------------------------------------------------------------------------- wandb
def test_wandb_files_stay_in_the_run_folder(tmp_path, monkeypatch):
    """Offline: the run, its staging and cache live under <output_dir>/wandb (nothing under HOME); a model
    file is not logged by default offline; a reference policy logs it without a copy."""
    from sparse_mim.utils import logger as logger_mod
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in logger_mod._WANDB_DIR_VARS:
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    model_file = tmp_path / "run" / "best.pth"
    out.mkdir()
    torch.save({"w": torch.ones(3)}, model_file)
    log = logger_mod.RunLogger(str(out), {"a": 1}, project="t", run_id="keep0001")
    assert os.environ["WANDB_DATA_DIR"].startswith(str(out / "wandb"))
    assert log.log_model(str(model_file), "m") is None                  # auto + offline: not logged
    log.log_model_policy = "reference"
    assert log.log_model(str(model_file), "m") == "reference"
    log.finish()
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run")]
    assert runs and all(r.endswith("keep0001") for r in runs)           # the id a resumed run passes back
    assert not (tmp_path / "home" / ".local" / "share" / "wandb").exists()
    staged = [f for _, _, fs in os.walk(out / "wandb") for f in fs if f.endswith(".pth")]
    assert not staged                                                    # no copy of the model anywhere


def test_diverging_run_never_writes_a_non_finite_checkpoint(demo_root, tmp_path):
    """A huge learning rate: the run stops with a clear error, and every checkpoint left on disk is finite
    (the state is checked before each write)."""
    from sparse_mim.utils.checkpoint import load_checkpoint
    from sparse_mim.utils.misc import NonFiniteLossError
    out = str(tmp_path / "run")
    with pytest.raises((NonFiniteLossError, NonFiniteStateError)) as e:
        train(_cfg(demo_root, out, "train.epochs=3", "optim.lr=1e30", "optim.clip_grad=0", "checkpoint.every_steps=1",
                   "data.batch_size=8", "optim.lr_base_batch=8"), **QUIET)
    assert "resume" in str(e.value) or "intact" in str(e.value) or "no checkpoint" in str(e.value)
    for name in ("last.pth", "best.pth"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            load_checkpoint(path, check_finite=True)
    assert not os.path.exists(os.path.join(out, LOCK_NAME))


def test_hard_kill_loses_at_most_the_steps_since_the_last_checkpoint(demo_root, tmp_path):
    """A real process killed with SIGKILL mid-training (no chance to save): resume=auto continues from the
    last periodic checkpoint and ends with the uninterrupted weights (bounded: one kill, 120 s cap)."""
    import json
    import subprocess
    import sys
    import time
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["train.epochs=1", "aug.mixup=0.8", "model.drop_path_rate=0.1", "checkpoint.every_steps=1", "log.every=1",
              "train.cpu_threads=1"]
    train(_cfg(demo_root, a, *common), **QUIET)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "fgvc.cli", "train", "-c", DEMO_YAML, *_args(demo_root, b, *common)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline, killed_at = os.path.join(b, "metrics.jsonl"), time.time() + 120, None
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.isfile(metrics):
                steps = [json.loads(line)["step"] for line in open(metrics) if line.strip()]
                if steps and max(steps) >= 3:
                    proc.kill()
                    killed_at = max(steps)
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    if killed_at is None:
        pytest.skip(f"the run ended before it could be killed (rc {proc.returncode}): {err[-300:]}")
    assert proc.returncode == -signal.SIGKILL
    ck = torch.load(os.path.join(b, "last.pth"), weights_only=True)
    assert ck["train_state"]["step"] >= killed_at - 1 > 0                  # at most one step lost
    train(_cfg(demo_root, b, *common, "resume=auto"), **QUIET)
    ca = torch.load(os.path.join(a, "last.pth"), weights_only=True)
    cb = torch.load(os.path.join(b, "last.pth"), weights_only=True)
    assert ca["train_state"] == cb["train_state"]
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k


def test_resume_into_a_shorter_schedule_is_refused(demo_root, tmp_path):
    out = str(tmp_path / "run")
    train(_cfg(demo_root, out, "train.epochs=2", "train.stop_at_step=10"), **QUIET)   # 8 steps per epoch
    with pytest.raises(ConfigError, match="beyond"):
        train(_cfg(demo_root, out, "train.epochs=1", "resume=auto"), **QUIET)


def test_damaged_last_falls_back_to_the_newest_keep(demo_root, tmp_path):
    out, lines = str(tmp_path / "run"), []
    args = ("train.epochs=1", "checkpoint.keep_every_steps=4")
    train(_cfg(demo_root, out, *args, "train.stop_at_step=6"), **QUIET)            # keeps: checkpoint-...04.pth
    with open(os.path.join(out, "last.pth"), "r+b") as f:
        f.truncate(1000)
    summary = train(_cfg(demo_root, out, *args, "resume=auto"), log=lines.append)
    assert any("checkpoint-00000004.pth" in line for line in lines), lines[:5]
    assert "test/top1" in summary and torch.load(os.path.join(out, "last.pth"), weights_only=True)[
        "train_state"]["step"] == 8
