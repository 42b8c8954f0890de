"""The k-NN monitor, the linear probe and spark-knn (sparse_mim.knn, the eval.* keys, sparse_mim.cli.knn)."""
import json
import math
import os
import re

import pytest
import torch
from PIL import Image

from sparse_mim import cli, create_backbone
from sparse_mim.data import DataError, generate_image
from sparse_mim.knn import (BUILTIN_CLASSES, KnnMonitor, builtin_labelled_images, eval_transform, extract_features,
                            knn_sets, labelled_split, linear_probe, read_labelled, subsample, weighted_knn)
from sparse_mim.testing import randomize_weights_

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# ----------------------------------------------------------------------------- the measure
def test_weighted_knn_equals_hand_computation():
    # reference points on the unit circle (lengths must not matter: scaled by 5), labels 0, 1, 1, 2
    train = 5 * torch.tensor([_unit(0), _unit(50), _unit(55), _unit(180)])
    train_labels = torch.tensor([0, 1, 1, 2])
    # x at 10 deg (label 0): neighbours a (cos 10 = .985), b (cos 40 = .766), c (cos 45 = .707)
    #   T = 0.07: votes class 0 exp(.985/.07) = 1.29e6 > class 1 exp(.766/.07) + exp(.707/.07) = 8.1e4 -> 0, right
    #   T = 1:    class 0 e^.985 = 2.68 < class 1 e^.766 + e^.707 = 4.18 -> 1 (the plain majority), wrong
    # y at 52.5 deg (label 1): b and c nearest -> 1 at any T, right
    # z at 175 deg, labelled 5 of 6 classes: d votes 2, c and b vote 1, classes 0, 3, 4, 5 have no vote and tie:
    #   ranking 2, 1, 0, 3, 4 | 5 (ties go to the lower index) -> wrong in top-1 and in top-5
    test = torch.tensor([_unit(10), _unit(52.5), _unit(175)])
    test_labels = torch.tensor([0, 1, 5])
    sharp = weighted_knn(train, train_labels, test, test_labels, k=3, temperature=0.07, num_classes=6)
    assert sharp["top1"] == pytest.approx(200 / 3) and sharp["top5"] == pytest.approx(200 / 3)
    assert sharp["k"] == 3 and sharp["n"] == 3
    flat = weighted_knn(train, train_labels, test, test_labels, k=3, temperature=1.0, num_classes=6)
    assert flat["top1"] == pytest.approx(100 / 3) and flat["top5"] == pytest.approx(200 / 3)
    one = weighted_knn(train, train_labels, test[:1], test_labels[:1], k=1, temperature=1.0, num_classes=6)
    assert one["top1"] == 100.0
    # k larger than the reference set: all 4 vote; z's label 2 would now be right
    assert weighted_knn(train, train_labels, test[2:], torch.tensor([2]), k=50)["k"] == 4
    # an exact tie between two classes goes to the lower class index
    tie = weighted_knn(torch.tensor([_unit(0), _unit(90)]), torch.tensor([1, 0]), torch.tensor([_unit(45)]),
                       torch.tensor([0]), k=2)
    assert tie["top1"] == 100.0
    with pytest.raises(ValueError, match="temperature"):
        weighted_knn(train, train_labels, test, test_labels, temperature=0.0)


def test_linear_probe_separates_separable_features_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(3, 16, generator=g)
    labels = torch.arange(3).repeat(40)
    feats = centres[labels] + 0.5 * torch.randn(120, 16, generator=g) + 10.0  # offset: the BatchNorm removes it
    val_labels = torch.arange(3).repeat(10)
    val = centres[val_labels] + 0.5 * torch.randn(30, 16, generator=g) + 10.0
    r = linear_probe(feats, labels, val, val_labels, epochs=30, batch_size=32)
    assert r["top1"] == 100.0 and r["train_top1"] == 100.0 and r["n"] == 30
    # labels unrelated to the features: held-out accuracy falls far below the separable case
    shuffled = labels[torch.randperm(120, generator=g)]
    r2 = linear_probe(feats, shuffled, val, val_labels[torch.randperm(30, generator=g)], epochs=30, batch_size=32)
    assert r2["top1"] < 70.0


# ----------------------------------------------------------------------------- labelled sets
def _image_folder(root, per_class, classes=("cat", "dog", "owl"), size=40):
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(generate_image(4 * i + c, size)).save(root / name / f"{i}.png")
    return root


def test_labelled_sets_folders_lists_splits(tmp_path):
    root = _image_folder(tmp_path / "train", 5)
    paths, labels, classes = read_labelled(str(root))
    assert classes == ["cat", "dog", "owl"] and labels == [0] * 5 + [1] * 5 + [2] * 5
    # a list file with class names (relative paths), and one with indices
    (tmp_path / "names.txt").write_text("# path label\n" + "".join(
        f"{os.path.relpath(p, tmp_path)} {classes[l]}\n" for p, l in zip(paths, labels)))
    assert read_labelled(str(tmp_path / "names.txt")) == (paths, labels, classes)
    (tmp_path / "ids.txt").write_text("".join(f"{p} {l}\n" for p, l in zip(paths, labels)))
    assert read_labelled(str(tmp_path / "ids.txt")) == (paths, labels, ["0", "1", "2"])
    (tmp_path / "bad.txt").write_text("just_a_path.png\n")
    with pytest.raises(DataError, match="expected 'path label'"):
        read_labelled(str(tmp_path / "bad.txt"))
    with pytest.raises(DataError, match="does not exist"):
        read_labelled(str(tmp_path / "nowhere"))
    from sparse_mim.train import DEFAULTS, validate_config
    from sparse_mim.utils.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="eval.knn_val_root=.*needs eval.knn_root"):  # at config time
        load_config(DEFAULTS, None, ["eval.knn_root=", f"eval.knn_val_root={root}"], validate=validate_config)
    # held-out split: a fifth of every class (one of five), deterministic, disjoint
    train, held = labelled_split(labels, 0.2)
    assert [labels[i] for i in held] == [0, 1, 2] and sorted(train + held) == list(range(15))
    assert labelled_split(labels, 0.2) == (train, held)
    # subsample keeps the class balance
    keep = subsample(labels, 6)
    assert [labels[i] for i in keep] == [0, 0, 1, 1, 2, 2]
    # a separate validation folder: its classes mapped to the reference set's indices
    _image_folder(tmp_path / "val", 2, classes=("dog", "owl"))
    tr, va = knn_sets(str(root), str(tmp_path / "val"))
    assert len(tr) == 15 and va.labels == [1, 1, 2, 2]
    tr, va = knn_sets(str(root), max_images=6)
    assert len(tr) == 6 and len(va) == 3
    # the built-in demo images, labelled by kind, none of them a pre-training image (those are 0..N-1)
    b = builtin_labelled_images(8, "val")
    assert b.classes == list(BUILTIN_CLASSES) and b.labels == [0, 1, 2, 3] * 2 and b.paths[0] == "<builtin:2000000>"


def test_unreadable_images_are_left_out_and_counted(tmp_path):
    root = _image_folder(tmp_path / "train", 3, classes=("a", "b"))
    (root / "a" / "broken.png").write_bytes(b"not a png")
    tr, va = knn_sets(str(root), str(root), transform=eval_transform(32))
    bb = create_backbone("resnet18", depths=[1, 1, 1, 1])
    r = KnnMonitor(tr, va, "resnet18", {"depths": [1, 1, 1, 1]}, batch_size=3, k=3).evaluate(bb)
    assert r["unreadable"] == 2 and r["n"] == 6  # one bad file in each set; 6 readable validation images


# ----------------------------------------------------------------------------- one process == two processes
def _tiny_sets():
    t = eval_transform(32)
    return builtin_labelled_images(7, "train", 48, t), builtin_labelled_images(5, "val", 48, t)


def _tiny_backbone():
    torch.manual_seed(3)
    return randomize_weights_(create_backbone("resnet18", depths=[1, 1, 1, 1]), torch.Generator().manual_seed(3))


def _monitor_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    train, val = _tiny_sets()
    bb = _tiny_backbone()
    monitor = KnnMonitor(train, val, "resnet18", {"depths": [1, 1, 1, 1]}, batch_size=2, k=3)
    result = monitor.evaluate(bb)
    feats, labels, ok = extract_features(monitor.encoder_like(bb), train, batch_size=2)  # 4 + 3 rows: uneven
    torch.save({"result": {k: result[k] for k in ("top1", "top5", "n")}, "features": feats, "ok": ok},
               os.path.join(out_dir, f"rank{rank}.pth"))
    torch.distributed.destroy_process_group()


def test_monitor_same_with_one_and_two_processes(tmp_path):
    import torch.multiprocessing as mp
    train, val = _tiny_sets()
    bb = _tiny_backbone()
    monitor = KnnMonitor(train, val, "resnet18", {"depths": [1, 1, 1, 1]}, batch_size=2, k=3)
    single = monitor.evaluate(bb)
    feats, _, ok = extract_features(monitor.encoder_like(bb), train, batch_size=2)
    assert feats.shape == (7, 512) and bool(ok.all())
    mp.start_processes(_monitor_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pth", weights_only=True)
        assert got["result"] == {k: single[k] for k in ("top1", "top5", "n")}
        assert torch.equal(got["features"], feats)  # the same batches -> bit-identical rows, in dataset order


# ----------------------------------------------------------------------------- spark-knn
def _official_files(tmp_path):
    """An official *_withdecoder_1kpretrained_spark_style.pth and *_1kpretrained_timm_style.pth of one encoder."""
    import torchvision
    tv = randomize_weights_(torchvision.models.resnet18(), torch.Generator().manual_seed(5)).eval()
    encoder = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    module = {f"sparse_encoder.sp_cnn.{k}": v for k, v in encoder.items()}
    module.update({"dense_decoder.dec.0.up_sample.weight": torch.randn(4, 4, 4, 4),
                   "mask_tokens.0": torch.randn(1, 512, 1, 1), "imn_m": torch.zeros(1, 3, 1, 1),
                   "config": {"mask_ratio": 0.6, "sparse_encoder.input_size": 64, "dense_decoder.width": 768}})
    spark_style = tmp_path / "resnet18_withdecoder_1kpretrained_spark_style.pth"
    torch.save({"args": "Namespace(...)", "arch": "resnet18", "input_size": 64, "epoch": 1599, "module": module,
                "is_pretrain": True}, spark_style)
    timm_style = tmp_path / "resnet18_1kpretrained_timm_style.pth"
    torch.save(encoder, timm_style)
    return tv, spark_style, timm_style


def test_spark_knn_reads_official_files(tmp_path, capsys):
    tv, spark_style, timm_style = _official_files(tmp_path)
    train_root = _image_folder(tmp_path / "train", 4, size=72)
    val_root = _image_folder(tmp_path / "val", 2, size=72)
    # the expected numbers, computed with torchvision's own ResNet-18 (its average pool is the pooled feature)
    tv.fc = torch.nn.Identity()
    tr, va = knn_sets(str(train_root), str(val_root), transform=eval_transform(64))
    with torch.no_grad():
        ftr = tv(torch.stack([tr[i][0] for i in range(len(tr))]))
        fva = tv(torch.stack([va[i][0] for i in range(len(va))]))
    expected = weighted_knn(ftr, torch.tensor(tr.labels), fva, torch.tensor(va.labels), k=5, temperature=0.07)
    args = ["--train", str(train_root), "--val", str(val_root), "--k", "5", "--no-progress", "--num-workers", "0",
            "--device", "cpu"]
    assert cli.knn([str(spark_style)] + args + ["--linear-probe", "3"]) == 0
    out = capsys.readouterr().out
    assert "resnet18 (official SparK *_withdecoder_* file), 64x64, 12 reference / 6 validation images, 3 classes" \
        in out
    assert f"k-NN (k=5, T=0.07): top-1 {expected['top1']:.1f} %, top-5 {expected['top5']:.1f} %" in out
    assert "linear probe (3 epochs): top-1" in out
    # the timm-style file does not name its architecture: --backbone
    assert cli.knn([str(timm_style)] + args) == 1
    assert "--backbone" in capsys.readouterr().err
    assert cli.knn([str(timm_style), "--backbone", "resnet18", "--img-size", "64"] + args) == 0
    assert f"top-1 {expected['top1']:.1f} %, top-5 {expected['top5']:.1f} %" in capsys.readouterr().out


# ----------------------------------------------------------------------------- inside pre-training
def test_pretraining_monitor_logs_and_matches_the_checkpoint(tmp_path, monkeypatch):
    from sparse_mim.spark import SparK
    from sparse_mim.train import DEFAULTS, pretrain, validate_config
    from sparse_mim.utils.config import load_config
    from tests.pretrain.test_pretrain import TINY
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = _image_folder(tmp_path / "labelled", 4, size=72)
    common = TINY + ["data.builtin_images=8", "data.batch_size=2", "train.epochs=2", "eval.knn_every=0.5",
                     f"eval.knn_root={root}", "eval.knn_val_fraction=0.25", "eval.knn_k=5",
                     "checkpoint.every_steps=2", "checkpoint.export_backbone=false"]
    s = pretrain(load_config(DEFAULTS, None, common + [f"output_dir={tmp_path / 'run'}"], validate=validate_config))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    knn_rows = [r for r in rows if "knn/top1" in r]
    assert [r["step"] for r in knn_rows] == [0, 2, 4, 6, 8]  # start, every half epoch (2 steps), end at 8
    assert [r["train/images_seen"] for r in knn_rows] == [0, 4, 8, 12, 16]
    base = [r for r in rows if "knn/top1_random_init" in r]
    assert len(base) == 1 and base[0]["knn/top1_random_init"] == knn_rows[0]["knn/top1"]
    assert s["knn"]["end"]["top1"] == knn_rows[-1]["knn/top1"] and s["knn"]["end"]["step"] == 8
    # every key the dashboard table of docs/pretraining.md names is one the run logs
    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "pretraining.md")).read()
    table = doc.split("### The dashboard")[1].split("\n\n")[2]
    documented = set(re.findall(r"`((?:train|knn|sys)/\w+)`", table))
    logged = {k for r in rows for k in r}
    assert len(documented) >= 12 and documented <= logged, documented - logged
    # the last number is the k-NN of the final weights (rebuilt from the checkpoint, dense encoder)
    model = SparK.from_checkpoint(str(tmp_path / "run" / "last.pth"))
    tr, va = knn_sets(str(root), val_fraction=0.25, transform=eval_transform(64))
    again = KnnMonitor(tr, va, "resnet18", {"depths": [1, 1, 1, 1]}, batch_size=64, k=5).evaluate(model.backbone)
    assert again["top1"] == s["knn"]["end"]["top1"] and again["top5"] == s["knn"]["end"]["top5"]
    # and spark-knn on our own checkpoint (architecture and input size from the file) says the same
    from sparse_mim.knn import evaluate_checkpoint
    r = evaluate_checkpoint(str(tmp_path / "run" / "last.pth"), str(root), val_fraction=0.25, k=5, device="cpu",
                            progress=False)
    assert (r["kind"], r["input_size"]) == ("sparse_mim pre-training checkpoint", [64, 64])
    assert (r["knn"]["top1"], r["knn"]["top5"]) == (again["top1"], again["top5"])
    # resumed: the random-init baseline is computed again from the run's seed and equals the fresh run's
    cut = pretrain(load_config(DEFAULTS, None, common + [f"output_dir={tmp_path / 'cut'}", "train.stop_at_step=3"],
                               validate=validate_config))
    assert cut["knn"] is None  # stopped: no final evaluation
    resumed = pretrain(load_config(DEFAULTS, None, common + [f"output_dir={tmp_path / 'cut'}", "resume=auto"],
                                   validate=validate_config))
    assert resumed["knn"]["random_init"]["top1"] == s["knn"]["random_init"]["top1"]
    assert resumed["knn"]["end"]["top1"] == s["knn"]["end"]["top1"]
