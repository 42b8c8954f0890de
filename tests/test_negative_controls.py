"""Negative controls: deliberately broken twins must FAIL every central equivalence helper.

A tolerance loosened for portability must never hide a real bug. Each control injects one of the bugs
an equivalence test exists to catch, at a realistic and deliberately *small* size, and asserts that the
helper raises (`EquivalenceError`, an AssertionError), under every precision the helper is used with:

* a missing kernel tap: the sparse conv skips one tap (one weight tap zeroed on the sparse side only);
* a hidden site leaking into a visible one: the dense-masked conv forgets to zero its input's hidden
  sites, or the mask a layer applies is off by one patch;
* a mis-classified op: a spatial op treated as a per-site one (the op table `dispatch.classify` shared
  by the engine's simulation, or GRN converted as an element-wise layer), which the sparse side and the
  engine's own simulation could share; the hook reference (`masked_reference`) shares no code with them.

The helpers are `assert_equivalent` (an op / block), `assert_backbones_equivalent` (a backbone) and
`assert_spark_equivalent` (the whole SparK model). "tight" controls scale the injected bug down to a few
tens of modelled roundings (`layer_rounding`), check the forward result only (a missing tap's weight
gradient is 0 and leaks move gradients by O(1), whatever the bug's size) and also assert that the failure
ratio (error / bound) stays below `MAX_RATIO`: the bound is tight enough to catch the smallest bug of that
kind, and loosening it by more than that ratio would make these tests fail. Run them under restricted instruction sets with
tools/run_tests_restricted_isa.sh (docs/testing.md).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_mim
from sparse_mim.sparse import SparseMap, convert, dispatch
from sparse_mim.testing import (EquivalenceError, assert_backbones_equivalent, assert_equivalent,
                                assert_spark_equivalent, patch_mask, random_visible_mask, randomize_weights_,
                                layer_rounding)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.precision]

BF16 = torch.bfloat16
MAX_RATIO = 100.0  # a tight control must fail, but by less than this factor
PRECISIONS = ["float64", "float32", "bfloat16"]  # bfloat16: float32 weights under CPU autocast


class Autocast(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.autocast("cpu", dtype=BF16):
            return self.inner(x)


def _setup(precision: str, module: nn.Module):
    """(module as run, input dtype, compute dtype) for a precision name."""
    if precision == "bfloat16":
        return Autocast(module.float()), torch.float32, BF16
    dtype = getattr(torch, precision)
    return module.to(dtype), dtype, dtype


def _input(C=8, dtype=torch.float64, seed=0):
    return torch.randn(3, C, 16, 24, generator=torch.Generator().manual_seed(seed)).to(dtype)


VISIBLE = patch_mask(3, 4, 6, 0.6)


def _fails(run) -> float:
    """Run an equivalence helper that must fail; return the failure ratio (worst error / bound)."""
    with pytest.raises(AssertionError) as info:
        run()
    assert isinstance(info.value, EquivalenceError), f"failed for another reason: {info.value}"
    ratio = info.value.report.worst.ratio
    print(f"control failed the helper by {ratio:.1f}x: {info.value.report.worst}")
    assert ratio > 1
    return ratio


def _small(compute: torch.dtype, k: int, units: float = 32.0) -> float:
    """A bug size of ``units`` modelled roundings of one layer (`layer_rounding`, relative)."""
    return units * layer_rounding(compute, k)


# ---------------------------------------------------------------------------------------------------- op level
class MissingTap(nn.Module):
    """``x + gamma * conv(x)`` (a residual branch with a layer scale); the sparse conv skips one tap."""

    def __init__(self, c: int, gamma: float, tap=(0, 0)):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gamma, self.tap = gamma, tap

    def forward(self, x):
        if isinstance(x, SparseMap):
            keep = torch.ones_like(self.conv.weight)
            keep[:, :, self.tap[0], self.tap[1]] = 0
            branch = F.conv2d(x, self.conv.weight * keep, self.conv.bias, padding=1)
        else:
            branch = self.conv(x)
        return x + self.gamma * branch


def _ln_then(c: int, layer: nn.Module, shift: float) -> nn.Module:
    """LayerNorm2d (its bias ``shift`` lands on the hidden sites of the zero-filled map) then ``layer``."""
    from timm.layers import LayerNorm2d
    ln = LayerNorm2d(c)
    with torch.no_grad():
        ln.weight.fill_(1.0)
        ln.bias.fill_(shift)
    return nn.Sequential(ln, layer)


class Blur(nn.Module):
    """A leaf whose spatial work is a functional call (the engine's simulation masks it via its op table)."""

    def forward(self, x):
        return F.avg_pool2d(x, 3, 1, 1)


def _conv_input_not_masked(monkeypatch):
    """The dense-masked conv multiplies its output by the mask but forgets its input."""
    monkeypatch.setattr(convert.MaskedConv2d, "forward", lambda self, x: convert._masked(nn.Conv2d.forward(self, x)))


def _avg_pool_classified_per_site(monkeypatch):
    classify = dispatch.classify
    monkeypatch.setattr(dispatch, "classify",
                        lambda func: "per_site" if dispatch.op_name(func) == "avg_pool2d" else classify(func))


COMPUTE = {"float64": torch.float64, "float32": torch.float32, "bfloat16": BF16}


def _op_control(precision: str, tight: bool, build, reduction: int, inject=None) -> None:
    """Build the op (``build(size)``: the bug's size, 1 or ~32 modelled roundings when ``tight``), check that
    the correct twins pass (when the bug is ``inject``ed afterwards), inject it, and require the helper to
    fail; a tight control compares the forward result only and must fail by less than `MAX_RATIO`."""
    size = 3 * _small(COMPUTE[precision], reduction) if tight else 1.0
    torch.manual_seed(0)
    module, dtype, compute = _setup(precision, build(size))
    if inject is not None:
        assert_equivalent(module, _input(dtype=dtype), VISIBLE, dtype=compute)  # the correct twins pass
        inject()
    ratio = _fails(lambda: assert_equivalent(module, _input(dtype=dtype), VISIBLE, dtype=compute, grad=not tight))
    if tight:
        assert ratio < MAX_RATIO


TIGHT = pytest.mark.parametrize("tight", [False, True], ids=["full", "tight"])


@pytest.mark.parametrize("precision", PRECISIONS)
@TIGHT
def test_op_missing_tap(precision, tight):
    # one tap of 9 carries ~1/3 of a default-initialised 3x3 conv's output: gamma sets the bug's size
    _op_control(precision, tight, lambda gamma: MissingTap(8, gamma), 8 * 9)


@pytest.mark.parametrize("precision", PRECISIONS)
@TIGHT
def test_op_hidden_site_leaks(monkeypatch, precision, tight):
    _op_control(precision, tight, lambda shift: _ln_then(8, nn.Conv2d(8, 8, 3, padding=1), shift), 8 * 9,
                lambda: _conv_input_not_masked(monkeypatch))


@pytest.mark.parametrize("precision", PRECISIONS)
@TIGHT
def test_op_spatial_op_classified_per_site(monkeypatch, precision, tight):
    _op_control(precision, tight, lambda shift: _ln_then(8, Blur(), shift), 9,
                lambda: _avg_pool_classified_per_site(monkeypatch))


def test_op_mask_off_by_one_patch(monkeypatch):
    """The simulation's mask at one scale shifted by one patch (a wrong upsampling): hidden sites leak in."""
    module = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1)).double()
    at = convert._MaskState.at

    def shifted(self, height, width):
        m = at(self, height, width)
        return m.roll(height // self.visible.shape[1], dims=2) if height == 8 else m
    monkeypatch.setattr(convert._MaskState, "at", shifted)
    _fails(lambda: assert_equivalent(module, _input(), VISIBLE))


# ---------------------------------------------------------------------------------------------------- backbones
def _depthwise_classified_element_wise(monkeypatch):
    """Both classifiers of the simulation take a depthwise conv (groups == channels) for a per-channel,
    per-site op: the module classifier leaves it unconverted and the op table passes its F.conv2d through
    unmasked, so the hidden sites of its input (LayerNorm biases after the stem) leak into visible ones.
    Either slip alone is harmless (the other one masks; checked below); together they are the shared
    blind spot the independent hook reference exists for. (On the sparse side the module slip is loud: the
    element-wise wrapper hands the conv [N, C] rows, which F.conv2d refuses.)"""
    kind, classify = convert._kind, dispatch.classify

    def wrong_kind(m, classes):
        k = kind(m, classes)
        return "elementwise" if k == "conv" and m.groups > 1 and m.groups == m.in_channels else k
    monkeypatch.setattr(convert, "_kind", wrong_kind)
    monkeypatch.setattr(dispatch, "classify", lambda f: "per_site" if dispatch.op_name(f) == "conv2d" else classify(f))


def _backbone_twins(precision: str, break_twin=None):
    """convnextv2_atto at one block per stage: sparse, dense-masked twin, plain reference, images, mask
    (``break_twin()`` runs just before the twin is built)."""
    kwargs = {"depths": (1, 1, 1, 1), "drop_path_rate": 0.0}
    sparse = sparse_mim.create_backbone("convnextv2_atto", sparse=True, **kwargs)
    randomize_weights_(sparse, torch.Generator().manual_seed(1))
    if break_twin is not None:
        break_twin()
    dense = sparse_mim.create_backbone("convnextv2_atto", sparse=False, **kwargs)
    dense.load_state_dict(sparse.state_dict())
    plain = sparse_mim.create_backbone("convnextv2_atto", sparse=None, **kwargs)
    dtype = torch.float64 if precision == "float64" else torch.float32
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    visible = random_visible_mask(2, 2, 3, 0.5, torch.Generator().manual_seed(3))
    return sparse.to(dtype), dense.to(dtype), plain, images, visible


def _run_backbones(precision, sparse, dense, plain, images, visible):
    autocast = BF16 if precision == "bfloat16" else None
    return assert_backbones_equivalent(sparse, dense, images, visible, train=False, reference=plain,
                                       autocast=autocast)


def _drop_tap(conv: nn.Conv2d, tap=(0, 0)) -> None:
    """This conv instance (a sparse one) skips one kernel tap."""
    keep = torch.ones_like(conv.weight)
    keep[:, :, tap[0], tap[1]] = 0
    conv.forward = lambda x: F.conv2d(x, conv.weight * keep, conv.bias, conv.stride, conv.padding, conv.dilation,
                                      conv.groups)


BACKBONE_PRECISIONS = ["float32", "bfloat16"]


@pytest.mark.parametrize("precision", BACKBONE_PRECISIONS)
def test_backbone_missing_tap(precision):
    """One corner tap of one 7x7 depthwise conv (1 of 49), at stride 8. The tap's weight gradient is 0 on
    the sparse side whatever the weights, so float32 fails by orders of magnitude; in bf16 the map at stride
    8 fails too, by a small factor (the bound is tight)."""
    sparse, dense, plain, images, visible = _backbone_twins(precision)
    _run_backbones(precision, sparse, dense, plain, images, visible)  # the correct twins pass
    _drop_tap(sparse.stages[1].blocks[0].conv_dw)
    ratio = _fails(lambda: _run_backbones(precision, sparse, dense, plain, images, visible))
    if precision == "bfloat16":
        assert ratio < MAX_RATIO


@pytest.mark.parametrize("precision", BACKBONE_PRECISIONS)
def test_backbone_hidden_site_leaks(monkeypatch, precision):
    """Hidden sites carry LayerNorm biases; a masked conv that forgets its input lets them in."""
    sparse, dense, plain, images, visible = _backbone_twins(precision)
    _conv_input_not_masked(monkeypatch)
    _fails(lambda: _run_backbones(precision, sparse, dense, plain, images, visible))


def test_backbone_one_classifier_slip_is_masked_by_the_other(monkeypatch):
    """Defence in depth: a depthwise conv the module classifier misses still has its F.conv2d masked by the
    op table, so the simulation stays right and the (correct) twins pass."""
    kind = convert._kind

    def slip():
        monkeypatch.setattr(convert, "_kind", lambda m, classes: "elementwise" if kind(m, classes) == "conv"
                            and m.groups > 1 and m.groups == m.in_channels else kind(m, classes))
    sparse, dense, plain, images, visible = _backbone_twins("float32", slip)
    assert any(type(m) is nn.Conv2d for m in dense.modules())  # really left unconverted
    _run_backbones("float32", sparse, dense, plain, images, visible)


@pytest.mark.parametrize("precision", BACKBONE_PRECISIONS)
def test_backbone_depthwise_classified_element_wise(monkeypatch, precision):
    sparse, dense, plain, images, visible = _backbone_twins(precision, lambda: _depthwise_classified_element_wise(monkeypatch))
    _fails(lambda: _run_backbones(precision, sparse, dense, plain, images, visible))


# ---------------------------------------------------------------------------------------------------- SparK
def _spark():
    from sparse_mim.spark import SparK
    torch.manual_seed(0)
    sparse = SparK("convnextv2_atto", input_size=(64, 64), decoder_width=32, drop_path_rate=0.0,
                   init="trunc_normal", depths=(1, 1, 1, 1)).train()
    visible = sparse.mask(2, generator=torch.Generator().manual_seed(1))
    plain = sparse_mim.create_backbone("convnextv2_atto", sparse=None, drop_path_rate=0.0, depths=(1, 1, 1, 1))
    return sparse, plain, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)), visible


def test_spark_missing_tap():
    sparse, plain, images, visible = _spark()
    dense = sparse.dense_reference()
    assert_spark_equivalent(sparse, dense, images, visible, reference_backbone=plain)
    _drop_tap(sparse.backbone.stages[1].blocks[0].conv_dw)
    _fails(lambda: assert_spark_equivalent(sparse, dense, images, visible, reference_backbone=plain))


def test_spark_hidden_site_leaks(monkeypatch):
    sparse, plain, images, visible = _spark()
    dense = sparse.dense_reference()
    _conv_input_not_masked(monkeypatch)
    _fails(lambda: assert_spark_equivalent(sparse, dense, images, visible, reference_backbone=plain))


def test_spark_depthwise_classified_element_wise(monkeypatch):
    sparse, plain, images, visible = _spark()
    _depthwise_classified_element_wise(monkeypatch)
    dense = sparse.dense_reference()
    _fails(lambda: assert_spark_equivalent(sparse, dense, images, visible, reference_backbone=plain))
