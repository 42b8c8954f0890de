"""Weight exchange: our backbones <-> torchvision / timm / official ConvNeXt and SparK files."""
import re

import pytest
import timm
import torch
import torchvision
from torch import nn

import sparse_mim
from sparse_mim.backbones import (list_backbones, load_backbone_weights, read_checkpoint, split_spark_checkpoint)
from sparse_mim.testing import random_visible_mask, randomize_weights_


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference(name: str) -> nn.Module:
    """The dense torchvision / timm model of the same name, without classifier."""
    if name.startswith("resnet") and name != "resnet200":
        model = getattr(torchvision.models, name)()
        del model.fc  # torchvision's classifier; avgpool has no parameters
        return model
    return timm.create_model(name, pretrained=False, num_classes=0)


@pytest.mark.parametrize("name", list_backbones("resnet*") + list_backbones("convnext*"))
def test_names_and_shapes_match_torchvision_timm(name):
    """Full-depth layouts, key by key (on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        ours = sparse_mim.create_backbone(name, sparse=True).state_dict()
        ref = _reference(name).state_dict()
    assert list(ours) == list(ref) or sorted(ours) == sorted(ref), (
        f"missing {sorted(set(ref) - set(ours))[:5]}, extra {sorted(set(ours) - set(ref))[:5]}")
    for k in ref:
        assert ours[k].shape == ref[k].shape, k


def _official_convnext_names(state: dict) -> dict:
    """timm ConvNeXt names -> facebookresearch names (the layout of official SparK ConvNeXt encoders)."""
    out = {}
    for k, v in state.items():
        if k.startswith("head."):
            continue  # the official SparK encoder has no final norm / head
        k = k.replace("stem.", "downsample_layers.0.")
        k = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc1", "pwconv1").replace("mlp.fc2", "pwconv2")
        if "mlp.grn" in k:
            k = k.replace("mlp.grn.weight", "grn.gamma").replace("mlp.grn.bias", "grn.beta")
            v = v.reshape(1, 1, 1, -1)
        if "pwconv" in k and v.dim() == 4:
            v = v.flatten(1)  # official MLPs are nn.Linear
        out[k] = v
    return out


def _assert_same_outputs(a: nn.Module, b: nn.Module, size=(64, 64), visible=None):
    a.eval()
    b.eval()
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        for x, y in zip(a(images, visible), b(images, visible)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def _assert_library_stages_match(name, kw, sparse, stem, stages):
    """The library model's own stage outputs equal ours on an all-visible mask (sparse and dense twin)."""
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        x = stem(images)
        expected = []
        for stage in stages:
            x = stage(x)
            expected.append(x)
        twin = sparse_mim.create_backbone(name, sparse=False, **kw).eval()
        twin.load_state_dict(sparse.state_dict())
        for ours in (sparse(images, torch.ones(2, 2, 3, dtype=torch.bool)), twin(images)):
            for a, b in zip(ours, expected):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("name,depths", [("resnet18", None), ("resnet50", (1, 2, 2, 1))])
def test_resnet_round_trip_and_torchvision_outputs(name, depths):
    kw = {"depths": depths} if depths else {}
    sparse = randomize_weights_(sparse_mim.create_backbone(name, **kw), torch.Generator().manual_seed(0)).eval()
    if depths:  # torchvision's own ResNet class at the same reduced depth
        tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, list(depths))
        del tv.fc
    else:
        tv = _reference(name)
    tv.eval()
    tv.load_state_dict(sparse.state_dict(), strict=True)  # sparse -> torchvision
    back = sparse_mim.create_backbone(name, **kw)
    back.load_state_dict(tv.state_dict(), strict=True)  # torchvision -> sparse
    _assert_same_outputs(sparse, back, visible=random_visible_mask(2, 2, 2, 0.5))
    # torchvision's own stage outputs == ours on an all-visible mask (sparse and dense twin)
    _assert_library_stages_match(name, kw, sparse, lambda x: tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))),
                                 (tv.layer1, tv.layer2, tv.layer3, tv.layer4))


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto", "convnext_tiny", "convnextv2_tiny"])
def test_convnext_round_trip_and_timm_outputs(name):
    depths = (1, 1, 2, 1) if "tiny" in name else None
    kw = {"depths": depths} if depths else {}
    sparse = randomize_weights_(sparse_mim.create_backbone(name, **kw), torch.Generator().manual_seed(0)).eval()
    ref = timm.create_model(name, pretrained=False, num_classes=0, **kw).eval()
    ref.load_state_dict(sparse.state_dict(), strict=True)
    back = sparse_mim.create_backbone(name, **kw)
    back.load_state_dict(ref.state_dict(), strict=True)
    _assert_same_outputs(sparse, back, visible=random_visible_mask(2, 2, 2, 0.5))
    _assert_library_stages_match(name, kw, sparse, ref.stem, ref.stages)


def test_supervised_checkpoints_with_classifier_load(tmp_path):
    """torchvision / timm classification weights (fc / head.fc included) load, classifier dropped."""
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    net = sparse_mim.create_backbone("resnet18", weights=str(tmp_path / "tv.pth"))
    assert torch.equal(net.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    tm = timm.create_model("convnextv2_atto", pretrained=False, num_classes=10)
    randomize_weights_(tm)
    report = load_backbone_weights(sparse_mim.create_backbone("convnextv2_atto"), tm.state_dict())
    assert report["missing"] == [] and report["unexpected"] == []
    # DDP prefixes and {"model": ...} wrappers
    net = sparse_mim.create_backbone("resnet18")
    load_backbone_weights(net, {"model": {f"module.{k}": v for k, v in tv.state_dict().items()}})
    assert torch.equal(net.conv1.weight, tv.conv1.weight)


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto", "convnextv2_pico"])
def test_official_spark_files(name, tmp_path):
    """*_1kpretrained_timm_style.pth (plain state dict, official ConvNeXt names, no final norm) and
    *_withdecoder_1kpretrained_spark_style.pth ({"module": {"sparse_encoder.sp_cnn.*", decoder ...}})."""
    src = randomize_weights_(sparse_mim.create_backbone(name, sparse=False), torch.Generator().manual_seed(2))
    official = _official_convnext_names(src.state_dict())
    torch.save(official, tmp_path / "timm_style.pth")
    net = sparse_mim.create_backbone(name)
    report = load_backbone_weights(net, str(tmp_path / "timm_style.pth"))
    assert report["missing"] == ["head.norm.weight", "head.norm.bias"] and not report["unexpected"]
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(net.state_dict()[k], v), k

    decoder = {"dense_decoder.dec.0.up_sample.weight": torch.randn(4, 4, 4, 4), "mask_tokens.0": torch.randn(1, 8, 1, 1)}
    module = {f"sparse_encoder.sp_cnn.{k}": v for k, v in official.items()}
    module.update(decoder)
    module["config"] = {"mask_ratio": 0.6, "sparse_encoder.input_size": 224, "dense_decoder.width": 768}
    spark_file = {"args": "Namespace(...)", "input_size": 224, "arch": name, "epoch": 3, "performance_desc": "x",
                  "module": module, "optimizer": {"state": {}, "param_groups": []}, "is_pretrain": True}
    torch.save(spark_file, tmp_path / "spark_style.pth")
    loaded = read_checkpoint(tmp_path / "spark_style.pth")
    encoder, rest = split_spark_checkpoint(loaded)
    assert sorted(encoder) == sorted(official)
    assert sorted(rest) == sorted(list(decoder) + ["config"])
    net2 = sparse_mim.create_backbone(name, weights=str(tmp_path / "spark_style.pth"))
    assert all(torch.equal(net.state_dict()[k], net2.state_dict()[k]) for k in net.state_dict())


def test_official_spark_resnet_file(tmp_path):
    src = randomize_weights_(sparse_mim.create_backbone("resnet50", sparse=False))
    torch.save({"module": {f"sparse_encoder.sp_cnn.{k}": v for k, v in src.state_dict().items()}
                | {"densify_norms.0.weight": torch.ones(3)}}, tmp_path / "r50_withdecoder.pth")
    net = sparse_mim.create_backbone("resnet50", weights=str(tmp_path / "r50_withdecoder.pth"))
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in net.state_dict().items())


def test_wrong_architecture_is_a_clear_error(tmp_path):
    r18 = sparse_mim.create_backbone("resnet18", sparse=False).state_dict()
    with pytest.raises(ValueError) as e:
        load_backbone_weights(sparse_mim.create_backbone("resnet50", depths=(1, 1, 1, 1)), r18)
    msg = str(e.value)
    assert "missing keys" in msg and "layer1.0.conv3.weight" in msg
    assert "unexpected keys" in msg and "layer1.1.conv1.weight" in msg
    assert "shape mismatches" in msg and "layer1.0.conv1.weight: checkpoint (64, 64, 3, 3) vs model (64, 64, 1, 1)" in msg
    with pytest.raises(ValueError, match="shape mismatches"):
        load_backbone_weights(sparse_mim.create_backbone("convnext_femto"),
                              sparse_mim.create_backbone("convnext_atto", sparse=False).state_dict())
    report = load_backbone_weights(sparse_mim.create_backbone("resnet18"), {**r18, "extra.weight": torch.ones(1)},
                                   strict=False)
    assert report["unexpected"] == ["extra.weight"]


class Payload:
    """A pickled object that weights_only=True must refuse."""


def test_weights_only_loading(tmp_path):
    torch.save({"conv1.weight": torch.ones(1), "obj": Payload()}, tmp_path / "unsafe.pth")
    with pytest.raises(RuntimeError, match="weights_only=True"):
        load_backbone_weights(sparse_mim.create_backbone("resnet18"), str(tmp_path / "unsafe.pth"))
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(sparse_mim.create_backbone("resnet18"), str(tmp_path / "nope.pth"))


def test_convnext_head_norm_is_frozen_and_kept():
    net = sparse_mim.create_backbone("convnext_atto")
    assert not any(p.requires_grad for p in net.head.norm.parameters())
    assert "head.norm.weight" in net.state_dict()
