"""Every Python and command-line example of docs/metaformer.md, docs/fgvc_data.md and docs/fgvc_inference.md
runs, against small stand-ins for the files the examples name (a tiny checkpoint, fixtures in the official
dataset layouts, an official-layout weights file)."""
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = Path(__file__).parents[2] / "docs"
DEMO_CLASSES = ["cross3_summer", "cross3_winter", "disc0_north", "disc0_south", "square1_summer", "square1_winter",
                "triangle2_north", "triangle2_south"]


def blocks(doc: str, lang: str):
    text = (DOCS / doc).read_text()
    found = re.findall(rf"```{lang}\n(.*?)```", text, re.S)
    assert found, f"no {lang} block in {doc}"
    return found


def commands(doc: str):
    """The command lines of the bash blocks (comments dropped, continuation lines joined)."""
    out = []
    for block in blocks(doc, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line))
    return out


def run_command(args):
    from fgvc.cli import export, predict
    if args[0] in ("python", ".venv/bin/python") and args[1] in ("-m",):
        return 0  # the test command itself
    tool = {"fgvc-predict": predict, "fgvc-export": export, "tools/predict_fgvc.py": predict,
            "tools/export_fgvc.py": export}
    name, rest = (args[1], args[2:]) if args[0] in ("python", ".venv/bin/python") else (args[0], args[1:])
    assert name in tool, f"an example command this test does not know how to run: {args}"
    return tool[name](rest)


def run_python(block: str, replace=None):
    for a, b in (replace or {}).items():
        block = block.replace(a, b)
    exec(compile(block, "<doc example>", "exec"), {"__name__": "__doc_example__"})


def _photo(path, colour):
    from PIL import Image
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.new("RGB", (40, 36), colour).save(path)


def test_fgvc_inference_doc(tmp_path, monkeypatch):
    from tests.fgvc.test_predict import save_tiny_checkpoint
    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint("outputs/fgvc_demo/best.pth", classes=DEMO_CLASSES,
                         groups=[{"name": "temporal", "dim": 4, "tokens": 1, "kind": "temporal"},
                                 {"name": "spatial", "dim": 3, "tokens": 1, "kind": "spatial"}])
    _photo("photo.png", (200, 40, 40))
    for i, name in enumerate(("disc0_north", "square1_winter", "triangle2_south")):
        _photo(f"photos/{name}.png", (60 * i, 120, 30))
    csvs = [b for b in blocks("fgvc_inference.md", "csv") if b.startswith("path,date")]
    Path("photos/meta.csv").write_text(csvs[0])
    for args in commands("fgvc_inference.md"):
        assert run_command(args) == 0, args
    assert Path("predictions.csv").is_file() and Path("deploy/demo.pt2").is_file()
    for block in blocks("fgvc_inference.md", "python"):
        run_python(block)


def test_metaformer_doc(tmp_path, monkeypatch):
    import torchvision
    from tests.fgvc.test_metaformer import official
    monkeypatch.chdir(tmp_path)
    # an official-layout file of another class count and meta layout (heads are dropped, as the example says)
    shapes = official.official_state_dict_shapes("metaformer_1", 384, num_classes=10000, meta_dims=(4, 3))
    torch.save({"model": {k: torch.zeros(s, dtype=torch.long if k.endswith("index") else torch.float32)
                          for k, s in shapes.items()}}, "metafg_1_inat21_384.pth")
    os.makedirs("outputs/pretrain")
    torch.save(torchvision.models.resnet50().state_dict(), "outputs/pretrain/backbone.pth")
    for block in blocks("metaformer.md", "python"):
        run_python(block)
    for args in commands("metaformer.md"):
        assert run_command(args) == 0


def test_fgvc_data_doc(tmp_path, monkeypatch):
    from tests.fgvc.test_fgvc_data import _inat_ann
    monkeypatch.chdir(tmp_path)
    root = str(tmp_path / "inat21")
    imgs = [{"id": i, "file_name": f"train_mini/{c:05d}_sp/{i}.jpg", "cat": c, "date": f"2019-0{i + 1}-02 10:00",
             "latitude": 10.0 * i, "longitude": -5.0 * i} for i, c in enumerate((3, 5, 3, 5))]
    _inat_ann(root, "train_mini", 2021, imgs)
    _inat_ann(root, "val", 2021, [{"id": 10 + i, "file_name": f"val/{c:05d}_sp/{i}.jpg", "cat": c, "date": "2020-05-01",
                                   "latitude": None, "longitude": None} for i, c in enumerate((3, 5, 5))])
    for block in blocks("fgvc_data.md", "python"):
        run_python(block, {"/data/inat21": root})
