"""spconv pitfalls (docs/sparse_engine.md) shown to exist, shown to be avoided, and a repeated 2-thread equivalence run."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_mim.sparse import SparseMap, functional as SF, sparsify
from sparse_mim.testing import assert_equivalent, conv_backend, patch_mask

spconv_backend = pytest.importorskip("sparse_mim.sparse.spconv_backend")
if not spconv_backend.spconv_available():
    pytest.skip("spconv does not import here", allow_module_level=True)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import spconv.pytorch as spconv
    from spconv.core import ConvAlgo

F64 = torch.float64


def _map(B=2, gh=4, gw=6, C=8, factor=4, ratio=0.6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, gh * factor, gw * factor, generator=g, dtype=dtype)
    vis = patch_mask(B, gh, gw, ratio, seed=seed)
    up = vis.repeat_interleave(factor, 1).repeat_interleave(factor, 2)[:, None]
    return x * up, vis, up


def _spconv_subm(features, indices, spatial_shape, batch_size, weight_torch):
    """A raw spconv SubMConv2d (Native, CPU) with a torch-layout weight converted to KRSC."""
    k = weight_torch.shape[-1]
    conv = spconv.SubMConv2d(weight_torch.shape[1], weight_torch.shape[0], k, padding=k // 2, bias=False,
                             algo=ConvAlgo.Native).to(features.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight_torch.permute(0, 2, 3, 1))
    out = conv(spconv.SparseConvTensor(features, indices, list(spatial_shape), batch_size))
    return out.features


def test_trap_noncontiguous_indices_exists_and_is_avoided():
    """Pitfall 2: `mask.nonzero().int()` is column-major; spconv reads raw memory -> wrong numbers."""
    x, vis, up = _map()
    sm = SparseMap.from_dense(x, vis)
    w = torch.randn(8, 8, 3, 3)
    reference = F.conv2d(x, w, padding=1).permute(0, 2, 3, 1)[sm.mask]

    raw = sm.mask.nonzero().int()
    assert not raw.is_contiguous(), "torch changed nonzero's layout: the trap is gone, update the test"
    wrong = _spconv_subm(sm.features, raw, sm.spatial_shape, sm.batch_size, w)
    assert (wrong - reference).abs().max() > 0.1 * reference.abs().max(), "the trap should give wrong numbers"

    assert sm.indices.dtype == torch.int32 and sm.indices.is_contiguous()
    right = _spconv_subm(sm.features, sm.indices, sm.spatial_shape, sm.batch_size, w)
    assert torch.allclose(right, reference, rtol=1e-4, atol=1e-4)
    # and the engine's own spconv path feeds the contiguous indices
    with conv_backend("spconv"):
        assert torch.allclose(SF.conv2d(sm, w, None, 1, 1).features, reference, rtol=1e-4, atol=1e-4)


def test_trap_1x1_weight_layout_exists_and_is_avoided():
    """Pitfall 3: spconv's 1x1 path reads the KRSC weight as view(in, out)."""
    x, vis, up = _map(C=8)
    sm = SparseMap.from_dense(x, vis)
    w = torch.randn(16, 8, 1, 1)
    reference = F.conv2d(x, w).permute(0, 2, 3, 1)[sm.mask]
    conv = spconv.SubMConv2d(8, 16, 1, bias=False, algo=ConvAlgo.Native)
    with torch.no_grad():
        conv.weight.copy_(w.permute(0, 2, 3, 1))  # the documented KRSC conversion...
    wrong = conv(spconv.SparseConvTensor(sm.features, sm.indices, list(sm.spatial_shape), sm.batch_size)).features
    assert (wrong - reference).abs().max() > 0.1 * reference.abs().max(), "...is read in another layout"
    for backend in ("auto", "gather", "spconv"):  # 1x1 is always F.linear, whatever the backend
        with conv_backend(backend):
            assert torch.allclose(SF.conv2d(sm, w).features, reference, rtol=1e-5, atol=1e-5)


def test_weight_layout_krsc_orientation():
    """Pitfall 4: torch [O, I, kh, kw] -> KRSC permute(0, 2, 3, 1), cross-correlation like F.conv2d.

    An asymmetric kernel catches a flip or a transposed (kh, kw)."""
    x, vis, up = _map(C=4, dtype=F64)
    sm = SparseMap.from_dense(x, vis)
    w = torch.zeros(4, 4, 3, 3, dtype=F64)
    w[:, :, 0, 2] = torch.randn(4, 4, dtype=F64)  # one off-centre tap only
    reference = F.conv2d(x, w, padding=1).permute(0, 2, 3, 1)[sm.mask]
    with conv_backend("spconv"):
        assert torch.allclose(SF.conv2d(sm, w, None, 1, 1).features, reference, rtol=1e-10, atol=1e-10)


def test_algorithm_follows_device():
    """Pitfall 1: Native on CPU (the default algorithm needs a CUDA driver), implicit GEMM on CUDA."""
    cpu = spconv_backend._template(8, 8, (3, 3), (1, 1), (1, 1), False)
    cuda = spconv_backend._template(8, 8, (3, 3), (1, 1), (1, 1), True)
    assert cpu.algo == ConvAlgo.Native and cuda.algo == ConvAlgo.MaskImplicitGemm


def test_spconv_index_pairs_reused_per_scale():
    x, vis, up = _map()
    sm = SparseMap.from_dense(x, vis)
    w = torch.randn(8, 8, 3, 3)
    with conv_backend("spconv"):
        y = SF.conv2d(sm, w, None, 1, 1)
        keys = [k for k in sm.cache if isinstance(k, tuple) and k[0] == "spconv_indice_dict"]
        assert len(keys) == 1
        pairs = sm.cache[keys[0]]
        SF.conv2d(y, w, None, 1, 1)
        assert sm.cache[keys[0]] is pairs


def test_repeated_two_thread_equivalence():
    """Pitfall 11: repeated runs with 2 torch threads give identical, correct results on every path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, vis, up = _map(B=4, C=16, ratio=0.6, dtype=F64)
        layers = {
            "3x3": nn.Conv2d(16, 16, 3, padding=1).to(F64),
            "dw7x7": nn.Conv2d(16, 16, 7, padding=3, groups=16).to(F64),
            "3x3s2": nn.Conv2d(16, 16, 3, stride=2, padding=1).to(F64),
        }
        for backend in ("spconv", "gather", "windows", "dense"):
            with conv_backend(backend):
                for name, layer in layers.items():
                    if backend == "spconv" and name != "3x3":
                        continue
                    first = None
                    for _ in range(3):
                        r = assert_equivalent(layer, x, vis)
                        now = (r["out_s"].detach(), r["gx_s"], [g for _, g, _ in r["gp"]])
                        if first is None:
                            first = now
                        else:
                            assert torch.equal(now[0], first[0]) and torch.equal(now[1], first[1]), (backend, name)
                            assert all(torch.equal(a, b) for a, b in zip(now[2], first[2])), (backend, name)
    finally:
        torch.set_num_threads(threads)


def test_spconv_large_kernel_and_float32_model():
    """A small conv stack through spconv end to end (float32, 5x5 = 25 taps and 3x3)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x, vis, up = _map(C=3)
    with conv_backend("spconv"):
        assert_equivalent(model, x, vis)
    assert isinstance(sparsify(model)[0], nn.Conv2d)  # sparse twins stay instances of their dense class
