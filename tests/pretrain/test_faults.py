"""Nothing lost, nothing silent: non-finite states, pre-emption, exact resume, checkpoint life-cycle, configs.

Tiny CPU runs (resnet18 with one block per stage at 64 px, a few steps) through the library
(``sparse_mim.train.pretrain``); signals are real (``os.kill`` of this process from inside a step).
"""
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_mim.data import build_pretrain_dataset, find_images, generate_image, load_rgb
from sparse_mim.spark import SparK
from sparse_mim.train import DEFAULTS, pretrain, validate_config
from sparse_mim.utils.checkpoint import NonFiniteStateError, load_checkpoint
from sparse_mim.utils.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["train.cpu_threads=1", "model.backbone=resnet18", "model.backbone_kwargs={depths: [1, 1, 1, 1]}",
        "model.img_size=64", "model.decoder_width=64", "data.num_workers=0", "log.progress=false", "log.vis_every=0",
        "log.vis_images=0", "optim.lr=0.05", "train.warmup_epochs=0", "train.amp=off", "wandb.enabled=false",
        "checkpoint.export_backbone=false", "log.every=1"]


def run(args):
    return pretrain(load_config(DEFAULTS, None, args, validate=validate_config))


def _step(path):
    return load_checkpoint(path)["train_state"]["step"]


def _signal_at(monkeypatch, calls, sig=signal.SIGTERM):
    """Send ``sig`` to this process during the forward of the given loss calls (1-based)."""
    orig = SparK.forward_loss
    n = {"calls": 0}

    def loss(self, *a, **k):
        n["calls"] += 1
        if n["calls"] in calls:
            os.kill(os.getpid(), sig)
        return orig(self, *a, **k)
    monkeypatch.setattr(SparK, "forward_loss", loss)


# ----------------------------------------------------------------------------- 1. non-finite state
def test_non_finite_buffer_is_never_checkpointed(tmp_path, monkeypatch):
    """Loss finite, a decoder BatchNorm running_var overflows at step 3: nothing non-finite is written."""
    orig = SparK.forward_loss
    n = {"calls": 0}

    def loss(self, *a, **k):
        n["calls"] += 1
        if n["calls"] == 3:
            self.dense_decoder.dec[0].conv[1].running_var.data.fill_(float("inf"))
        return orig(self, *a, **k)
    monkeypatch.setattr(SparK, "forward_loss", loss)
    args = TINY + [f"output_dir={tmp_path}", "data.builtin_images=4", "data.batch_size=2", "train.epochs=3",
                   "checkpoint.every_steps=1"]
    with pytest.raises(NonFiniteStateError, match=r"step 3: .*non-finite.*running_var.*last good checkpoint is "
                                                  r".*last.pth \(step 2\)"):
        run(args)
    ck = load_checkpoint(tmp_path / "last.pth", check_finite=True)
    assert ck["train_state"]["step"] == 2
    monkeypatch.undo()
    assert run(args + ["resume=auto"])["step"] == 6  # resumes from the good one and finishes


def test_non_finite_at_first_save_says_no_checkpoint(tmp_path, monkeypatch):
    orig = SparK.forward_loss

    def loss(self, *a, **k):
        self.dense_decoder.dec[0].conv[1].running_var.data.fill_(float("nan"))
        return orig(self, *a, **k)
    monkeypatch.setattr(SparK, "forward_loss", loss)
    with pytest.raises(NonFiniteStateError, match="no good checkpoint was written in this run"):
        run(TINY + [f"output_dir={tmp_path}", "data.builtin_images=2", "data.batch_size=2", "train.epochs=1"])
    assert not os.path.exists(tmp_path / "last.pth")


# ----------------------------------------------------------------------------- 2 + 4. pre-emption, exact resume
STOCHASTIC = TINY + ["data.builtin_images=8", "data.batch_size=2", "optim.accum_steps=2", "train.epochs=4",
                     "model.drop_path_rate=0.2", "aug.hflip=true", "aug.scale=[0.3,1.0]", "checkpoint.every_steps=3",
                     "train.warmup_epochs=1"]


def test_preemption_and_exact_resume_with_every_stochastic_option(tmp_path, monkeypatch):
    """SIGTERM / SIGUSR1 at two points and train.stop_at_step at a third: every resumed run equals the uninterrupted one
    bit for bit (drop-path, crops, flips, masks, accumulation, 2 loader workers on resume)."""
    full = run(STOCHASTIC + [f"output_dir={tmp_path / 'full'}"])
    assert full["step"] == 8
    reference = load_checkpoint(tmp_path / "full" / "last.pth")["model"]
    out = tmp_path / "cut"
    # 1) SIGTERM during micro-batch 5 (step 3): the step finishes, last.pth is written at step 3
    _signal_at(monkeypatch, {5})
    s = run(STOCHASTIC + [f"output_dir={out}"])
    assert s["preempted"] and s["step"] == 3 and _step(out / "last.pth") == 3
    monkeypatch.undo()
    # 2) resumed with 2 loader workers, SIGUSR1 during step 6
    _signal_at(monkeypatch, {5}, signal.SIGUSR1)
    s = run(STOCHASTIC + [f"output_dir={out}", "resume=auto", "data.num_workers=2"])
    assert s["preempted"] and s["step"] == 6 and _step(out / "last.pth") == 6
    monkeypatch.undo()
    # 3) train.stop_at_step=7: a stop like a pre-emption without a signal (last.pth at step 7)
    s = run(STOCHASTIC + [f"output_dir={out}", "resume=auto", "train.stop_at_step=7"])
    assert s["stopped_early"] and not s["preempted"] and s["stop_signal"] is None and _step(out / "last.pth") == 7
    # orphan temp file of a killed writer: removed at start
    (out / ".last.pth.k1ll3d.tmp").write_bytes(b"partial")
    done = run(STOCHASTIC + [f"output_dir={out}", "resume=auto"])
    assert done["step"] == 8 and not os.path.exists(out / ".last.pth.k1ll3d.tmp")
    final = load_checkpoint(out / "last.pth")["model"]
    different = [k for k in reference if not torch.equal(reference[k], final[k])]
    assert not different, f"{len(different)} of {len(reference)} tensors differ, e.g. {different[:3]}"
    assert [round(l, 6) for _, l in done["history"]] == [round(l, 6) for _, l in full["history"]]


def test_resume_auto_falls_back_and_shorter_schedule_is_refused(tmp_path, capsys):
    args = TINY + [f"output_dir={tmp_path}", "data.builtin_images=4", "data.batch_size=2", "train.epochs=2",
                   "checkpoint.every_steps=1", "checkpoint.keep_every_steps=2", "train.stop_at_step=3"]
    run(args)  # last.pth at step 3, checkpoint-00000002.pth
    data = open(tmp_path / "last.pth", "rb").read()
    (tmp_path / "last.pth").write_bytes(data[: len(data) // 3])  # truncated (copied by hand, disk trouble...)
    capsys.readouterr()
    s = run(args[:-1] + ["resume=auto"])
    said = capsys.readouterr().out
    assert "skipping" in said and "truncated" in said and "checkpoint-00000002.pth" in said
    assert s["step"] == 4
    with pytest.raises(ConfigError, match=r"step 4, past the end of this schedule \(2 steps"):
        run(args[:-1] + ["resume=auto", "train.epochs=1"])


def test_vis_images_zero_still_exports(tmp_path):
    s = run(TINY + [f"output_dir={tmp_path}", "data.builtin_images=2", "data.batch_size=2", "train.epochs=1",
                    "log.vis_images=0", "checkpoint.export_backbone=true"])
    assert s["reconstruction_png"] is None and os.path.isfile(s["backbone"])
    assert oct(os.stat(s["backbone"]).st_mode & 0o777) == oct(os.stat(tmp_path / "last.pth").st_mode & 0o777) \
        == "0o644"


# ----------------------------------------------------------------------------- 6. configs checked at load
@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", r"data.batch_size=0 .*expected > 0"),
    ("optim.accum_steps=0", r"optim.accum_steps=0 .*expected > 0"),
    ("log.every=0", r"log.every=0 .*expected > 0"),
    ("optim.betas=[0.9]", r"optim.betas=\[0.9\] .*a list of 2"),
    ("optim.betas=[0.9,1.5]", r"optim.betas=\[0.9, 1.5\] .*each item >= 0 and < 1"),
    ("aug.scale=[1.0,0.5]", r"aug.scale=\[1.0, 0.5\] .*low <= high"),
    ("model.decoder_width=0", r"model.decoder_width=0 .*expected > 0"),
    ("model.decoder_width=100", r"model.decoder_width=100 .*multiple of 32"),
    ("model.mask_ratio=0.0", r"model.mask_ratio=0.0 .*> 0"),
    ("model.mask_ratio=1", r"model.mask_ratio=1.0 .*< 1"),
    ("train.epochs=0", r"train.epochs=0.0 .*> 0"),
    ("train.epochs=-1", r"train.epochs=-1.0 .*> 0"),
    ("train.stop_at_step=-1", r"train.stop_at_step=-1 .*>= 0"),
    ("log.vis_images=-1", r"log.vis_images=-1 .*>= 0"),
    ("train.dist_timeout=0", r"train.dist_timeout=0 .*> 0"),
    ("model.img_size=[70,100]", r"model.img_size=\[70, 100\] .*multiples of 32"),
    ("train.warmup_epochs=9", r"train.warmup_epochs=9.0: expected <= train.epochs"),
    ("model.init=xavier", r"model.init='xavier' .*official \| trunc_normal"),
])
def test_bad_configs_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULTS, None, [override], validate=validate_config)


def test_fractional_epochs_allowed():
    assert load_config(DEFAULTS, None, ["train.epochs=1.5"], validate=validate_config).train.epochs == 1.5


# ----------------------------------------------------------------------------- 5. hostile data
def test_symlink_loops_counted_once_and_no_hang(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(generate_image(i, 40)).save(root / "a" / f"{i}.png")
    os.symlink(root, root / "a" / "loop")            # a -> root -> a -> ...
    os.symlink(root / "a", root / "again")           # a second way into a
    os.symlink(tmp_path, root / "a" / "up")          # and one to an ancestor
    assert len(find_images(str(root))) == 4


def test_16bit_png_decoded_not_clipped(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    rgb = np.asarray(load_rgb(str(path)))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert abs(float(rgb.mean()) - 127.5) < 2  # a ramp, not near-white


def test_decompression_bomb_skipped_and_counted(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(generate_image(0, 40)).save(root / "ok.png")
    Image.new("L", (300, 300)).save(root / "big.png")  # 90,000 pixels > the limit below
    ds = build_pretrain_dataset(str(root), 32, max_pixels=50_000)
    big = [i for i, p in enumerate(ds.paths) if p.endswith("big.png")][0]
    img, _, failed = ds[(big, 3)]
    assert failed == 1 and img.shape == (3, 32, 32)


def test_fault_injection_bad_config_scenarios_and_report(tmp_path):
    """The fault-injection driver's in-process part (the subprocess scenarios run in tools/fault_injection.py)."""
    from repotools.fault_injection import TARGETS, Result, _bad_configs, format_report
    results = _bad_configs(TARGETS["pretrain"], str(tmp_path))
    assert len(results) == len(TARGETS["pretrain"].bad_configs) and all(r.passed for r in results), \
        [r for r in results if not r.passed]
    report = format_report(results + [Result("fgvc", "x", False, True, "a|b")])
    assert "pretrain: 15 scenarios tried, 15 passed, 0 with data lost" in report
    assert "total: 16 tried, 15 passed, 1 with data lost" in report and "a/b" in report
