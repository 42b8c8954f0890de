"""Backbone registry: one name -> one factory of a dense twin; `create_backbone` makes it sparse.

The same API shape as ``fgvc``'s model registry (``register_model`` / ``list_models`` /
``is_model`` / ``create_model``): `register_backbone`, `list_backbones`,
`is_backbone`, `create_backbone`. Names not registered here fall through to timm:
``create_backbone("resnet50d")`` wraps ``timm.create_model("resnet50d")`` unchanged
(`TimmBackbone`).

A factory takes ``drop_path_rate=None`` (None = the architecture's documented default)
plus architecture keywords, and returns a `HierarchicalBackbone` built from plain dense
layers. `create_backbone` then converts it in place: ``sparse=True`` swaps every layer
for its sparse twin (same Parameter objects, same ``state_dict``), ``sparse=False``
keeps the dense layers and runs them as SparK's dense-masked simulation.
"""
from __future__ import annotations

import fnmatch
from functools import partial
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

__all__ = ["register_backbone", "list_backbones", "is_backbone", "create_backbone", "backbone_family"]


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    family: str


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(name, factory: Optional[Callable[..., nn.Module]] = None, *, family: str = "custom"):
    """Register ``factory`` under ``name``; usable as a call or as a class / function decorator.

    ``@register_backbone`` without a name registers a function under its own name
    (as fgvc's ``register_model``); ``@register_backbone("name")`` or
    ``register_backbone("name", factory)`` under ``name``.

    ``family`` groups backbones that share a weight format ("resnet", "convnext", or
    "custom"); `load_backbone_weights` uses it to translate foreign checkpoint names.
    Registering a taken name raises (names are global: pick a prefix for your own nets).
    """
    def _register(fn):
        if name in _REGISTRY and _REGISTRY[name].factory is not fn:
            raise ValueError(f"backbone name {name!r} is already registered (by {_REGISTRY[name].factory!r}); "
                             "choose another name")
        _REGISTRY[name] = _Entry(fn, family)
        return fn

    if callable(name) and factory is None:  # bare decorator: the function's own name
        fn, name = name, name.__name__
        return _register(fn)
    return _register if factory is None else _register(factory)


def list_backbones(pattern: str = "*", include_timm: bool = False) -> list[str]:
    """Registered backbone names matching ``pattern`` (a glob such as ``"convnextv2_*"``, or a substring), sorted.

    ``include_timm=True`` adds every timm model name matching it (any of them can be
    tried with `create_backbone`; convnets with 4 maps at strides 4 to 32 work).
    """
    _import_builtin()
    names = set(_REGISTRY)
    if include_timm:
        import timm

        names |= set(timm.list_models())
    if any(c in pattern for c in "*?["):
        return sorted(n for n in names if fnmatch.fnmatch(n, pattern))
    return sorted(n for n in names if pattern in n)


def is_backbone(name: str) -> bool:
    """True when ``create_backbone(name)`` knows the name: registered here, or a timm model name."""
    _import_builtin()
    if name in _REGISTRY:
        return True
    import timm

    return bool(timm.is_model(name))


def backbone_family(name: str) -> str:
    """"resnet", "convnext", "custom" for registered names; "timm" for other timm model names."""
    _import_builtin()
    if name not in _REGISTRY and is_backbone(name):
        return "timm"
    return _lookup(name).family


def _lookup(name: str) -> _Entry:
    entry = _REGISTRY.get(name)
    if entry is None:
        close = [n for n in _REGISTRY if n.split("_")[0] == name.split("_")[0]] or sorted(_REGISTRY)
        raise ValueError(f"unknown backbone {name!r} (neither registered nor a timm model name); registered: "
                         f"{', '.join(sorted(close))} (see sparse_mim.list_backbones(), timm.list_models(); custom "
                         "nets: sparse_mim.backbones.register_backbone)")
    return entry


def create_backbone(name: str, sparse: Optional[bool] = True, drop_path_rate: Optional[float] = None,
                    weights: Optional[str] = None, **kwargs) -> nn.Module:
    """Build a registered backbone, or any timm convnet, as a SparK encoder.

    Args:
        name: a name from `list_backbones()` (e.g. ``"resnet50"``, ``"convnext_small"``)
            or any timm model name with maps at strides 4, 8, 16, 32 (e.g.
            ``"resnet50d"``, ``"efficientnet_b0"``): timm's model, unchanged.
        sparse: True: true sparse computation on the visible sites (spconv / torch gathers).
            False: the dense-masked simulation of the official SparK code with the same
            parameter names (the reference and benchmark baseline; with ``visible=None``
            it is the plain dense network, e.g. for fine-tuning).
            None: the plain dense layers, unconverted: no patch mask allowed (the k-NN evaluation
            uses it for all-visible forwards at dense speed, and `sparse_mim.testing.masked_reference`
            masks it with hooks, a reference that shares no code with the engine).
        drop_path_rate: stochastic-depth rate of the last block (linear decay from 0);
            None = the architecture's default (SparK: R50 .05, R101 .08, R152 .10,
            R200 .15, ConvNeXt-S/B/L .2/.3/.4; see docs/backbones.md).
        weights: optional checkpoint (torchvision / timm / official SparK / ours) loaded
            with `load_backbone_weights` before conversion.
        **kwargs: passed to the architecture's factory (for timm names: to
            ``timm.create_model``). ResNets take ``depths`` (blocks per stage) and
            ``zero_init_last`` (default True: the last BN of every block starts at
            zero, as in the official SparK encoder).

    Returns:
        A `HierarchicalBackbone`: ``.downsample_ratio`` (32), ``.channels`` (4 ints,
        strides 4, 8, 16, 32), ``forward(images, visible, return_sparse=False)``.
    """
    _import_builtin()
    if name in _REGISTRY or not is_backbone(name):
        factory = _lookup(name).factory
    else:
        from .timm_backbone import create_timm_backbone

        factory = partial(create_timm_backbone, name)
    model = factory(drop_path_rate=drop_path_rate, **kwargs)
    from ._base import HierarchicalBackbone

    if not isinstance(model, HierarchicalBackbone):
        raise TypeError(f"factory of backbone {name!r} returned {type(model).__name__}, which is not a "
                        "sparse_mim.backbones.HierarchicalBackbone; subclass it (see docs/backbones.md)")
    model.backbone_name = name
    if weights is not None:
        from .weights import load_backbone_weights

        load_backbone_weights(model, weights)
    if sparse is None:  # the plain dense network: all-visible forwards only, at dense speed
        return model
    return model.to_sparse() if sparse else model.to_dense_masked()


def _import_builtin() -> None:
    """Register the built-in families on first use (keeps `import sparse_mim` cheap)."""
    from . import families  # noqa: F401
