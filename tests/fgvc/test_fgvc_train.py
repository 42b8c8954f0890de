"""fgvc training / evaluation: meta dropout, mixup keeps meta, the generated demo proves the meta
pathway, evaluation outputs are deterministic, every recipe loads, torchrun shards evaluation."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from fgvc.builders import build_model, resolve_data_config
from fgvc.eval_loop import drop_meta_groups
from fgvc.finetune_loop import meta_dropout, meta_dropout_prob, train_one_epoch
from sparse_mim.utils.streams import RandomStreams
from sparse_mim.utils.training_run import TrainState
from fgvc.evaluate import evaluate_checkpoint, prediction_rows
from fgvc.train import DEFAULTS, train, validate_config
from sparse_mim.utils.config import ConfigError, load_config, shipped_recipes_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPES = os.path.join(shipped_recipes_dir(), "fgvc")
DEMO_YAML = os.path.join(RECIPES, "demo.yaml")
QUIET = dict(log=lambda *a: None)


def _cfg(root, out, *overrides):
    return load_config(DEFAULTS, DEMO_YAML, [
        f"data.root={root}", f"output_dir={out}", "data.val_split=0", "data.batch_size=16", "optim.lr_base_batch=16",
        "log.progress=false", "wandb.enabled=false", "train.warmup_epochs=0", *overrides], validate=validate_config)


def _epoch(model, batches, opt, criterion=None, epoch=0, epochs=1, **kw):
    kw.setdefault("meta_drop_p", 0.0)
    return train_one_epoch(model, batches, opt, lambda s: opt.param_groups[0]["lr"], TrainState(epoch=epoch),
                           criterion=criterion or torch.nn.CrossEntropyLoss(), epochs=epochs,
                           streams=RandomStreams(0), **kw)


# ------------------------------------------------------------------------------------------- engine units
def test_meta_dropout_schedule_and_rows():
    assert meta_dropout_prob(0, 10) == 1.0 and meta_dropout_prob(5, 10) == 0.5 and meta_dropout_prob(10, 10) == 0.0
    meta = torch.arange(1, 71, dtype=torch.float32).reshape(10, 7)
    present = torch.ones(10, 2, dtype=torch.bool)
    m, p = meta_dropout(meta, present, 0.35)
    dropped = (m == 0).all(1)
    assert int(dropped.sum()) == 3                                   # floor(10 * 0.35)
    assert torch.equal(m[~dropped], meta[~dropped]) and torch.equal(~p.any(1), dropped)
    assert meta.min() > 0                                            # input untouched
    m, p = drop_meta_groups(meta, present, [1], [4, 3])
    assert torch.equal(m[:, :4], meta[:, :4]) and not m[:, 4:].any() and p[:, 0].all() and not p[:, 1].any()
    with pytest.raises(ValueError, match="out of range"):
        drop_meta_groups(meta, present, [2], [4, 3])


class _SpyModel(torch.nn.Module):
    """Records what the engine feeds it; meta enters the logits so a wrong row would matter."""

    def __init__(self, k=4, d=3):
        super().__init__()
        self.fc = torch.nn.Linear(3 + d, k)
        self.seen = []

    def forward(self, images, meta=None, meta_present=None):
        self.seen.append((images.detach().clone(), meta.detach().clone(), meta_present.clone()))
        return self.fc(torch.cat([images.mean((2, 3)), meta], 1))


def _batch(n, k=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(n, 3, 8, 8, generator=g), "meta": torch.randn(n, d, generator=g) + 5,
            "meta_present": torch.ones(n, 1, dtype=torch.bool), "labels": torch.arange(n) % k,
            "index": torch.arange(n), "skipped": 0}


def test_mixup_mixes_images_and_labels_not_meta():
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    batches = [_batch(6, seed=b) for b in range(3)]
    originals = [{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    model = _SpyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mix = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, num_classes=4, label_smoothing=0.0)
    stats = _epoch(model, batches, opt, SoftTargetCrossEntropy(), epoch=3, epochs=4, mixup=mix)
    assert stats["step"] == 3 and len(model.seen) == 3
    for batch, (images, meta, present) in zip(originals, model.seen):  # timm mixes the batch in place
        assert torch.equal(meta, batch["meta"])                        # meta rows unchanged and in order
        assert not torch.allclose(images, batch["images"])             # the images were mixed
        lam_img = images[0] - batch["images"][0]
        flipped = batch["images"].flip(0)                               # timm batch mixup pairs i with B-1-i
        lam = 1 - (lam_img / (flipped[0] - batch["images"][0])).median()
        np.testing.assert_allclose(images.numpy(), (lam * batch["images"] + (1 - lam) * flipped).numpy(), atol=1e-4)


def test_mixup_batch_trimmed_to_zero_images_is_skipped():
    """A batch left with one readable image is odd; Mixup needs an even batch, so it is trimmed to 0
    images: skipped (counted), the other micro-batch of the window still makes the optimizer step."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    model = _SpyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    mix = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, prob=1.0, num_classes=4)
    stats = _epoch(model, [_batch(4), _batch(1, seed=1)], opt, SoftTargetCrossEntropy(), mixup=mix, accum_steps=2)
    assert stats["step"] == 1 and stats["empty_batches"] == 1 and len(model.seen) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    stats = _epoch(model, [_batch(1, seed=2)], opt, SoftTargetCrossEntropy(), mixup=mix)  # nothing at all to learn
    assert stats["step"] == 1 and stats["empty_batches"] == 1


class _LinearMeta(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 + 3, 4)
        self.seen_meta = []

    def forward(self, images, meta=None, meta_present=None):
        self.seen_meta.append(meta.detach().clone())
        return self.fc(torch.cat([images.mean((2, 3)), meta], 1))


def test_gradient_accumulation_equals_big_batch():
    """accum_steps=2 over batches of 4 == one batch of 8 (mean loss, one optimizer step)."""
    small = [_batch(4, seed=s) for s in range(4)]
    big = [{k: torch.cat([a[k], b[k]]) if torch.is_tensor(a[k]) else 0 for k in a} for a, b in zip(small[::2], small[1::2])]
    models = []
    for batches, accum in ((small, 2), (big, 1)):
        torch.manual_seed(0)
        m = _LinearMeta()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        assert _epoch(m, batches, opt, accum_steps=accum)["step"] == 2
        models.append(m)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_meta_dropout_inside_training_epoch():
    """p = 0.75: floor(8 * 0.75) = 6 samples per batch see an all-zero meta vector."""
    m = _LinearMeta()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    _epoch(m, [_batch(8, seed=s) for s in range(3)], opt, epoch=1, epochs=4, meta_drop_p=meta_dropout_prob(1, 4))
    for meta in m.seen_meta:
        assert int((meta == 0).all(1).sum()) == 6 and int((meta != 0).all(1).sum()) == 2


def test_transforms_recipe():
    from PIL import Image
    from fgvc.data import build_transform
    img = Image.new("RGB", (80, 60), (120, 30, 200))
    ev = build_transform(False, 64)
    names = [type(t).__name__ for t in ev.transforms]
    assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"] and ev.transforms[0].size == 73  # 64 * 256 / 224
    assert torch.equal(ev(img), ev(img)) and ev(img).shape == (3, 64, 64)
    tr = build_transform(True, 64)
    names = [type(t).__name__ for t in tr.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "ToTensor", "Normalize", "RandomErasing"]
    assert tr.transforms[0].interpolation.value == "bicubic" and tr.transforms[-1].probability == 0.25
    assert tr(img).shape == (3, 64, 64)
    assert [type(t).__name__ for t in build_transform(True, 32, rand_augment="", reprob=0).transforms] == \
        ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]


# ------------------------------------------------------------------------------------------- the demo
@pytest.fixture(scope="module")
def demo_run(demo_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo_out") / "run")
    summary = train(_cfg(demo_root, out, "train.epochs=6", "train.meta_dropout=false"), **QUIET)
    return out, summary


def test_demo_meta_beats_image_only(demo_run, demo_root, tmp_path):
    """Class pairs differ only by latitude / season: only a model that reads its meta tokens can
    separate them (image-only ceiling: 50 %)."""
    out, summary = demo_run
    assert summary["test/top1"] >= 90.0, summary
    assert summary["test/top1"] - summary["test/top1_meta_zeroed"] >= 30.0, summary
    image_only = train(_cfg(demo_root, str(tmp_path / "img"), "train.epochs=6", "data.use_meta=false"), **QUIET)
    assert image_only["test/top1"] <= 65.0, image_only             # chance within each pair
    assert summary["test/top1"] - image_only["test/top1"] >= 25.0
    with open(os.path.join(out, "final.json")) as f:
        assert json.load(f)["test/top1"] == summary["test/top1"]
    assert {"config.yaml", "last.pth", "best.pth", "metrics.jsonl"} <= set(os.listdir(out))
    assert not os.path.exists(os.path.join(out, "run.lock"))       # released at the end


def test_eval_outputs_and_determinism(demo_run, tmp_path):
    out, summary = demo_run
    ckpt = os.path.join(out, "best.pth")
    res = []
    for k in range(2):
        d = str(tmp_path / f"eval{k}")
        res.append(evaluate_checkpoint(ckpt, overrides=[f"eval.out_dir={d}", "wandb.enabled=false",
                                                        "eval.table_rows=0", "log.progress=false"], **QUIET))
        assert {"summary.json", "per_class.csv", "top_confusions.csv", "confusion.png", "predictions.csv"} <= \
            set(os.listdir(d))
    assert res[0]["results"] == res[1]["results"]                      # bit-identical numbers
    r = res[0]["results"]
    assert set(r) == {"with_meta", "meta_zeroed", "without_temporal", "without_spatial"}
    assert r["with_meta"]["top1"] == pytest.approx(summary["test/top1"])
    assert r["meta_zeroed"]["top1"] == pytest.approx(summary["test/top1_meta_zeroed"])
    # one pair is split by season, the other by latitude: each group alone is worth ~ one pair
    assert r["without_temporal"]["top1"] < r["with_meta"]["top1"] - 10
    assert r["without_spatial"]["top1"] < r["with_meta"]["top1"] - 10
    lines = open(os.path.join(str(tmp_path / "eval0"), "per_class.csv")).read().splitlines()
    assert lines[0] == "class_index,class,images,top1,top1_meta_zeroed" and len(lines) == 5
    import csv
    with open(os.path.join(str(tmp_path / "eval0"), "predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == r["with_meta"]["n"] and set(rows[0]) >= {"path", "label", "pred_1", "prob_1", "pred_4"}
    assert np.mean([row["correct"] == "True" for row in rows]) * 100 == pytest.approx(r["with_meta"]["top1"])
    assert all(float(row["prob_1"]) >= float(row["prob_2"]) for row in rows)
    with pytest.raises(ConfigError, match="unknown config key"):
        evaluate_checkpoint(ckpt, overrides=["eval.nope=1"], **QUIET)


def test_eval_folder_named_after_checkpoint_and_cli(demo_run, capsys):
    """eval of last.pth goes to eval_last_test/, of best.pth to eval_best_test/: neither overwrites the other."""
    from fgvc.cli import evaluate
    out, _ = demo_run
    for name in ("best", "last"):
        assert evaluate([os.path.join(out, f"{name}.pth"), "wandb.enabled=false", "eval.per_group=false",
                         "log.progress=false"]) == 0
    assert os.path.isfile(os.path.join(out, "eval_best_test", "summary.json"))
    assert os.path.isfile(os.path.join(out, "eval_last_test", "summary.json"))
    assert evaluate([os.path.join(out, "best.pth"), "eval.nope=1"]) == 2
    assert "unknown config key 'eval.nope'" in capsys.readouterr().err
    assert evaluate([os.path.join(out, "nothing.pth")]) == 1


@pytest.mark.parametrize("path", sorted(p for p in os.listdir(RECIPES) if p.endswith(".yaml")))
def test_recipes_load(path):
    """Every shipped recipe (with its _base_ files) parses against the schema (keys, types, ranges)."""
    cfg = load_config(DEFAULTS, os.path.join(RECIPES, path), ["data.root=/data"], validate=validate_config)
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr > 0
    if path in ("demo.yaml", "tiny_cpu.yaml"):
        assert cfg.model.name == "metaformer_tiny" and cfg.aug.mixup == 0
    else:
        ds, model, size = path[:-5].split("_")
        assert cfg.data.dataset == ds and cfg.model.name == "metaformer_" + model[-1]
        assert cfg.model.img_size == int(size) and cfg.train.epochs == 300 and cfg.aug.mixup == 0.8
        assert cfg.optim.lr == (5e-5 if ds in ("cub", "nabirds") else 1e-4)
        assert cfg.output_dir == f"outputs/{path[:-5]}" and not cfg.data.demo
        assert len(open(os.path.join(RECIPES, path)).read().splitlines()) <= 8   # only what differs


def test_build_model_inits_hybrid_backbone(tmp_path):
    """model.init_backbone puts a (SparK-exported / ImageNet) backbone under the meta-token head."""
    from fgvc.data.meta import MetaGroup
    groups = [MetaGroup("temporal", 4), MetaGroup("spatial", 3)]
    cfg = load_config(DEFAULTS, None, ["model.name=metaformer_resnet18", "model.img_size=32"])
    donor = build_model(cfg.model, 5, groups)
    for p in donor.backbone.parameters():
        torch.nn.init.normal_(p)
    path = str(tmp_path / "backbone.pth")
    torch.save(donor.backbone.state_dict(), path)
    cfg.model.init_backbone = path
    model = build_model(cfg.model, 5, groups)
    for (k, a), b in zip(donor.backbone.state_dict().items(), model.backbone.state_dict().values()):
        assert torch.equal(a, b), k
    assert model(torch.randn(2, 3, 32, 32), torch.randn(2, 7)).shape == (2, 5)
    cfg.model.name = "metaformer_0"
    with pytest.raises(ValueError, match="hybrids"):
        build_model(cfg.model, 5, groups)


def test_eval_official_weights_file_and_prediction_rows(demo_run, demo_root, tmp_path):
    """A bare {'model': state_dict} file (the official layout) + -c recipe gives the same numbers
    as our checkpoint; the predictions table shows decoded meta."""
    out, summary = demo_run
    ours = torch.load(os.path.join(out, "best.pth"), weights_only=True)
    official = str(tmp_path / "official.pth")
    torch.save({"model": ours["model"]}, official)
    with pytest.raises(ConfigError, match="-c"):
        evaluate_checkpoint(official, **QUIET)
    s = evaluate_checkpoint(official, DEMO_YAML, [f"data.root={demo_root}", f"eval.out_dir={tmp_path / 'e'}",
                                                  "wandb.enabled=false", "data.val_split=0", "log.progress=false"],
                            **QUIET)
    assert s["results"]["with_meta"]["top1"] == pytest.approx(summary["test/top1"])
    assert s["results"]["meta_zeroed"]["top1"] == pytest.approx(summary["test/top1_meta_zeroed"])

    from fgvc.data import build_records
    cfg = _cfg(demo_root, str(tmp_path))
    rec = build_records(resolve_data_config(cfg.data, str(tmp_path / "unused")), "test")
    n = 3
    cols, rows = prediction_rows(rec, rec.classes, rec.meta_groups, np.arange(n), rec.labels[:n],
                                 rec.labels[:n], np.full(n, 0.9), (rec.labels[:n] + 1) % 4, max_rows=2)
    assert cols == ["image", "label", "prediction", "confidence", "correct", "meta/temporal", "meta/spatial",
                    "prediction_meta_zeroed"]
    assert len(rows) == 2 and rows[0][0].size[0] <= 128 and rows[0][4] is True
    assert rows[0][5].startswith("month ") and rows[0][6].startswith("lat ")
    import csv as _csv
    with open(os.path.join(demo_root, "test.csv")) as f:
        first = next(iter(_csv.DictReader(f)))
    assert rows[0][6] == f"lat {float(first['lat']):.2f}, lon {float(first['lon']):.2f}"
    assert rows[0][5].split(",")[0] == f"month {int(first['date'][5:7])}"


def test_prediction_table_decodes_by_encoder_not_name(demo_root, tmp_path):
    """Custom groups named as in the docs (when / where) are decoded by their type."""
    from fgvc.data import build_records
    cfg = _cfg(demo_root, str(tmp_path), "data.demo=false", "data.train_csv=train.csv", "data.test_csv=test.csv",
               "data.meta_groups=[{name: when, type: date, columns: [date]}, {name: where, type: latlon, "
               "columns: [lat, lon]}]")
    rec = build_records(dict(cfg.data), "test")
    cols, rows = prediction_rows(rec, rec.classes, rec.meta_groups, np.arange(2), rec.labels[:2], rec.labels[:2],
                                 np.full(2, 0.9), None, max_rows=2)
    assert cols[5:] == ["meta/when", "meta/where"]
    assert rows[0][5].startswith("month ") and rows[0][6].startswith("lat "), rows[0]


def test_torchrun_two_processes_sharded_eval(demo_root, tmp_path):
    """DDP on 2 CPU processes (gloo): training runs, and the sharded, all-reduced validation
    accuracy equals a single-process evaluation of the saved best weights."""
    import socket
    import subprocess
    out = str(tmp_path / "ddp")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "fgvc.cli", "train", "-c", DEMO_YAML, f"data.root={demo_root}", f"output_dir={out}",
           "train.epochs=2", "data.batch_size=8", "optim.lr_base_batch=16", "log.progress=false",
           "wandb.enabled=false", "data.val_split=0.2", "train.cpu_threads=1"]
    r = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"epoch"' in line]
    assert [row["epoch"] for row in rows] == [1, 2]
    best = max(rows, key=lambda row: row["val/top1"])
    assert best["val/images"] == 24                                    # each image once over both shards
    s = evaluate_checkpoint(os.path.join(out, "best.pth"), overrides=[
        "eval.split=val", f"eval.out_dir={tmp_path / 'e'}", "wandb.enabled=false", "eval.per_group=false",
        "log.progress=false"], **QUIET)
    assert s["results"]["with_meta"]["n"] == 24
    assert s["results"]["with_meta"]["top1"] == pytest.approx(best["val/top1"])
