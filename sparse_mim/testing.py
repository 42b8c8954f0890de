"""Equivalence-test helpers (importable like ``torch.testing``): sparse == dense-masked.

Every sparse op and backbone of the project is tested against SparK's dense-masked
simulation of the same weights. This module is the one place for what those tests
share:

* `random_visible_mask` / `patch_mask`: SparK's random patch mask
  (`sparse_mim.spark.random_visible_mask`);
* `randomize_weights_`: weights that make every layer matter (see below);
* `conv_backend(name)`: the sparse convs on one backend inside a ``with`` block;
* `relative_error` (norm-based) and `max_relative_error` (max-based);
* the error model every equivalence test uses (`ErrorModel`, below, and docs/testing.md),
  with its float64 reference `masked_reference` (the plain dense model under masking
  hooks: no code shared with the engine);
* `assert_equivalent(module, x, visible)`: a module (an op, a block, a whole
  unchanged timm / torchvision trunk) converted both ways; `run_both` returns the raw
  results;
* `assert_backbones_equivalent(sparse, dense, images, visible, train)`: two
  `HierarchicalBackbone` twins (4 maps, gradients, BN statistics);
* `assert_spark_equivalent(sparse, dense, images, visible)`: the whole SparK model.

The helpers raise `EquivalenceError` (an ``AssertionError`` carrying the `ErrorReport`:
every compared tensor with its errors and bounds).

Why randomise: freshly initialised backbones hide bugs. ConvNeXt's layer scale starts
at 1e-6 (the residual branch is invisible next to the shortcut), V2's GRN starts at
zero (identity), ResNets zero their last BN, BatchNorm's running statistics are
0 / 1 and LayerNorm's affine is 1 / 0. A test that compares sparse and dense outputs
must randomise all of them.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["random_visible_mask", "patch_mask", "randomize_weights_", "relative_error", "max_relative_error",
           "rel_err", "run_both", "run_reference", "masked_reference", "visible_at", "unit_roundoff", "layer_rounding",
           "reduction_length", "ErrorModel", "ErrorReport", "Check", "EquivalenceError", "assert_equivalent",
           "assert_backbones_equivalent", "assert_spark_equivalent", "ChannelsLast", "conv_backend"]


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
@contextlib.contextmanager
def conv_backend(name: str):
    """The sparse convs on backend ``name`` inside the block
    (:func:`sparse_mim.sparse.functional.set_conv_backend`); the previous backend is restored after."""
    from .sparse import functional as SF
    previous = SF.set_conv_backend(name)
    try:
        yield
    finally:
        SF.set_conv_backend(previous)


def relative_error(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius norms)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_relative_error(a: Tensor, b: Tensor, floor: float = 1e-8) -> float:
    """max |a - b| relative to max |b| (the scale of the reference; at least ``floor``, for grads that are 0
    up to rounding, e.g. a conv bias followed by a training-mode BatchNorm)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor))


rel_err = max_relative_error  # the engine tests' short name


# ---------------------------------------------------------------------------------------------------- error model
#
# The rule every equivalence test uses (`ErrorModel`). Rounding differs between machines: oneDNN on an
# AVX-512-BF16 CPU rounds once per GEMM and sums in one fixed order; an AVX2 or SSE4.1 CPU, another BLAS or
# a GPU round and sum differently. So no test compares two finite-precision results with a bound read off
# one machine. Instead, for every compared tensor (a map, an input gradient, a parameter gradient, a BN
# buffer, the loss):
#
#   r    = the float64 result of the same computation (same weights, same mask, same input): by default
#          from `masked_reference`, the plain dense model with every layer's input and output masked by
#          forward hooks, which shares no code with the sparse engine;
#   r~   = the same float64 reference with one modelled rounding per layer, forward and backward: every
#          layer output (and the gradient flowing into it) multiplied by (1 + delta), delta ~ N(0, 1) *
#          `layer_rounding`(dtype, K) (uniform rounding statistics; K the layer's reduction length; bf16 /
#          fp16 accumulate in fp32). It shows how far *any* correct implementation may land at this
#          precision on this computation, amplifiers included: a train-mode BatchNorm over a handful of
#          visible sites divides by a small standard deviation, and r~ moves as much as a real rounding;
#   e(y) = max |y - r| / s, s = max |r| (the reference's own scale); for gradients, whose derivative flips
#          at ReLU / max-pool kinks, ||y - r|| / ||r|| (Frobenius; for a parameter gradient s is at least
#          `GRAD_SCALE_FRACTION` of the largest gradient, since a gradient that is 0 analytically is
#          rounding noise of the terms it sums; for a running mean at least momentum * its layer's
#          running standard deviation, the scale of what it averages);
#
# and requires
#
#   e(twin)   <= FACTOR * e(r~) + floor                (the dense-masked twin rounds like a correct model)
#   e(sparse) <= FACTOR * max(e(twin), e(r~)) + floor  (the sparse path errs at most FACTOR x either)
#   floor      = FLOOR_ULPS * layer_rounding(dtype, K) (K: the largest fan-in; for parameter gradients the
#                                                       sites they sum over, the input's B * H * W)
#
# Both twins see the same inputs rounded the same way, so on a correct engine e(sparse) / e(twin) stays
# near 1 on every instruction set (measured: the worst sparse ratio e(sparse) / max(e(twin), e(r~)) over
# the suite is in docs/testing.md); a missing kernel tap, a hidden site leaking in or a mis-classified op
# moves a result by a fraction of its own size. tests/test_negative_controls.py breaks twins on purpose
# and checks that the rule catches them, by how much, under every instruction set.
FACTOR = 8.0
FLOOR_ULPS = 4.0
GRAD_SCALE_FRACTION = 1e-3


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the relative error of one round-to-nearest in ``dtype`` (bf16 2^-8, fp32 2^-24)."""
    return torch.finfo(dtype).eps / 2


def layer_rounding(dtype: torch.dtype, reduction: int) -> float:
    """The modelled relative error (standard deviation) of one layer computed in ``dtype`` whose output sums
    ``reduction`` = K terms.

    One round-to-nearest errs by a uniform amount in [-u, u]: standard deviation u / sqrt(3). float32 /
    float64: the sum runs in that precision, K roundings that add up like a random walk (sqrt(K) u / sqrt(3);
    the probabilistic bound of Higham & Mary; blocked and pairwise sums do better). bfloat16 / float16:
    autocast rounds the weights to 16 bits and the output once more (the input is usually the previous
    layer's 16-bit output already), and the GEMM accumulates in float32 (PyTorch's CPU kernels, oneDNN,
    cuBLAS' default): sqrt(2) u_16 / sqrt(3) + sqrt(K) u_32 / sqrt(3)."""
    s = math.sqrt(reduction) * unit_roundoff(dtype)
    if torch.finfo(dtype).bits <= 16:
        s = math.sqrt(2) * unit_roundoff(dtype) + math.sqrt(reduction) * unit_roundoff(torch.float32)
    return s / math.sqrt(3)


def reduction_length(module: nn.Module) -> int:
    """The longest dot product of ``module``: max fan-in (in_channels / groups * kh * kw, in_features) of its
    convs and linears (1 for a module without any, e.g. a pool)."""
    k = [p[0].numel() for n, p in module.named_parameters() if p.dim() > 1 and n.endswith("weight")]
    return max(k, default=1)


@dataclass
class Check:
    """One compared tensor: errors of the sparse path, of the twin and of the modelled rounding, and bounds."""
    what: str
    err_sparse: float
    err_twin: float
    err_model: float
    bound_sparse: float
    bound_twin: float

    @property
    def ratio(self) -> float:
        """The worse of error / bound over the two twins (> 1: the check fails)."""
        return max(self.err_sparse / self.bound_sparse, self.err_twin / self.bound_twin)

    def __str__(self) -> str:
        return (f"{self.what}: sparse err {self.err_sparse:.2e} (bound {self.bound_sparse:.2e}), dense-masked err "
                f"{self.err_twin:.2e} (bound {self.bound_twin:.2e}), modelled rounding {self.err_model:.2e}")


class EquivalenceError(AssertionError):
    """Raised by the equivalence helpers; ``report`` holds every `Check` (the failing ones first)."""

    def __init__(self, message: str, report: "ErrorReport"):
        super().__init__(message)
        self.report = report


@dataclass
class ErrorReport:
    """The `Check`s of one equivalence test, under one `ErrorModel`."""
    dtype: torch.dtype
    reduction: int
    checks: list = field(default_factory=list)

    @property
    def worst(self) -> Check:
        return max(self.checks, key=lambda c: c.ratio)

    def failures(self) -> list:
        return sorted((c for c in self.checks if c.ratio > 1), key=lambda c: -c.ratio)

    def raise_if_failed(self, context: str = "") -> "ErrorReport":
        self._log()
        bad = self.failures()
        if bad:
            lines = "\n  ".join(str(c) for c in bad[:8])
            raise EquivalenceError(
                f"{context}sparse and dense-masked results differ beyond the error model ({self.dtype}, "
                f"u = {unit_roundoff(self.dtype):.1e}, K = {self.reduction}; worst ratio {bad[0].ratio:.1f}):\n  "
                f"{lines}", self)
        return self


    def _log(self) -> None:
        """With ``SPARSE_MIM_ERROR_LOG=file``: append the worst check as one JSON line (test, ISA, ratio), to
        see the margin of every equivalence test on a machine (tools/run_tests_restricted_isa.sh reads it)."""
        path = os.environ.get("SPARSE_MIM_ERROR_LOG")
        if not path or not self.checks:
            return
        w = self.worst
        line = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "isa": torch.backends.cpu.get_cpu_capability(),
                "dtype": str(self.dtype), "ratio": w.ratio, "what": w.what, "err_sparse": w.err_sparse,
                "err_twin": w.err_twin, "err_model": w.err_model, "bound_sparse": w.bound_sparse}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


class ErrorModel:
    """Applies the rule above for one compute dtype and reduction length."""

    def __init__(self, dtype: torch.dtype, reduction: int, sites: int = 1):
        self.dtype, self.reduction = dtype, max(int(reduction), 1)
        self.floor = FLOOR_ULPS * layer_rounding(dtype, self.reduction)
        # a parameter gradient sums over every site of its layer's map (at most ``sites``, the input's B*H*W)
        self.grad_floor = FLOOR_ULPS * layer_rounding(dtype, max(self.reduction, int(sites)))
        self.report = ErrorReport(dtype, self.reduction)

    def compare(self, what: str, sparse: Tensor, twin: Tensor, reference: Tensor, rounded: Tensor,
                scale: float = 0.0, floor: Optional[float] = None, gradient: bool = False) -> Check:
        """Add the `Check` of one tensor (sparse result, twin result, float64 reference, float64 reference
        with modelled rounding); ``scale``: a lower limit of the error's denominator (see the rule).

        Values are compared by their largest entry (max |y - r| / max |r|): a forward result is a
        continuous function of the roundings. A gradient is not: where a ReLU's or a max-pool's input lies
        within rounding of its kink, the derivative flips and that entry changes wholesale, on any machine
        and in the modelled rounding alike, but at other entries. So ``gradient=True`` compares Frobenius
        norms (||y - r|| / ||r||), where a flip weighs in proportion to the entries it touches."""
        ref = reference.detach().double()
        size = (ref.norm() if gradient else ref.abs().max()).item() if ref.numel() else 0.0
        s = max(size, scale, 1e-300)

        def err(y):
            y = y.detach().double()
            assert y.shape == ref.shape, f"{what}: shape {tuple(y.shape)} != reference {tuple(ref.shape)}"
            if not ref.numel():
                return 0.0
            d = y - ref
            return (d.norm() if gradient else d.abs().max()).item() / s
        e_s, e_t, e_m = err(sparse), err(twin), err(rounded)
        floor = self.floor if floor is None else floor
        check = Check(what, e_s, e_t, e_m, FACTOR * max(e_t, e_m) + floor, FACTOR * e_m + floor)
        self.report.checks.append(check)
        return check

    def compare_grads(self, what: str, sparse: dict, twin: dict, reference: dict, rounded: dict) -> None:
        """Parameter gradients by name (all four dicts must name the same parameters, None for no grad)."""
        assert set(sparse) == set(twin) == set(reference), \
            f"{what}: parameter sets differ: {sorted(set(sparse) ^ set(reference))}"
        for n in reference:
            assert (sparse[n] is None) == (reference[n] is None) == (twin[n] is None), \
                f"{what} {n}: gradient present on one side only"
        present = [g for g in reference.values() if g is not None]
        largest = max((g.norm().item() for g in present if g.numel()), default=0.0)
        for n, g in reference.items():
            if g is not None:
                self.compare(f"{what} {n}", sparse[n], twin[n], g, rounded[n], GRAD_SCALE_FRACTION * largest,
                             self.grad_floor, gradient=True)


    def compare_buffers(self, sparse: dict, twin: dict, reference: dict, rounded: dict, modules: dict) -> None:
        """Buffers by name (BN running statistics after a train-mode step; integer buffers must be equal).

        A running mean moves by momentum * (mean of the batch); summing N values errs relative to their
        magnitude (~ the standard deviation), not to their mean, which may be near 0. So its denominator is
        at least momentum * sqrt(max running_var) of the same layer."""
        for n, b in sparse.items():
            if not b.is_floating_point():
                assert torch.equal(b, twin[n]) and torch.equal(b, reference[n].to(b.dtype)), f"buffer {n} differs"
                continue
            scale = 0.0
            if n.endswith("running_mean") and n[:-4] + "var" in reference:
                layer = modules.get(n.rsplit(".", 1)[0] if "." in n else "")
                momentum = getattr(layer, "momentum", None) or 1.0
                scale = momentum * reference[n[:-4] + "var"].double().clamp_min(0).max().sqrt().item()
            self.compare(f"buffer {n}", b, twin[n], reference[n], rounded[n], scale)


# ---------------------------------------------------------------------------------------------------- reference
def visible_at(visible: Tensor, height: int, width: int) -> Optional[Tensor]:
    """The patch mask upsampled (nearest) to ``height`` x ``width``, or None when that size is not a whole
    multiple of the patch grid (a pooled [B, C, 1, 1] gate, a map off the grid)."""
    gh, gw = visible.shape[1:]
    if height == 0 or height % gh or width % gw or height // gh != width // gw:
        return None
    f = height // gh
    return visible.repeat_interleave(f, 1).repeat_interleave(f, 2)


def _layout(m: nn.Module) -> Optional[str]:
    """Where a leaf module's maps keep their channels: "nchw", "nhwc", or None for a per-site module
    (activations, dropout, identity: masking around them is never needed)."""
    if getattr(type(m), "__module__", "").startswith(("torch.nn.modules.activation", "torch.nn.modules.dropout",
                                                      "timm.layers.activations")) \
            or type(m).__name__ in ("Identity", "DropPath", "Flatten"):
        return None
    if type(m) in (nn.Linear, nn.LayerNorm) or getattr(m, "spatial_dim", None) == (1, 2):  # timm GRN, NHWC
        return "nhwc"
    return "nchw"


def _apply_mask(t, visible: Tensor, layout: str):
    if not (isinstance(t, Tensor) and t.dim() == 4 and t.is_floating_point() and t.shape[0] == visible.shape[0]):
        return t
    h, w = (t.shape[2], t.shape[3]) if layout == "nchw" else (t.shape[1], t.shape[2])
    m = visible_at(visible, h, w)
    if m is None:
        return t
    m = m.to(t.dtype)
    return t * (m[:, None] if layout == "nchw" else m[..., None])


def _batch_norm_on_visible(bn: nn.Module, visible: Tensor):
    """BatchNorm over the visible sites only (SparK's rule), written for the reference: rows of the
    zero-filled NCHW map at visible sites -> F.batch_norm -> zeros elsewhere (timm's BatchNormAct2d: then
    its activation)."""
    plain = bn.forward

    def forward(x):
        m = visible_at(visible, x.shape[2], x.shape[3]) if x.dim() == 4 else None
        if m is None:
            return plain(x)
        rows = x.permute(0, 2, 3, 1)[m]
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        training = bn.training or (bn.running_mean is None and bn.running_var is None)
        keep_stats = not bn.training or bn.track_running_stats
        out_rows = F.batch_norm(rows, bn.running_mean if keep_stats else None, bn.running_var if keep_stats else None,
                                bn.weight, bn.bias, training, factor, bn.eps)
        out = out_rows.new_zeros(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).index_put((m,), out_rows)
        out = out.permute(0, 3, 1, 2)
        if hasattr(bn, "act"):
            out = bn.act(out)
        if hasattr(bn, "drop"):
            out = bn.drop(out)
        return out
    return forward


def _layer_reduction(m: nn.Module, out) -> int:
    """K of one layer: its fan-in (convs, linears), the values its statistics sum (BatchNorm: B * H * W;
    LayerNorm: the normalised size), else 1."""
    fan_in = [p[0].numel() for n, p in m.named_parameters(recurse=False) if p.dim() > 1]
    if fan_in:
        return max(fan_in)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and isinstance(out, Tensor) and out.dim() > 1:
        return out.numel() // out.shape[1]
    if isinstance(m, nn.LayerNorm):
        return math.prod(m.normalized_shape)
    return 1


def _round(out, rel: float, gen: torch.Generator):
    """The modelled rounding of one layer: ``out * (1 + delta)`` in the forward pass and the same for the
    gradient flowing back into ``out`` (a fresh draw: the backward GEMMs round too), delta ~ N(0, 1) * rel."""
    if not rel or not isinstance(out, Tensor) or not out.is_floating_point():
        return out
    out = out * (1 + torch.randn(out.shape, generator=gen, dtype=out.dtype) * rel)
    if out.requires_grad:
        out.register_hook(lambda g: g * (1 + torch.randn(g.shape, generator=gen, dtype=g.dtype) * rel))
    return out


def masked_reference(module: nn.Module, visible: Tensor, rounding: Optional[torch.dtype] = None,
                     seed: int = 0) -> nn.Module:
    """SparK's dense-masked semantics of ``module`` (a float64 copy), built from forward hooks only.

    Independent of the sparse engine (no `sparse_mim.sparse` code, no op tables): every leaf module that
    mixes sites (convs, pools, norms, GRN, anything unknown) gets its 4-D input and its output multiplied by
    ``visible`` upsampled to that map's size (NCHW, or NHWC for ``nn.Linear`` / ``nn.LayerNorm`` / modules
    with ``channels_last=True``); BatchNorms take their statistics over the visible sites. Per-site leaves
    (activations, dropout) need no mask. Ops a module's own ``forward`` calls between leaves are not seen:
    a model whose spatial work happens in such functional calls needs the op-level simulation
    (``assert_equivalent(..., reference="masked")``).

    ``rounding``: model one rounding of that dtype per layer output, forward and backward: ``out * (1 +
    delta)``, delta ~ N(0, 1) * `layer_rounding`(rounding, K) (K: `_layer_reduction`), drawn from a
    generator seeded by ``seed`` (`_round`).
    """
    ref = copy.deepcopy(module).double()
    gen = torch.Generator().manual_seed(10_000 + seed)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.forward = _batch_norm_on_visible(m, visible)
        if next(m.children(), None) is not None and not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        layout = _layout(m)
        if layout is None:
            continue
        def pre(mod, args, layout=layout):
            return tuple(_apply_mask(a, visible, layout) for a in args)

        def post(mod, args, out, layout=layout):
            rel = 0.0 if rounding is None else layer_rounding(rounding, _layer_reduction(mod, out))
            return _apply_mask(_round(out, rel, gen), visible, layout)
        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)
    return ref


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
        g = _output_weights(out_d, seed)
        result["out_weights"] = g
        (dense_s * g).sum().backward()
        (out_d * g).sum().backward()
        result["gx_s"], result["gx_d"] = xs.grad, xd.grad
        result["gp"] = [(n, p1.grad, p2.grad) for (n, p1), p2 in
                        zip(sparse_model.named_parameters(), masked_model.parameters())]
    result["buffers"] = [(n, b1, b2) for (n, b1), b2 in zip(sparse_model.named_buffers(), masked_model.buffers())]
    return result


def _output_weights(out: Tensor, seed: int) -> Tensor:
    """The fixed random weights of the scalar loss sum(out * g) whose gradients the helpers compare (drawn in
    float32 whatever ``out``'s dtype, so a float64 reference can use the very same numbers)."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.dtype)


def run_reference(module: nn.Module, x: Tensor, visible: Tensor, seed: int = 0, grad: bool = True,
                  rounding: Optional[torch.dtype] = None, reference: str = "hooks",
                  out_weights: Optional[Tensor] = None) -> dict:
    """The float64 reference of ``module`` on ``x`` (see the error model): ``reference="hooks"`` is
    `masked_reference` (independent of the engine); ``"masked"`` is the engine's op-level dense-masked
    simulation in float64, for models whose spatial work happens in functional calls. ``rounding``: with
    one modelled rounding of that dtype per layer. Same keys as `run_both` (``out``, ``gx``, ``grads``,
    ``buffers``), computed with the loss weights ``out_weights`` (`run_both`'s ``"out_weights"``)."""
    if reference == "hooks":
        model = masked_reference(module, visible, rounding, seed)
        context = contextlib.nullcontext()
    elif reference == "masked":
        from .sparse import active_mask, dense_masked
        model = _with_rounding(copy.deepcopy(module).double(), rounding, seed)
        model = dense_masked(model)
        context = active_mask(visible)
    else:
        raise ValueError(f"reference must be 'hooks' or 'masked', got {reference!r}")
    xr = x.detach().double().requires_grad_(grad)
    mask = visible_at(visible, x.shape[2], x.shape[3])[:, None].double()
    with context:
        torch.manual_seed(seed)
        out = model(xr * mask)
    out_mask = visible_at(visible, out.shape[2], out.shape[3])
    out = out * out_mask[:, None].double()
    result = {"out": out.detach(), "model": model}
    if grad:
        g = _output_weights(out, seed) if out_weights is None else out_weights
        (out * g.double()).sum().backward()
        result["gx"] = xr.grad
        result["grads"] = {n: p.grad for n, p in model.named_parameters()}
    result["buffers"] = dict(model.named_buffers())
    return result


def _with_rounding(model: nn.Module, rounding: Optional[torch.dtype], seed: int) -> nn.Module:
    """Add `masked_reference`'s modelled rounding (no masking) to every weighted or normalising leaf."""
    if rounding is None:
        return model
    gen = torch.Generator().manual_seed(10_000 + seed)
    for m in model.modules():
        if next(m.children(), None) is not None or _layout(m) is None:
            continue
        m.register_forward_hook(lambda mod, args, out: _round(out, layer_rounding(rounding, _layer_reduction(mod, out)),
                                                              gen))
    return model


def assert_equivalent(module: nn.Module, x: Tensor, visible: Tensor, grad: bool = True, seed: int = 0,
                      dtype: Optional[torch.dtype] = None, reference: str = "hooks") -> dict:
    """Forward, input grad, parameter grads and buffers of the sparse twin equal the dense-masked ones, under
    the error model of this module (each twin against a float64 reference of the same computation).

    ``module`` maps a [B, C, H, W] tensor to one map (an op, a block, a trunk); it is copied, so the
    caller's module is left as it is. ``dtype``: the compute precision (default ``x.dtype``; bf16 for a
    module that runs under bf16 autocast). ``reference``: see `run_reference`. Raises `EquivalenceError`
    (an AssertionError carrying the `ErrorReport`); returns the `run_both` dict plus ``"report"``.
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
    dtype = x.dtype if dtype is None else dtype
    g = r.get("out_weights")
    ref = run_reference(module, x, visible, seed, grad, reference=reference, out_weights=g)
    rnd = run_reference(module, x, visible, seed, grad, rounding=dtype, reference=reference, out_weights=g)
    model = ErrorModel(dtype, reduction_length(module), x.numel() // x.shape[1])
    model.compare("output", out_s, out_d, ref["out"], rnd["out"])
    if grad:
        model.compare("input grad", r["gx_s"], r["gx_d"], ref["gx"], rnd["gx"], gradient=True)
        model.compare_grads("grad of", {n: a for n, a, _ in r["gp"]}, {n: b for n, _, b in r["gp"]},
                            ref["grads"], rnd["grads"])
    model.compare_buffers({n: b for n, b, _ in r["buffers"]}, {n: b for n, _, b in r["buffers"]}, ref["buffers"],
                          rnd["buffers"], dict(r["sparse_model"].named_modules()))
    r["report"] = model.report.raise_if_failed()
    return r


# ---------------------------------------------------------------------------------------------------- backbones
def _backbone_pass(model: nn.Module, images: Tensor, visible: Tensor, train: bool, seed: int,
                   autocast: Optional[torch.dtype], plain: bool) -> tuple:
    """One forward + backward of a backbone: (maps, input grad, {name: grad}, {name: buffer}).

    ``plain``: an unconverted backbone under `masked_reference` hooks (masked input and maps)."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = images.detach().clone().to(next(model.parameters()).dtype).requires_grad_()
    torch.manual_seed(seed)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        if plain:
            maps = model.forward_features(x * visible_at(visible, x.shape[2], x.shape[3])[:, None].to(x.dtype))
            maps = [m * visible_at(visible, m.shape[2], m.shape[3])[:, None].to(m.dtype) for m in maps]
        else:
            maps = model(x, visible)
    gen = torch.Generator().manual_seed(7 + seed)
    loss = sum((m.to(x.dtype) * torch.randn(m.shape, generator=gen).to(m.dtype).to(x.dtype)).sum() for m in maps)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return [m.detach() for m in maps], x.grad, grads, dict(model.named_buffers())


def assert_backbones_equivalent(sparse: nn.Module, dense: nn.Module, images: Tensor, visible: Tensor, train: bool,
                                reference: Optional[nn.Module] = None, autocast: Optional[torch.dtype] = None,
                                seed: int = 0) -> ErrorReport:
    """Assert that a sparse backbone equals its dense-masked twin (same weights) on one batch, under the
    error model of this module; returns the `ErrorReport` (raises `EquivalenceError` on a failure).

    Checks the four maps (shapes, exact zeros at hidden sites, values), the input gradient and the gradient
    of every trainable parameter for a scalar loss that weighs every site differently, and, in train mode,
    the BN running statistics after the step. The float64 reference is ``reference``, a plain (unconverted)
    backbone of the same architecture (``create_backbone(name, sparse=None, ...)``; its weights are loaded
    from ``sparse``) run under `masked_reference` hooks; without it, a float64 copy of ``dense`` (the
    engine's own simulation). ``autocast``: run both twins under CPU autocast to that dtype (bf16), which is
    then the error model's compute precision.
    """
    dtype = autocast or next(sparse.parameters()).dtype
    state = {k: v.detach().clone() for k, v in sparse.state_dict().items()}  # before the twins' BN updates
    out_s, gx_s, grads_s, buf_s = _backbone_pass(sparse, images, visible, train, seed, autocast, False)
    out_d, gx_d, grads_d, buf_d = _backbone_pass(dense, images, visible, train, seed, autocast, False)
    refs = []
    for rounding in (None, dtype):
        if reference is not None:
            base = copy.deepcopy(reference).double()  # float64 before loading: the state is not rounded
            base.load_state_dict(state)
            model, plain = masked_reference(base, visible, rounding, seed), True
        else:
            model, plain = _with_rounding(copy.deepcopy(dense).double(), rounding, seed), False
            model.load_state_dict(state)
        refs.append(_backbone_pass(model, images.double(), visible, train, seed, None, plain))
    (out_r, gx_r, grads_r, buf_r), (out_m, gx_m, grads_m, buf_m) = refs
    num_maps = len(sparse.channels)
    assert len(out_s) == len(out_d) == len(out_r) == num_maps
    model = ErrorModel(dtype, reduction_length(sparse), images.numel() // images.shape[1])
    for i, (a, b) in enumerate(zip(out_s, out_d)):
        stride = sparse.downsample_ratio // 2 ** (num_maps - 1 - i)
        assert a.shape == b.shape == (images.shape[0], sparse.channels[i], images.shape[2] // stride,
                                      images.shape[3] // stride)
        hidden = ~visible_at(visible, a.shape[2], a.shape[3])
        if hidden.any():
            assert a.permute(0, 2, 3, 1)[hidden].abs().max() == 0, f"map {i}: non-zero hidden sites (sparse)"
            assert b.permute(0, 2, 3, 1)[hidden].abs().max() == 0, f"map {i}: non-zero hidden sites (dense)"
        model.compare(f"map {i} (stride {stride})", a, b, out_r[i], out_m[i])
    model.compare("input grad", gx_s, gx_d, gx_r, gx_m, gradient=True)
    for n in grads_s:
        assert grads_s[n] is not None, f"{n} got no gradient in the sparse backbone"
        assert grads_d[n] is not None, f"{n} got no gradient in the dense-masked backbone"
    model.compare_grads("grad of", grads_s, grads_d, grads_r, grads_m)
    if train:
        model.compare_buffers(buf_s, buf_d, buf_r, buf_m, dict(sparse.named_modules()))
    return model.report.raise_if_failed()


# ---------------------------------------------------------------------------------------------------- SparK
def _spark_pass(model: nn.Module, images: Tensor, visible: Tensor, seed: int,
                autocast: Optional[torch.dtype] = None) -> tuple:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext():
        loss, rec, _ = model(images.to(next(model.parameters()).dtype), visible)
    loss.backward()
    return (loss.detach(), rec.detach(), {n: p.grad for n, p in model.named_parameters()},
            dict(model.named_buffers()))


def assert_spark_equivalent(sparse: nn.Module, dense: nn.Module, images: Tensor, visible: Tensor,
                            reference_backbone: Optional[nn.Module] = None, autocast: Optional[torch.dtype] = None,
                            seed: int = 0) -> ErrorReport:
    """Whole SparK model: the sparse-encoder model equals its dense reference (``SparK.dense_reference()``)
    in loss, reconstruction, every parameter gradient and (train mode) BN buffers, under this module's
    error model. The float64 reference is a copy of ``dense`` whose encoder is ``reference_backbone`` (a
    plain backbone, ``create_backbone(name, sparse=None, ...)``) under `masked_reference` hooks; without
    it, ``dense`` itself in float64. ``autocast``: run both models under CPU autocast to that dtype (the
    error model's compute precision then). Raises `EquivalenceError`; returns the `ErrorReport`."""
    dtype = autocast or next(sparse.parameters()).dtype
    state = {k: v.detach().clone() for k, v in sparse.state_dict().items()}
    prefix = "sparse_encoder.sp_cnn."
    loss_s, rec_s, grads_s, buf_s = _spark_pass(sparse, images, visible, seed, autocast)
    loss_d, rec_d, grads_d, buf_d = _spark_pass(dense, images, visible, seed, autocast)
    refs = []
    for rounding in (None, dtype):
        ref = _with_rounding(copy.deepcopy(dense).double(), rounding, seed)
        ref.load_state_dict(state)
        if rounding is not None:  # the loss is a layer too: per-patch target statistics over patch_size^2 pixels
            loss_fn, rel = ref.forward_loss, layer_rounding(rounding, ref.patch_size ** 2)
            gen = torch.Generator().manual_seed(20_000 + seed)
            ref.forward_loss = lambda im, rec, vis: loss_fn(im, _round(rec, rel, gen), vis)
        if reference_backbone is not None:
            plain = copy.deepcopy(reference_backbone).double()
            plain.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            encoder = masked_reference(plain, visible, rounding, seed).train(dense.training)
            encoder.mode = "dense_masked"  # HierarchicalBackbone.forward masks the images and the 4 maps
            ref.sparse_encoder.sp_cnn = encoder
        refs.append(_spark_pass(ref, images, visible, seed))
    (loss_r, rec_r, grads_r, buf_r), (loss_m, rec_m, grads_m, buf_m) = refs
    model = ErrorModel(dtype, reduction_length(sparse), images.numel() // images.shape[1])
    model.compare("loss", loss_s, loss_d, loss_r, loss_m)
    model.compare("reconstruction", rec_s, rec_d, rec_r, rec_m)
    model.compare_grads("grad of", grads_s, grads_d, grads_r, grads_m)
    if sparse.training:
        model.compare_buffers(buf_s, buf_d, buf_r, buf_m, dict(sparse.named_modules()))
    return model.report.raise_if_failed()
