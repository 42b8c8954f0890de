"""The sparse ops under bf16 autocast equal their dense-masked twins under the same autocast.

Both sides see the same fp32 inputs and weights, autocast casts them to bf16 the same
way, and every op follows its dense twin's dtype policy (convs / linears in bf16 with
fp32 accumulation, norms and sums accumulated in fp32, outputs in the dtype the dense
op returns). What differs is only the *order* of the fp32 accumulations (the gather-GEMM,
a per-window conv or the dense conv sum the same products in different orders, ~1e-7)
and therefore, rarely, on which side of a bf16 rounding boundary a result lands.

Tolerance. bf16 keeps 8 significant bits: ``torch.finfo(torch.bfloat16).eps`` = 2^-7, and
one round-to-nearest errs by at most u = 2^-8 = 3.9e-3 relative. Two roundings of
nearly equal numbers can land one ulp apart, 2u = 2^-7 relative to the value. An op
rounds at most ``r`` times in a chain, so |sparse - dense| <= r * 2u * |value| <=
r * 2^-7 * max|value|. We check max |a - b| / max |b| (`rel_err`) against ``r * 2^-7``:

* single ops, forward: r = 2 (the conv output, then + bias: the sparse op adds the bias
  after the GEMM, the dense conv inside it), 1.6e-2;
* stride-1 ops, gradients: r = 1 (the GEMM / conv-backward output; casts of the
  incoming bf16 gradient and of the result to fp32 are exact), 7.8e-3;
* strided ops, gradients: r = 2 (the gather path's input gradient is rounded per
  tap row, then scatter-added in fp32 and rounded again), 1.6e-2;
* short stacks (conv -> norm -> act -> conv): r = 4, 3.1e-2.

The fp32 tests in test_sparse_ops.py stay at 1e-5 / float64. The tests can fail: a bf16
accumulation in the depthwise taps (measured 1.3e-2 on the 7x7 gradients against 7.8e-3
allowed) or in a segment sum (stalls at 256 equal terms), or a missing tap (O(1)).
"""
import pytest
import torch
from torch import nn

from sparse_mim.sparse import SparseMap, functional as SF, sparse_global_avg_pool
from sparse_mim.testing import ChannelsLast, assert_equivalent, patch_mask, rel_err, run_both

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.precision]

BF16 = torch.bfloat16
U = 2.0 ** -8                  # bf16 unit roundoff
FACTOR = 4
MASKS = [(2, 4, 4, 0.6), (3, 4, 6, 0.75)]


class Autocast(nn.Module):
    """Run ``inner`` under CPU autocast (backward runs outside, as in a training step)."""

    def __init__(self, inner: nn.Module, dtype=BF16):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x):
        with torch.autocast("cpu", dtype=self.dtype):
            return self.inner(x)




@pytest.fixture
def backend(request):
    previous = SF.set_conv_backend(request.param)
    yield request.param
    SF.set_conv_backend(previous)


def _input(B, gh, gw, C, factor=FACTOR, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, gh * factor, gw * factor, generator=g)


def assert_bf16_equivalent(module: nn.Module, x, visible, seed: int = 0):
    """Sparse vs dense-masked under bf16 autocast: the same output dtype, fp32 gradients and buffers, and every
    number within the shared error model (`sparse_mim.testing.assert_equivalent` with u = 2^-8)."""
    r = assert_equivalent(Autocast(module), x, visible, seed=seed, dtype=BF16)
    assert r["sparse_map"].features.dtype == r["out_d"].dtype, (r["sparse_map"].features.dtype, r["out_d"].dtype)
    assert r["gx_s"].dtype == torch.float32
    for name, g_s, g_d in r["gp"]:
        assert (g_s is None) == (g_d is None), name
        assert g_s is None or g_s.dtype == torch.float32, name  # master weights and their grads stay fp32
    for name, b_s, b_d in r["buffers"]:
        assert not b_d.is_floating_point() or b_s.dtype == torch.float32, f"buffer {name}"
    return r


# ---------------------------------------------------------------------------------------------------- convs
STRIDE1_CASES = ([(b, m) for b in ("gather", "windows", "dense") for m in MASKS]
                 + [("spconv", MASKS[0]), ("autotune", MASKS[1])])  # spconv: no bf16 kernel, the fallback


@pytest.mark.parametrize("backend,mask", STRIDE1_CASES, indirect=["backend"], ids=str)
@pytest.mark.parametrize("cin,cout,k,groups", [(8, 16, 3, 1), (16, 16, 7, 16), (16, 16, 3, 16)])
def test_conv_stride1_bf16(backend, cin, cout, k, groups, mask):
    """Every stride-1 path (spconv has no bf16 kernel: its forced mode falls back, still exact)."""
    B, gh, gw, ratio = mask
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=True)
    assert_bf16_equivalent(conv, _input(B, gh, gw, cin), patch_mask(B, gh, gw, ratio))


@pytest.mark.parametrize("backend", ["gather", "dense"], indirect=True)
@pytest.mark.parametrize("cin,cout,k,s,p,groups", [(3, 8, 7, 2, 3, 1), (8, 16, 3, 2, 1, 1), (8, 16, 2, 2, 0, 1),
                                                   (8, 16, 1, 2, 0, 1), (16, 16, 3, 2, 1, 16)])
def test_conv_strided_bf16(backend, cin, cout, k, s, p, groups):
    """Strided convs: the gather path's input gradient is a scatter-add (accumulated in fp32)."""
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=groups, bias=True)
    assert_bf16_equivalent(conv, _input(3, 4, 6, cin), patch_mask(3, 4, 6, 0.6))


def test_pointwise_bf16():
    assert_bf16_equivalent(nn.Conv2d(8, 16, 1), _input(2, 4, 4, 8), patch_mask(2, 4, 4, 0.6))


# ---------------------------------------------------------------------------------------------------- norms, pools
def _affine(m):
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    return m


def _grn(c):
    from timm.layers.grn import GlobalResponseNorm
    return ChannelsLast(_affine(GlobalResponseNorm(c, channels_last=True)))


def _ln2d(c):
    from timm.layers import LayerNorm2d
    return _affine(LayerNorm2d(c))


STACKS = {
    "conv_bn_relu_pool": lambda c: nn.Sequential(nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                                 nn.MaxPool2d(3, 2, 1)),
    "conv_bn_eval_relu_conv": lambda c: nn.Sequential(nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16).eval(),
                                                      nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)),
    "convnext_block": lambda c: nn.Sequential(nn.Conv2d(c, c, 7, padding=3, groups=c), ChannelsLast(
        nn.Sequential(_affine(nn.LayerNorm(c)), nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)))),
    "convnextv2_grn": lambda c: nn.Sequential(nn.Conv2d(c, c, 3, padding=1), _grn(c), nn.Conv2d(c, c, 3, padding=1)),
    "ln2d_strided": lambda c: nn.Sequential(_ln2d(c), nn.Conv2d(c, 2 * c, 2, stride=2)),
}


@pytest.mark.parametrize("name", list(STACKS))
def test_stacks_bf16(name):
    """Short stacks with the norms (fp32 statistics), pooling and per-site layers between convs.

    (No conv bias before a train-mode BN: its gradient is 0 up to rounding noise, as in ResNets.)"""
    assert_bf16_equivalent(STACKS[name](16), _input(3, 4, 6, 16), patch_mask(3, 4, 6, 0.6))


def test_sums_over_many_sites_accumulate_in_fp32():
    """Per-sample sums over > 256 sites (GRN, global average pool): a bf16 accumulator would stall at 256."""
    x = torch.ones(2, 4, 32, 32)
    vis = patch_mask(2, 4, 4, 0.25)  # 12 of 16 patches of 8x8 sites: 768 visible sites per sample
    sm = SparseMap.from_dense(x.to(BF16), vis)
    pooled = sparse_global_avg_pool(sm)
    assert pooled.dtype == BF16 and torch.equal(pooled, torch.ones(2, 4, dtype=BF16))
    from timm.layers.grn import GlobalResponseNorm
    r = assert_bf16_equivalent(ChannelsLast(_affine(GlobalResponseNorm(4, channels_last=True))),
                               torch.randn(2, 4, 32, 32), vis)
    assert r["sparse_map"].features.dtype == torch.float32  # timm's GRN: x + addcmul(fp32 bias, ...) is fp32


def test_drop_path_bf16():
    from timm.layers import DropPath
    assert_bf16_equivalent(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), DropPath(0.5)), _input(4, 4, 6, 8),
                           patch_mask(4, 4, 6, 0.6), seed=3)


def test_bf16_is_close_to_fp32():
    """The bf16 result itself is a faithful low-precision copy of the fp32 one (not only equal to its twin).

    Inputs and weights are rounded to bf16 (2 roundings), each conv's output once more: 4 in a chain,
    <= 4 * 2u relative. Smooth layers only: against fp32 a ReLU's derivative flips wherever the bf16
    pre-activation is within rounding of 0 (a fraction ~u of the sites, each gradient entry then wholly
    different: sqrt(u) ~ 6% in norm), and a train-mode BatchNorm's backward subtracts means (the
    cancellation turns 2^-8 into a few percent). Sparse and dense-masked still agree with each other
    there, see test_stacks_bf16: the comparison that matters is between the two bf16 twins.
    """
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 16, 3, 2, 1))
    x, vis = _input(3, 4, 6, 16), patch_mask(3, 4, 6, 0.6)
    fp32 = run_both(net, x, vis)
    bf16 = run_both(Autocast(net), x, vis)
    assert rel_err(bf16["out_s"].float(), fp32["out_s"]) <= 4 * 2 * U
    assert rel_err(bf16["gx_s"], fp32["gx_s"]) <= 4 * 2 * U
    for (name, g_bf16, _), (_, g_fp32, _) in zip(bf16["gp"], fp32["gp"]):
        assert rel_err(g_bf16, g_fp32) <= 4 * 2 * U, name


# ---------------------------------------------------------------------------------------------------- spconv
def test_spconv_low_precision_where_supported():
    """spconv runs fp16 where its kernels take it (CUDA); bf16 is refused, the forced mode falls back to gather."""
    from sparse_mim.sparse.spconv_backend import spconv_available, spconv_supports
    if not spconv_available():
        pytest.skip("spconv not installed")
    x = torch.randn(8, 4)
    assert spconv_supports(x) and not spconv_supports(x.to(BF16))
    if torch.cuda.is_available():
        assert spconv_supports(x.cuda().half())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="spconv's fp16 implicit GEMM needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_spconv_cuda_autocast(dtype):
    """On CUDA: the spconv path (fp16) or its fallback (bf16) equals dense-masked under autocast."""
    from sparse_mim.testing import run_both as _run_both
    previous = SF.set_conv_backend("spconv")
    try:
        conv = nn.Conv2d(16, 32, 3, padding=1).cuda()
        vis = patch_mask(2, 4, 4, 0.6).cuda()
        x = _input(2, 4, 4, 16).cuda()

        class AC(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, t):
                with torch.autocast("cuda", dtype=dtype):
                    return self.inner(t)
        r = _run_both(AC(conv), x, vis)
        eps = torch.finfo(dtype).eps
        assert r["sparse_map"].features.dtype == dtype
        assert rel_err(r["out_s"].float(), r["out_d"].float()) <= 4 * eps
        assert rel_err(r["gx_s"], r["gx_d"]) <= 4 * eps
    finally:
        SF.set_conv_backend(previous)


@pytest.mark.parametrize("path", ["dense_fp32", "windows_fp32"])
@pytest.mark.parametrize("k", [7, 3])
def test_depthwise_fp32_candidates_equal_bf16(monkeypatch, path, k):
    """The autotuner's fp32 depthwise candidates (exact up-cast of the bf16 inputs, output rounded back):
    the bf16 conv's numbers up to fp32 summation order, so the same 1-2 ulp bounds hold."""
    from sparse_mim.sparse import autotune
    choose = autotune.choose
    monkeypatch.setattr(SF, "_choose_path", lambda call: path if call.kind == "depthwise" else choose(call))
    conv = nn.Conv2d(16, 16, k, padding=k // 2, groups=16)
    r = assert_bf16_equivalent(conv, _input(2, 4, 4, 16), patch_mask(2, 4, 4, 0.6))
    assert autotune.last_path() == path and r["sparse_map"].features.dtype == BF16
