"""Equivalence-test helpers (importable like ``torch.testing``): sparse == dense-masked.

Every sparse op and backbone of the project is tested against SparK's dense-masked
simulation of the same weights. This module is the one place for what those tests
share:

* `random_visible_mask` / `patch_mask`: SparK's random patch mask
  (`sparse_mim.spark.random_visible_mask`);
* `randomize_weights_`: weights that make every layer matter (see below);
* `relative_error` (norm-based) and `max_relative_error` (max-based);
* `assert_equivalent(module, x, visible)`: a module (an op, a block, a whole
  unchanged timm / torchvision trunk) converted both ways; `run_both` returns the raw
  results;
* `assert_backbones_equivalent(sparse, dense, images, visible, train)`: two
  `HierarchicalBackbone` twins (4 maps, gradients, BN statistics).

Why randomise: freshly initialised backbones hide bugs. ConvNeXt's layer scale starts
at 1e-6 (the residual branch is invisible next to the shortcut), V2's GRN starts at
zero (identity), ResNets zero their last BN, BatchNorm's running statistics are
0 / 1 and LayerNorm's affine is 1 / 0. A test that compares sparse and dense outputs
must randomise all of them.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["random_visible_mask", "patch_mask", "randomize_weights_", "relative_error", "max_relative_error",
           "rel_err", "run_both", "assert_equivalent", "assert_backbones_equivalent", "ChannelsLast"]


class ChannelsLast(nn.Module):
    """A per-site layer applied channels-last, as timm's ConvNeXt block does around its LayerNorm / MLP."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------- masks
def random_visible_mask(batch: int, height: int, width: int, mask_ratio: float = 0.6,
                        generator: Optional[torch.Generator] = None) -> Tensor:
    """SparK's mask on a ``height`` x ``width`` patch grid: every image keeps exactly
    round(h*w*(1-mask_ratio)) patches (at least 1). True = visible."""
    from .spark import random_visible_mask as spark_mask

    keep = max(1, round(height * width * (1 - mask_ratio)))
    return spark_mask(batch, (height, width), keep, generator)


def patch_mask(B: int, gh: int, gw: int, mask_ratio: float, seed: int = 0) -> Tensor:
    """`random_visible_mask` with a seed instead of a generator."""
    return random_visible_mask(B, gh, gw, mask_ratio, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- weights
@torch.no_grad()
def randomize_weights_(model: nn.Module, generator: Optional[torch.Generator] = None, scale: float = 1.0) -> nn.Module:
    """Give every parameter and BN buffer values of order 1 so each layer changes the output.

    Conv / linear weights get a fan-in scaled normal (keeps activations O(1) through
    deep nets); norm affines, layer scales and GRN parameters get values around 1 / 0
    with a spread; BN running means / variances get non-trivial statistics.
    """
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    for name, p in model.named_parameters():
        if p.dim() > 1:  # conv [O, I, kh, kw] or linear [O, I]
            fan_in = p[0].numel()
            p.copy_(randn(*p.shape) * (scale / fan_in) ** 0.5)
        elif name.endswith("bias"):
            p.copy_(0.2 * randn(*p.shape))
        else:  # norm weights, layer-scale gamma, GRN weight: around 1
            p.copy_(1.0 + 0.3 * randn(*p.shape))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(0.2 * randn(*m.running_mean.shape))
            m.running_var.copy_(0.5 + torch.rand(*m.running_var.shape, generator=generator))
            m.num_batches_tracked.fill_(10)
    return model


# ---------------------------------------------------------------------------------------------------- errors
def relative_error(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius norms)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_relative_error(a: Tensor, b: Tensor, floor: float = 1e-8) -> float:
    """max |a - b| relative to max |b| (the scale of the reference; at least ``floor``, for grads that are 0
    up to rounding, e.g. a conv bias followed by a training-mode BatchNorm)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor))


rel_err = max_relative_error  # the engine tests' short name


# ---------------------------------------------------------------------------------------------------- modules
def run_both(module: nn.Module, x: Tensor, visible: Tensor, seed: int = 0, grad: bool = True) -> dict:
    """Run the sparse twin and the dense-masked twin of (copies of) ``module`` on the same input.

    Returns a dict with the dense outputs (sparse scattered with zeros, dense-masked
    multiplied by the output mask), the input gradients, the parameter gradients
    and buffers of both, and the sparse output map.
    """
    from .sparse import SparseMap, active_mask, dense_masked, mask_at, sparsify

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


def assert_equivalent(module: nn.Module, x: Tensor, visible: Tensor, tol: float = 1e-5,
                      grad: bool = True, seed: int = 0) -> dict:
    """Forward, input grad, parameter grads and buffers of the sparse twin equal the dense-masked ones.

    ``module`` maps a [B, C, H, W] tensor to one map (an op, a block, a trunk); it is
    copied, so the caller's module is left as it is.
    """
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


# ---------------------------------------------------------------------------------------------------- backbones
def assert_backbones_equivalent(sparse: nn.Module, dense: nn.Module, images: Tensor, visible: Tensor, train: bool,
                                tol: float = 1e-4) -> None:
    """Assert that a sparse backbone equals its dense-masked twin (same weights) on one batch.

    Checks the four maps (shapes, zeros at hidden sites, relative error < ``tol``), the
    gradient of a scalar loss that weighs every site differently w.r.t. every trainable
    parameter (relative per parameter, with a floor of 1e-3 * tol of the total gradient
    norm for gradients that are ~0 analytically), and, in train mode, the BN running
    statistics after the step.
    """
    sparse.train(train)
    dense.train(train)
    sparse.zero_grad(set_to_none=True)
    dense.zero_grad(set_to_none=True)
    out_s, out_d = sparse(images, visible), dense(images, visible)
    num_maps = len(sparse.channels)
    assert len(out_s) == len(out_d) == num_maps
    for i, (a, b) in enumerate(zip(out_s, out_d)):
        stride = sparse.downsample_ratio // 2 ** (num_maps - 1 - i)
        assert a.shape == b.shape == (images.shape[0], sparse.channels[i], images.shape[2] // stride,
                                      images.shape[3] // stride)
        factor = a.shape[-1] // visible.shape[-1]
        hidden = ~visible.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
        if hidden.any():
            assert a.permute(0, 2, 3, 1)[hidden].abs().max() == 0, f"map {i}: non-zero hidden sites (sparse)"
            assert b.permute(0, 2, 3, 1)[hidden].abs().max() == 0, f"map {i}: non-zero hidden sites (dense)"
        err = relative_error(a, b)
        assert err < tol, f"map {i} (stride {stride}): relative error {err:.2e}"
    # a scalar loss that weighs every site and channel differently
    weights = [torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(7 + i))
               for i, o in enumerate(out_d)]
    sum((o * w).sum() for o, w in zip(out_s, weights)).backward()
    sum((o * w).sum() for o, w in zip(out_d, weights)).backward()
    grads_d = {n: p.grad for n, p in dense.named_parameters() if p.requires_grad}
    total = torch.stack([g.norm() for g in grads_d.values() if g is not None]).norm()
    for n, p in sparse.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{n} got no gradient in the sparse backbone"
        assert grads_d[n] is not None, f"{n} got no gradient in the dense-masked backbone"
        err = (p.grad - grads_d[n]).norm()
        # relative per parameter, with a floor for gradients that are ~0 analytically
        assert err <= tol * grads_d[n].norm() + 1e-3 * tol * total, \
            f"gradient of {n}: error {err:.2e}, norm {grads_d[n].norm():.2e}"
    if train:
        buffers_d = dict(dense.named_buffers())
        for n, b in sparse.named_buffers():
            if b.is_floating_point():
                assert relative_error(b, buffers_d[n]) < tol, f"buffer {n} differs after a training step"
