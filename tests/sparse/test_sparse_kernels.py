"""The kernels added for common convnets equal their dense-masked twins (forward, input and parameter grads):
grouped conv (ResNeXt / RegNet), average pooling (ResNet-D, Res2Net, DenseNet, CSPNet), strided depthwise
(EfficientNet / MobileNet), depthwise with a channel multiplier; F.* calls on a map use the same kernels."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_mim.sparse import SparseMap, functional as SF, kernels, mac_report
from sparse_mim.testing import assert_equivalent, patch_mask, rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread", "gather_path")

F64 = torch.float64
# (batch, patch grid h, patch grid w, mask ratio): square and rectangular, two ratios
MASKS = [(2, 4, 4, 0.6), (3, 4, 6, 0.9), (1, 6, 4, 0.6)]
FACTOR = 4  # sites per patch side (stride 8 of a 32-px-patch image)


def _input(B, gh, gw, C, factor=FACTOR, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, gh * factor, gw * factor, generator=g, dtype=F64)


def _ids(v):
    return "-".join(map(str, v)) if isinstance(v, tuple) else str(v)


GROUPED = [  # (in, out, kernel, stride, groups, bias, dilation)
    (8, 16, 3, 1, 2, True, 1), (16, 16, 3, 2, 4, False, 1), (8, 8, 1, 1, 4, True, 1), (8, 16, 1, 2, 2, False, 1),
    (12, 12, 3, 1, 3, True, 2), (16, 32, 5, 2, 8, True, 1),
]


@pytest.mark.parametrize("case", GROUPED, ids=_ids)
@pytest.mark.parametrize("mask", MASKS, ids=_ids)
def test_grouped_conv(case, mask):
    cin, cout, k, s, g, bias, d = case
    B, gh, gw, ratio = mask
    conv = nn.Conv2d(cin, cout, k, s, padding=d * (k // 2), dilation=d, groups=g, bias=bias).to(F64)
    assert_equivalent(conv, _input(B, gh, gw, cin), patch_mask(B, gh, gw, ratio))


DEPTHWISE = [  # (channels, multiplier, kernel, stride)
    (8, 1, 3, 2), (8, 1, 5, 2), (6, 2, 3, 1), (6, 2, 3, 2),
]


@pytest.mark.parametrize("case", DEPTHWISE, ids=_ids)
@pytest.mark.parametrize("mask", MASKS[:2], ids=_ids)
def test_strided_and_multiplier_depthwise(case, mask):
    c, mult, k, s = case
    B, gh, gw, ratio = mask
    conv = nn.Conv2d(c, c * mult, k, s, padding=k // 2, groups=c).to(F64)
    assert_equivalent(conv, _input(B, gh, gw, c), patch_mask(B, gh, gw, ratio))


AVG = [  # (kernel, stride, padding, ceil_mode, count_include_pad): ResNet-D, Res2Net, DenseNet / CSPNet, ...
    (2, 2, 0, True, False), (3, 1, 1, False, True), (3, 2, 1, False, True), (2, 2, 0, False, True),
    (3, 1, 1, False, False), (3, 2, 1, False, False), (5, 1, 2, False, True),
]


@pytest.mark.parametrize("case", AVG, ids=_ids)
@pytest.mark.parametrize("mask", MASKS, ids=_ids)
def test_avg_pool(case, mask):
    k, s, p, ceil, include = case
    B, gh, gw, ratio = mask
    pool = nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=include)
    # a conv in front, so the input gradient of the pool reaches a parameter too
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), pool).to(F64)
    assert_equivalent(model, _input(B, gh, gw, 4), patch_mask(B, gh, gw, ratio))


def test_avg_pool_divisor_override_and_functional_call():
    x, vis = _input(2, 4, 4, 4), patch_mask(2, 4, 4, 0.6)
    sm = SparseMap.from_dense(x, vis)
    up = sm.mask[:, None].to(F64)
    for kwargs in ({"divisor_override": 3}, {"count_include_pad": False}, {}):
        ref = F.avg_pool2d(x * up, 3, 2, 1, **kwargs)
        out = F.avg_pool2d(sm, 3, 2, 1, **kwargs)  # torch dispatch -> the sparse kernel
        assert isinstance(out, SparseMap)
        assert rel_err(out.dense(), ref * out.mask[:, None]) < 1e-12


def test_functional_conv_calls_use_sparse_kernels():
    """F.conv2d / F.max_pool2d on a map (as in a conv subclass' own forward) run on the sparse kernels."""
    x, vis = _input(2, 4, 4, 8), patch_mask(2, 4, 4, 0.6)
    sm = SparseMap.from_dense(x, vis)
    up = sm.mask[:, None].to(F64)
    w = torch.randn(16, 2, 3, 3, dtype=F64)
    with mac_report() as rep:
        out = F.conv2d(sm, w, None, 2, 1, 1, 4)
        pooled = F.max_pool2d(sm, 3, 2, 1)
    assert isinstance(out, SparseMap) and isinstance(pooled, SparseMap)
    assert rel_err(out.dense(), F.conv2d(x * up, w, None, 2, 1, 1, 4) * out.mask[:, None]) < 1e-12
    assert rel_err(pooled.dense(), F.max_pool2d(x * up, 3, 2, 1) * pooled.mask[:, None]) < 1e-12
    assert rep.fallback_rows() == [] and rep.sparse_share == 1.0
    assert rep.macs("sparse") == out.num_sites * 2 * 9 * 16 + pooled.num_sites * 9 * 8


def test_grouped_conv_through_functional_module():
    """`functional.conv2d` itself accepts any groups now (it hands them to the grouped kernel)."""
    x, vis = _input(1, 4, 4, 8), patch_mask(1, 4, 4, 0.6)
    sm = SparseMap.from_dense(x, vis)
    w = torch.randn(8, 4, 3, 3, dtype=F64)
    a = SF.conv2d(sm, w, None, 1, 1, 1, 2)
    b = kernels.grouped_conv2d(sm, w, None, 1, 1, 1, 2)
    assert torch.equal(a.features, b.features)
    with pytest.raises(ValueError, match="input channels"):
        kernels.grouped_conv2d(sm, torch.randn(8, 3, 3, 3, dtype=F64), None, 1, 1, 1, 2)


@pytest.mark.parametrize("op", ["mean", "sum", "amax", "amin"])
def test_spatial_reduce_sees_hidden_zeros(op):
    """Over H, W a sample's hidden sites count as zeros: mean divides by H*W, max/min see a 0."""
    x, vis = _input(3, 4, 6, 5), patch_mask(3, 4, 6, 0.9)
    x = x.abs() + 1 if op == "amin" else -x.abs() - 1  # every visible value beats 0 the wrong way
    sm = SparseMap.from_dense(x, vis)
    ref = getattr(torch, op)(x * sm.mask[:, None].to(F64), dim=(2, 3))
    assert rel_err(kernels.spatial_reduce(sm, op), ref) < 1e-13


SAME = [  # (in, out, kernel, stride, groups): timm's Conv2dSame (TF 'same' padding, asymmetric when strided)
    (3, 8, 3, 2, 1), (8, 8, 5, 2, 8), (8, 16, 3, 2, 2), (8, 8, 3, 1, 1), (8, 8, 4, 1, 1), (8, 8, 2, 2, 1),
]


@pytest.mark.parametrize("case", SAME, ids=_ids)
@pytest.mark.parametrize("mask", MASKS[:2], ids=_ids)
def test_tf_same_conv(case, mask):
    from timm.layers.conv2d_same import Conv2dSame
    cin, cout, k, s, g = case
    B, gh, gw, ratio = mask
    conv = Conv2dSame(cin, cout, k, s, groups=g).to(F64)
    with mac_report() as rep:
        r = assert_equivalent(conv, _input(B, gh, gw, cin), patch_mask(B, gh, gw, ratio))
    assert type(r["sparse_model"]).__name__ == "SparseConv2dSame"
    assert rep.fallback_rows() == [] and rep.sparse_share == 1.0
