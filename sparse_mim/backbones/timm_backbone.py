"""Any timm convnet, unchanged, as a SparK encoder.

`TimmBackbone` takes a model built by ``timm.create_model(name, num_classes=0,
global_pool="")`` and exposes it through the `HierarchicalBackbone` interface:

* **Same modules, same names.** The model's top-level children become the
  backbone's children, so ``state_dict()`` has exactly the keys (and tensors) of
  ``timm.create_model(name, num_classes=0)``: exported weights load back into timm
  with ``strict=True`` (into ``timm.create_model(name)`` only the classifier is then
  missing), and timm / torchvision checkpoints load into the backbone. timm's ResNets
  have torchvision's parameter names, so torchvision ``resnetXX`` files fit too.
* **The model's own forward.** ``forward_features`` runs the model's own
  ``forward_features`` (or ``forward``) and collects the four maps at strides 4, 8,
  16 and 32 with forward hooks on the modules that timm's ``feature_info`` names (the
  last module of each stride, as ``features_only=True`` would pick). As soon as the
  stride-32 map exists the forward stops, so layers after it (a final norm, a
  ``conv_head``) never run.
* **Unused layers are frozen.** Parameters that the four maps do not depend on (for
  example ConvNeXt's ``head.norm``, EfficientNet's ``conv_head`` / ``bn2``) are found
  once at construction (a tiny dense forward and backward) and get
  ``requires_grad=False``: no optimizer update, no unused-parameter error under DDP,
  yet they stay in ``state_dict()`` for weight exchange.

Nothing of the model's code is replaced: `sparse_mim.sparse.sparsify` converts its
layers in place (sparse twin) or `dense_masked` turns them into SparK's dense-masked
simulation; the `HierarchicalBackbone` modes do that.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ._base import HierarchicalBackbone

__all__ = ["TimmBackbone", "create_timm_backbone", "feature_modules_from_info"]

_STRIDES = (4, 8, 16, 32)


class _FeaturesReady(Exception):
    """Raised by the last feature hook to stop the model's forward early (caught in forward_features)."""


def feature_modules_from_info(feature_info, strides: Sequence[int] = _STRIDES) -> tuple[list[str], list[int]]:
    """(module names, channels) of the last feature of each stride in ``strides``, from timm's ``feature_info``.

    ``feature_info`` is the model's list of ``{"module", "reduction", "num_chs"}`` dicts
    (or a timm ``FeatureInfo``).
    """
    info = list(getattr(feature_info, "info", feature_info))
    by_stride: dict[int, dict] = {}
    for entry in info:
        by_stride[int(entry["reduction"])] = entry  # the last module at a stride, as timm's features_only
    missing = [s for s in strides if s not in by_stride]
    if missing:
        have = sorted(by_stride)
        raise ValueError(f"the model has no feature map at stride(s) {missing} (its feature_info has strides {have}); "
                         "SparK's hierarchical decoder needs maps at strides 4, 8, 16 and 32 (a model built with "
                         "output_stride < 32 or a non-hierarchical model cannot be used)")
    return [by_stride[s]["module"] for s in strides], [int(by_stride[s]["num_chs"]) for s in strides]


class TimmBackbone(HierarchicalBackbone):
    """An unchanged timm (or torchvision-style) model as a SparK encoder (see the module docstring).

    Args:
        model: the dense model, classifier removed (``num_classes=0, global_pool=""``).
        feature_modules: names of the 4 modules whose outputs are the maps at strides
            4, 8, 16, 32; default: read from ``model.feature_info``.
        channels: their widths; default: read from ``model.feature_info``.
        drop_path_rate: recorded as ``.drop_path_rate`` (the model was built with it).
        name: the timm model name (recorded as ``.timm_name``).
    """

    def __init__(self, model: nn.Module, feature_modules: Optional[Sequence[str]] = None,
                 channels: Optional[Sequence[int]] = None, drop_path_rate: float = 0.0, name: Optional[str] = None):
        super().__init__()
        if feature_modules is None or channels is None:
            if not hasattr(model, "feature_info"):
                raise ValueError(f"{type(model).__name__} has no feature_info; pass feature_modules=[4 module names] "
                                 "and channels=[4 widths] for the maps at strides 4, 8, 16, 32")
            names, chans = feature_modules_from_info(model.feature_info)
            feature_modules = feature_modules or names
            channels = channels or chans
        if model._buffers:
            raise ValueError(f"{type(model).__name__} holds buffers at its top level ({sorted(model._buffers)}); "
                             "only models whose tensors live in sub-modules can be wrapped")
        # Adopt the model's parameters and children under their own names (shared objects: one set of weights).
        for key, param in model._parameters.items():
            self.register_parameter(key, param)
        for key, child in model._modules.items():
            self.add_module(key, child)
        object.__setattr__(self, "_timm_model", model)  # not a child: its modules are ours already
        self.feature_modules = list(feature_modules)
        for n in self.feature_modules:
            self.get_submodule(n)  # raises AttributeError naming a wrong module
        self.channels = [int(c) for c in channels]
        self.downsample_ratio = 32
        self.drop_path_rate = float(drop_path_rate or 0.0)
        self.timm_name = name
        self.unused_parameters = self._freeze_unused()

    # ------------------------------------------------------------------ the model's own forward, stopped early
    def train(self, mode: bool = True) -> "TimmBackbone":
        super().train(mode)
        self._timm_model.training = mode  # the wrapped model's own flag (its children are ours)
        return self

    def forward_features(self, x) -> list:
        outputs: dict[str, object] = {}
        wanted = len(self.feature_modules)

        def hook(name):
            def fn(module, args, out):
                outputs[name] = out
                if len(outputs) == wanted:
                    raise _FeaturesReady
            return fn

        handles = [self.get_submodule(n).register_forward_hook(hook(n)) for n in self.feature_modules]
        run = getattr(self._timm_model, "forward_features", None) or self._timm_model.forward
        try:
            run(x)
        except _FeaturesReady:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.feature_modules if n not in outputs]
        if missing:
            raise RuntimeError(f"{type(self._timm_model).__name__}'s forward did not run the feature module(s) {missing}; "
                               "pass the right feature_modules")
        return [outputs[n] for n in self.feature_modules]

    # ------------------------------------------------------------------ unused layers
    def _freeze_unused(self) -> list[str]:
        """Set requires_grad=False on parameters the 4 maps do not depend on; returns their names."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not params:
            return []
        first = next((m for m in self.modules() if isinstance(m, nn.Conv2d)), None)
        in_chans = first.in_channels if first is not None else 3
        ref = params[0][1]
        was_training = self.training
        self.eval()  # no BN statistics update; tiny maps are fine in eval mode
        try:
            with torch.enable_grad():
                x = torch.zeros(1, in_chans, 64, 64, dtype=ref.dtype, device=ref.device)
                maps = self.forward_features(x)
                total = sum(m.float().sum() for m in maps)
                grads = torch.autograd.grad(total, [p for _, p in params], allow_unused=True)
        finally:
            self.train(was_training)
        unused = [n for (n, p), g in zip(params, grads) if g is None]
        for n, p in params:
            if n in unused:
                p.requires_grad_(False)
        return unused


def create_timm_backbone(name: str, drop_path_rate: Optional[float] = None, zero_init_last: Optional[bool] = None,
                         pretrained: bool = False, **kwargs) -> TimmBackbone:
    """Build ``timm.create_model(name, num_classes=0, global_pool="", **kwargs)`` as a `TimmBackbone`.

    ``drop_path_rate`` / ``zero_init_last``: passed to timm when given (None = the
    model's default); a model that has no such option raises a clear error.
    Downloads are refused: load weights from a file (``create_backbone(name,
    weights=path)``).
    """
    import timm

    if pretrained:
        raise ValueError("pretrained=True would download weights; pass a local file instead: "
                         f"sparse_mim.create_backbone({name!r}, weights='path/to/{name}.pth')")
    if not timm.is_model(name):
        raise ValueError(f"{name!r} is neither a registered backbone nor a timm model name")
    if drop_path_rate:
        kwargs["drop_path_rate"] = float(drop_path_rate)
    if zero_init_last is not None:
        kwargs["zero_init_last"] = bool(zero_init_last)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)
    except TypeError as e:
        raise TypeError(f"timm.create_model({name!r}) does not accept the options {sorted(kwargs)}: {e}") from e
    return TimmBackbone(model, drop_path_rate=drop_path_rate or 0.0, name=name)
