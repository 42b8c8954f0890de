"""fgvc.data: readers on tiny fixtures in the official formats, meta encoders, split, bad images."""
import json
import math
import os

import numpy as np
import pytest
import torch

from fgvc.data import (FGVCDataset, build_records, build_transform, collate_skip_bad, read_cub, read_custom_csv,
                       read_inat, read_nabirds, stratified_split)
from fgvc.data.meta import (MetaGroup, MetaIssues, describe_meta, encode_lat_lon, encode_month_hour, parse_date,
                            spatial_from_lat_lon, temporal_from_date)


def _png(path, colour=(200, 30, 30), size=8):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------- encoders
def test_spatio_temporal_encoding_values():
    v = encode_month_hour(3, 6)
    np.testing.assert_allclose(v, [math.sin(math.pi / 2), math.cos(math.pi / 2), 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(encode_lat_lon(0.0, 0.0), [1, 0, 0], atol=1e-7)  # 0.0 is the equator, not "missing"
    np.testing.assert_allclose(encode_lat_lon(90.0, 123.0), [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(encode_lat_lon(0.0, 90.0), [0, 1, 0], atol=1e-6)
    issues = MetaIssues()
    v, ok = spatial_from_lat_lon(0.0, 0.0, issues, "f", 1)
    assert ok and v[0] == 1.0 and not issues
    v, ok = spatial_from_lat_lon("", "12", issues, "f", 2)  # truly missing -> zeros, not an issue
    assert not ok and not v.any() and not issues
    v, ok = spatial_from_lat_lon(95.0, 10.0, issues, "loc.json", 3)  # out of range -> reported with the line
    assert not ok and not v.any() and issues.total("bad coordinate") == 1
    assert "line 3" in issues.summary() and "latitude 95.0" in issues.summary()
    v, ok = temporal_from_date("2020-13-01", issues, "x.csv", 7)
    assert not ok and not v.any() and "month 13" in issues.summary()
    v, ok = temporal_from_date("2011-06-16", issues, "x.csv", 8)  # no hour: hour pair zeros
    assert ok and v[2] == 0 and v[3] == 0 and abs(v[1] - math.cos(math.pi)) < 1e-6
    assert parse_date("2010-06-13 17:35:00+00:00") == (2010, 6, 13, 17)
    groups = [MetaGroup("temporal", 4), MetaGroup("spatial", 3)]
    text = describe_meta(groups, np.concatenate([encode_month_hour(11, 5), encode_lat_lon(-33.5, 151.25)]), [1, 1])
    assert text == {"temporal": "month 11, hour 5", "spatial": "lat -33.50, lon 151.25"}


# ------------------------------------------------------------------------------------------- CUB / NABirds
def write_cub(root, items, colour=lambda c: (200, 30, 30), size=8):
    """A CUB-200-2011 layout with one image per ``(class, is_training_image)`` of ``items`` (classes from 1);
    returns the number of images."""
    images, labels, split = [], [], []
    for k, (c, is_train) in enumerate(items, 1):
        rel = f"{c:03d}.Bird_{c}/img_{k}.jpg"
        _png(os.path.join(root, "images", rel), colour=colour(c), size=size)
        images.append(f"{k} {rel}")
        labels.append(f"{k} {c}")
        split.append(f"{k} {int(is_train)}")
    n_classes = max(c for c, _ in items)
    _write(os.path.join(root, "images.txt"), "\n".join(images) + "\n")
    _write(os.path.join(root, "image_class_labels.txt"), "\n".join(labels) + "\n")
    _write(os.path.join(root, "train_test_split.txt"), "\n".join(split) + "\n")
    _write(os.path.join(root, "classes.txt"), "".join(f"{c} {c:03d}.Bird_{c}\n" for c in range(1, n_classes + 1)))
    return len(items)


def _make_cub(root, n_classes=3, per_class=2):
    """Each class: its first image for training, the rest for testing."""
    return write_cub(root, [(c, j == 0) for c in range(1, n_classes + 1) for j in range(per_class)])


def test_cub_reader_with_attributes_and_bad_lines(tmp_path):
    root = str(tmp_path / "CUB_200_2011")
    n = _make_cub(root)
    lines = []
    for img in range(1, n + 1):
        for a in range(1, 313):
            lines.append(f"{img} {a} {int((img + a) % 3 == 0)} 3 12.5")
    lines[5] = "1 6 1 3 0 27.7051"            # official quirk: an extra field before the time -> still read
    lines[7] = "1 8 1"                        # malformed: too few fields -> reported, skipped
    lines[9] = "1 10 7 3 1.0"                 # is_present out of range -> reported
    _write(os.path.join(root, "attributes", "image_attribute_labels.txt"), "\n".join(lines) + "\n")
    rec = read_cub(root, "train", attributes=True, num_classes=3)
    assert len(rec) == 3 and rec.labels.tolist() == [0, 1, 2] and rec.meta_dims == [312]
    assert rec.classes[0] == "001.Bird_1"
    assert rec.meta[0, 5] == 1.0                                   # the 6-field line was used
    assert rec.meta[0, 7] == 0.0 and rec.meta[0, 9] == 0.0
    expected = [float((1 + a) % 3 == 0) for a in range(1, 313)]
    expected[5], expected[7], expected[9] = 1.0, 0.0, 0.0
    np.testing.assert_array_equal(rec.meta[0], expected)
    assert rec.meta_present.all()
    assert rec.issues.total("bad line") == 1 and rec.issues.total("bad attribute") == 1
    assert "line 8" in rec.issues.summary() and "line 10" in rec.issues.summary()
    test = read_cub(root, "test", num_classes=3)
    assert len(test) == 3 and test.meta_dims == []
    with pytest.raises(ValueError, match="strict"):
        read_cub(root, "train", attributes=True, num_classes=3, strict=True)


def test_cub_missing_files_and_labels(tmp_path):
    root = str(tmp_path / "cub")
    _make_cub(root)
    with open(os.path.join(root, "image_class_labels.txt"), "a") as f:
        f.write("7 999\n")                                         # label out of range
    with open(os.path.join(root, "images.txt"), "a") as f:
        f.write("7 999.Nope/x.jpg\n8 001.Bird_1/missing.jpg\n")
    with open(os.path.join(root, "train_test_split.txt"), "a") as f:
        f.write("7 1\n8 1\n")
    with open(os.path.join(root, "image_class_labels.txt"), "a") as f:
        f.write("8 1\n")
    rec = read_cub(root, "train", num_classes=3)
    assert len(rec) == 3
    assert rec.issues.total("label out of range") == 1 and rec.issues.total("missing image") == 1
    os.remove(os.path.join(root, "train_test_split.txt"))
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        read_cub(root, "train")
    with pytest.raises(FileNotFoundError, match="image_attribute_labels"):
        _make_cub(root)
        read_cub(root, "train", attributes=True)


def test_nabirds_sorted_ids_remapped(tmp_path):
    root = str(tmp_path / "nabirds")
    ids = ["0a1b-c", "ff-02", "13-x", "77"]
    raw = [817, 295, 817, 1010]
    for i, (u, r) in enumerate(zip(ids, raw)):
        _png(os.path.join(root, "images", f"{r:04d}", f"{u}.jpg"))
    _write(os.path.join(root, "images.txt"), "".join(f"{u} {r:04d}/{u}.jpg\n" for u, r in zip(ids, raw)))
    _write(os.path.join(root, "image_class_labels.txt"), "".join(f"{u} {r}\n" for u, r in zip(ids, raw)))
    _write(os.path.join(root, "train_test_split.txt"), "".join(f"{u} 1\n" for u in ids))
    _write(os.path.join(root, "classes.txt"), "0 Birds\n295 Sparrow\n817 Finch\n1010 Gull\n")
    rec = read_nabirds(root, "train", num_classes=None)
    assert rec.classes == ["Sparrow", "Finch", "Gull"]              # sorted class ids 295 < 817 < 1010
    assert rec.labels.tolist() == [1, 0, 1, 2]


# ------------------------------------------------------------------------------------------- iNaturalist
def _inat_ann(root, split, year, images, cats=(3, 5)):
    anns = [{"id": i, "image_id": im["id"], "category_id": im.pop("cat")} for i, im in enumerate(images)]
    for im in images:
        _png(os.path.join(root, im["file_name"]))
    name = f"{split}{year}.json" if year != 2021 else f"{split}.json"
    _write(os.path.join(root, name), json.dumps({
        "images": images, "annotations": anns,
        "categories": [{"id": c, "name": f"sp{c}", "supercategory": "Aves"} for c in cats]}))


@pytest.mark.parametrize("year", [2017, 2018])
def test_inat_2017_2018_locations(tmp_path, year):
    root = str(tmp_path / f"inat{year}")
    _inat_ann(root, "train", year, [
        {"id": 10, "file_name": "train_val_images/Aves/sp3/a.jpg", "cat": 3},
        {"id": 11, "file_name": "train_val_images/Aves/sp5/b.jpg", "cat": 5},
        {"id": 12, "file_name": "train_val_images/Aves/sp5/c.jpg", "cat": 5},
        {"id": 13, "file_name": "train_val_images/Aves/sp3/d.jpg", "cat": 3},
    ])
    _write(os.path.join(root, f"train{year}_locations.json"), json.dumps([
        {"id": 10, "lat": 0.0, "lon": 0.0, "date": "2014-06-08 17:00:00+00:00", "loc_uncert": 10},
        {"id": 11, "lat": None, "lon": None, "date": "", "loc_uncert": None},
        {"id": 12, "lat": 120.0, "lon": 5.0, "date": "2014-13-01", "loc_uncert": 5},
    ]))  # id 13 has no location entry at all
    if year == 2018:
        _write(os.path.join(root, "categories.json"), json.dumps([{"id": 3, "name": "Turdus"}, {"id": 5, "name": "Parus"}]))
    rec = read_inat(root, year, "train")
    assert rec.labels.tolist() == [0, 1, 1, 0] and rec.meta_dims == [4, 3]
    if year == 2018:
        assert rec.classes == ["Turdus", "Parus"]
    np.testing.assert_allclose(rec.meta[0], np.concatenate([encode_month_hour(6, 17), [1, 0, 0]]), atol=1e-6)
    assert rec.meta_present.tolist() == [[True, True], [False, False], [False, False], [False, False]]
    assert not rec.meta[1:].any()
    assert rec.issues.total("bad coordinate") == 1 and rec.issues.total("bad date") == 1
    assert f"train{year}_locations.json" in rec.issues.summary() and "id 12" in rec.issues.summary()
    with pytest.raises(FileNotFoundError, match=f"val{year}.json"):
        read_inat(root, year, "val")


def test_inat2021_per_image_meta_and_label_check(tmp_path):
    root = str(tmp_path / "inat21")
    _inat_ann(root, "train_mini", 2021, [
        {"id": 1, "file_name": "train_mini/00000_a/1.jpg", "cat": 0, "date": "2010-06-13 17:35:00+00:00",
         "latitude": -33.5, "longitude": 151.2},
        {"id": 2, "file_name": "train_mini/00001_b/2.jpg", "cat": 1, "date": "2012-12-01",
         "latitude": None, "longitude": None},
        {"id": 3, "file_name": "train_mini/00001_b/3.jpg", "cat": 7, "date": "2012-12-01",
         "latitude": 1.0, "longitude": 2.0},
    ], cats=(0, 1))
    rec = read_inat(root, 2021, "train_mini")
    assert len(rec) == 2 and rec.labels.tolist() == [0, 1]
    assert rec.issues.total("label out of range") == 1
    np.testing.assert_allclose(rec.meta[0, 4:], encode_lat_lon(-33.5, 151.2), atol=1e-6)
    assert rec.meta_present.tolist() == [[True, True], [True, False]]
    cfg = {"dataset": "inat2021", "root": root, "train_split": "train_mini", "use_meta": False}
    assert build_records(cfg, "train").meta_dims == []


# ------------------------------------------------------------------------------------------- custom CSV
def test_custom_csv_groups_labels_and_bad_rows(tmp_path):
    root = tmp_path / "mydata"
    for i in range(4):
        _png(str(root / "imgs" / f"{i}.png"))
    _write(str(root / "train.csv"),
           "path,label,lat,lon,date,depth,temp\n"
           "imgs/0.png,owl,10.5,20,2020-01-05,3.5,\n"
           "imgs/1.png,hawk,,,,x,1\n"
           "imgs/2.png,owl,-91,0,2020-13-02,1,2\n"
           "imgs/3.png,hawk,0,0,2021-07-01 12:00,0,0\n"
           "imgs/404.png,owl,0,0,2021-07-01,0,0\n")
    _write(str(root / "test.csv"), "path,label,lat,lon,date,depth,temp\nimgs/0.png,eagle,1,1,2020-01-01,1,1\n"
                                   "imgs/1.png,owl,1,1,2020-01-01,1,1\n")
    meta = [{"name": "when", "type": "date", "columns": ["date"]},
            {"name": "where", "type": "latlon", "columns": ["lat", "lon"]},
            {"name": "env", "type": "numeric", "columns": ["depth", "temp"]}]
    cfg = {"dataset": "custom", "root": str(root), "train_csv": "train.csv", "test_csv": "test.csv",
           "meta_groups": meta}
    rec = build_records(cfg, "train")
    assert rec.classes == ["hawk", "owl"] and rec.labels.tolist() == [1, 0, 1, 0]
    assert rec.meta_dims == [4, 3, 2]
    assert rec.meta_present.tolist() == [[True, True, True], [False, False, True], [False, False, True],
                                         [True, True, True]]
    np.testing.assert_allclose(rec.meta[3, 4:7], [1, 0, 0], atol=1e-7)   # (0, 0) is a place
    np.testing.assert_allclose(rec.meta[0, 7:], [3.5, 0.0])
    s = rec.issues.summary()
    assert "line 4" in s and "latitude -91" in s and "month 13" in s and "line 6" in s and "missing image" in s
    assert rec.issues.total("bad number") == 1                         # "x" in line 3
    test = build_records(cfg, "test")
    assert len(test) == 1 and test.issues.total("label out of range") == 1   # 'eagle' is not a train class
    with pytest.raises(ValueError, match="not in the CSV header"):
        read_custom_csv(str(root / "train.csv"), meta=[{"type": "latlon", "columns": ["lat", "longitude"]}])
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        build_records({**cfg, "test_csv": "nope.csv"}, "test")


def test_stratified_split_is_seeded_and_per_class():
    labels = np.repeat(np.arange(5), [10, 10, 3, 1, 20])
    tr, va = stratified_split(labels, 0.2, seed=3)
    tr2, va2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert not set(tr) & set(va) and len(tr) + len(va) == len(labels)
    counts = np.bincount(labels[va], minlength=5)
    assert counts.tolist() == [2, 2, 1, 0, 4]                          # 20 % per class; a singleton stays in train
    assert not np.array_equal(stratified_split(labels, 0.2, seed=4)[1], va)


# ------------------------------------------------------------------------------------------- dataset
def test_unreadable_image_is_skipped_and_counted(tmp_path):
    root = tmp_path / "d"
    _png(str(root / "good.png"))
    _png(str(root / "good2.png"), colour=(0, 0, 255))
    _write(str(root / "bad.png"), "this is not a png")
    _write(str(root / "train.csv"), "path,label,month\ngood.png,0,3\nbad.png,1,4\ngood2.png,1,\n")
    rec = read_custom_csv(str(root / "train.csv"), meta=[{"type": "month_hour", "columns": ["month"]}])
    ds = FGVCDataset(rec, build_transform(False, 32))
    with pytest.warns(UserWarning, match="bad.png"):
        batch = collate_skip_bad([ds[i] for i in range(3)])
    assert batch["skipped"] == 1 and batch["images"].shape == (2, 3, 32, 32)
    assert batch["labels"].tolist() == [0, 1] and batch["index"].tolist() == [0, 2]
    assert batch["meta_present"].tolist() == [[True], [False]]
    np.testing.assert_allclose(batch["meta"][0].numpy(), encode_month_hour(3, None), atol=1e-6)


def test_text_meta_caption_choice(tmp_path):
    root = str(tmp_path / "cub")
    _make_cub(root, n_classes=2, per_class=2)
    rng = np.random.default_rng(0)
    for line in open(os.path.join(root, "images.txt")):
        rel = line.split()[1]
        p = os.path.join(root, "text_emb", os.path.splitext(rel)[0] + ".npy")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        np.save(p, rng.normal(size=(10, 4, 6)).astype(np.float16))
    rec = read_cub(root, "train", text_dir="text_emb", num_classes=2)
    assert [(g.name, g.dim, g.tokens) for g in rec.meta_groups] == [("text", 6, 4)]
    ev = FGVCDataset(rec, build_transform(False, 32), train=False)
    caps = np.load(rec.text_files[0]).astype(np.float32)
    a, b = ev[0][1], ev[0][1]
    assert a.shape == (24,) and torch.equal(a, b)                     # evaluation: fixed caption 0
    np.testing.assert_array_equal(a.numpy(), caps[0].reshape(-1))
    tr = FGVCDataset(rec, build_transform(False, 32), train=True)
    np.random.seed(0)
    seen = {tuple(tr[0][1][:3].tolist()) for _ in range(20)}
    assert len(seen) > 1                                               # training: a random caption each time


def test_prepare_text_meta_layout_and_errors(tmp_path):
    from fgvc.data import text_meta as ptm
    from sparse_mim.utils.cli import UsageError
    root = str(tmp_path / "cub")
    _make_cub(root, n_classes=2, per_class=2)
    rels = [line.split()[1] for line in open(os.path.join(root, "images.txt"))]
    for rel in rels[:-1]:  # the last image has no captions
        _write(os.path.join(root, "text_c10", os.path.splitext(rel)[0] + ".txt"), "a red bird\n\nsmall wings\n")

    def fake_embed(captions, max_len):  # deterministic stand-in for BERT: caption length in every slot
        return np.stack([np.full((max_len, 5), len(c), np.float32) for c in captions])

    counts = ptm.prepare_text_meta(root, fake_embed, num_captions=3, max_len=4, progress=False)
    assert counts == {"written": 3, "kept": 0, "missing_captions": 1}
    arr = np.load(os.path.join(root, "text_emb", os.path.splitext(rels[0])[0] + ".npy"))
    assert arr.shape == (3, 4, 5) and arr.dtype == np.float16
    assert arr[:, 0, 0].tolist() == [10, 11, 10]                      # 2 captions, the first repeated to 3
    assert ptm.prepare_text_meta(root, fake_embed, num_captions=3, max_len=4, progress=False)["kept"] == 3
    rec = read_cub(root, "test", text_dir="text_emb", num_classes=2)
    assert rec.meta_present[:, 0].tolist() == [True, False] and rec.issues.total("missing text") == 1
    with pytest.raises(UsageError, match="pip install transformers"):
        ptm.load_bert(str(tmp_path / "no_bert_here"))
    with pytest.raises(FileNotFoundError, match="must be the CUB_200_2011 folder"):
        ptm.prepare_text_meta(str(tmp_path), fake_embed, progress=False)


def test_text_meta_feeds_the_model(tmp_path):
    """The flat [B, tokens*dim] text vector from the dataset is what MetaFormer takes for meta_tokens=[T]."""
    from fgvc.models import create_model
    m = create_model("metaformer_0", num_classes=3, img_size=32, meta_dims=[6], meta_tokens=[4],
                     conv_embed_dims=[16, 16, 32], attn_embed_dims=[32, 64], conv_depths=[1, 1, 1],
                     attn_depths=[1, 1], num_heads=4).eval()
    meta = torch.randn(2, 24)
    out = m(torch.randn(2, 3, 32, 32), meta, torch.ones(2, 1, dtype=torch.bool))
    assert out.shape == (2, 3)
    out2 = m(torch.randn(2, 3, 32, 32), meta.reshape(2, 4, 6), None)
    assert out2.shape == (2, 3)


# ------------------------------------------------------------------------------------------- as downloaded
def test_inat2021_train_falls_back_to_train_mini_and_says_so(tmp_path, caplog):
    root = str(tmp_path / "inat21")
    _inat_ann(root, "train_mini", 2021, [
        {"id": 1, "file_name": "train_mini/00000_a/1.jpg", "cat": 0, "date": "2010-06-13", "latitude": 1.0,
         "longitude": 2.0}], cats=(0,))
    with caplog.at_level("WARNING"):
        rec = build_records({"dataset": "inat2021", "root": root}, "train")
    assert len(rec) == 1 and rec.name == "inat2021/train_mini"
    assert any("train_mini.json" in n for n in rec.notes) and "train_mini.json" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"neither .*train\.json.* nor .*train_mini\.json"):
        read_inat(str(tmp_path / "empty"), 2021, "train")


def test_nan_meta_is_reported_and_counted_like_inf():
    issues = MetaIssues()
    for line, (lat, lon) in enumerate([(float("nan"), 1.0), ("nan", "2"), (float("inf"), 1.0), ("", "")], 1):
        v, ok = spatial_from_lat_lon(lat, lon, issues, "m.csv", line)
        assert not ok and not v.any()
    assert issues.total("bad coordinate") == 3  # NaN, 'nan' and inf; the empty cells are just missing
    assert "line 1" in issues.summary() and "line 2" in issues.summary()
    v, ok = temporal_from_date(float("nan"), issues, "m.csv", 9)
    assert not ok and issues.total("bad date") == 1


def test_describe_meta_decodes_by_encoder_not_by_name(tmp_path):
    from fgvc.data.readers import custom_meta_groups
    groups = custom_meta_groups([{"name": "when", "type": "date", "columns": ["d"]},
                                 {"name": "where", "type": "latlon", "columns": ["la", "lo"]}])
    assert [g.kind for g in groups] == ["temporal", "spatial"]
    meta = np.concatenate([encode_month_hour(3, None), encode_lat_lon(48.5, -2.25)])
    assert describe_meta(groups, meta, [True, True]) == {"when": "month 3", "where": "lat 48.50, lon -2.25"}
    assert describe_meta(groups, meta, [False, True])["when"] == "missing"


def test_16bit_png_and_pixel_limit(tmp_path, monkeypatch):
    from PIL import Image
    from fgvc.data.dataset import load_image
    arr = np.full((6, 5), 30000, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(load_image(str(tmp_path / "deep.png")))
    assert rgb.shape == (6, 5, 3) and abs(int(rgb[0, 0, 0]) - round(30000 / 257)) <= 1  # scaled, not clipped to 255
    import sparse_mim.data as sd
    monkeypatch.setattr(sd, "DEFAULT_MAX_PIXELS", 20)
    monkeypatch.setattr(sd.load_rgb, "__defaults__", (20,))
    with pytest.raises(ValueError, match="pixels"):
        load_image(str(tmp_path / "deep.png"))
