"""Shared helpers for the sparse-engine tests: random patch masks and the dense-masked equivalence check."""
from __future__ import annotations

import copy

import torch
from torch import nn

from sparse_mim.sparse import SparseMap, active_mask, dense_masked, mask_at, sparsify


def patch_mask(B: int, gh: int, gw: int, mask_ratio: float, seed: int = 0) -> torch.Tensor:
    """SparK masking: each image keeps round(gh*gw*(1-ratio)) (at least 1) random patches. True = visible."""
    g = torch.Generator().manual_seed(seed)
    keep = max(1, round(gh * gw * (1 - mask_ratio)))
    order = torch.rand(B, gh * gw, generator=g).argsort(1)
    m = torch.zeros(B, gh * gw, dtype=torch.bool)
    m.scatter_(1, order[:, :keep], True)
    return m.view(B, gh, gw)


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-8) -> float:
    """max |a - b| relative to max |b| (the scale of the reference; at least ``floor``, for grads that are 0
    up to rounding, e.g. a conv bias followed by a training-mode BatchNorm)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor))


def run_both(module: nn.Module, x: torch.Tensor, visible: torch.Tensor, seed: int = 0, grad: bool = True):
    """Run the sparse twin and the dense-masked twin of (copies of) ``module`` on the same input.

    Returns a dict with the dense outputs (sparse scattered with zeros, dense-masked
    multiplied by the output mask), the input gradients, the parameter gradients
    and buffers of both, and the sparse output map.
    """
    sparse_model = sparsify(copy.deepcopy(module))
    masked_model = dense_masked(copy.deepcopy(module))
    xs = x.clone().requires_grad_(grad)
    xd = x.clone().requires_grad_(grad)
    torch.manual_seed(seed)
    out_s = sparse_model(SparseMap.from_dense(xs, visible))
    with active_mask(visible):
        torch.manual_seed(seed)
        out_d = masked_model(xd * mask_at(xd))
        out_d = out_d * mask_at(out_d)
    dense_s = out_s.dense()
    result = {"sparse_map": out_s, "out_s": dense_s, "out_d": out_d, "sparse_model": sparse_model,
              "masked_model": masked_model}
    if grad:
        g = torch.randn(out_d.shape, dtype=out_d.dtype, generator=torch.Generator().manual_seed(seed + 1))
        (dense_s * g).sum().backward()
        (out_d * g).sum().backward()
        result["gx_s"], result["gx_d"] = xs.grad, xd.grad
        result["gp"] = [(n, p1.grad, p2.grad) for (n, p1), p2 in
                        zip(sparse_model.named_parameters(), masked_model.parameters())]
    result["buffers"] = [(n, b1, b2) for (n, b1), b2 in zip(sparse_model.named_buffers(), masked_model.buffers())]
    return result


def assert_equivalent(module: nn.Module, x: torch.Tensor, visible: torch.Tensor, tol: float = 1e-5,
                      grad: bool = True, seed: int = 0):
    """Forward, input grad, parameter grads and buffers of the sparse twin equal the dense-masked ones."""
    r = run_both(module, x, visible, seed=seed, grad=grad)
    out_s, out_d = r["out_s"], r["out_d"]
    assert out_s.shape == out_d.shape, (out_s.shape, out_d.shape)
    # the sparse map's sites are exactly the patch mask at the output scale
    sm = r["sparse_map"]
    factor = out_d.shape[2] // visible.shape[1]
    expected_mask = visible.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    assert torch.equal(sm.mask, expected_mask), "output sites differ from the patch mask at the output scale"
    idx = sm.indices
    assert idx.dtype == torch.int32 and idx.is_contiguous()
    assert torch.equal(idx, expected_mask.nonzero().int()), "output rows are not in canonical (b, y, x) order"
    assert rel_err(out_s, out_d) <= tol, f"forward differs: rel err {rel_err(out_s, out_d):.2e}"
    if grad:
        assert rel_err(r["gx_s"], r["gx_d"]) <= tol, f"input grad differs: rel err {rel_err(r['gx_s'], r['gx_d']):.2e}"
        for name, g_s, g_d in r["gp"]:
            assert (g_s is None) == (g_d is None), name
            if g_d is not None:
                assert rel_err(g_s, g_d) <= tol, f"grad of {name} differs: rel err {rel_err(g_s, g_d):.2e}"
    for name, b_s, b_d in r["buffers"]:
        if b_d.is_floating_point():
            assert rel_err(b_s, b_d) <= tol, f"buffer {name} differs"
        else:
            assert torch.equal(b_s, b_d), name
    return r
