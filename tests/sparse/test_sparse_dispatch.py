"""A SparseMap in torch dispatch: dense model code runs on it unchanged and equals the dense-masked twin.

Per-site ops, channel structure (cat / split / chunk / slices / channel shuffle / flatten), exact global
reductions (squeeze-excitation gates, also where hidden sites hold non-zeros in the simulation), channels-last
permutes, and the exact dense fallback (interpolate, asymmetric pad, GroupNorm, an unknown module) with its
MAC report and its one-time warning. Forward, input gradient and parameter gradients, float64.
"""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_mim.sparse import SparseMap, functional as SF, mac_report, report, sparsify
from sparse_mim.testing import assert_equivalent, patch_mask, rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64
MASKS = [(2, 4, 4, 0.6), (3, 4, 6, 0.9)]
FACTOR = 4


@pytest.fixture(autouse=True)
def _gather_paths():
    """One fixed conv path, no autotuning (every path is exact; `test_sparse_ops` checks each)."""
    previous = SF.set_conv_backend("gather")
    yield
    SF.set_conv_backend(previous)


def _input(B, gh, gw, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, gh * FACTOR, gw * FACTOR, generator=g, dtype=F64)


def _ids(v):
    return "-".join(map(str, v)) if isinstance(v, tuple) else str(v)


class Lambda(nn.Module):
    """A conv, then model code ``fn(self, x)`` as a user's block would write it."""

    def __init__(self, fn, c_in=8, c_out=8):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.fn = fn
        self.gamma = nn.Parameter(torch.randn(c_out))
        self.scale = nn.Parameter(torch.randn(1, c_out, 1, 1))

    def forward(self, x):
        return self.fn(self, self.conv(x))


def _shuffle(x, groups=2):  # ShuffleNet's channel shuffle
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


CODE = {
    # per-site: activations, arithmetic with scalars, [C], [1, C, 1, 1], [B, C, 1, 1], another map; casts
    "activations": lambda s, x: F.hardswish(torch.sigmoid(x) * F.silu(x)) + torch.tanh(x).relu() - F.gelu(x),
    "scalars": lambda s, x: (2.0 - x) / 3 + x * 0.5 - 1 + x.clamp(-0.5, 0.5) ** 2,
    "per_channel": lambda s, x: x * s.gamma[:, None, None] + s.scale - x / (s.gamma.abs()[:, None, None] + 1),
    "where_cast": lambda s, x: torch.where(x > 0, x, 0.1 * x).float().double(),
    "inplace": lambda s, x: (x * 1).mul_(2).add_(s.scale).clamp_(-1, 1) + F.relu(x * 1, inplace=True),
    # squeeze-excitation: mean / amax / adaptive pools over H, W; the gate multiplies per sample
    "se_mean": lambda s, x: x * torch.sigmoid(x.mean((2, 3), keepdim=True) * s.scale),
    "se_pool": lambda s, x: x * torch.sigmoid(F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)),
    "se_amax_sum": lambda s, x: x * (x.amax((2, 3), keepdim=True) - x.sum((-1, -2), keepdim=True)
                                     / 50).tanh()[:, :, :, :],
    # SE behind a per-site op that leaves non-zeros at hidden sites of the simulation (sigmoid(0) = 0.5)
    "se_after_sigmoid": lambda s, x: torch.sigmoid(x) * torch.sigmoid(torch.sigmoid(x).mean((2, 3))[:, :, None, None]),
    "channel_reduce": lambda s, x: x * torch.sigmoid(x.mean(1, keepdim=True) + x.amax(1, keepdim=True)),
    # channel structure
    "cat_split": lambda s, x: torch.cat([p * (i + 1) for i, p in enumerate(torch.split(x, [3, 5], 1))], 1),
    "chunk_slice": lambda s, x: torch.cat(x.chunk(2, dim=1)[::-1] + (x[:, 2:6],), dim=1),
    "shuffle": lambda s, x: _shuffle(x) + x,
    "flatten_channels": lambda s, x: x.view(x.shape[0], 2, 4, *x.shape[2:]).flatten(1, 2) * 2,
    "softmax_channels": lambda s, x: F.softmax(x, dim=1) + F.normalize(x, dim=1),
    "channels_last": lambda s, x: F.linear(F.layer_norm(x.permute(0, 2, 3, 1), (8,)), torch.eye(8, dtype=F64)
                                           * 2).permute(0, 3, 1, 2),
}


@pytest.mark.parametrize("name", list(CODE))
@pytest.mark.parametrize("mask", MASKS, ids=_ids)
def test_model_code_on_sparse_maps(name, mask):
    B, gh, gw, ratio = mask
    model = nn.Sequential(Lambda(CODE[name]), nn.Conv2d(CODE_OUT.get(name, 8), 4, 3, padding=1)).to(F64)
    with mac_report() as rep:  # functional model code between layers: the reference is the op-level simulation
        r = assert_equivalent(model, _input(B, gh, gw, 8), patch_mask(B, gh, gw, ratio), reference="masked")
    assert rep.fallback_rows() == [], rep.format()  # all of these stay sparse
    assert isinstance(r["sparse_map"], SparseMap)


CODE_OUT = {"chunk_slice": 12}


def test_densenet_style_cat_of_a_map():
    """``torch.cat(x, 1)`` with a map where a list is expected (timm's DenseNet passes its input so) is ``x``."""
    x, vis = _input(2, 4, 4, 8), patch_mask(2, 4, 4, 0.6)
    sm = SparseMap.from_dense(x, vis)
    assert torch.equal(torch.cat(sm, 1).features, sm.features)
    assert torch.equal(torch.cat([sm, sm], 1).features, torch.cat([sm.features, sm.features], 1))


def test_tensor_like_interface():
    x, vis = _input(2, 4, 6, 8), patch_mask(2, 4, 6, 0.6)
    sm = SparseMap.from_dense(x, vis)
    assert sm.shape == x.shape and sm.ndim == 4 and sm.dim() == 4 and sm.size(1) == 8 and sm.size() == x.shape
    nhwc = sm.permute(0, 2, 3, 1)
    assert nhwc.channels_last and nhwc.shape == (2, 16, 24, 8) and nhwc.features is sm.features
    assert not nhwc.permute(0, 3, 1, 2).channels_last
    assert sm.is_floating_point() and sm.to(torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="active sites differ"):
        sm + SparseMap.from_dense(x, patch_mask(2, 4, 6, 0.6, seed=3))
    with pytest.raises(ValueError, match="per-sample"):
        sm * torch.randn(3, 8, dtype=F64)


# ---------------------------------------------------------------------------------------------------- fallback
class Resize(nn.Module):
    """Down and up again with interpolation (no sparse kernel), then a residual add."""

    def forward(self, x):
        y = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        return x + F.interpolate(y, scale_factor=2.0, mode="nearest")


class SamePadConv(nn.Conv2d):
    """TF 'same' padding of a stride-2 even kernel: an asymmetric pad, then a 'valid' conv (as timm's Conv2dSame)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0)


FALLBACKS = {
    "interpolate": (lambda: Resize(), {"interpolate"}),
    "upsample_module": (lambda: nn.Sequential(nn.AvgPool2d(2), nn.Upsample(scale_factor=2)), {"interpolate"}),
    "asymmetric_pad": (lambda: SamePadConv(8, 8, 2, 2), {"pad", "conv2d"}),
    "group_norm": (lambda: nn.GroupNorm(2, 8), {"group_norm"}),
    "valid_conv": (lambda: nn.Conv2d(8, 8, 3, padding=0), {"Conv2d"}),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
@pytest.mark.parametrize("mask", MASKS, ids=_ids)
def test_exact_fallback_and_its_report(name, mask):
    build, ops = FALLBACKS[name]
    B, gh, gw, ratio = mask
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), build(), nn.BatchNorm2d(8), nn.ReLU()).to(F64).train()
    if name == "valid_conv":  # a 'valid' conv shrinks the map: off the patch grid, the output stays dense
        model = model[:2]
    with mac_report() as rep:
        run_or_compare(model, _input(B, gh, gw, 8), patch_mask(B, gh, gw, ratio), dense_out=name == "valid_conv")
    rows = rep.fallback_rows()
    assert {row["op"] for row in rows} == ops, rep.format()
    assert all(row["module"].startswith("1") and row["macs"] > 0 for row in rows), rep.format()
    assert 0 < rep.fallback_share < 1 and abs(sum(row["share"] for row in rep.rows) - 1) < 1e-9
    assert "fallback" in rep.format()


def run_or_compare(model, x, vis, dense_out=False):
    if not dense_out:
        return assert_equivalent(model, x, vis)
    # the output is off the grid: compare the dense results where the simulation has valid outputs
    from sparse_mim.sparse import active_mask, dense_masked, mask_at
    import copy
    sm, dm = sparsify(copy.deepcopy(model)), dense_masked(copy.deepcopy(model))
    out_s = sm(SparseMap.from_dense(x, vis))
    with active_mask(vis):
        out_d = dm(x * mask_at(x))
    assert isinstance(out_s, torch.Tensor) and out_s.shape == out_d.shape
    assert rel_err(out_s, out_d) < 1e-10
    return None


def test_fallback_is_reported_once(caplog):
    model = sparsify(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)).to(F64))
    x, vis = _input(2, 4, 4, 8), patch_mask(2, 4, 4, 0.6)
    report.reset_warnings()
    with caplog.at_level(logging.WARNING, logger="sparse_mim.sparse"):
        for _ in range(3):  # three steps: one warning, logged when the next pass starts
            model(SparseMap.from_dense(x, vis))
        SparseMap.from_dense(x, vis)
    lines = [r.getMessage() for r in caplog.records if "fallback" in r.getMessage()]
    assert len(lines) == 1 and "1 (GroupNorm)" in lines[0] and "group_norm" in lines[0] and "%" in lines[0]


def test_unknown_module_runs_with_gradients_to_its_parameters():
    """A layer the engine does not know (its own parameters, its own F.* calls) runs exactly, grads included."""

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8, 3, 3, dtype=F64) * 0.1)
            self.norm = nn.GroupNorm(4, 8).to(F64)

        def forward(self, x):
            y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.weight)  # reflect pad: dense fallback
            return self.norm(y) + x * y.mean((2, 3), keepdim=True).sigmoid()

    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), Odd()).to(F64)
    with mac_report() as rep:
        assert_equivalent(model, _input(2, 4, 6, 8), patch_mask(2, 4, 6, 0.6), reference="masked")  # its own F.* calls
    assert {r["op"] for r in rep.fallback_rows()} >= {"pad", "conv2d", "group_norm"}
