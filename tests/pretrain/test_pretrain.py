"""End-to-end tests of SparK pre-training (sparse_mim.train, sparse_mim.data, sparse_mim.pretrain_loop).

All on CPU with resnet18 (one block per stage) at 64 px and a handful of steps. Each run
is a real ``sparse_mim.train.pretrain`` run (in-process; the DDP one through torchrun and
``tools/pretrain.py`` in a subprocess).
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_mim import cli
from sparse_mim.data import DataError, ResumableBatchSampler, build_pretrain_dataset, generate_image
from sparse_mim.export import export_from_checkpoint
from sparse_mim.train import DEFAULTS, build_model, pretrain, stream_seed, validate_config
from sparse_mim.utils.checkpoint import load_checkpoint
from sparse_mim.utils.config import ConfigError, load_config
from sparse_mim.utils.misc import NonFiniteLossError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = ["train.cpu_threads=1", "model.backbone=resnet18", "model.backbone_kwargs={depths: [1, 1, 1, 1]}",
        "model.img_size=64", "model.decoder_width=64", "data.num_workers=0", "log.progress=false", "log.vis_every=0",
        "log.vis_images=2", "optim.lr=0.05", "train.warmup_epochs=0", "train.amp=off", "wandb.enabled=false"]


def config(args, recipe=None):
    return load_config(DEFAULTS, recipe, args, validate=validate_config)


def run(args):
    return pretrain(config(args))


def _image_folder(path, n, corrupt=0, size=80):
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        sub = os.path.join(path, f"class{i % 2}")  # an ImageFolder tree
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(generate_image(i, size)).save(os.path.join(sub, f"img{i}.png"))
    for i in range(corrupt):
        with open(os.path.join(path, f"broken{i}.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return str(path)


def _params(path):
    return load_checkpoint(path)["model"]


# ----------------------------------------------------------------------------- data
def test_sampler_layout_independent_and_resumable():
    """2 processes x 1 accumulation step == 1 process x 2 accumulation steps; start_step skips exactly."""
    one = ResumableBatchSampler(20, 2, num_replicas=1, rank=0, accum_steps=2, seed=3)
    two = [ResumableBatchSampler(20, 2, num_replicas=2, rank=r, accum_steps=1, seed=3) for r in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 5
    for s in [one, *two]:
        s.set_epoch(1)
    b1, b2 = list(one), [list(s) for s in two]
    for step in range(5):
        assert b1[2 * step] == b2[0][step] and b1[2 * step + 1] == b2[1][step]
    flat = [i for batch in b1 for i, _ in batch]
    assert sorted(flat) == sorted(set(flat)) and len(flat) == 20
    one.set_epoch(1, start_step=3)
    assert list(one) == b1[6:]
    one.set_epoch(2)
    assert list(one) != b1  # a new order each epoch
    with pytest.raises(DataError, match="fewer than one global batch"):
        ResumableBatchSampler(3, 2, num_replicas=2)


def test_dataset_skips_and_counts_corrupt_images(tmp_path):
    root = _image_folder(tmp_path / "imgs", 3, corrupt=2)
    ds = build_pretrain_dataset(root, (64, 96))
    assert len(ds) == 5
    bad = [i for i, p in enumerate(ds.paths) if "broken" in p]
    img, seed, failed = ds[(bad[0], 11)]
    assert img.shape == (3, 64, 96) and seed == 11 and failed >= 1
    good = [i for i in range(5) if i not in bad][0]
    a, b = ds[(good, 5)][0], ds[(good, 5)][0]
    assert torch.equal(a, b) and ds[(good, 5)][2] == 0  # the per-sample seed fixes the augmentation
    assert not torch.equal(a, ds[(good, 6)][0])
    # a list file of the same images, with a label column
    lst = tmp_path / "list.txt"
    lst.write_text("# images\n" + "\n".join(f"{os.path.relpath(p, tmp_path)} 0" for p in ds.paths) + "\n")
    assert build_pretrain_dataset(str(lst), 64).paths == ds.paths


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["empty_folder", "corrupt_folder", "unknown_backbone", "size_not_32"])
def test_bad_input_clear_errors(tmp_path, case):
    out = f"output_dir={tmp_path / 'out'}"
    if case == "empty_folder":
        (tmp_path / "empty").mkdir()
        with pytest.raises(DataError, match="(?s)no images found.*data.root"):
            run(TINY + [out, f"data.root={tmp_path / 'empty'}"])
    elif case == "corrupt_folder":
        root = _image_folder(tmp_path / "bad", 0, corrupt=3)
        with pytest.raises(DataError, match="(?s)could be read.*Point data.root"):
            run(TINY + [out, f"data.root={root}"])
    elif case == "unknown_backbone":
        with pytest.raises(ConfigError, match="did you mean resnet50"):
            run(TINY + [out, "model.backbone=resnet05"])
    else:
        with pytest.raises(ConfigError, match=r"multiples of 32.*model.img_size=\[64, 96\]"):
            run(TINY + [out, "model.img_size=[70,100]"])


@pytest.mark.parametrize("recipe", sorted(os.listdir(os.path.join(ROOT, "configs", "pretrain"))))
def test_recipes_parse(recipe):
    from sparse_mim.backbones import list_backbones
    cfg = config([], os.path.join(ROOT, "configs", "pretrain", recipe))
    assert cfg.model.backbone in list_backbones()
    size = cfg.model.img_size
    assert all(s % 32 == 0 for s in ([size] if isinstance(size, int) else size))
    if not recipe.startswith(("cpu_", "base")):  # official recipes: LAMB betas per family, 1600 epochs, data required
        assert cfg.optim.betas[1] == (0.95 if "resnet" in recipe else 0.999) and cfg.train.epochs == 1600
        assert cfg.data.root is None and cfg.model.decoder_width == 768


def test_unknown_config_key(capsys):
    assert cli.pretrain(["optim.learning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.learning_rate'" in err and "optim.lr" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- training
def test_loss_falls_and_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "run"
    s = run(TINY + [f"output_dir={out}", "data.builtin_images=4", "data.batch_size=4",
                    "train.epochs=30", "log.every=1", "optim.lr=0.5", "checkpoint.every_steps=0"])
    losses = [l for _, l in s["history"]]
    assert s["step"] == 30 and len(losses) == 30
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first - 0.05, f"loss did not fall: {first:.4f} -> {last:.4f}"
    assert os.path.isfile(s["reconstruction_png"]) and os.path.isfile(out / "config.yaml")
    assert os.path.isfile(out / "metrics.jsonl") and os.path.isfile(out / "last.pth")
    # the exported backbone loads strict=True into torchvision's ResNet (here one block per stage; fc removed)
    import torchvision
    tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    tv.fc = torch.nn.Identity()
    exported = torch.load(s["backbone"], weights_only=True)
    tv.load_state_dict(exported, strict=True)
    # and the export (spark-export, tools/export_backbone.py) writes the same tensors from the checkpoint
    again = export_from_checkpoint(out / "last.pth", tmp_path / "bb.pth")
    assert again["verified"] and again["backbone"] == "resnet18" and again["step"] == 30
    assert cli.export([str(out / "last.pth"), str(tmp_path / "bb2.pth")]) == 0
    again = torch.load(again["path"], weights_only=True)
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)


def test_kill_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """Stopped after step 7 (train.stop_at_step: last.pth at step 7, mid-epoch), resumed: same parameters as one run."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    common = TINY + ["data.builtin_images=8", "data.batch_size=2", "train.epochs=2", "checkpoint.every_steps=3",
                     "log.every=1", "train.warmup_epochs=0.5", "checkpoint.export_backbone=false"]
    full = run(common + [f"output_dir={tmp_path / 'full'}"])
    killed = run(common + [f"output_dir={tmp_path / 'cut'}", "train.stop_at_step=7"])
    assert killed["stopped_early"] and load_checkpoint(str(tmp_path / "cut" / "last.pth"))["train_state"]["step"] == 7
    # resumed with 2 loader processes: samples, crops and masks must not depend on the loader layout either
    resumed = run(common + [f"output_dir={tmp_path / 'cut'}", "resume=auto", "data.num_workers=2"])
    assert resumed["step"] == full["step"] == 8
    assert resumed["wandb_run_id"] == killed["wandb_run_id"]
    a, b = _params(str(tmp_path / "full" / "last.pth")), _params(str(tmp_path / "cut" / "last.pth"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [round(l, 5) for _, l in resumed["history"]] == [round(l, 5) for _, l in full["history"]]
    oa = load_checkpoint(str(tmp_path / "full" / "last.pth"))["optimizer"]["param_groups"]
    ob = load_checkpoint(str(tmp_path / "cut" / "last.pth"))["optimizer"]["param_groups"]
    assert [g["lr"] for g in oa] == [g["lr"] for g in ob]


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, amp):
    """A NaN loss stops the run with the same error in every precision (fp16's scaler must not swallow it)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    from sparse_mim.spark import SparK
    calls = {"n": 0}
    orig = SparK.forward_loss

    def flaky_loss(self, *a, **k):
        calls["n"] += 1
        loss = orig(self, *a, **k)
        return loss * float("nan") if calls["n"] == 3 else loss
    monkeypatch.setattr(SparK, "forward_loss", flaky_loss)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3.*last good checkpoint is .*last.pth"):
        run(TINY + [f"output_dir={tmp_path}", "data.builtin_images=4", "data.batch_size=2",
                    "train.epochs=3", "checkpoint.every_steps=1", "model.img_size=[64,96]", f"train.amp={amp}"])
    ck = load_checkpoint(str(tmp_path / "last.pth"))
    assert ck["train_state"]["step"] == 2
    assert ("scaler" in ck) == (amp == "fp16")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_single_process(tmp_path, monkeypatch):
    """torchrun, 2 CPU processes (gloo) x batch 2 == 1 process x batch 2 x 2 accumulation steps."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = _image_folder(tmp_path / "imgs", 11, corrupt=1)
    common = TINY + [f"data.root={root}", "data.batch_size=2", "train.epochs=1", "checkpoint.export_backbone=false",
                     "train.warmup_epochs=0.5", "log.every=1"]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           os.path.join(ROOT, "tools", "pretrain.py"), *common, f"output_dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = run(common + [f"output_dir={tmp_path / 'one'}", "optim.accum_steps=2"])
    assert single["step"] == 3 and single["failed_images"] >= 1
    ddp_ck = load_checkpoint(str(tmp_path / "ddp" / "last.pth"))
    assert ddp_ck["world_size"] == 2 and ddp_ck["global_batch"] == 4 and ddp_ck["train_state"]["step"] == 3
    assert ddp_ck["train_state"]["failed_images"] == single["failed_images"]
    # same losses and gradient norms at every step (log.every=1), to float noise
    def metrics(run):
        rows = [json.loads(l) for l in open(tmp_path / run / "metrics.jsonl")]
        return np.array([[r["train/loss"], r["train/grad_norm"]] for r in rows])
    m_ddp, m_one = metrics("ddp"), metrics("one")
    assert m_ddp.shape == m_one.shape == (3, 2)
    np.testing.assert_allclose(m_ddp[:, 0], m_one[:, 0], rtol=1e-5)
    np.testing.assert_allclose(m_ddp[:, 1], m_one[:, 1], rtol=2e-3)
    # and the same parameter update: LAMB/Adam normalise each element by its gradient's magnitude, which
    # amplifies float noise on near-zero gradients, so compare updates as a whole (a different batch
    # composition or grouping gives a relative difference of order 1)
    cfg = config(common)
    torch.manual_seed(stream_seed(cfg.seed, "init"))
    init = build_model(cfg).state_dict()
    a, b = ddp_ck["model"], _params(str(tmp_path / "one" / "last.pth"))
    num = den = 0.0
    for k in a:
        if a[k].is_floating_point() and "running" not in k:
            num += float((a[k] - b[k]).norm() ** 2)
            den += float((b[k] - init[k]).norm() ** 2)
    assert den > 0 and (num / den) ** 0.5 < 1e-2, (num / den) ** 0.5


def test_fractional_epochs_stop_at_the_scheduled_step(tmp_path):
    """train.epochs=1.5 trains one and a half epochs (the last one stops mid-epoch), not two."""
    out = run(TINY + [f"output_dir={tmp_path}", "data.builtin_images=8", "data.batch_size=2", "train.epochs=1.5",
                      "checkpoint.every_steps=0"])
    assert out["total_steps"] == 6 and out["step"] == 6
    assert load_checkpoint(str(tmp_path / "last.pth"))["train_state"]["step"] == 6


def test_run_prints_and_logs_its_kernel_choices(tmp_path, capsys):
    """A SparK run prints its per-scale kernel choices after the first step (every rank then uses rank 0's)."""
    for name in ("first", "second"):  # the second run in the same process meets known choices: still printed
        run(TINY + [f"output_dir={tmp_path / name}", "data.builtin_images=4", "data.batch_size=2", "train.epochs=1",
                    "train.conv_backend=table"])
        out = capsys.readouterr().out
        assert "autotune choices" in out and "| strided_conv | 7x7/s2 |" in out, name
