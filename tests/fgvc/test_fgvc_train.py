"""fgvc training / evaluation: meta dropout, mixup keeps meta, the generated demo proves the meta
pathway, kill + resume gives the uninterrupted weights, evaluation is deterministic."""
import json
import os
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))

import eval_fgvc  # noqa: E402
import train_fgvc  # noqa: E402
from fgvc.demo import make_demo_dataset  # noqa: E402
from fgvc.engine import drop_meta_groups, meta_dropout, meta_dropout_prob, train_one_epoch  # noqa: E402
from sparse_mim.utils.config import load_config  # noqa: E402
from sparse_mim.utils.misc import NonFiniteLossError  # noqa: E402

DEMO_YAML = os.path.join(REPO, "configs", "fgvc", "demo.yaml")


def _cfg(root, out, *overrides):
    return load_config(train_fgvc.DEFAULTS, DEMO_YAML, [
        f"data.root={root}", f"output_dir={out}", "data.val_split=0", "data.batch_size=16", "optim.lr_base_batch=16",
        "train.progress=false", "wandb.enabled=false", "train.warmup_epochs=0", *overrides])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~5x faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fgvc_demo") / "data")
    make_demo_dataset(root, n_looks=2, train_per_class=32, test_per_class=16, image_size=32, seed=1)
    return root


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


class _SpyModel(torch.nn.Module):
    """Records what the engine feeds it; meta enters the logits so a wrong row would matter."""

    def __init__(self, k=4, d=3):
        super().__init__()
        self.fc = torch.nn.Linear(3 + d, k)
        self.seen = []

    def forward(self, images, meta=None, meta_present=None):
        self.seen.append((images.detach().clone(), meta.detach().clone(), meta_present.clone()))
        return self.fc(torch.cat([images.mean((2, 3)), meta], 1))


def test_mixup_mixes_images_and_labels_not_meta():
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    torch.manual_seed(0)
    batches = []
    for b in range(3):
        batches.append({"images": torch.randn(6, 3, 8, 8), "meta": torch.randn(6, 3),
                        "meta_present": torch.ones(6, 1, dtype=torch.bool), "labels": torch.arange(6) % 4,
                        "index": torch.arange(6), "skipped": 0})
    originals = [{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    model = _SpyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mix = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, num_classes=4, label_smoothing=0.0)
    stats = train_one_epoch(model, batches, opt, SoftTargetCrossEntropy(), torch.device("cpu"), epoch=3, epochs=4,
                            lr_schedule=lambda s: 1e-3, start_step=0, mixup_fn=mix, use_meta_dropout=False,
                            progress=False)
    assert stats["step"] == 3 and len(model.seen) == 3
    for batch, (images, meta, present) in zip(originals, model.seen):  # timm mixes the batch in place
        assert torch.equal(meta, batch["meta"])                        # meta rows unchanged and in order
        assert not torch.allclose(images, batch["images"])             # the images were mixed
        lam_img = images[0] - batch["images"][0]
        flipped = batch["images"].flip(0)                               # timm batch mixup pairs i with B-1-i
        lam = 1 - (lam_img / (flipped[0] - batch["images"][0])).median()
        np.testing.assert_allclose(images.numpy(), (lam * batch["images"] + (1 - lam) * flipped).numpy(), atol=1e-4)


def test_nan_loss_stops_with_clear_error():
    class NaNModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, images, meta=None, meta_present=None):
            return self.w * torch.full((images.shape[0], 2), float("nan"))

    batch = {"images": torch.zeros(2, 3, 4, 4), "meta": torch.zeros(2, 1), "meta_present": torch.ones(2, 1).bool(),
             "labels": torch.zeros(2, dtype=torch.long), "index": torch.arange(2), "skipped": 0}
    model = NaNModel()
    with pytest.raises(NonFiniteLossError, match="resume=auto"):
        train_one_epoch(model, [batch], torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                        torch.device("cpu"), 0, 1, lambda s: 0.1, 0, progress=False)


# ------------------------------------------------------------------------------------------- the demo
@pytest.fixture(scope="module")
def demo_run(demo_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo_out"))
    summary = train_fgvc.train(_cfg(demo_root, out, "train.epochs=6", "train.meta_dropout=false"), log=lambda *a: None)
    return out, summary


def test_demo_meta_beats_image_only(demo_run, demo_root, tmp_path):
    """Class pairs differ only by latitude / season: only a model that reads its meta tokens can
    separate them (image-only ceiling: 50 %)."""
    out, summary = demo_run
    assert summary["test/top1"] >= 90.0, summary
    assert summary["test/top1"] - summary["test/top1_meta_zeroed"] >= 30.0, summary
    image_only = train_fgvc.train(_cfg(demo_root, str(tmp_path), "train.epochs=6", "data.use_meta=false"),
                                  log=lambda *a: None)
    assert image_only["test/top1"] <= 65.0, image_only             # chance within each pair
    assert summary["test/top1"] - image_only["test/top1"] >= 25.0
    with open(os.path.join(out, "final.json")) as f:
        assert json.load(f)["test/top1"] == summary["test/top1"]
    assert os.path.isfile(os.path.join(out, "config.yaml")) and os.path.isfile(os.path.join(out, "last.pth"))


def test_eval_tool_outputs_and_determinism(demo_run, tmp_path):
    out, summary = demo_run
    ckpt = os.path.join(out, "best.pth")
    res = []
    for k in range(2):
        d = str(tmp_path / f"eval{k}")
        s = eval_fgvc.main([ckpt, f"eval.out_dir={d}", "wandb.enabled=false", "eval.table_rows=0"])
        res.append(s)
        assert {"summary.json", "per_class.csv", "top_confusions.csv", "confusion.png"} <= set(os.listdir(d))
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
    with pytest.raises(SystemExit, match="unknown config key"):
        eval_fgvc.main([ckpt, "eval.nope=1"])


# ------------------------------------------------------------------------------------------- resume
def test_kill_and_resume_equals_uninterrupted(demo_root, tmp_path):
    """2 epochs in one go == 1 epoch, 'killed', resumed with resume=auto (weights, optimizer, best)."""
    common = ["train.epochs=2", "data.batch_size=8", "optim.accum_steps=2", "optim.lr_base_batch=16", "aug.mixup=0.8", "aug.cutmix=1.0",
              "aug.reprob=0.25", "aug.rand_augment=rand-m9-mstd0.5", "train.ema=true", "train.ema_decay=0.9",
              "data.val_split=0.25", "train.eval_meta_zeroed=false"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_fgvc.train(_cfg(demo_root, a, *common), log=lambda *x: None)
    stopped = train_fgvc.train(_cfg(demo_root, b, *common, "train.stop_after_epoch=1"), log=lambda *x: None)
    assert stopped == {"stopped_at_epoch": 1}
    torch.manual_seed(123)  # the resumed run must restore its own RNG state, not rely on the process's
    np.random.seed(123)
    train_fgvc.train(_cfg(demo_root, b, *common, "resume=auto"), log=lambda *x: None)
    ca = torch.load(os.path.join(a, "last.pth"), weights_only=True)
    cb = torch.load(os.path.join(b, "last.pth"), weights_only=True)
    n_train = 4 * 32 - 4 * 8                                          # 25 % of each class held out for val
    assert ca["epoch"] == cb["epoch"] == 2 and ca["step"] == cb["step"] == 2 * (n_train // 8 // 2)
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for k in ca["model_ema"]:
        assert torch.equal(ca["model_ema"][k], cb["model_ema"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert ca["best"] == cb["best"]


@pytest.mark.parametrize("path", sorted(p for p in os.listdir(os.path.join(REPO, "configs", "fgvc")) if p.endswith(".yaml")))
def test_recipes_load(path):
    """Every shipped recipe parses against the defaults (keys and types checked)."""
    cfg = load_config(train_fgvc.DEFAULTS, os.path.join(REPO, "configs", "fgvc", path), ["data.root=/data"])
    assert cfg.data.dataset in ("cub", "nabirds", "inat2017", "inat2018", "inat2021", "custom")
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr > 0
    if path != "demo.yaml":
        assert cfg.model.name in ("metaformer_0", "metaformer_1", "metaformer_2") and cfg.train.epochs == 300


def test_build_model_inits_hybrid_backbone(tmp_path):
    """model.init_backbone puts a (SparK-exported / ImageNet) backbone under the meta-token head."""
    from fgvc.data.meta import MetaGroup
    groups = [MetaGroup("temporal", 4), MetaGroup("spatial", 3)]
    cfg = load_config(train_fgvc.DEFAULTS, None, ["model.name=metaformer_resnet18", "model.img_size=32"])
    donor = train_fgvc.build_model(cfg, 5, groups)
    for p in donor.backbone.parameters():
        torch.nn.init.normal_(p)
    path = str(tmp_path / "backbone.pth")
    torch.save(donor.backbone.state_dict(), path)
    cfg.model.init_backbone = path
    model = train_fgvc.build_model(cfg, 5, groups)
    for (k, a), b in zip(donor.backbone.state_dict().items(), model.backbone.state_dict().values()):
        assert torch.equal(a, b), k
    out = model(torch.randn(2, 3, 32, 32), torch.randn(2, 7))
    assert out.shape == (2, 5)
    cfg.model.name = "metaformer_0"
    with pytest.raises(ValueError, match="hybrids"):
        train_fgvc.build_model(cfg, 5, groups)


def test_eval_official_weights_file_and_prediction_rows(demo_run, demo_root, tmp_path):
    """A bare {'model': state_dict} file (the official layout) + -c recipe gives the same numbers
    as our checkpoint; the predictions table shows decoded meta."""
    out, summary = demo_run
    ours = torch.load(os.path.join(out, "best.pth"), weights_only=True)
    official = str(tmp_path / "official.pth")
    torch.save({"model": ours["model"]}, official)
    with pytest.raises(SystemExit, match="-c"):
        eval_fgvc.main([official])
    s = eval_fgvc.main([official, "-c", DEMO_YAML, f"data.root={demo_root}", f"eval.out_dir={tmp_path / 'e'}",
                        "wandb.enabled=false", "data.val_split=0"])
    assert s["results"]["with_meta"]["top1"] == pytest.approx(summary["test/top1"])
    assert s["results"]["meta_zeroed"]["top1"] == pytest.approx(summary["test/top1_meta_zeroed"])

    from fgvc.data import build_records
    cfg = _cfg(demo_root, str(tmp_path))
    rec = build_records(train_fgvc.prepare_data_config(cfg), "test")
    n = 3
    cols, rows = eval_fgvc.prediction_rows(rec, rec.classes, rec.meta_groups, np.arange(n), rec.labels[:n],
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


def test_torchrun_two_processes_sharded_eval(demo_root, tmp_path):
    """DDP on 2 CPU processes (gloo): training runs, and the sharded, all-reduced validation
    accuracy equals a single-process evaluation of the saved best weights."""
    import subprocess
    out = str(tmp_path / "ddp")
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(REPO, "tools", "train_fgvc.py"), f"data.root={demo_root}", f"output_dir={out}",
           "train.epochs=2", "data.batch_size=8", "optim.lr_base_batch=16", "train.progress=false",
           "wandb.enabled=false", "data.val_split=0.2", "train.cpu_threads=1"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"epoch"' in line]
    assert [row["epoch"] for row in rows] == [1, 2]
    best = max(rows, key=lambda row: row["val/top1"])
    assert best["val/images"] == 24                                    # each image once over both shards
    s = eval_fgvc.main([os.path.join(out, "best.pth"), "eval.split=val", f"eval.out_dir={tmp_path / 'e'}",
                        "wandb.enabled=false", "eval.per_group=false"])
    assert s["results"]["with_meta"]["n"] == 24
    assert s["results"]["with_meta"]["top1"] == pytest.approx(best["val/top1"])


class _LinearMeta(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 + 3, 4)
        self.seen_meta = []

    def forward(self, images, meta=None, meta_present=None):
        self.seen_meta.append(meta.detach().clone())
        return self.fc(torch.cat([images.mean((2, 3)), meta], 1))


def _batches(n, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"images": torch.randn(b, 3, 4, 4, generator=g), "meta": torch.randn(b, 3, generator=g) + 5,
             "meta_present": torch.ones(b, 1, dtype=torch.bool), "labels": torch.randint(0, 4, (b,), generator=g),
             "index": torch.arange(b), "skipped": 0} for _ in range(n)]


def test_gradient_accumulation_equals_big_batch():
    """accum_steps=2 over batches of 4 == one batch of 8 (mean loss, one optimizer step)."""
    small = _batches(4, 4)
    big = [{k: torch.cat([a[k], b[k]]) if torch.is_tensor(a[k]) else 0 for k in a} for a, b in zip(small[::2], small[1::2])]
    models = []
    for batches, accum in ((small, 2), (big, 1)):
        torch.manual_seed(0)
        m = _LinearMeta()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        stats = train_one_epoch(m, batches, opt, torch.nn.CrossEntropyLoss(), torch.device("cpu"), 0, 1,
                                lambda s: 0.5, 0, accum_steps=accum, use_meta_dropout=False, progress=False)
        assert stats["step"] == 2
        models.append(m)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_meta_dropout_inside_training_epoch():
    """Epoch 1 of 4: p = 0.75, so floor(8 * 0.75) = 6 samples per batch see an all-zero meta vector."""
    m = _LinearMeta()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    train_one_epoch(m, _batches(3, 8), opt, torch.nn.CrossEntropyLoss(), torch.device("cpu"), 1, 4,
                    lambda s: 0.1, 0, progress=False)
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
