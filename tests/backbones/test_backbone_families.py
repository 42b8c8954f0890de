"""Any timm convnet by name: sparse backbone == dense-masked twin, per family, and timm weight exchange.

Each family is timm's own model, unchanged (`TimmBackbone`), at a reduced width / depth
where timm's constructor allows it (the blocks are the family's own), in float64, train
mode (batch statistics over visible sites), at a square and a rectangular input. The
check covers the 4 maps, every parameter gradient and the BN running statistics
(`sparse_mim.testing.assert_backbones_equivalent`).
"""
import pytest
import timm
import torch

import sparse_mim
from sparse_mim.backbones import TimmBackbone, is_backbone, list_backbones, load_backbone_weights
from sparse_mim.testing import assert_backbones_equivalent, random_visible_mask, randomize_weights_

pytestmark = pytest.mark.usefixtures("one_torch_thread", "conv_paths_by_table")


@pytest.fixture
def conv_paths_by_table():
    """The engine's rule table picks each conv's path (no timing runs: every path is exact, tested per op)."""
    from sparse_mim.sparse import autotune

    previous = autotune.set_mode("table")
    yield
    autotune.set_mode(previous)

SMALL_RESNET = {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128)}
# name -> keyword arguments of timm.create_model that make it small (empty: the model is small already)
FAMILIES = {
    "resnet18": {"depths": (1, 1, 1, 1)},        # registered names (timm's ResNet / ConvNeXt)
    "convnext_atto": {"depths": (1, 1, 1, 1)},
    "convnextv2_atto": {"depths": (1, 1, 1, 1)},
    "resnet50d": {**SMALL_RESNET, "stem_width": 16},   # deep stem, average-pool shortcut (ResNet-D)
    "res2net50_26w_4s": SMALL_RESNET,                   # split / cat / avg-pool blocks
    "resnext50_32x4d": {**SMALL_RESNET, "channels": (32, 64, 128, 256)},  # grouped 3x3 (32 groups)
    "seresnet50": SMALL_RESNET,                          # squeeze-excitation
    "densenet121": {"block_config": (1, 1, 1, 1), "growth_rate": 8},  # concatenation, avg-pool transitions
    "regnetx_002": {},                                   # grouped convs
    "efficientnet_b0": {},                               # strided depthwise, SE, SiLU
    "mobilenetv3_large_100": {},                         # hard-swish, SE with hard-sigmoid
    "cspresnet50": {},                                   # cross-stage partial split / cat
    "repvgg_a0": {},                                     # parallel 3x3 / 1x1 / identity branches
    "vgg11": {"mlp_ratio": 0.01},                        # plain convs + max-pools (small unused pre-logits)
}


def _twins(name, **kwargs):
    sparse = sparse_mim.create_backbone(name, sparse=True, drop_path_rate=0.0, **kwargs)
    randomize_weights_(sparse, torch.Generator().manual_seed(1))
    sparse.double()
    dense = sparse_mim.create_backbone(name, sparse=False, drop_path_rate=0.0, **kwargs).double()
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_sparse_equals_dense_masked(name):
    sparse, dense = _twins(name, **FAMILIES[name])
    plain = sparse_mim.create_backbone(name, sparse=None, drop_path_rate=0.0, **FAMILIES[name])  # hook reference
    for i, (h, w) in enumerate(((2, 2), (2, 3))):  # 64x64 and 64x96 pixels
        images = torch.randn(2, 3, 32 * h, 32 * w, dtype=torch.float64)
        visible = random_visible_mask(2, h, w, 0.5, torch.Generator().manual_seed(3 + i))
        assert_backbones_equivalent(sparse, dense, images, visible, train=True, reference=plain)


def test_timm_backbone_interface_and_frozen_unused_layers():
    net = sparse_mim.create_backbone("efficientnet_b0", sparse=False)
    assert isinstance(net, TimmBackbone) and net.downsample_ratio == 32
    assert net.channels == [24, 40, 112, 320] == [f["num_chs"] for f in net._timm_model.feature_info[1:]]
    # conv_head / bn2 come after the stride-32 map: kept for weight exchange, never trained
    assert net.unused_parameters == ["conv_head.weight", "bn2.weight", "bn2.bias"]
    assert not net.conv_head.weight.requires_grad and net.blocks[6][0].conv_pw.weight.requires_grad
    assert is_backbone("resnet50d") and is_backbone("resnet50") and not is_backbone("resnet51")
    assert "resnet50d" in list_backbones("resnet50*", include_timm=True) and "resnet50d" not in list_backbones()
    with pytest.raises(ValueError, match="unknown backbone 'resnet51'"):
        sparse_mim.create_backbone("resnet51")
    with pytest.raises(ValueError, match="would download weights"):
        sparse_mim.create_backbone("resnet50d", pretrained=True)
    with pytest.raises(ValueError, match=r"no feature map at stride\(s\) \[32\]"):
        sparse_mim.create_backbone("resnet18d", output_stride=16)


def test_timm_weights_round_trip(tmp_path):
    """timm weights from a local file load into the backbone; its state dict loads back into timm (strict)."""
    kw = {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128)}
    ref = randomize_weights_(timm.create_model("seresnet50", num_classes=10, **kw), torch.Generator().manual_seed(0))
    torch.save(ref.state_dict(), tmp_path / "seresnet50.pth")
    net = sparse_mim.create_backbone("seresnet50", weights=str(tmp_path / "seresnet50.pth"), **kw)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in net.state_dict().items())
    back = timm.create_model("seresnet50", num_classes=0, **kw)
    back.load_state_dict(net.state_dict(), strict=True)  # num_classes=0: the same keys
    full = timm.create_model("seresnet50", **kw)  # with its classifier: only the classifier is missing
    result = full.load_state_dict(net.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    # timm's own forward of the loaded weights == the backbone's maps when every patch is visible
    net.eval(), back.eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = net(images, torch.ones(1, 2, 2, dtype=torch.bool))
        theirs = timm.create_model("seresnet50", num_classes=0, features_only=True, out_indices=(1, 2, 3, 4), **kw)
        theirs.load_state_dict(net.state_dict(), strict=False)
        for a, b in zip(ours, theirs.eval()(images)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    load_backbone_weights(net, back.state_dict())  # and timm's num_classes=0 file


def test_resnet_zero_init_last():
    """Official SparK / timm ResNet init: the last BN weight of every block is 0; zero_init_last=False gives 1."""
    for name, last in (("resnet50", "bn3"), ("resnet18", "bn2")):
        net = sparse_mim.create_backbone(name, sparse=False, depths=(1, 2, 1, 1))
        lasts = [m.weight for n, m in net.named_modules() if n.endswith(last)]
        assert len(lasts) == 5 and all(w.abs().max() == 0 for w in lasts)
        others = [m.weight for n, m in net.named_modules() if n.endswith("bn1")]
        assert all(torch.equal(w, torch.ones_like(w)) for w in others)
        plain = sparse_mim.create_backbone(name, sparse=False, depths=(1, 2, 1, 1), zero_init_last=False)
        assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for n, m in plain.named_modules()
                   if n.endswith(last))
    with pytest.raises(ValueError, match="zero_init_last applies to ResNets"):
        sparse_mim.create_backbone("convnext_atto", zero_init_last=True)
