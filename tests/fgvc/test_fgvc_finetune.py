"""Fine-tuning controls (layer decay, backbone lr multiplier, SGD, step schedule) and weight averaging
(EMA warm-up, the EMA warning, both weights evaluated, checkpoint averaging)."""
import json
import os

import pytest
import torch

import fgvc
from fgvc.average import average_checkpoints, ema_warning
from fgvc.cli import average as average_cli
from fgvc.evaluate import evaluate_checkpoint
from fgvc.optim import WarmupStep, backbone_prefixes, build_lr_schedule, build_optimizer, build_param_groups
from fgvc.train import DEFAULTS, train, validate_config
from sparse_mim.utils.config import load_config

from .test_fgvc_longtail import cub_cfg, make_longtail_cub

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = dict(log=lambda *a: None)


@pytest.mark.parametrize("name", ["metaformer_tiny", "metaformer_resnet18", "metaformer_convnext_atto"])
def test_layer_ids_run_from_the_stem_to_the_head(name):
    m = fgvc.create_model(name, num_classes=5, img_size=32, meta_dims=[4])
    layer_of = m.group_matcher()
    layers = m.layer_prefixes()
    top = len(layers)
    ids = {n: layer_of(n) for n, _ in m.named_parameters()}
    conv = tuple(backbone_prefixes(m))
    n_conv = sum(len(stage) for stage in m._conv_stages())
    for n, i in ids.items():
        if n.startswith(conv):
            assert i < n_conv, n                                  # every conv / trunk parameter has its block
        elif n.startswith(("stage_3.", "stage_4.", "cls_token")):
            assert n_conv <= i < top, n
        else:
            assert i == top, n                                    # meta heads, aggregation, norms, head on top
    assert ids["head.weight"] == top and ids["cls_token_2"] == ids["stage_4.0.norm1.weight"]
    first = "stage_0.0.weight" if name == "metaformer_tiny" else \
        ("backbone.conv1.weight" if "resnet" in name else "backbone.stem.0.weight")
    assert ids[first] == 0
    blocks = [ids[n] for n, _ in m.named_parameters() if n.endswith("norm1.weight") and n.startswith("stage_")]
    assert blocks == sorted(blocks) and len(set(blocks)) == len(blocks)
    assert len(m.layer_prefixes(coarse=True)) == len(m._conv_stages()) + 2


def test_layer_decay_and_backbone_multiplier_scale_the_groups():
    m = fgvc.create_model("metaformer_resnet18", num_classes=5, img_size=32, meta_dims=[4])
    top = len(m.layer_prefixes())
    names = {id(p): n for n, p in m.named_parameters()}
    layer_of = m.group_matcher()
    groups = build_param_groups(m, 0.05, layer_decay=0.5, backbone_lr_mult=0.1)
    seen = 0
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            want = 0.5 ** (top - layer_of(n)) * (0.1 if n.startswith("backbone.") else 1.0)
            assert g["lr_scale"] == pytest.approx(want, rel=1e-12), n
            assert g["weight_decay"] == (0.0 if p.ndim <= 1 or n.startswith("cls_token") else 0.05), n
            seen += 1
    assert seen == sum(1 for _ in m.parameters())
    plain = build_param_groups(m, 0.05)
    assert {g["lr_scale"] for g in plain} == {1.0}
    for opt, cls, nesterov in (("sgd", torch.optim.SGD, True), ("momentum", torch.optim.SGD, False),
                               ("adamw", torch.optim.AdamW, None)):
        o = build_optimizer(m, {"opt": opt, "weight_decay": 0.05, "momentum": 0.8, "betas": [0.9, 0.99],
                                "eps": 1e-8, "layer_decay": 0.5}, lr=0.2)
        assert type(o) is cls
        if nesterov is not None:
            assert o.defaults["nesterov"] is nesterov and o.defaults["momentum"] == 0.8
        assert all(g["lr"] == pytest.approx(0.2 * g["lr_scale"]) for g in o.param_groups)


def test_step_schedule():
    s = WarmupStep(1.0, decay_steps=10, decay_rate=0.1, warmup_steps=5, warmup_start=0.0)
    assert [s(i) for i in (0, 4, 5, 14)] == pytest.approx([0.0, 0.8, 1.0, 1.0])
    assert [s(i) for i in (15, 24, 25, 35)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    cfg = {"sched": "step", "decay_epochs": 2, "decay_rate": 0.5}
    sched = build_lr_schedule(cfg, 1.0, 0.0, 0.0, 100, 0, updates_per_epoch=3)
    assert [sched(5), sched(6), sched(12)] == pytest.approx([1.0, 0.5, 0.25])


# ------------------------------------------------------------------------------------------- runs
DEMO_PER_CLASS = (24, 8)  # train / test images per class of the demo_root fixture (tests/fgvc/conftest.py)


def _cfg(root, out, *overrides):
    return load_config(DEFAULTS, "fgvc/demo.yaml", [
        f"data.root={root}", f"output_dir={out}", "data.val_split=0.25", "data.batch_size=8",
        "optim.lr_base_batch=8", "log.progress=false", "wandb.enabled=false", "train.warmup_epochs=0",
        "train.eval_meta_zeroed=false", *overrides], validate=validate_config)


def test_sgd_step_layer_decay_run_sets_each_group_lr(demo_root, tmp_path):
    out = str(tmp_path / "run")
    train(_cfg(demo_root, out, "train.epochs=3", "optim.opt=momentum", "optim.sched=step", "optim.decay_epochs=1",
               "optim.decay_rate=0.5", "optim.layer_decay=0.6", "optim.backbone_lr_mult=0.5"), **QUIET)
    ck = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    step = ck["train_state"]["step"]                       # 3 epochs x 9 steps
    lr = 3e-3 * 8 / 8 * 0.5 ** ((step - 1) // 9)           # the lr of the last step (decay every 9 steps)
    scales = sorted({round(g["lr_scale"], 9) for g in ck["optimizer"]["param_groups"]})
    assert len(scales) == 6 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.6 ** 5 * 0.5)
    for g in ck["optimizer"]["param_groups"]:
        assert g["lr"] == pytest.approx(lr * g["lr_scale"], rel=1e-9)
        assert g["momentum"] == 0.9 and g["nesterov"] is False


def test_ema_warning_and_warmup():
    from timm.utils import ModelEmaV3
    m = torch.nn.Linear(2, 2)
    msg = ema_warning(ModelEmaV3(m, decay=0.9998), total_steps=75)
    assert "~5000 steps" in msg and "75" in msg and "train.ema_warmup=true" in msg
    assert ema_warning(ModelEmaV3(m, decay=0.9998, use_warmup=True), total_steps=75) is None
    assert ema_warning(ModelEmaV3(m, decay=0.9), total_steps=75) is None


def _ema_gap(ck, init):
    """|EMA - raw| / |raw - initial weights| over the float weights."""
    num = den = 0.0
    for k, v in ck["model"].items():
        if v.is_floating_point() and k in init:
            num += float((ck["model_ema"][k] - v).pow(2).sum())
            den += float((v - init[k]).pow(2).sum())
    return (num / den) ** 0.5


def test_short_run_ema_follows_the_weights_only_with_warmup(demo_root, tmp_path):
    """The short-run EMA failure: decay 0.9998 over 36 steps keeps the EMA at the initial weights
    without warm-up (and says so); with the warm-up (default) it follows the trained weights. Both the
    EMA and the raw weights are evaluated."""
    gaps, logs = {}, {}
    for warm in ("false", "true"):
        out = str(tmp_path / warm)
        lines = []
        final = train(_cfg(demo_root, out, "train.epochs=4", "train.ema=true", "train.ema_decay=0.9998",
                           f"train.ema_warmup={warm}", "checkpoint.keep_every_steps=1"), log=lines.append)
        logs[warm] = "\n".join(lines)
        ck = torch.load(os.path.join(out, "last.pth"), weights_only=True)
        init = torch.load(os.path.join(out, "checkpoint-00000001.pth"), weights_only=True)["model"]
        gaps[warm] = _ema_gap(ck, init)
        rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
        assert all("val/top1_raw" in r for r in rows if "val/top1" in r)
        assert "test/top1_raw_last" in final
    assert "[warning] train.ema_decay=0.9998 averages over ~5000 steps" in logs["false"]
    assert "[warning]" not in logs["true"]
    assert gaps["false"] > 0.8        # the EMA is still near the first step's weights
    assert gaps["true"] < 0.2         # ... with the warm-up it is near the trained weights


def test_average_checkpoints_on_the_cub_layout(tmp_path):
    root = make_longtail_cub(str(tmp_path / "CUB_200_2011"), [20, 20, 10])
    out = str(tmp_path / "run")
    cfg = cub_cfg(root, out, "train.epochs=2", "data.batch_size=8", "data.val_split=0",
                  "checkpoint.keep_every_steps=3", "train.ema=true", "train.ema_decay=0.9", "optim.opt=sgd",
                  "optim.layer_decay=0.8")
    train(cfg, **QUIET)
    groups = torch.load(os.path.join(out, "last.pth"), weights_only=True)["optimizer"]["param_groups"]
    assert sorted({round(g["lr_scale"], 9) for g in groups}) == [round(0.8 ** i, 9) for i in range(5, -1, -1)]
    assert all(g["nesterov"] for g in groups)
    paths = [os.path.join(out, f"checkpoint-{s:08d}.pth") for s in (3, 6, 9)]
    avg_path = str(tmp_path / "avg.pth")
    assert average_cli(paths + ["--out", avg_path]) == 0
    cks = [torch.load(p, weights_only=True) for p in paths]
    avg = torch.load(avg_path, weights_only=True)
    for k, v in avg["model"].items():
        if v.is_floating_point():
            ref = sum(c["model"][k].double() for c in cks) / 3
            torch.testing.assert_close(v, ref.to(v.dtype), rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(v, cks[0]["model"][k])
    assert avg["classes"] == cks[0]["classes"] and avg["averaged_weights"] == "model"
    ema = average_checkpoints(paths, str(tmp_path / "avg_ema.pth"), use_ema=True, **QUIET)
    k = "head.weight"
    torch.testing.assert_close(ema["model"][k], sum(c["model_ema"][k] for c in cks) / 3, rtol=1e-6, atol=1e-7)
    summary = evaluate_checkpoint(avg_path, overrides=["wandb.enabled=false"], **QUIET)
    assert summary["results"]["with_meta"]["n"] == 6
    with pytest.raises(ValueError, match="at least two"):
        average_checkpoints(paths[:1], str(tmp_path / "x.pth"), **QUIET)
    other = dict(cks[1], classes=list(reversed(cks[1]["classes"])))
    torch.save(other, str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="names differ"):
        average_checkpoints([paths[0], str(tmp_path / "other.pth")], str(tmp_path / "y.pth"), **QUIET)
