"""fgvc.Predictor / fgvc-predict on a tiny checkpoint in the training-checkpoint format (CPU, seconds)."""
import csv
import math
import os

import numpy as np
import pytest
import torch

import fgvc
from fgvc.data.meta import encode_lat_lon, encode_month_hour
from fgvc.predict import Predictor, check_same_classes, read_meta_csv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ["disc0_north", "disc0_south", "square1_summer", "square1_winter"]
GROUPS = [{"name": "when", "dim": 4, "tokens": 1, "kind": "temporal"},
          {"name": "where", "dim": 3, "tokens": 1, "kind": "spatial"}]


def save_tiny_checkpoint(path, groups=GROUPS, classes=CLASSES, img_size=32, kind=True, seed=0):
    """A model + config + class list + meta layout, saved as the trainer's best.pth is."""
    from sparse_mim.utils.checkpoint import save_checkpoint
    torch.manual_seed(seed)
    model = fgvc.create_model("metaformer_tiny", num_classes=len(classes), img_size=img_size,
                              meta_dims=[g["dim"] for g in groups], drop_path_rate=0.0)
    with torch.no_grad():  # make the meta path matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    specs = [{"name": "when", "type": "date", "columns": ["obs_date"]},
             {"name": "where", "type": "latlon", "columns": ["y", "x"]}]
    cfg = {"model": {"name": "metaformer_tiny", "img_size": img_size, "drop_path_rate": 0.1, "kwargs": None},
           "data": {"dataset": "custom", "train_csv": "train.csv", "meta_groups": specs[:len(groups)],
                    "use_hour": True}}
    meta_groups = [dict(g) if kind else {k: v for k, v in g.items() if k != "kind"} for g in groups]
    save_checkpoint({"model": model.state_dict(), "config": cfg, "classes": list(classes),
                     "meta_groups": meta_groups, "train_state": {"epoch": 3}}, path)
    return model.eval()


def _photo(path, colour=(200, 40, 40), size=(40, 48)):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.new("RGB", size, colour)
    img.putpixel((3, 5), (0, 255, 0))
    img.save(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    model = save_tiny_checkpoint(str(d / "best.pth"))
    return str(d / "best.pth"), model


def _expected_logits(model, path, meta, present):
    from fgvc.data import build_transform
    from fgvc.data.dataset import load_image
    x = build_transform(False, 32)(load_image(path))[None]
    with torch.no_grad():
        return model(x, torch.as_tensor(meta, dtype=torch.float32)[None], torch.as_tensor(present)[None])


def test_predictor_equals_the_model_with_encoded_meta(ckpt, tmp_path):
    path, model = ckpt
    img = _photo(str(tmp_path / "a.png"))
    pred = Predictor.from_checkpoint(path, device="cpu", amp="off")
    assert pred.classes == CLASSES and [g.encoder for g in pred.meta_groups] == ["temporal", "spatial"]
    out = pred(img, date="2021-06-14T09:30", lat=48.85, lon=2.35, topk=3)
    meta = np.concatenate([encode_month_hour(6, 9), encode_lat_lon(48.85, 2.35)])
    probs = _expected_logits(model, img, meta, [True, True]).softmax(-1)[0]
    top = probs.topk(3)
    assert [c for c, _ in out.topk] == [CLASSES[i] for i in top.indices.tolist()]
    np.testing.assert_allclose([p for _, p in out.topk], top.values.numpy(), rtol=1e-5, atol=1e-6)
    assert out.meta_used == {"when": "month 6, hour 9", "where": "lat 48.85, lon 2.35"}
    assert out.label == out.topk[0][0] and "month 6, hour 9" in str(out)


def test_any_subset_of_meta_missing_takes_the_missing_path(ckpt, tmp_path):
    path, model = ckpt
    img = _photo(str(tmp_path / "b.png"), colour=(30, 90, 200))
    pred = Predictor.from_checkpoint(path, device="cpu", amp="off")
    cases = [({}, [False, False]), ({"date": "2020-12-01"}, [True, False]), ({"lat": -33.9, "lon": 18.4}, [False, True])]
    for kw, present in cases:
        out = pred(img, topk=4, **kw)
        meta = np.zeros(7, np.float32)
        if present[0]:
            meta[:4] = encode_month_hour(12, None)
        if present[1]:
            meta[4:] = encode_lat_lon(-33.9, 18.4)
        probs = _expected_logits(model, img, meta, present).softmax(-1)[0]
        got = dict(out.topk)
        np.testing.assert_allclose([got[c] for c in CLASSES], probs.numpy(), rtol=1e-5, atol=1e-6)
        assert [v == "missing" for v in out.meta_used.values()] == [not p for p in present]
    # the meta changes the answer (the missing path is not the same as the full one)
    assert pred(img, topk=4).topk != pred(img, date="2020-06-01", lat=60.0, lon=10.0, topk=4).topk
    with pytest.raises(ValueError, match="latitude 95.0 out of range"):
        pred(img, lat=95, lon=0)
    with pytest.raises(ValueError, match="month 13"):
        pred(img, date="2020-13-01")
    with pytest.raises(ValueError, match="both lat and lon"):
        pred(img, lat=10)


def test_batch_with_per_image_meta_equals_single_calls(ckpt, tmp_path):
    path, _ = ckpt
    pred = Predictor.from_checkpoint(path, device="cpu", amp="off")
    imgs = [_photo(str(tmp_path / f"{i}.png"), colour=(40 * i, 200 - 30 * i, 90)) for i in range(5)]
    metas = [{"date": "2021-0%d-02" % (i + 1)} if i % 2 else {"lat": 10.0 * i, "lon": -20.0 * i} for i in range(5)]
    batch = pred.predict_batch(imgs, metas, topk=2, batch_size=3)
    for img, m, b in zip(imgs, metas, batch):
        single = pred(img, topk=2, **m)
        assert [c for c, _ in single.topk] == [c for c, _ in b.topk]
        np.testing.assert_allclose([p for _, p in single.topk], [p for _, p in b.topk], rtol=1e-4, atol=1e-5)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out = pred.predict_batch([imgs[0], str(tmp_path / "broken.png")], topk=2)
    assert out[0].topk and not out[1].topk and out[1].error


def test_old_checkpoint_without_kind_reads_group_types_from_the_config(tmp_path):
    save_tiny_checkpoint(str(tmp_path / "best.pth"), kind=False)
    pred = Predictor.from_checkpoint(str(tmp_path / "best.pth"), device="cpu", amp="off")
    assert [g.encoder for g in pred.meta_groups] == ["temporal", "spatial"]
    assert pred.custom_columns == {"when": ["obs_date"], "where": ["y", "x"]}


def test_cli_prints_topk_writes_csv_and_uses_the_meta_csv(ckpt, tmp_path, capsys):
    from fgvc.cli import predict
    path, _ = ckpt
    folder = tmp_path / "photos"
    for i in range(3):
        _photo(str(folder / ("sub" if i == 2 else "") / f"p{i}.png"), colour=(60 * i, 100, 30))
    with open(tmp_path / "meta.csv", "w") as f:
        f.write("path,obs_date,y,x\np0.png,2021-06-14 09:30,48.85,2.35\np1.png,,,\n")
    out_csv = tmp_path / "pred.csv"
    rc = predict([path, str(folder), "--meta-csv", str(tmp_path / "meta.csv"), "--topk", "2", "--out", str(out_csv),
                  "--device", "cpu", "--amp", "off"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "metaformer_tiny: 4 classes" in text and "when (date, 4-d)" in text
    assert "1 of 3 images have no row" in text and "3 image(s) classified" in text
    rows = list(csv.DictReader(open(out_csv)))
    assert [os.path.basename(r["path"]) for r in rows] == ["p0.png", "p1.png", "p2.png"]  # sorted, recursive
    assert rows[0]["meta_used"] == "when: month 6, hour 9; where: lat 48.85, lon 2.35"
    assert rows[1]["meta_used"] == "when: missing; where: missing"
    assert set(rows[0]) >= {"top1", "top1_prob", "top2", "top2_prob"} and rows[0]["top1"] in CLASSES
    # the same meta on the command line as in the CSV gives the same answer
    rc = predict([path, str(folder / "p0.png"), "--date", "2021-06-14T09:30", "--lat", "48.85", "--lon", "2.35",
                  "--topk", "2", "--out", "", "--device", "cpu", "--amp", "off", "--quiet"])
    assert rc == 0
    table = read_meta_csv(str(tmp_path / "meta.csv"), Predictor.from_checkpoint(path, device="cpu", amp="off"))
    assert table["p0.png"]["meta"] == {"when": "2021-06-14 09:30", "where": (48.85, 2.35)}


def test_cli_errors_are_one_line(ckpt, tmp_path, capsys):
    from fgvc.cli import predict
    path, _ = ckpt
    img = _photo(str(tmp_path / "x.png"))
    assert predict([str(tmp_path / "nope.pth"), img]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "resume=auto" not in err and len(err.strip().splitlines()) == 1
    assert predict([os.path.dirname(path), img]) == 1
    err = capsys.readouterr().err
    assert "is a folder" in err and "best.pth" in err
    assert predict([path, img, "--lat", "10"]) == 2
    assert "--lat and --lon go together" in capsys.readouterr().err
    torch.save({"model": fgvc.create_model("metaformer_tiny", num_classes=3, img_size=32).state_dict()},
               tmp_path / "weights.pth")
    assert predict([str(tmp_path / "weights.pth"), img]) == 1
    assert "not an fgvc training checkpoint" in capsys.readouterr().err


def test_checkpoint_of_another_variant_and_class_mismatch_messages(tmp_path):
    path = str(tmp_path / "best.pth")
    save_tiny_checkpoint(path)
    ck = torch.load(path, weights_only=True)
    ck["config"]["model"]["kwargs"] = {"attn_depths": [2, 1]}  # the config no longer matches the weights
    torch.save(ck, path)
    with pytest.raises(ValueError) as e:
        Predictor.from_checkpoint(path, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "but the model is" in msg and "blocks 1/1/1/1" in msg and "blocks 1/1/2/1" in msg
    with pytest.raises(ValueError, match=r"checkpoint has 200 classes \(CUB\), data has 555 \(NABirds\)"):
        check_same_classes([str(i) for i in range(200)], [str(i) for i in range(555)], "CUB", "NABirds")
    with pytest.raises(ValueError, match=r"class 1 is 'b' in the checkpoint, 'x' in the data"):
        check_same_classes(["a", "b", "c"], ["a", "x", "c"])
    check_same_classes(["a"], ["a"])


def test_non_finite_weights_are_refused(tmp_path):
    path = str(tmp_path / "best.pth")
    save_tiny_checkpoint(path)
    ck = torch.load(path, weights_only=True)
    ck["model"]["head.bias"][0] = math.nan
    torch.save(ck, path)
    with pytest.raises(Exception, match="NaN or inf"):
        Predictor.from_checkpoint(path, device="cpu")


def test_attributes_file_forms(tmp_path):
    groups = [{"name": "attributes", "dim": 12, "tokens": 1, "kind": "numeric"}]
    path = str(tmp_path / "best.pth")
    save_tiny_checkpoint(path, groups=groups)
    pred = Predictor.from_checkpoint(path, device="cpu", amp="off")
    vec = np.zeros(12, np.float32)
    vec[[1, 4]] = 1
    (tmp_path / "dense.txt").write_text(" ".join(str(int(v)) for v in vec))
    (tmp_path / "pairs.txt").write_text("2 1\n5 1\n7 0\n")
    for src in (vec.tolist(), str(tmp_path / "dense.txt"), str(tmp_path / "pairs.txt")):
        v, present, used, _ = pred.encode_meta(attributes=src)
        np.testing.assert_array_equal(v, vec)
        assert present.tolist() == [True] and used["attributes"] == "2 of 12 non-zero"
    _, _, _, notes = pred.encode_meta(date="2020-01-01")
    assert notes == ["date given but the model has no group that takes it: ignored"]
    with pytest.raises(ValueError, match="expects 12"):
        pred.encode_meta(attributes=[1, 0])


def test_end_to_end_on_a_trained_demo_checkpoint(tmp_path, capsys):
    """fgvc-train (1 epoch of the CPU demo) -> best.pth -> fgvc-predict with the demo's own meta CSV."""
    from fgvc.cli import predict, train
    out = tmp_path / "run"
    assert train([f"output_dir={out}", "train.epochs=1", "wandb.enabled=false", "log.progress=false"]) == 0
    capsys.readouterr()
    test_csv = out / "demo_data" / "test.csv"
    rows = list(csv.DictReader(open(test_csv)))[:4]
    images = [str(out / "demo_data" / r["path"]) for r in rows]
    assert predict([str(out / "best.pth"), *images, "--meta-csv", str(test_csv), "--topk", "3",
                    "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "metaformer_tiny: 8 classes, 32 px" in text and "4 image(s) classified" in text
    got = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(got) == 4 and all(r["meta_used"].startswith("temporal: month ") for r in got)
    assert all("spatial: lat " in r["meta_used"] for r in got)


def test_eval_on_another_dataset_names_both_class_counts(tmp_path):
    from fgvc.evaluate import evaluate_checkpoint
    from tests.fgvc.test_fgvc_data import _make_cub
    path = str(tmp_path / "best.pth")
    save_tiny_checkpoint(path)
    root = str(tmp_path / "CUB")
    _make_cub(root, n_classes=3)
    with pytest.raises(ValueError, match=r"^checkpoint has 4 classes \(custom train\.csv\), data has 3 \(CUB: cub/test\)"):
        evaluate_checkpoint(path, None, ["data.dataset=cub", f"data.root={root}", "wandb.enabled=false"])


def test_eval_with_another_variant_is_one_line(tmp_path):
    from fgvc.evaluate import evaluate_checkpoint
    from tests.fgvc.test_fgvc_data import _make_cub
    root = str(tmp_path / "CUB")
    _make_cub(root, n_classes=3)
    path = str(tmp_path / "best.pth")
    save_tiny_checkpoint(path, groups=[], classes=[f"{c:03d}.Bird_{c}" for c in range(1, 4)])
    with pytest.raises(ValueError) as e:
        evaluate_checkpoint(path, None, ["data.dataset=cub", f"data.root={root}", "wandb.enabled=false",
                                         "model.kwargs={attn_depths: [1, 2]}"])
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint is metaformer_tiny" in msg and "blocks 1/1/1/2" in msg, msg
