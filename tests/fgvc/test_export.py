"""fgvc-export: the torch.export program's logits equal the eager model's (tiny model, CPU)."""
import json

import pytest
import torch

from fgvc.export import check_export, load_program
from fgvc.predict import Predictor
from tests.fgvc.test_predict import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pt2_export_equals_eager_with_any_meta_present(tmp_path, capsys):
    from fgvc.cli import export
    ckpt = tmp_path / "best.pth"
    save_tiny_checkpoint(str(ckpt))
    assert export([str(ckpt), "--out", str(tmp_path / "deploy" / "birds.pt2")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "max |logit diff| vs eager" in out
    module, meta = load_program(str(tmp_path / "deploy" / "birds.pt2"))
    assert meta["classes"][0] == "disc0_north" and meta["inputs"] == ["images", "meta", "meta_present"]
    assert [g["encoder"] for g in meta["meta_groups"]] == ["temporal", "spatial"] and meta["img_size"] == [32, 32]
    assert json.load(open(tmp_path / "deploy" / "birds.json")) == meta
    predictor = Predictor.from_checkpoint(str(ckpt), device="cpu", amp="off")
    # another batch size than the traced one, meta present / partly absent / absent per sample
    g = torch.Generator().manual_seed(3)
    images, metas = torch.randn(5, 3, 32, 32, generator=g), torch.randn(5, 7, generator=g)
    present = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0], [1, 1]], dtype=torch.bool)
    with torch.no_grad():
        eager = predictor.model(images, metas, present)
    torch.testing.assert_close(module(images, metas, present), eager, rtol=1e-5, atol=1e-5)
    assert check_export(predictor, module) < 1e-5
    # the exported graph also gives the missing-meta logits (zeros + absent), as the eager model does
    with torch.no_grad():
        eager0 = predictor.model(images)
    torch.testing.assert_close(module(images, torch.zeros_like(metas), torch.zeros_like(present)), eager0,
                               rtol=1e-5, atol=1e-5)


def test_onnx_export_needs_its_packages_or_matches(tmp_path):
    from fgvc.export import export_checkpoint
    ckpt = tmp_path / "best.pth"
    save_tiny_checkpoint(str(ckpt))
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install"):
            export_checkpoint(str(ckpt), str(tmp_path / "m.pt2"), formats=["onnx"], log=lambda *_: None)
        return
    paths = export_checkpoint(str(ckpt), str(tmp_path / "m.pt2"), formats=["onnx"], log=lambda *_: None)
    assert paths[0].endswith(".onnx")
    ort = pytest.importorskip("onnxruntime")
    # another batch size than the traced one, meta present / partly absent / absent per sample
    predictor = Predictor.from_checkpoint(str(ckpt), device="cpu", amp="off")
    g = torch.Generator().manual_seed(3)
    images, metas = torch.randn(5, 3, 32, 32, generator=g), torch.randn(5, 7, generator=g)
    present = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0], [1, 1]], dtype=torch.bool)
    sess = ort.InferenceSession(paths[0], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images", "meta", "meta_present"]
    got = sess.run(None, {"images": images.numpy(), "meta": metas.numpy(), "meta_present": present.numpy()})[0]
    with torch.no_grad():
        eager = predictor.model(images, metas, present)
    torch.testing.assert_close(torch.from_numpy(got), eager, rtol=1e-4, atol=1e-4)


def test_export_refuses_unknown_formats(tmp_path):
    from fgvc.export import export_checkpoint
    with pytest.raises(ValueError, match="unknown export format"):
        export_checkpoint(str(tmp_path / "best.pth"), str(tmp_path / "m.pt2"), formats=["torchscript"])
