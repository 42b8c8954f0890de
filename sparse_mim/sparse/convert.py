"""Model conversion: dense model -> sparse twin (`sparsify`), and -> SparK's dense-masked simulation (`dense_masked`).

Both conversions work in place by switching the class of each supported
layer to a subclass of its own class, so every Parameter and buffer object
stays where it was: ``state_dict()`` keys and tensors are unchanged, and a
sparse model, its dense-masked twin and the plain dense model share weights.

Dense-masked simulation (the reference every sparse result must equal, and the
baseline of every benchmark), as in the official SparK code:

* the input is zeroed at hidden patches;
* every spatial op (conv, max-pool) masks its input, so it only ever reads
  zeros at hidden sites, and multiplies its output by the mask at the output
  scale; statistics ops (BatchNorm, GRN) likewise see zeros at hidden sites,
  BatchNorm's statistics are over visible sites only, GRN's norms are per
  sample over its visible sites (zeros add nothing to a sum of squares);
* ops written in the model's own code (``x.mean((2, 3))`` of a
  squeeze-excitation gate, ``F.interpolate``, ``F.batch_norm`` of timm's
  ``BatchNormAct2d``, ``F.conv2d`` of a conv subclass, ...) are seen by a torch
  function mode that `active_mask` enables inside converted models. It sorts
  them with the sparse dispatch's own tables (`dispatch.classify`): reductions
  read the zero-filled map; ``batch_norm`` takes statistics over visible
  sites; any other spatial op, and any op the sparse side runs through its
  dense fallback, masks its 4-D inputs and outputs; per-site and
  channel-structure ops run as they are;
* per-site ops (activations, channels-last LayerNorm / Linear, LayerNorm2d,
  DropPath, layer-scale) are left alone. They may write non-zeros at hidden
  sites (a LayerNorm's bias, GELU(0) + a Linear's bias), but a value at a hidden
  site never reaches a visible site except through a spatial or statistics op,
  and all of those mask their input first. Hence the visible sites of the
  simulation equal the sparse model's features exactly; hidden sites are junk
  unless the model masks its final outputs (the backbones do).

The mask comes from the `active_mask(visible)` context: ``visible`` is the
bool [B, h, w] patch mask; a layer seeing a [B, C, H, W] tensor uses it
upsampled (nearest) by H / h (= W / w; rectangular inputs work).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import Tensor, nn

from . import dispatch, report
from .nn import (SparseAvgPool2d, SparseBatchNorm2d, SparseConv2d, SparseConv2dSameMixin, SparseDropPath,
                 SparseElementwise, SparseGRN, SparseLayerNorm, SparseLayerNorm2d, SparseMaxPool2d, SparseSyncBatchNorm,
                 _SparseBatchNormMixin, conv_same_twin, elementwise_twin)
from .tensor import check_visible_mask, upsample_mask

__all__ = ["sparsify", "dense_masked", "active_mask", "current_mask", "mask_at", "convert_sync_batchnorm",
           "MaskedConv2d", "MaskedBatchNorm2d", "MaskedSyncBatchNorm", "MaskedMaxPool2d", "MaskedAvgPool2d",
           "UnsupportedLayerError", "mac_report"]

from .report import mac_report  # noqa: E402  (re-exported: the fallback / MAC report of a sparse model)


class UnsupportedLayerError(TypeError):
    """A layer that cannot be converted as asked (e.g. a SyncBatchNorm conversion of a custom BatchNorm)."""


# ---------------------------------------------------------------------------------------------------- mask context
class _MaskState:
    def __init__(self, visible: Tensor):
        self.visible = visible
        self.by_size: dict[tuple[int, int], Tensor] = {}

    def at(self, height: int, width: int) -> Tensor:
        m = self.by_size.get((height, width))
        if m is None:
            factor = check_visible_mask(self.visible, height, width)
            m = upsample_mask(self.visible, factor)
            self.by_size[(height, width)] = m
        return m

    def sites(self, height: int, width: int) -> Tensor:
        """[N] int64 flat (b, y, x) positions of the visible sites at height x width, built once per scale: a
        gather / scatter through it needs no ``nonzero`` (no host-device synchronisation) per layer."""
        key = ("sites", height, width)
        idx = self.by_size.get(key)
        if idx is None:
            idx = self.by_size[key] = self.at(height, width).flatten().nonzero().flatten()
        return idx

    def on_grid(self, height: int, width: int) -> Tensor | None:
        """The mask at height x width, or None when that size is off the patch grid."""
        m = self.by_size.get((height, width))
        if m is not None:
            return m
        gh, gw = self.visible.shape[1:]
        if height == 0 or height % gh or width % gw or height // gh != width // gw:
            return None
        return self.at(height, width)


_ACTIVE: contextvars.ContextVar[_MaskState | None] = contextvars.ContextVar("sparse_mim_active_mask", default=None)


@contextlib.contextmanager
def active_mask(visible: Tensor) -> Iterator[Tensor]:
    """Make ``visible`` (bool [B, h, w], True = visible patch) the mask of the dense-masked layers inside."""
    if not isinstance(visible, Tensor) or visible.dtype != torch.bool or visible.dim() != 3:
        raise ValueError("active_mask expects a bool [B, h, w] visible-patch mask, got "
                         f"{getattr(visible, 'dtype', type(visible).__name__)} {tuple(getattr(visible, 'shape', ()))}")
    token = _ACTIVE.set(_MaskState(visible))
    mode = _MaskedMode()
    try:
        with mode:
            yield visible
    finally:
        _ACTIVE.reset(token)


def current_mask() -> Tensor | None:
    """The visible-patch mask of the innermost `active_mask` context, or None."""
    state = _ACTIVE.get()
    return None if state is None else state.visible


def mask_at(x: Tensor, channels_last: bool = False) -> Tensor:
    """The active mask at ``x``'s resolution, shaped to broadcast against ``x`` (NCHW, or NHWC), in x's dtype."""
    state = _ACTIVE.get()
    if state is None:
        raise RuntimeError("a dense-masked layer ran outside `with active_mask(visible):`; the simulation needs "
                           "the visible-patch mask")
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    m = state.at(h, w)
    if m.shape[0] != x.shape[0]:
        raise ValueError(f"active mask has batch {m.shape[0]}, the tensor has batch {x.shape[0]}")
    if m.device != x.device:
        raise ValueError(f"active mask is on {m.device} but the tensor is on {x.device}; move both to one device")
    m = m.to(x.dtype)
    return m[..., None] if channels_last else m[:, None]


def _grid_mask(x: Tensor) -> Tensor | None:
    """The active mask at ``x``'s NCHW size (shaped [B, 1, h, w], x's dtype), or None when the size is off the
    patch grid: a pooled [B, C, 1, 1] gate input, or a map a 'valid' conv / a pad moved off the grid (the
    sparse side keeps those dense too)."""
    state = _ACTIVE.get()
    if state is None:
        raise RuntimeError("a dense-masked layer ran outside `with active_mask(visible):`; the simulation needs "
                           "the visible-patch mask")
    if x.dim() != 4 or x.shape[0] != state.visible.shape[0]:
        return None
    m = state.on_grid(int(x.shape[2]), int(x.shape[3]))
    if m is None:
        return None
    if m.device != x.device:
        raise ValueError(f"active mask is on {m.device} but the tensor is on {x.device}; move both to one device")
    return m[:, None].to(x.dtype)


def _on_visible_rows(fn, x: Tensor, sites: Tensor) -> Tensor:
    """``fn`` on the [N, C] visible rows of NCHW ``x`` (``sites``: `_MaskState.sites`), scattered back, 0 elsewhere."""
    B, C, h, w = x.shape
    y = fn(x.permute(0, 2, 3, 1).reshape(B * h * w, C).index_select(0, sites))
    out = y.new_zeros((B * h * w, y.shape[1])).index_put((sites,), y)
    return out.view(B, h, w, -1).permute(0, 3, 1, 2)


def _masked(x: Tensor) -> Tensor:
    m = _grid_mask(x)
    return x if m is None else x * m


# ---------------------------------------------------------------------------------------------------- masked layers
class MaskedConv2d(nn.Conv2d):
    """Dense conv on the zero-filled map, output multiplied by the mask at its scale."""

    def forward(self, x: Tensor) -> Tensor:
        return _masked(super().forward(_masked(x)))


class _MaskedBatchNormMixin:
    """BatchNorm whose statistics cover visible sites only; zeros at hidden sites."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2:
            raise ValueError(f"expected [N, C] rows, got shape {tuple(input.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects an NCHW tensor, got shape {tuple(x.shape)}")
        m = _grid_mask(x)
        if m is None:  # a tensor smaller than the patch grid: plain BatchNorm over all its sites
            y = super().forward(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]))
            return y.view(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)
        return _on_visible_rows(super().forward, x, _ACTIVE.get().sites(int(x.shape[2]), int(x.shape[3])))


class MaskedBatchNorm2d(_MaskedBatchNormMixin, nn.BatchNorm2d):
    pass


class MaskedSyncBatchNorm(_MaskedBatchNormMixin, nn.SyncBatchNorm):
    pass


class MaskedMaxPool2d(nn.MaxPool2d):
    """Max-pool on the zero-filled map (hidden neighbours count as 0), output masked."""

    def forward(self, x: Tensor) -> Tensor:
        return _masked(super().forward(_masked(x)))


class MaskedAvgPool2d(nn.AvgPool2d):
    """Average pool on the zero-filled map (hidden neighbours count as 0 and in the window), output masked."""

    def forward(self, x: Tensor) -> Tensor:
        return _masked(super().forward(_masked(x)))


class _MaskedGRNMixin:
    """GRN on the zero-filled map (per-sample norms = norms over visible sites), output masked."""

    def forward(self, x: Tensor) -> Tensor:
        channels_last = getattr(self, "channel_dim", -1) in (-1, 3)
        m = mask_at(x, channels_last)
        return super().forward(x * m) * m


_MASKED_GRN: dict[type, type] = {}


def _masked_grn_class(cls: type) -> type:
    twin = _MASKED_GRN.get(cls)
    if twin is None:
        twin = type(f"Masked{cls.__name__}", (_MaskedGRNMixin, cls), {"__module__": __name__})
        _MASKED_GRN[cls] = twin
        globals()[twin.__name__] = twin
    return twin


# ---------------------------------------------------------------------------------------------------- layer kinds
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU,
    nn.Mish, nn.PReLU, nn.Softplus, nn.Dropout, nn.Identity, nn.Linear,
)


def _timm_classes() -> dict[str, tuple[type, ...]]:
    try:
        from timm.layers import activations, norm
        from timm.layers.drop import DropPath
        from timm.layers.grn import GlobalResponseNorm
    except ImportError:  # timm is optional for the engine itself
        return {"ln": (), "ln2d": (), "grn": (), "droppath": (), "act_modules": (), "conv_same": ()}
    try:
        from timm.layers.conv2d_same import Conv2dSame
        conv_same = (Conv2dSame,)
    except ImportError:
        conv_same = ()
    return {"ln": (norm.LayerNorm,), "ln2d": (norm.LayerNorm2d,), "grn": (GlobalResponseNorm,),
            "droppath": (DropPath,), "act_modules": (activations.__name__,), "conv_same": conv_same}


def _kind(m: nn.Module, timm_classes: dict) -> str | None:
    t = type(m)
    if t in (nn.Conv2d, SparseConv2d, MaskedConv2d):
        return "conv"
    if t in (nn.BatchNorm2d, SparseBatchNorm2d, MaskedBatchNorm2d):
        return "bn"
    if t in (nn.SyncBatchNorm, SparseSyncBatchNorm, MaskedSyncBatchNorm):
        return "syncbn"
    if t in (nn.MaxPool2d, SparseMaxPool2d, MaskedMaxPool2d):
        return "maxpool"
    if t in (nn.AvgPool2d, SparseAvgPool2d, MaskedAvgPool2d):
        return "avgpool"
    if t in timm_classes["conv_same"] or isinstance(m, SparseConv2dSameMixin):
        return "conv_same"
    if t in (nn.LayerNorm, SparseLayerNorm) + timm_classes["ln"]:
        return "ln"
    if t is SparseLayerNorm2d or t in timm_classes["ln2d"]:
        return "ln2d"
    if t is SparseGRN or t in timm_classes["grn"] or t in _MASKED_GRN.values():
        return "grn"
    if t is SparseDropPath or t in timm_classes["droppath"]:
        return "droppath"
    if isinstance(m, SparseElementwise) or t in _ELEMENTWISE or t.__module__ in timm_classes["act_modules"]:
        return "elementwise"
    return None


def _walk(module: nn.Module, visit, prefix: str = "") -> None:
    """Visit every layer of a known kind; containers and unknown layers are walked into (never refused)."""
    timm_classes = _timm_classes()

    def rec(m: nn.Module, name: str) -> None:
        kind = _kind(m, timm_classes)
        if kind is not None:
            visit(m, kind, name)
            return
        for child_name, child in m.named_children():
            rec(child, f"{name}.{child_name}" if name else child_name)

    rec(module, prefix)


def sparsify(module: nn.Module) -> nn.Module:
    """Turn ``module`` (in place) into its sparse twin; returns it. Never refuses a layer type.

    Every layer of a known kind (Conv2d, BatchNorm2d / SyncBatchNorm, MaxPool2d,
    AvgPool2d, LayerNorm, timm LayerNorm2d / GlobalResponseNorm / DropPath,
    activations, Linear, Dropout, Identity) switches its class to its sparse
    twin (a subclass of the layer's class), sharing the same Parameter / buffer
    objects, so ``state_dict()`` is unchanged. Everything else (containers,
    blocks, unknown layers) keeps its code and runs on `SparseMap`s through
    torch dispatch (`dispatch`): per-site ops on the features, global
    reductions exactly, spatial ops on sparse kernels where one exists, else
    through the exact dense fallback, reported in `report` (``mac_report``).
    """
    sparse_class = {"conv": SparseConv2d, "bn": SparseBatchNorm2d, "syncbn": SparseSyncBatchNorm,
                    "maxpool": SparseMaxPool2d, "avgpool": SparseAvgPool2d, "ln": SparseLayerNorm,
                    "ln2d": SparseLayerNorm2d, "droppath": SparseDropPath}

    def visit(m: nn.Module, kind: str, name: str) -> None:
        if kind == "grn":
            if isinstance(getattr(m, "weight", None), nn.Parameter) and hasattr(m, "eps"):
                m.__class__ = SparseGRN
            # else: left as it is; its ops run through torch dispatch
        elif kind == "elementwise":
            m.__class__ = elementwise_twin(type(m))
        elif kind == "conv_same":
            m.__class__ = conv_same_twin(type(m))
        else:
            m.__class__ = sparse_class[kind]

    _walk(module, visit)
    report.install_scopes(module, "sparse")
    return module


def dense_masked(module: nn.Module) -> nn.Module:
    """Turn ``module`` (in place) into SparK's dense-masked simulation; returns it.

    Run it inside ``with active_mask(visible):`` on zero-filled inputs. Shares
    all parameters and buffers with the original (only classes change).
    """
    masked_class = {"conv": MaskedConv2d, "bn": MaskedBatchNorm2d, "syncbn": MaskedSyncBatchNorm,
                    "maxpool": MaskedMaxPool2d, "avgpool": MaskedAvgPool2d}
    timm_classes = _timm_classes()

    def visit(m: nn.Module, kind: str, name: str) -> None:
        if kind in masked_class:
            m.__class__ = masked_class[kind]
        elif kind == "grn":
            base = type(m)
            if base is SparseGRN or base in _MASKED_GRN.values():
                if not timm_classes["grn"]:
                    raise UnsupportedLayerError(f"{name}: dense-masked GRN needs timm")
                base = timm_classes["grn"][0]
                if not hasattr(m, "channel_dim"):
                    m.spatial_dim, m.channel_dim, m.wb_shape = (1, 2), -1, (1, 1, 1, -1)
            m.__class__ = _masked_grn_class(base)
        elif kind == "droppath" and type(m) is SparseDropPath:
            pass  # works on dense tensors too
        elif kind in ("ln", "ln2d", "elementwise") and isinstance(m, (SparseElementwise, SparseLayerNorm,
                                                                           SparseLayerNorm2d)):
            pass  # sparse element-wise twins accept dense tensors
        # other per-site layers need no masking (see the module docstring)

    _walk(module, visit)
    report.install_scopes(module, "masked")
    return module


# ---------------------------------------------------------------------------------------------------- functional ops
_OPAQUE = (MaskedConv2d, _MaskedBatchNormMixin, MaskedMaxPool2d, MaskedAvgPool2d, _MaskedGRNMixin)


class _MaskedMode(torch.overrides.TorchFunctionMode):
    """Inside a dense-masked model (scope role "masked"), mask around the ops its own code calls.

    Mirrors the sparse dispatch (same `dispatch.classify` tables): per-site and
    channel-structure ops run unchanged; reductions read the zero-filled map;
    ``batch_norm`` on a 4-D map takes statistics over visible sites; every
    other op masks its 4-D on-grid inputs and outputs (what the sparse side's
    kernels or exact fallback compute at visible sites). Masked layers
    (`MaskedConv2d`, ...) mask for themselves and are left alone.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        frame = report.current_scope()
        if frame is None or frame.role != "masked" or isinstance(frame.module, _OPAQUE) \
                or dispatch.first_map(args) is not None:
            return func(*args, **kwargs)
        kind = dispatch.classify(func)
        if kind in ("per_site", "structural"):
            return func(*args, **kwargs)
        name = dispatch.op_name(func)
        if name.endswith("_") and not name.endswith("__"):  # in-place: masking a copy would lose the write
            return func(*args, **kwargs)
        state = _ACTIVE.get()
        if state is None:
            return func(*args, **kwargs)

        def mask(t):
            if isinstance(t, Tensor) and t.dim() == 4 and t.is_floating_point() \
                    and t.shape[0] == state.visible.shape[0]:
                m = state.on_grid(int(t.shape[2]), int(t.shape[3]))
                if m is not None:
                    return t * m[:, None].to(t.dtype)
            return t
        if kind == "reduction":
            return func(mask(args[0]), *args[1:], **kwargs)
        if kind == "batch_norm":
            x = args[0]
            m = state.on_grid(int(x.shape[2]), int(x.shape[3])) if isinstance(x, Tensor) and x.dim() == 4 else None
            if m is None or x.shape[0] != m.shape[0]:
                return func(*args, **kwargs)
            return _on_visible_rows(lambda rows: func(rows, *args[1:], **kwargs), x,
                                    state.sites(int(x.shape[2]), int(x.shape[3])))
        args = dispatch.map_tree(args, mask)
        kwargs = dispatch.map_tree(kwargs, mask)
        return dispatch.map_tree(func(*args, **kwargs), mask)


def _sync_bn_act_class(role: str | None) -> type:
    """timm's ``SyncBatchNormAct`` for a ``BatchNormAct2d`` of a plain model, or its sparse / dense-masked twin.

    timm's ``BatchNormAct2d`` (EfficientNet, MobileNetV3, RegNet, CSPNet, DenseNet, RepVGG) is left as it is by
    `sparsify` / `dense_masked`: its ``F.batch_norm`` call goes through the sparse dispatch or the dense-masked
    mode. timm's ``SyncBatchNormAct`` calls ``nn.SyncBatchNorm.forward`` instead, whose synchronised path is an
    autograd Function that neither the dispatch nor the mode sees; the twins run it on the visible rows
    (statistics over visible sites of every rank), then the layer's dropout and activation, as the
    ``BatchNormAct2d`` did.
    """
    from timm.layers.norm_act import SyncBatchNormAct
    if role is None:
        return SyncBatchNormAct
    key = (SyncBatchNormAct, role)
    twin = _SYNC_TWINS.get(key)
    if twin is None:
        mixin = _SparseBatchNormMixin if role == "sparse" else _MaskedBatchNormMixin
        name = f"{'Sparse' if role == 'sparse' else 'Masked'}SyncBatchNormAct"
        twin = type(name, (mixin, SyncBatchNormAct), {
            "__module__": __name__,
            "__doc__": f"timm's SyncBatchNormAct on the visible sites ({role} twin of BatchNormAct2d)."})
        _SYNC_TWINS[key] = twin
        globals()[name] = twin
    return twin


_SYNC_TWINS: dict[tuple[type, str], type] = {}


def _is_bn_act(m: nn.Module) -> bool:
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:
        return False
    return isinstance(m, BatchNormAct2d)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Like ``nn.SyncBatchNorm.convert_sync_batchnorm`` (and timm's ``convert_sync_batchnorm``) but in place and
    aware of the sparse / dense-masked twins: every BatchNorm of the model becomes synchronised and stays what
    it was (sparse, dense-masked or plain).

    * ``nn.BatchNorm1d/2d/3d``, `SparseBatchNorm2d`, ``MaskedBatchNorm2d`` -> ``nn.SyncBatchNorm``,
      `SparseSyncBatchNorm`, ``MaskedSyncBatchNorm``;
    * timm's ``BatchNormAct2d`` (norm + dropout + activation in one layer) -> timm's ``SyncBatchNormAct``, or its
      sparse / dense-masked twin when the layer belongs to a converted model (`_sync_bn_act_class`);
    * any other ``_BatchNorm`` subclass that keeps torch's ``forward`` -> ``nn.SyncBatchNorm``.
    A BatchNorm subclass with its own forward raises `UnsupportedLayerError` (converting it would drop that code).

    Class switch: every Parameter and buffer (running statistics, ``num_batches_tracked``) stays the same object;
    returns the module.
    """
    mapping = {SparseBatchNorm2d: SparseSyncBatchNorm, MaskedBatchNorm2d: MaskedSyncBatchNorm}
    for name, m in module.named_modules():
        t = type(m)
        if t in mapping:
            m.__class__ = mapping[t]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            if _is_bn_act(m):
                m.__class__ = _sync_bn_act_class(report.role_of(m))
            elif t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) or t.forward is nn.modules.batchnorm._BatchNorm.forward:
                m.__class__ = nn.SyncBatchNorm
            else:
                raise UnsupportedLayerError(
                    f"{name or 'the model'}: cannot convert {t.__module__}.{t.__qualname__} to SyncBatchNorm (it has "
                    "its own forward); set train.sync_bn=false, or convert it yourself before training")
        else:
            continue
        m.process_group = process_group
    return module
