"""The custom-backbone interface: a user-written net (SE blocks) becomes a SparK encoder.

The worked example is docs/examples/custom_backbone.py (user code, not in the package): loaded from its file
here, once, as a user's module would be imported, which registers ``example_tiny_senet``."""
import importlib.util
import os

import pytest
import torch
from torch import nn

import sparse_mim
from sparse_mim.backbones import HierarchicalBackbone, register_backbone
from sparse_mim.testing import assert_backbones_equivalent as assert_equivalent
from sparse_mim.testing import random_visible_mask, randomize_weights_

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs",
                       "examples", "custom_backbone.py")
_spec = importlib.util.spec_from_file_location("custom_backbone_example", EXAMPLE)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)
TinySENet = example.TinySENet


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_worked_example_sparse_equals_dense_masked():
    sparse = sparse_mim.create_backbone("example_tiny_senet", depth=2, widths=(16, 32, 64, 128), drop_path_rate=0.0)
    randomize_weights_(sparse, torch.Generator().manual_seed(0)).double()
    dense = sparse_mim.create_backbone("example_tiny_senet", sparse=False, depth=2, widths=(16, 32, 64, 128)).double()
    dense.load_state_dict(sparse.state_dict())
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    visible = random_visible_mask(2, 2, 3, 0.6, torch.Generator().manual_seed(1))
    assert_equivalent(sparse, dense, images, visible, train=False)
    assert_equivalent(sparse, dense, images, visible, train=True)
    # SE gates see only visible sites: changing hidden pixels changes nothing
    sparse.eval()
    hidden = ~visible.repeat_interleave(32, 1).repeat_interleave(32, 2)
    noisy = images + hidden[:, None] * torch.randn_like(images) * 10
    for a, b in zip(sparse(images, visible), sparse(noisy, visible)):
        assert torch.equal(a, b)


def test_example_script_runs(capsys):
    """``python docs/examples/custom_backbone.py``: four maps at strides 4..32, sparse == dense-masked (float32)."""
    rel = example.main()
    out = capsys.readouterr().out
    assert "map (2, 32, 16, 24)" in out and "map (2, 256, 2, 3)" in out
    # float32, ~10 layers of sums over <= 1152 terms in another order: ~10 * sqrt(1152) * 2**-23 = 4e-5 relative
    assert rel <= 1e-4


def test_custom_backbone_without_registry():
    net = TinySENet().to_sparse()
    maps = net(torch.randn(1, 3, 64, 64), torch.tensor([[[True, False], [False, True]]]))
    assert [tuple(m.shape[1:]) for m in maps] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    assert net.get_feature_map_channels() == [32, 64, 128, 256] and net.get_downsample_ratio() == 32


class _GroupNormNet(HierarchicalBackbone):
    def __init__(self, **_):
        super().__init__()
        self.channels, self.downsample_ratio = [8, 8, 8, 8], 32
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.GroupNorm(2, 8))

    def forward_features(self, x):
        return [self.stem(x)] * 4


class _WrongStrides(HierarchicalBackbone):
    def __init__(self, **_):
        super().__init__()
        self.channels, self.downsample_ratio = [8, 8, 8, 8], 32
        self.stem = nn.Conv2d(3, 8, 4, 4)

    def forward_features(self, x):
        return [self.stem(x)] * 4


def test_unsupported_layers_and_wrong_outputs_are_clear_errors():
    register_backbone("test_groupnorm_net", _GroupNormNet)
    net = sparse_mim.create_backbone("test_groupnorm_net")  # GroupNorm has no sparse kernel: exact dense fallback
    from sparse_mim.sparse import mac_report
    with mac_report() as rep, pytest.raises(RuntimeError, match="map 1 has 8 channels"):  # (one map, 4 times)
        net(torch.randn(1, 3, 64, 64), torch.tensor([[[True, False], [False, True]]]))
    assert [(r["module"], r["op"]) for r in rep.fallback_rows()] == [("stem.1 (GroupNorm)", "group_norm")]
    register_backbone("test_wrong_strides", _WrongStrides)
    net = sparse_mim.create_backbone("test_wrong_strides")
    with pytest.raises(RuntimeError, match="map 1 has 8 channels and height 16; expected 8 channels at stride 8"):
        net(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet50", _WrongStrides)
    with pytest.raises(TypeError, match="not a sparse_mim.backbones.HierarchicalBackbone"):
        register_backbone("test_plain_module", lambda **_: nn.Conv2d(3, 8, 1))
        sparse_mim.create_backbone("test_plain_module")


def test_registry_api_matches_fgvc():
    """Bare decorator (the function's name), glob or substring listing, is_backbone, families."""
    from sparse_mim.backbones import backbone_family, is_backbone, list_backbones

    @register_backbone
    def test_bare_decorated(drop_path_rate=None, **kw):
        return TinySENet(**kw)

    assert list_backbones("test_bare_*") == ["test_bare_decorated"] == list_backbones("bare_deco")
    assert is_backbone("test_bare_decorated") and backbone_family("test_bare_decorated") == "custom"
    assert backbone_family("resnet50") == "resnet" and backbone_family("resnet50d") == "timm"
    assert sparse_mim.create_backbone("test_bare_decorated").channels == [32, 64, 128, 256]
