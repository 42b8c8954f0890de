"""Every sparse op equals its dense-masked twin: forward, input gradient, parameter gradients, buffers.

Reference: the dense layer on the zero-filled map, output multiplied by the mask
at the output scale (SparK's simulation, `dense_masked`). Random SparK masks at
ratio 0.6 and 0.9, batch 1 and 4, square and rectangular maps, several channel
counts. Every implementation path of the convs is forced in turn, and the
autotuned and fixed-table choices run too: a path choice can never change a
number beyond float tolerance.
"""
import pytest
import torch
from torch import nn

from sparse_mim.sparse import SparseMap, functional as SF, sparse_global_avg_pool
from sparse_mim.testing import ChannelsLast, assert_equivalent, patch_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F64 = torch.float64
# (batch, patch grid h, patch grid w, mask ratio): batch 1 and 4, square and rectangular, ratio 0.6 and 0.9
MASKS = [(1, 4, 4, 0.6), (4, 4, 6, 0.9), (4, 4, 4, 0.9), (1, 6, 4, 0.6)]
GRIDS = [m[:3] for m in MASKS]
FACTOR = 4  # sites per patch side at the tested scale (stride 8 of a 32-px-patch image)


def _input(B, gh, gw, C, factor=FACTOR, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, gh * factor, gw * factor, generator=g, dtype=dtype)


@pytest.fixture
def backend(request):
    previous = SF.set_conv_backend(request.param)
    yield request.param
    SF.set_conv_backend(previous)




# ---------------------------------------------------------------------------------------------------- convolutions
STRIDE1 = [  # (in, out, kernel, bias, dilation)
    (3, 8, 3, True, 1), (8, 16, 3, False, 1), (16, 8, 5, True, 1), (8, 8, 7, False, 1), (8, 16, 1, True, 1),
    (8, 8, 3, True, 2),
]


STRIDE1_CASES = (
    [("gather", case, m) for case in STRIDE1 for m in MASKS]
    + [("windows", case, m) for case in STRIDE1 for m in MASKS]
    + [("dense", case, m) for case in STRIDE1 for m in MASKS[:2]]
    # spconv (Native on CPU) is slow to warm up per kernel shape: its cases are few but cover both mask ratios
    + [("spconv", case, m) for case in (STRIDE1[1], STRIDE1[2]) for m in MASKS[:2]]
    + [("autotune", case, m) for case in STRIDE1 for m in MASKS[:2]]
    + [("table", case, m) for case in STRIDE1 for m in MASKS[1:2]]
)


def _case_id(v):
    return "-".join(map(str, v)) if isinstance(v, tuple) else str(v)


@pytest.mark.parametrize("backend,case,mask", STRIDE1_CASES, indirect=["backend"], ids=_case_id)
def test_conv_stride1(backend, case, mask):
    cin, cout, k, bias, dil = case
    B, gh, gw, ratio = mask
    conv = nn.Conv2d(cin, cout, k, padding=dil * (k // 2), dilation=dil, bias=bias).to(F64)
    assert_equivalent(conv, _input(B, gh, gw, cin), patch_mask(B, gh, gw, ratio))


@pytest.mark.parametrize("backend", ["gather", "windows", "dense", "autotune"], indirect=True)
@pytest.mark.parametrize("c,k,bias", [(16, 7, True), (8, 3, False), (3, 5, True)])
@pytest.mark.parametrize("mask", MASKS, ids=_case_id)
def test_depthwise(backend, c, k, bias, mask):
    B, gh, gw, ratio = mask
    conv = nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=bias).to(F64)
    assert_equivalent(conv, _input(B, gh, gw, c), patch_mask(B, gh, gw, ratio))


STRIDED = [  # (in, out, kernel, stride, padding, bias): ResNet stem / downsample, ConvNeXt stem / downsample
    (3, 8, 7, 2, 3, False), (8, 16, 3, 2, 1, False), (8, 16, 1, 2, 0, False), (8, 16, 2, 2, 0, True),
    (3, 8, 4, 4, 0, True),
]


@pytest.mark.parametrize("backend", ["gather", "dense", "autotune"], indirect=True)
@pytest.mark.parametrize("cin,cout,k,s,p,bias", STRIDED)
@pytest.mark.parametrize("mask", MASKS, ids=_case_id)
def test_conv_strided(backend, cin, cout, k, s, p, bias, mask):
    B, gh, gw, ratio = mask
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=bias).to(F64)
    r = assert_equivalent(conv, _input(B, gh, gw, cin), patch_mask(B, gh, gw, ratio))
    assert r["sparse_map"].spatial_shape == (gh * FACTOR // s, gw * FACTOR // s)


@pytest.mark.parametrize("backend", ["gather", "dense", "autotune"], indirect=True)
def test_strided_depthwise(backend):
    conv = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8).to(F64)
    assert_equivalent(conv, _input(4, 4, 6, 8), patch_mask(4, 4, 6, 0.6))


# ---------------------------------------------------------------------------------------------------- norms, pooling
def _bn(c, train):
    bn = nn.BatchNorm2d(c).to(F64)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    return bn.train(train)


def _grn(c):
    from timm.layers.grn import GlobalResponseNorm
    grn = GlobalResponseNorm(c, channels_last=True).to(F64)
    with torch.no_grad():
        grn.weight.normal_()
        grn.bias.normal_()
    return ChannelsLast(grn)


def _grn_nchw(c):
    from timm.layers.grn import GlobalResponseNorm
    grn = GlobalResponseNorm(c, channels_last=False).to(F64)
    with torch.no_grad():
        grn.weight.normal_()
        grn.bias.normal_()
    return grn


def _ln2d(c):
    from timm.layers import LayerNorm2d
    ln = LayerNorm2d(c).to(F64)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    return ln


def _ln_last(c):
    ln = nn.LayerNorm(c).to(F64)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    return ChannelsLast(ln)


LAYERS = {
    "bn_train": lambda c: _bn(c, True),
    "bn_eval": lambda c: _bn(c, False),
    "ln_channels_last": _ln_last,
    "ln2d": _ln2d,
    "grn": _grn,
    "grn_nchw": _grn_nchw,
    "maxpool_3x3_s2": lambda c: nn.MaxPool2d(3, 2, 1),
    "maxpool_3x3_s1": lambda c: nn.MaxPool2d(3, 1, 1),
    # a conv feeding each per-site layer: hidden sites must not leak into visible ones
    "conv_gelu_linear_conv": lambda c: nn.Sequential(nn.Conv2d(c, c, 3, padding=1), ChannelsLast(
        nn.Sequential(nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))),
        nn.Conv2d(c, c, 3, padding=1)).to(F64),
    "conv_bn_relu_pool": lambda c: nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                                 nn.MaxPool2d(3, 2, 1)).to(F64),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("c,mask", [(3, MASKS[0]), (16, MASKS[1]), (8, MASKS[2]), (16, MASKS[3])], ids=_case_id)
def test_layers(name, c, mask):
    B, gh, gw, ratio = mask
    assert_equivalent(LAYERS[name](c), _input(B, gh, gw, c), patch_mask(B, gh, gw, ratio))


def test_bn_statistics_are_over_visible_sites_only():
    """The dense-masked BN is a real reference: plain BN over the zero-filled map gives different numbers."""
    x, vis = _input(4, 4, 6, 8), patch_mask(4, 4, 6, 0.6)
    r = assert_equivalent(_bn(8, True), x, vis)
    up = vis.repeat_interleave(FACTOR, 1).repeat_interleave(FACTOR, 2)[:, None]
    plain = _bn(8, True)(x * up) * up
    assert (plain - r["out_d"]).abs().max() > 1e-2


def test_drop_path_per_sample():
    from timm.layers import DropPath
    dp = DropPath(0.5)
    x, vis = _input(4, 4, 6, 8), patch_mask(4, 4, 6, 0.6)
    r = assert_equivalent(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), dp).to(F64), x, vis, seed=3)
    # rows of a sample are all kept or all dropped
    sm = r["sparse_map"]
    per_row_zero = sm.features.abs().amax(1) == 0
    for b in range(4):
        rows = per_row_zero[sm.batch_index == b]
        assert bool(rows.all()) or not bool(rows.any())


@pytest.mark.precision
def test_float32_tolerance():
    torch.manual_seed(0)
    x, vis = _input(4, 4, 6, 16, dtype=torch.float32), patch_mask(4, 4, 6, 0.6)
    for backend in ("gather", "windows", "dense", "spconv", "autotune", "table"):
        previous = SF.set_conv_backend(backend)
        try:
            assert_equivalent(nn.Conv2d(16, 16, 3, padding=1), x, vis)
            assert_equivalent(nn.Conv2d(16, 16, 7, padding=3, groups=16), x, vis)
            assert_equivalent(nn.Conv2d(16, 32, 3, stride=2, padding=1), x, vis)
        finally:
            SF.set_conv_backend(previous)
    assert_equivalent(nn.Conv2d(16, 32, 1), x, vis)


# ---------------------------------------------------------------------------------------------------- functional bits
@pytest.mark.parametrize("grid", GRIDS)
def test_global_avg_pool_per_sample(grid):
    B, gh, gw = grid
    x, vis = _input(B, gh, gw, 8), patch_mask(B, gh, gw, 0.6)
    up = vis.repeat_interleave(FACTOR, 1).repeat_interleave(FACTOR, 2)[:, None]
    expected = (x * up).sum((2, 3)) / up.sum((2, 3))
    assert torch.allclose(sparse_global_avg_pool(SparseMap.from_dense(x, vis)), expected, rtol=1e-12)


def test_per_sample_channel_scale():
    """SE-style ``x * s`` with s [B, C] or [B, C, 1, 1], and layer-scale with gamma [C] / [1, C, 1, 1]."""
    x, vis = _input(4, 4, 6, 8), patch_mask(4, 4, 6, 0.6)
    up = vis.repeat_interleave(FACTOR, 1).repeat_interleave(FACTOR, 2)[:, None]
    sm = SparseMap.from_dense(x, vis)
    s = torch.randn(4, 8, dtype=F64)
    for operand in (s, s[:, :, None, None]):
        assert torch.equal((sm * operand).dense(), (x * up) * s[:, :, None, None])
    gamma = torch.randn(8, dtype=F64)
    for operand in (gamma, gamma.view(1, -1, 1, 1), gamma.view(1, 1, 1, -1)):
        assert torch.equal(sm.mul(operand).dense(), (x * up) * gamma.view(1, -1, 1, 1))
    with pytest.raises(ValueError, match="per-sample"):
        sm * torch.randn(3, 8, dtype=F64)


def test_residual_add_refuses_other_sites():
    x = _input(2, 4, 4, 8)
    a = SparseMap.from_dense(x, patch_mask(2, 4, 4, 0.6, seed=0))
    b = SparseMap.from_dense(x, patch_mask(2, 4, 4, 0.6, seed=1))
    with pytest.raises(ValueError, match="active sites differ"):
        a + b
    conv_s2 = nn.Conv2d(8, 8, 3, 2, 1).to(F64)
    with pytest.raises(ValueError, match="active sites differ"):
        SF.conv2d(a, conv_s2.weight, None, 2, 1) + a


def test_two_strided_paths_share_sites_order_and_cache():
    """ResNet block: 3x3/s2 main branch (after a 1x1) and 1x1/s2 shortcut from one input are addable row by row."""
    x, vis = _input(4, 4, 6, 8), patch_mask(4, 4, 6, 0.6)
    sm = SparseMap.from_dense(x, vis)
    w1, w3, wd = (torch.randn(8, 8, k, k, dtype=F64) for k in (1, 3, 1))
    main = SF.conv2d(SF.conv2d(sm, w1), w3, None, 2, 1)
    short = SF.conv2d(sm, wd, None, 2, 0)
    assert main.cache is short.cache and main.mask is short.mask
    up = vis.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]
    f = torch.nn.functional
    xz = x * vis.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
    expected = (f.conv2d(f.conv2d(xz, w1), w3, None, 2, 1) + f.conv2d(xz, wd, None, 2)) * up
    assert torch.allclose((main + short).dense(), expected, rtol=1e-10, atol=1e-10)


def test_neighbour_tables_built_once_per_scale():
    x, vis = _input(4, 4, 6, 8), patch_mask(4, 4, 6, 0.6)
    sm = SparseMap.from_dense(x, vis)
    w = torch.randn(8, 8, 3, 3, dtype=F64)
    previous = SF.set_conv_backend("gather")
    try:
        y = SF.conv2d(sm, w, None, 1, 1)
        keys = set(k for k in sm.cache if isinstance(k, tuple))
        table = sm.cache[("table", (3, 3), (1, 1), (1, 1), (1, 1))]
        y2 = SF.conv2d(y, w, None, 1, 1)  # next layer at the same scale: same cache, no new table
        assert y.cache is sm.cache and y2.cache is sm.cache
        assert set(k for k in sm.cache if isinstance(k, tuple)) == keys
        assert sm.cache[("table", (3, 3), (1, 1), (1, 1), (1, 1))] is table
    finally:
        SF.set_conv_backend(previous)


def test_autocast_cpu_bfloat16_runs():
    """Under autocast the torch paths compute in the autocast dtype without dtype-mismatch errors."""
    x, vis = _input(2, 4, 4, 8, dtype=torch.float32), patch_mask(2, 4, 4, 0.6)
    for backend in ("gather", "windows", "dense", "autotune"):
        previous = SF.set_conv_backend(backend)
        sm = SparseMap.from_dense(x.clone().requires_grad_(), vis)
        w = torch.randn(8, 8, 3, 3, requires_grad=True)
        wd = torch.randn(8, 1, 7, 7, requires_grad=True)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = SF.conv2d(sm, w, None, 1, 1)
                y = SF.conv2d(y, wd, None, 1, 3, groups=8)
                y = SF.conv2d(y, w, None, 2, 1)
            assert y.features.dtype == torch.bfloat16
            y.features.float().sum().backward()
            assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
        finally:
            SF.set_conv_backend(previous)
