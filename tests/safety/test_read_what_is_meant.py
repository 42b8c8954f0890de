"""Read what the user means: EXIF orientation applied wherever an image is read, CSVs saved by Excel (BOM)
read, one row per image in a meta CSV (a duplicate names both lines), bytes that are not UTF-8 name the file."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fgvc.data.dataset import load_image
from fgvc.data.readers import read_custom_csv
from fgvc.predict import Predictor, read_meta_csv
from sparse_mim.data import ImageFileDataset, load_rgb
from tests.fgvc.test_predict import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _phone_photo(path, orientation=6):
    """A 48x32 JPEG whose pixels are stored sideways, with the EXIF tag that says how to turn them upright."""
    arr = np.zeros((32, 48, 3), np.uint8)
    arr[:, :16] = (220, 30, 30)
    arr[:8, 16:] = (30, 30, 220)
    arr[8:, 16:] = (30, 200, 30)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as raw:  # the stored pixels, decoded without looking at EXIF
        stored = np.asarray(raw.convert("RGB"))
    return stored


@pytest.mark.parametrize("orientation,turn", [(6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
                                              (3, lambda a: np.rot90(a, 2)), (2, lambda a: a[:, ::-1])])
def test_every_image_reader_turns_a_photo_upright(tmp_path, orientation, turn):
    path = str(tmp_path / "phone.jpg")
    stored = _phone_photo(path, orientation)
    upright = np.ascontiguousarray(turn(stored))
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), upright)           # pre-training, visualisation
    np.testing.assert_array_equal(np.asarray(load_image(path)), upright)         # fgvc training, evaluation


def test_pretraining_dataset_reads_upright(tmp_path):
    path = str(tmp_path / "phone.jpg")
    stored = _phone_photo(path, 6)
    seen = []
    ds = ImageFileDataset([path], transform=lambda img, *_: seen.append(np.asarray(img)) or torch.zeros(3, 2, 2))
    ds[0]
    np.testing.assert_array_equal(seen[0], np.rot90(stored, -1))


def test_prediction_turns_a_photo_upright_from_a_path_or_an_opened_image(tmp_path):
    ckpt = str(tmp_path / "best.pth")
    save_tiny_checkpoint(ckpt)
    predictor = Predictor.from_checkpoint(ckpt, device="cpu", amp="off")
    path = str(tmp_path / "phone.jpg")
    stored = _phone_photo(path, 6)
    expected = predictor.preprocess(np.ascontiguousarray(np.rot90(stored, -1)))
    with Image.open(path) as opened:
        from_pil = predictor.preprocess(opened)
    assert torch.equal(predictor.preprocess(path), expected) and torch.equal(from_pil, expected)
    assert not torch.equal(predictor.preprocess(stored), expected)  # the orientation matters for this image


def _write(path, text, bom=False, encoding="utf-8"):
    with open(path, "wb") as f:
        f.write((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))


def _images(root, names):
    for n in names:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(os.path.join(root, n))


def test_excel_csv_with_bom_is_read(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    _write(tmp_path / "train.csv", "path,label,lat,lon\na.png,0,10,20\nb.png,1,11,21\n", bom=True)
    rec = read_custom_csv(str(tmp_path / "train.csv"), meta=[{"name": "where", "type": "latlon",
                                                                "columns": ["lat", "lon"]}])
    assert len(rec) == 2 and list(rec.labels) == [0, 1]
    _write(tmp_path / "meta.csv", "path,lat,lon\na.png,10,20\n", bom=True)
    assert read_meta_csv(str(tmp_path / "meta.csv"))["a.png"] == {"lat": 10.0, "lon": 20.0}


def test_one_image_twice_is_an_error_naming_both_lines(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    _write(tmp_path / "meta.csv", 'path,lat,lon\na.png,10,20\nb.png,1,2\n"a.png",50,60\n')
    with pytest.raises(ValueError) as e:
        read_meta_csv(str(tmp_path / "meta.csv"))
    assert str(tmp_path / "meta.csv") in str(e.value) and "lines 2 and 4" in str(e.value) and "a.png" in str(e.value)
    _write(tmp_path / "train.csv", 'path,label\na.png,0\nb.png,1\n"multi\nline",1\na.png,1\n')
    with pytest.raises(ValueError, match="lines 2 and 6 are both for path 'a.png'"):
        read_custom_csv(str(tmp_path / "train.csv"), check_files=False)


def test_bytes_that_are_not_utf8_name_the_file(tmp_path):
    _write(tmp_path / "meta.csv", "path,place\nb\xe9b\xe9.png,Z\xfcrich\n", encoding="latin-1")
    for read in (read_meta_csv, lambda p: read_custom_csv(p, label_column="place", check_files=False)):
        with pytest.raises(ValueError) as e:
            read(str(tmp_path / "meta.csv"))
        assert str(tmp_path / "meta.csv") in str(e.value) and "not UTF-8" in str(e.value) and "line 2" in str(e.value)


def test_a_run_lock_of_any_shape_is_not_a_crash(tmp_path):
    from sparse_mim.utils.rundir import LOCK_NAME, prepare_run_dir
    for text in ("[1, 2]", '{"pid": "abc", "host": 3}', "null", "[" * 50000):
        (tmp_path / LOCK_NAME).write_text(text)
        prepare_run_dir(str(tmp_path), "auto", log=lambda *a: None).release()


def test_a_deeply_nested_json_index_is_a_one_line_error(tmp_path):
    from fgvc.data.readers import _load_json
    (tmp_path / "train2021.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="is not valid JSON"):
        _load_json(str(tmp_path / "train2021.json"), "iNat annotations")


def test_meta_vector_file_with_a_bom_or_foreign_bytes(tmp_path):
    from fgvc.predict import _read_vector
    _write(tmp_path / "attrs.txt", "1 0 1\n", bom=True)
    np.testing.assert_array_equal(_read_vector(str(tmp_path / "attrs.txt"), 3, "attributes"), [1, 0, 1])
    _write(tmp_path / "bad.txt", "1 0 \xe9\n", encoding="latin-1")
    with pytest.raises(ValueError, match="bad.txt.*not UTF-8"):
        _read_vector(str(tmp_path / "bad.txt"), 3, "attributes")


def test_pretraining_image_list_with_a_bom_or_foreign_bytes(tmp_path):
    from sparse_mim.data import DataError, read_image_list
    _write(tmp_path / "list.txt", "a.png\n# comment\nsub/b.png 3\n", bom=True)
    assert read_image_list(str(tmp_path / "list.txt")) == [str(tmp_path / "a.png"), str(tmp_path / "sub/b.png")]
    _write(tmp_path / "bad.txt", "a.png\ncaf\xe9.png\n", encoding="latin-1")
    with pytest.raises(DataError, match="bad.txt.*not UTF-8.*line 2"):
        read_image_list(str(tmp_path / "bad.txt"))
