"""Long-tail tools: class-aware samplers, logit-adjusted loss, many / medium / few-shot top-1."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgvc.longtail import (ClassAwareSampler, LogitAdjustedLoss, build_loss, class_counts, sampling_weights,
                           shot_accuracy, shot_of)
from fgvc.train import DEFAULTS, validate_config
from sparse_mim.utils.config import ConfigError, load_config

from .test_fgvc_data import write_cub

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sampling_weights_follow_the_power_of_the_class_count():
    labels = np.array([0] * 100 + [1] * 4 + [2] * 1)
    for mode, q in (("uniform", 1.0), ("sqrt", 0.5), ("class_balanced", 0.0)):
        w = sampling_weights(labels, mode)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        mass = np.array([w[labels == c].sum() for c in range(3)])
        expected = np.array([100, 4, 1], float) ** q
        np.testing.assert_allclose(mass, expected / expected.sum(), rtol=1e-12)
        assert np.ptp(w[labels == 0]) == 0                      # images of one class equally likely
    with pytest.raises(ValueError, match="data.sampler"):
        sampling_weights(labels, "balanced")


def test_class_aware_sampler_draws_resumes_and_shards():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    s = ClassAwareSampler(labels, "class_balanced", seed=3)
    assert len(s) == 100
    draws = []
    for epoch in range(40):
        s.set_epoch(epoch)
        draws += list(s)
    draws = np.array(draws)
    freq = np.bincount(labels[draws], minlength=3) / len(draws)
    # 4000 draws of p = 1/3: standard error 0.0075; 5 sigma
    np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.0375)
    s.set_epoch(7)
    full = list(s)
    assert list(s) == full                                       # a function of (seed, epoch) only
    s.set_start(37)
    assert list(s) == full[37:] and len(s) == 63
    s.set_epoch(8)
    s.set_start(0)
    assert list(s) != full
    r0, r1 = (ClassAwareSampler(labels, "sqrt", num_replicas=2, rank=r, seed=3) for r in (0, 1))
    whole = ClassAwareSampler(labels, "sqrt", num_replicas=1, seed=3).indices()
    assert len(r0) == len(r1) == 50
    assert sorted(r0.indices() + r1.indices()) == sorted(whole)  # the two ranks split one draw


def test_logit_adjusted_loss_is_ce_of_shifted_logits():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 0, 1])
    counts = [60, 30, 10]
    prior = torch.tensor(counts, dtype=torch.float64) / 100
    for tau in (0.0, 0.5, 1.0, 2.0):
        loss = LogitAdjustedLoss(torch.nn.CrossEntropyLoss(), counts, tau)(logits, target)
        ref = F.cross_entropy(logits + tau * prior.log().float(), target)
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    assert build_loss(torch.nn.CrossEntropyLoss(), "ce", counts, 1.0).__class__ is torch.nn.CrossEntropyLoss
    soft = torch.softmax(torch.randn(6, 3), 1)  # Mixup targets
    from timm.loss import SoftTargetCrossEntropy
    la = build_loss(SoftTargetCrossEntropy(), "balanced_softmax", counts, 0.3)
    assert la.tau == 1.0
    ref = torch.sum(-soft * F.log_softmax(logits + prior.log().float(), -1), -1).mean()
    torch.testing.assert_close(la(logits, soft), ref, rtol=1e-6, atol=1e-6)
    # the adjustment raises the loss of head-class predictions: a head-class sample costs less than plain CE
    head = torch.tensor([0])
    assert la(logits[:1], F.one_hot(head, 3).float()) < F.cross_entropy(logits[:1], head)
    with pytest.raises(ConfigError, match="balanced_softmax"):
        load_config(DEFAULTS, None, ["train.loss=balanced_softmax", "train.logit_tau=0.5"], validate=validate_config)


def test_shot_splits_follow_the_literature_thresholds():
    counts = [101, 100, 20, 19, 0]
    assert shot_of(counts).tolist() == ["many_shot", "medium_shot", "medium_shot", "few_shot", "few_shot"]
    correct, total = [9, 5, 1, 0, 0], [10, 10, 4, 5, 0]
    out = shot_accuracy(correct, total, counts)
    assert out["many_shot"] == pytest.approx(90.0)
    assert out["medium_shot"] == pytest.approx((50.0 + 25.0) / 2)     # mean of per-class top-1
    assert out["few_shot"] == pytest.approx(0.0) and out["few_shot_classes"] == 1  # class 4 has no test image
    assert shot_accuracy([1], [1], [5])["many_shot"] is None
    assert class_counts([0, 2, 2], 4).tolist() == [1, 0, 2, 0]


# ------------------------------------------------------------------------------------------- runs
def test_longtail_demo_data_and_comparison(tmp_path):
    """The long-tailed demo: the generated training split follows the profile, and a one-epoch comparison
    of uniform and class-balanced sampling reports every shot split of each."""
    import csv
    from fgvc.demo import class_names
    from repotools.longtail_fgvc import compare, longtail_profile
    profile = longtail_profile()
    assert profile[:4] == [150, 5, 110, 7] and sorted(profile)[0] == 5 and len(profile) == 12
    lines = []
    results = compare(str(tmp_path), epochs=1, settings=(("uniform", "uniform", "ce"),
                                                         ("class_balanced", "class_balanced", "ce")), log=lines.append)
    with open(tmp_path / "data" / "train.csv") as f:
        labels = [r["label"] for r in csv.DictReader(f)]
    assert [labels.count(c) for c in class_names(6)] == profile
    for r in results.values():
        assert r["test/n"] == 240 and all(r.get(f"test/{s}") is not None for s in ("many_shot", "medium_shot",
                                                                                    "few_shot"))
    cfg = torch.load(tmp_path / "class_balanced" / "best.pth", weights_only=True)["config"]
    assert cfg["data"]["sampler"] == "class_balanced"
    assert lines[-2].startswith("uniform ") and lines[-1].startswith("class_balanced ")


def make_longtail_cub(root, counts, test_per_class=2, size=16):
    """A CUB-200-2011 layout whose training classes have ``counts`` images (a long tail)."""
    items = [(c, j >= test_per_class) for c, n in enumerate(counts, 1) for j in range(n + test_per_class)]
    write_cub(root, items, colour=lambda c: (40 * c % 256, 255 - 30 * c % 256, 90), size=size)
    return root


def cub_cfg(root, out, *overrides):
    """The tiny CPU recipe on a CUB-layout fixture, image only, quiet, no wandb."""
    return load_config(DEFAULTS, "fgvc/tiny_cpu.yaml", [
        "data.dataset=cub", f"data.root={root}", f"output_dir={out}", "model.img_size=32", "data.use_meta=false",
        "train.warmup_epochs=0", "log.progress=false", "wandb.enabled=false", "train.eval_meta_zeroed=false",
        *overrides], validate=validate_config)


def test_longtail_run_on_the_cub_layout_reports_shot_splits(tmp_path):
    """class-balanced sampling + logit-adjusted loss on a CUB-layout fixture: the shot splits are in the
    validation rows, final.json and fgvc-eval's summary.json, and agree with the per-class table."""
    from fgvc.evaluate import evaluate_checkpoint
    from fgvc.train import train
    root = make_longtail_cub(str(tmp_path / "CUB_200_2011"), [150, 30, 5])
    out = str(tmp_path / "run")
    cfg = cub_cfg(root, out, "train.epochs=1", "data.batch_size=16", "data.val_split=0.3",
                  "data.sampler=class_balanced", "train.loss=logit_adjusted", "train.logit_tau=1.0")
    final = train(cfg, log=lambda *a: None)
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    val = [r for r in rows if "val/top1" in r][-1]
    assert {"val/many_shot", "val/medium_shot", "val/few_shot"} <= set(val)
    ck = torch.load(os.path.join(out, "best.pth"), weights_only=True)
    n_train = ck["train_class_counts"]
    assert len(n_train) == 3 and sum(n_train) < 185       # the held-out part is not counted
    assert n_train[0] > 100 and n_train[2] < 20
    for key in ("test/many_shot", "test/medium_shot", "test/few_shot"):
        assert key in final
    summary = evaluate_checkpoint(os.path.join(out, "best.pth"), overrides=["wandb.enabled=false"],
                                  log=lambda *a: None)
    per_class = list(__import__("csv").DictReader(open(os.path.join(summary["out_dir"], "per_class.csv"))))
    shots = shot_of(n_train)
    for split in ("many_shot", "medium_shot", "few_shot"):
        want = np.mean([float(r["top1"]) for r, s in zip(per_class, shots) if s == split])
        assert summary[split] == pytest.approx(want)
        assert final[f"test/{split}"] == pytest.approx(want)
