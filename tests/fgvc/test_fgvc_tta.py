"""Test-time augmentation: the views, averaged probabilities, and --tta in fgvc-eval / fgvc-predict / fgvc-export."""
import csv
import json
import os

import pytest
import torch

import fgvc
from fgvc.cli import evaluate as eval_cli, export as export_cli, predict as predict_cli
from fgvc.demo import make_demo_dataset
from fgvc.evaluate import evaluate_checkpoint
from fgvc.predict import Predictor
from fgvc.train import DEFAULTS, train, validate_config
from fgvc.tta import TTAModel, tta_input_size, tta_transform, tta_views
from sparse_mim.utils.config import load_config

from .test_fgvc_longtail import make_longtail_cub

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = dict(log=lambda *a: None)


def test_views_are_the_documented_crops():
    x = torch.arange(6 * 7, dtype=torch.float32).reshape(1, 1, 6, 7).expand(2, 3, 6, 7)
    assert tta_input_size(224, "multicrop") == (256, 256) and tta_input_size(224, "hflip") == (224, 224)
    v = tta_views(x, "multicrop", 4)
    assert len(v) == 10 and all(t.shape == (2, 3, 4, 4) for t in v)
    assert torch.equal(v[0], x[..., 1:5, 1:5])                                   # centre
    assert torch.equal(v[1], x[..., :4, :4]) and torch.equal(v[4], x[..., 2:, 3:])  # top-left, bottom-right
    assert torch.equal(v[2], x[..., :4, 3:]) and torch.equal(v[3], x[..., 2:, :4])
    assert all(torch.equal(v[5 + i], v[i].flip(-1)) for i in range(5))
    h = tta_views(x, "hflip", 4)
    assert len(h) == 2 and torch.equal(h[1][..., 0], x[..., -1])
    with pytest.raises(ValueError, match="at least 8x8"):
        tta_views(x, "multicrop", 8)
    with pytest.raises(ValueError, match="tta="):
        tta_views(x, "flip", 4)


@pytest.mark.parametrize("mode", ["hflip", "multicrop"])
def test_tta_model_returns_log_of_the_averaged_probabilities(mode):
    m = fgvc.create_model("metaformer_tiny", num_classes=5, img_size=32, meta_dims=[4]).eval()
    t = TTAModel(m, mode).eval()
    size = tta_input_size(32, mode)
    images, meta = torch.randn(3, 3, *size), torch.randn(3, 4)
    present = torch.tensor([[True], [False], [True]])
    with torch.no_grad():
        got = t(images, meta, present).softmax(-1)
        ref = torch.stack([m(v, meta, present).softmax(-1) for v in tta_views(images, mode, 32)]).mean(0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert t.img_size == size and t.pretrained_cfg["tta"] == mode


# ------------------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module", params=[("demo", "hflip"), ("cub", "multicrop")],
                ids=["demo-hflip", "cub-multicrop"])
def layout(request, tmp_path_factory):
    """(best.pth of a 2-epoch run on the demo data / a CUB-layout fixture, the TTA mode its tests use)."""
    kind, mode = request.param
    base = tmp_path_factory.mktemp(f"tta_{kind}")
    if kind == "demo":
        root = str(base / "data")
        make_demo_dataset(root, n_looks=2, train_per_class=16, test_per_class=6, image_size=32, seed=1)
        extra = [f"data.root={root}"]
        recipe = "fgvc/demo.yaml"
    else:
        root = make_longtail_cub(str(base / "CUB_200_2011"), [12, 12, 6], test_per_class=3, size=40)
        extra = ["data.dataset=cub", f"data.root={root}", "model.img_size=32", "data.use_meta=false"]
        recipe = "fgvc/tiny_cpu.yaml"
    out = str(base / "run")
    cfg = load_config(DEFAULTS, recipe, extra + [
        f"output_dir={out}", "train.epochs=2", "train.warmup_epochs=0", "data.batch_size=8", "data.val_split=0",
        "log.progress=false", "wandb.enabled=false", "train.eval_meta_zeroed=false"], validate=validate_config)
    train(cfg, **QUIET)
    return os.path.join(out, "best.pth"), mode


def _images_of(summary):
    with open(os.path.join(summary["out_dir"], "predictions.csv")) as f:
        return [r["path"] for r in csv.DictReader(f)]


def test_eval_and_predict_with_tta(layout, tmp_path):
    checkpoint, mode = layout
    plain = evaluate_checkpoint(checkpoint, overrides=["wandb.enabled=false", f"eval.out_dir={tmp_path / 'a'}"],
                                **QUIET)
    assert eval_cli([checkpoint, "--tta", mode, "wandb.enabled=false", f"eval.out_dir={tmp_path / 'b'}"]) == 0
    with open(tmp_path / "b" / "summary.json") as f:
        tta = json.load(f)
    assert tta["tta"] == mode and plain["tta"] == "none"
    assert tta["results"]["with_meta"]["n"] == plain["results"]["with_meta"]["n"]
    # the TTA predictions are the averaged probabilities of the views, image by image
    pred = Predictor.from_checkpoint(checkpoint, device="cpu", amp="off")
    paths = _images_of(plain)[:4]
    from PIL import Image
    manual = []
    for p in paths:
        x = tta_transform(pred.img_size, mode)(Image.open(p).convert("RGB"))[None]
        meta, present = torch.zeros(1, pred.meta_dim), torch.zeros(1, len(pred.meta_groups), dtype=torch.bool)
        views = tta_views(x, mode, pred.img_size)
        manual.append(torch.stack([pred.logits(v, meta, present).softmax(-1) for v in views]).mean(0)[0])
    out_csv = str(tmp_path / "pred.csv")
    assert predict_cli([checkpoint, *paths, "--tta", mode, "--device", "cpu", "--amp", "off", "--topk", "1",
                        "--out", out_csv, "--quiet"]) == 0
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    for r, m in zip(rows, manual):
        assert r["top1"] == pred.classes[int(m.argmax())]
        assert float(r["top1_prob"]) == pytest.approx(float(m.max()), abs=2e-6)


def test_export_with_tta_equals_eager(layout, tmp_path):
    checkpoint, mode = layout
    out = str(tmp_path / "m.pt2")
    assert export_cli([checkpoint, "--out", out, "--tta", mode]) == 0
    from fgvc.export import load_program
    module, meta = load_program(out)
    assert meta["tta"] == mode and meta["crop_pct"] == (1.0 if mode == "multicrop" else 224 / 256)
    assert meta["img_size"] == list(tta_input_size(32, mode))
    pred = Predictor.from_checkpoint(checkpoint, device="cpu", amp="off", tta=mode)
    x = torch.randn(3, 3, *meta["img_size"])
    args = (x,) if not pred.meta_groups else (x, torch.randn(3, pred.meta_dim),
                                              torch.ones(3, len(pred.meta_groups), dtype=torch.bool))
    with torch.no_grad():
        torch.testing.assert_close(module(*args).softmax(-1), pred.model(*args).softmax(-1), rtol=1e-4, atol=1e-5)
