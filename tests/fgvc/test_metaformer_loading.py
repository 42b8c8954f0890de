"""Official-checkpoint loading (filter, head/meta-head dropping, table resizing) and hybrid backbone init."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fgvc
from fgvc.models import checkpoint_filter_fn, load_pretrained, resize_relative_position_bias_table

_spec = importlib.util.spec_from_file_location(
    "metaformer_keys", Path(__file__).parent / "fixtures" / "metaformer_keys.py")
official = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(official)

# MetaFormer structure at a fraction of the width/depth (the grids only depend on img_size).
TINY = dict(conv_embed_dims=(32, 48, 96), attn_embed_dims=(64, 128), conv_depths=(2, 1, 2), attn_depths=(2, 2))


def _tiny(img_size=64, num_classes=10, meta_dims=(4, 3), **kw):
    return fgvc.create_model("metaformer_0", num_classes=num_classes, img_size=img_size, meta_dims=meta_dims,
                             drop_path_rate=0., **{**TINY, **kw}).eval()


def _official_file(model) -> dict:
    """``model``'s weights in the official file layout: under "model", with the persistent index buffers."""
    sd = dict(model.state_dict())
    for name, m in model.named_modules():
        if name.endswith(".attn"):
            n_extra = 1 + sum(model.meta_tokens)
            h, w = m.grid_size
            sd[f"{name}.relative_position_index"] = F.pad(m.relative_position_index, (n_extra, 0, n_extra, 0))
    return {"model": sd, "epoch": 299, "max_accuracy": 91.5}


def _tables(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith("relative_position_bias_table")}


def _assert_same_except(a, b, skip_prefixes=()):
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if not k.startswith(skip_prefixes):
            torch.testing.assert_close(sa[k], sb[k], msg=k)


# ---------------------------------------------------------------------------------------------
# Full official-size key set round trip
# ---------------------------------------------------------------------------------------------

def test_official_layout_loads_strictly(tmp_path):
    """A file with the official keys (index buffers included), wrapped in "model", loads with nothing left out."""
    src = _tiny(img_size=224)
    path = tmp_path / "metafg.pth"
    torch.save(_official_file(src), path)
    dst = _tiny(img_size=224)
    notes = load_pretrained(dst, path)
    assert notes == []
    _assert_same_except(src, dst)
    # the official (index-carrying) shapes are what the fixture describes
    raw = torch.load(path, weights_only=True)["model"]
    expected = official.official_state_dict_shapes("metaformer_0", 224, meta_dims=(4, 3))
    assert raw["stage_4.1.attn.relative_position_index"].shape == expected["stage_4.1.attn.relative_position_index"]


def test_state_dict_ema_and_module_prefix():
    src = _tiny()
    wrapped = {"state_dict_ema": {f"module.{k}": v for k, v in _official_file(src)["model"].items()}}
    dst = _tiny()
    load_pretrained(dst, wrapped)
    _assert_same_except(src, dst)


# ---------------------------------------------------------------------------------------------
# Resolution change: relative-position tables
# ---------------------------------------------------------------------------------------------

def test_224_checkpoint_at_384_constant_tables_give_the_same_logits(tmp_path):
    """Grid rows constant per head, the never-read last row junk: resizing must keep the bias constant.

    Resizing the junk row into the grid (as the official one-slot-shifted resize does) changes the logits.
    """
    torch.manual_seed(0)
    src = _tiny(img_size=224)
    head_values = {}
    with torch.no_grad():
        for k, table in _tables(src).items():
            p = src.get_parameter(k)
            head_values[k] = torch.randn(p.shape[1])
            p.copy_(head_values[k].expand_as(p))
            p[-1] = 100.  # never read at 224; must not leak into the 384 grid
    torch.save(_official_file(src), tmp_path / "m224.pth")

    loaded = _tiny(img_size=384)
    notes = load_pretrained(loaded, tmp_path / "m224.pth")
    assert sum("resized" in n for n in notes) == len(head_values)
    reference = _tiny(img_size=384)
    reference.load_state_dict({k: v for k, v in src.state_dict().items() if "relative_position" not in k},
                              strict=False)
    with torch.no_grad():
        for k, values in head_values.items():
            reference.get_parameter(k).copy_(values.expand_as(reference.get_parameter(k)))
            new = loaded.get_parameter(k)
            assert new.shape[0] == (2 * 24 - 1) ** 2 + 1 if k.startswith("stage_3") else (2 * 12 - 1) ** 2 + 1
            torch.testing.assert_close(new[:-1], values.expand_as(new[:-1]))  # grid + extra-token row
            assert (new[-1] == 100.).all()  # unused row carried over
    x, meta = torch.randn(1, 3, 384, 384), torch.randn(1, 7)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x, meta), reference(x, meta), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("old,new", [((4, 4), (8, 8)), ((3, 5), (6, 10)), ((14, 14), (24, 24)), ((12, 12), (7, 7))])
def test_resize_follows_the_offset_grid(old, new):
    """Bias of a smooth function of the offset (dy, dx): the resized table samples the same function
    at offsets scaled by (2h-1)/(2h'-1) -- checks orientation (rows = dy), centring and the kept rows."""
    (h, w), (nh, nw) = old, new
    heads = 3

    def f(dy, dx, head):
        return torch.sin(dy / (0.9 * h) + head) + torch.cos(dx / (1.1 * w) - head)

    dy, dx = torch.meshgrid(torch.arange(-(h - 1), h).float(), torch.arange(-(w - 1), w).float(), indexing="ij")
    grid = torch.stack([f(dy, dx, i) for i in range(heads)], -1).reshape(-1, heads)
    table = torch.cat([grid, torch.full((1, heads), 7.)], 0)
    out = resize_relative_position_bias_table(table, old, new)
    assert out.shape == ((2 * nh - 1) * (2 * nw - 1) + 1, heads)
    torch.testing.assert_close(out[0], table[0])  # the extra-token row (also the corner offset)
    torch.testing.assert_close(out[-1], table[-1])  # never read, carried over
    ndy, ndx = torch.meshgrid(torch.arange(-(nh - 1), nh).float(), torch.arange(-(nw - 1), nw).float(), indexing="ij")
    sy, sx = (2 * h - 1) / (2 * nh - 1), (2 * w - 1) / (2 * nw - 1)
    expected = torch.stack([f(ndy * sy, ndx * sx, i) for i in range(heads)], -1)
    got = out[:-1].reshape(2 * nh - 1, 2 * nw - 1, heads)

    def inner(n_new, n_old):  # outputs whose bicubic support lies inside the old grid (no border clamping)
        src = (torch.arange(n_new) + 0.5) * n_old / n_new - 0.5
        return (src >= 1) & (src <= n_old - 2)

    keep = inner(2 * nh - 1, 2 * h - 1)[:, None] & inner(2 * nw - 1, 2 * w - 1)[None, :]
    assert keep.sum() >= 9
    torch.testing.assert_close(got[keep], expected[keep], atol=0.03, rtol=0)
    torch.testing.assert_close(resize_relative_position_bias_table(table, old, old), table)
    # A trained extra-token row that differs from its grid neighbours is still kept exactly.
    table[0] = torch.tensor([5., -5., 0.5])
    torch.testing.assert_close(resize_relative_position_bias_table(table, old, new)[0], table[0])


def test_wrong_input_size_error_points_to_load_pretrained():
    with pytest.raises(ValueError, match="load_pretrained"):
        _tiny(img_size=64)(torch.randn(1, 3, 96, 96))


# ---------------------------------------------------------------------------------------------
# Dropping heads
# ---------------------------------------------------------------------------------------------

def test_head_dropped_when_class_count_differs(caplog):
    src = _tiny(num_classes=1000)
    dst = _tiny(num_classes=10)
    head_before = dst.head.weight.detach().clone()
    with caplog.at_level("WARNING"):
        notes = load_pretrained(dst, _official_file(src))
    assert any("head" in n and "1000 classes" in n for n in notes)
    assert any("head" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(dst.head.weight, head_before)
    _assert_same_except(src, dst, skip_prefixes=("head.",))


@pytest.mark.parametrize("src_meta,dst_meta", [((4, 3), (312,)), ((4, 3), ()), ((), (4, 3)), ((4, 3), (4,))])
def test_meta_heads_dropped_when_layout_differs(src_meta, dst_meta):
    src = _tiny(meta_dims=src_meta)
    dst = _tiny(meta_dims=dst_meta)
    meta_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("meta_")}
    notes = load_pretrained(dst, _official_file(src))
    assert len(notes) == 1 and "meta" in notes[0]
    if src_meta:
        assert "dropped the meta heads" in notes[0] and str(list(src_meta)) in notes[0]
    else:
        assert "no meta heads" in notes[0]
    for k, v in meta_before.items():  # kept their fresh init
        torch.testing.assert_close(dst.state_dict()[k], v)
    _assert_same_except(src, dst, skip_prefixes=("meta_",))


def test_checkpoint_of_another_variant_is_one_line_naming_both():
    deeper = _tiny(attn_depths=(3, 2))
    with pytest.raises(ValueError) as e:
        load_pretrained(_tiny(), _official_file(deeper))
    msg = str(e.value)
    assert "\n" not in msg and msg.count("stage_") <= 3, msg  # one line, not hundreds of keys
    assert "blocks 1/2/3/2" in msg and "blocks 1/2/2/2" in msg  # found vs expected
    assert "keys the model does not have (e.g. stage_3.2.attn" in msg
    wider = _tiny(conv_embed_dims=(32, 64, 96))
    with pytest.raises(ValueError, match=r"shape mismatches \(e\.g\. stage_1\.0\._bn2\.bias"):
        load_pretrained(_tiny(), _official_file(wider))
    with pytest.raises(ValueError, match=r"1 keys missing in the checkpoint \(e\.g\. stage_2\.1\._bn2\.weight\)"):
        sd = _official_file(_tiny())["model"]
        del sd["stage_2.1._bn2.weight"]
        checkpoint_filter_fn(sd, _tiny())
    # the official sizes are named
    with torch.device("meta"):
        m0, m1 = fgvc.create_model("metaformer_0"), fgvc.create_model("metaformer_1")
    from fgvc.models.metaformer import load_state_dict_exact
    with pytest.raises(ValueError, match=r"^checkpoint is metaformer_1 \(.*\) but the model is metaformer_0 \("):
        load_state_dict_exact(m0, m1.state_dict())
    m0b = fgvc.create_model("metaformer_tiny", num_classes=200, img_size=32)
    with pytest.raises(ValueError, match=r"metaformer_tiny .*555 classes.*shape mismatches \(e\.g\. head\.bias"):
        load_state_dict_exact(m0b, fgvc.create_model("metaformer_tiny", num_classes=555, img_size=32).state_dict())


# ---------------------------------------------------------------------------------------------
# Official training files pickle a yacs config: read safely, hostile pickles refused
# ---------------------------------------------------------------------------------------------

def _fake_yacs(monkeypatch):
    """Modules ``yacs`` / ``yacs.config`` with a stand-in ``CfgNode`` like yacs' (a dict subclass whose
    attributes hold a set and a dict), so torch.save pickles ``yacs.config.CfgNode`` as the official
    training script does; removed again before loading."""
    import sys
    import types
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init_dict=None, new_allowed=False):
            super().__init__(init_dict or {})
            self.__dict__["__immutable__"] = False
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {"OLD": ("NEW", "renamed")}
            self.__dict__["__new_allowed__"] = new_allowed

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config.CfgNode, yacs.config = CfgNode, config
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config)
    return CfgNode


def _official_training_file(monkeypatch, model, path):
    CfgNode = _fake_yacs(monkeypatch)
    ck = _official_file(model)
    ck["config"] = CfgNode({"MODEL": CfgNode({"TYPE": "MetaFG_meta", "NAME": "MetaFG_meta_0", "NUM_CLASSES": 10}),
                            "DATA": CfgNode({"IMG_SIZE": 64, "DATASET": "inaturelist2021"}), "TAGS": ("a", 1)})
    ck["optimizer"] = {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}
    torch.save(ck, path)
    monkeypatch.undo()  # the loader must not need yacs


def test_official_training_file_with_yacs_config_loads_safely(tmp_path, monkeypatch):
    import sys
    src = _tiny()
    path = tmp_path / "ckpt_epoch_299.pth"
    _official_training_file(monkeypatch, src, path)
    assert "yacs" not in sys.modules
    ck = fgvc.models.read_weights(path)
    assert type(ck["config"]) is dict and ck["config"]["MODEL"]["NAME"] == "MetaFG_meta_0"
    assert ck["config"]["TAGS"] == ("a", 1) and ck["epoch"] == 299
    dst = _tiny()
    assert load_pretrained(dst, path) == []
    _assert_same_except(src, dst)
    assert "yacs" not in sys.modules  # nothing was imported


class _Hostile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "config"])
def test_hostile_pickle_is_refused_without_running(tmp_path, where):
    marker = tmp_path / "PWNED"
    ck = _official_file(_tiny())
    ck[where] = _Hostile(marker)
    torch.save(ck, tmp_path / "evil.pth")
    with pytest.raises(RuntimeError) as e:
        load_pretrained(_tiny(), tmp_path / "evil.pth")
    msg = str(e.value)
    assert not marker.exists()
    assert "pickles Python objects" in msg and "system" in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg


def test_truncated_and_foreign_files_are_told_apart(tmp_path):
    torch.save(_official_file(_tiny()), tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    with pytest.raises(RuntimeError, match="truncated or damaged") as e:
        load_pretrained(_tiny(), tmp_path / "cut.pth")
    assert "weights_only=False" not in str(e.value)
    with pytest.raises(RuntimeError, match="not a PyTorch file"):
        load_pretrained(_tiny(), tmp_path / "notes.pth")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_pretrained(_tiny(), tmp_path)


def test_create_model_pretrained_path(tmp_path):
    src = _tiny(num_classes=5)
    torch.save(_official_file(src), tmp_path / "w.pth")
    dst = fgvc.create_model("metaformer_0", num_classes=5, img_size=64, meta_dims=(4, 3),
                            pretrained=str(tmp_path / "w.pth"), **TINY).eval()
    _assert_same_except(src, dst)


# ---------------------------------------------------------------------------------------------
# Hybrids: pre-trained convnet weights in
# ---------------------------------------------------------------------------------------------

HYBRID_SMALL = dict(num_classes=4, img_size=64, meta_dims=(3,), embed_dims=(64, 128), depths=(1, 1))


def test_hybrid_resnet_loads_torchvision_weights(tmp_path):
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    sd = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}  # an exported backbone
    torch.save(sd, tmp_path / "resnet18_backbone.pth")
    model = fgvc.create_model("metaformer_resnet18", init_backbone=tmp_path / "resnet18_backbone.pth",
                              **HYBRID_SMALL).eval()
    assert any("layer4" in n for n in model.init_notes)
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, sd[k], msg=k)
    # the trunk computes exactly torchvision's layer3 features
    x = torch.randn(1, 3, 64, 64)
    resnet.eval()
    with torch.inference_mode():
        ref = resnet.layer3(resnet.layer2(resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x)))))))
        torch.testing.assert_close(model.forward_conv_stages(x), ref)
        assert model(x, torch.randn(1, 3)).shape == (1, 4)


def test_hybrid_convnext_loads_timm_weights():
    import timm

    net = timm.create_model("convnext_atto", pretrained=False, num_classes=0)
    sd = net.state_dict()
    model = fgvc.create_model("metaformer_convnext_atto", init_backbone=sd, **HYBRID_SMALL).eval()
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, sd[k], msg=k)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model.forward_conv_stages(x), net.stages[:3](net.stem(x)))


def test_hybrid_rejects_weights_of_another_backbone():
    import torchvision

    with pytest.raises(ValueError, match=r"(?s)resnet18 trunk.*layer1\.2"):  # resnet34 has 3 blocks in layer1
        fgvc.create_model("metaformer_resnet18", init_backbone=torchvision.models.resnet34().state_dict(),
                          **HYBRID_SMALL)
    import timm

    femto = timm.create_model("convnext_femto", pretrained=False, num_classes=0).state_dict()
    with pytest.raises(ValueError, match=r"(?s)shape mismatches.*stages\.0\.blocks\.0\.conv_dw\.weight"):
        fgvc.create_model("metaformer_convnext_atto", init_backbone=femto, **HYBRID_SMALL)


def test_hybrid_loads_exported_sparse_mim_backbone(tmp_path):
    """The file tools/export_backbone.py writes (the dense twin's plain state dict) fits the hybrid."""
    backbones = pytest.importorskip("sparse_mim.backbones")
    engine = pytest.importorskip("sparse_mim.export")
    backbone = backbones.create_backbone("resnet18", sparse=False)
    with torch.no_grad():  # make the weights recognisable
        for p in backbone.parameters():
            p.normal_()
    path = engine.export_backbone(backbone, str(tmp_path / "resnet18_spark.pth"))
    sd = torch.load(path, weights_only=True)
    model = fgvc.create_model("metaformer_resnet18", init_backbone=path, **HYBRID_SMALL)
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, sd[k], msg=k)
