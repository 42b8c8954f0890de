"""The training run's dashboard: per-class top-1, confusion matrix, sample predictions with thumbnails,
grad norm, peak memory, in metrics.jsonl and in an offline wandb run read back; evaluation runs grouped
with their training run."""
import csv
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from fgvc.demo import make_demo_dataset
from fgvc.evaluate import evaluate_checkpoint
from fgvc.train import DEFAULTS, train, validate_config
from sparse_mim.utils import logger as logger_mod
from sparse_mim.utils.config import load_config

from .test_fgvc_longtail import cub_cfg, make_longtail_cub

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = dict(log=lambda *a: None)


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


def _check_figures(rows, classes_n, prefix="val"):
    """The figures of every evaluation in metrics.jsonl agree with its scalars."""
    scalars = [r for r in rows if f"{prefix}/top1" in r]
    figures = [r for r in rows if f"{prefix}/per_class_top1" in r]
    assert scalars and len(figures) == len(scalars)
    for s, f in zip(scalars, figures):
        assert f["step"] == s["step"]
        cm = np.array(f[f"{prefix}/confusion"])
        assert cm.shape == (classes_n, classes_n) and cm.sum() == s[f"{prefix}/images"]
        assert 100.0 * np.trace(cm) / cm.sum() == pytest.approx(s[f"{prefix}/top1"])
        per_class = [100.0 * cm[c, c] / cm[c].sum() if cm[c].sum() else None for c in range(classes_n)]
        assert f[f"{prefix}/per_class_top1"] == pytest.approx(per_class, abs=1e-3)
        assert f[f"{prefix}/per_class_images"] == cm.sum(1).tolist()
        seen = [p for p in per_class if p is not None]
        assert s[f"{prefix}/mean_per_class_top1"] == pytest.approx(np.mean(seen))
        samples = f[f"{prefix}/samples"]
        assert 0 < len(samples) <= 16 and all(os.path.isfile(x["path"]) for x in samples)
    steps = [r for r in rows if "train/grad_norm" in r]
    assert steps and all(r["train/grad_norm"] > 0 and r["sys/peak_memory_mb"] > 0 for r in steps)


def test_demo_dashboard_in_offline_wandb_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    seen = []
    real_finish = logger_mod.RunLogger.finish

    def finish(self):  # record the wandb run's group and job type at the logger boundary
        if self.run is not None:
            seen.append((self.run.job_type, self.run.group, self.run.id, self.out_dir))
        real_finish(self)

    monkeypatch.setattr(logger_mod.RunLogger, "finish", finish)
    root = str(tmp_path / "data")
    make_demo_dataset(root, n_looks=2, train_per_class=16, test_per_class=6, image_size=32, seed=1)
    out = str(tmp_path / "run")
    train(load_config(DEFAULTS, "fgvc/demo.yaml", [
        f"data.root={root}", f"output_dir={out}", "data.val_split=0.25", "data.batch_size=8", "log.every=1",
        "log.progress=false", "train.warmup_epochs=0", "train.epochs=2", "train.eval_meta_zeroed=false"],
        validate=validate_config), **QUIET)
    _check_figures(_rows(out), 4)
    evaluate_checkpoint(os.path.join(out, "best.pth"), overrides=["eval.table_rows=8"], **QUIET)
    (train_job, train_group, train_id, _), (eval_job, eval_group, eval_id, eval_dir) = seen
    assert train_job == "fgvc-train" and eval_job == "fgvc-eval"
    assert train_group == train_id and eval_group == train_group and eval_id != train_id
    # read back what wandb staged: the sample table's image cells are image files, and the images are the
    # thumbnails of the validation images (not a placeholder)
    tables = []
    for p in glob.glob(os.path.join(out, "wandb", "data", "artifacts", "staging", "*")):
        try:
            with open(p) as f:
                tables.append(json.load(f))
        except (UnicodeDecodeError, ValueError):
            continue
    samples = [t for t in tables if t.get("columns") == ["image", "label", "prediction", "confidence", "correct"]]
    per_class = [t for t in tables if t.get("columns") == ["class_index", "class", "train_images", "shot", "images",
                                                          "top1"]]
    confusion = [t for t in tables if t.get("columns") == ["Actual", "Predicted", "nPredictions"]]
    assert len(samples) >= 2 and len(per_class) >= 2 and len(confusion) >= 2     # every evaluation (staged twice)
    cells = [row[0] for t in samples for row in t["data"]]
    assert cells and all(c["_type"] == "image-file" and c["width"] == 32 and c["height"] == 32 for c in cells)
    names = [c[1] for c in per_class[0]["data"]]
    staged = set()
    for t in confusion:   # wandb's confusion-matrix table, back to a matrix
        got = {(a, p): n for a, p, n in t["data"]}
        staged.add(tuple(int(got[(names[i], names[j])]) for i in range(4) for j in range(4)))
    for r in _rows(out):
        if "val/confusion" in r:
            assert tuple(np.array(r["val/confusion"]).ravel().tolist()) in staged
    media = os.path.join(out, "wandb", "offline-run-*", "files", "media", "images")
    pngs = [Image.open(p) for p in glob.glob(os.path.join(media, "val", "*.png"))]
    assert len(pngs) == 32 and all(im.size == (32, 32) and np.asarray(im).std() > 1 for im in pngs)
    eval_rows = _rows(eval_dir)                                             # the eval run's figures
    with open(os.path.join(eval_dir, "per_class.csv")) as f:
        per_class_csv = [float(r["top1"]) for r in csv.DictReader(f)]
    assert eval_rows[0]["eval/per_class_top1"] == pytest.approx(per_class_csv, abs=1e-3)
    assert np.array(eval_rows[0]["eval/confusion"]).sum() == 24
    eval_pngs = glob.glob(os.path.join(eval_dir, "wandb", "offline-run-*", "files", "media", "images", "eval", "*.png"))
    assert len(eval_pngs) == 8                                              # eval/prediction_images


def test_cub_layout_dashboard_figures_without_wandb(tmp_path):
    root = make_longtail_cub(str(tmp_path / "CUB_200_2011"), [20, 12, 6], test_per_class=2)
    out = str(tmp_path / "run")
    train(cub_cfg(root, out, "train.epochs=2", "data.batch_size=8", "data.val_split=0", "log.every=1"), **QUIET)
    rows = _rows(out)
    _check_figures(rows, 3, prefix="test")
    assert [r for r in rows if "test/few_shot" in r]                        # classes of 6 training images
