"""Backbone registry: one name -> one factory of a dense twin; `create_backbone` makes it sparse.

A factory takes ``drop_path_rate=None`` (None = the architecture's documented default)
plus architecture keywords, and returns a `HierarchicalBackbone` built from plain dense
layers. `create_backbone` then converts it in place: ``sparse=True`` swaps every layer
for its sparse twin (same Parameter objects, same ``state_dict``), ``sparse=False``
keeps the dense layers and runs them as SparK's dense-masked simulation.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

__all__ = ["register_backbone", "list_backbones", "create_backbone", "backbone_family"]


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    family: str


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(name: str, factory: Optional[Callable[..., nn.Module]] = None, *, family: str = "custom"):
    """Register ``factory`` under ``name``; usable as a call or as a class / function decorator.

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

    return _register if factory is None else _register(factory)


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered backbone names matching a shell-style ``pattern`` (e.g. ``"convnextv2_*"``), sorted."""
    _import_builtin()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def backbone_family(name: str) -> str:
    _import_builtin()
    return _lookup(name).family


def _lookup(name: str) -> _Entry:
    entry = _REGISTRY.get(name)
    if entry is None:
        close = [n for n in _REGISTRY if n.split("_")[0] == name.split("_")[0]] or sorted(_REGISTRY)
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(sorted(close))} "
                         "(see sparse_mim.list_backbones(); custom nets: sparse_mim.backbones.register_backbone)")
    return entry


def create_backbone(name: str, sparse: bool = True, drop_path_rate: Optional[float] = None,
                    weights: Optional[str] = None, **kwargs) -> nn.Module:
    """Build a registered backbone as a SparK encoder.

    Args:
        name: a name from `list_backbones()` (e.g. ``"resnet50"``, ``"convnext_small"``).
        sparse: True: true sparse computation on the visible sites (spconv / torch gathers).
            False: the dense-masked simulation of the official SparK code with the same
            parameter names (the reference and benchmark baseline; with ``visible=None``
            it is the plain dense network, e.g. for fine-tuning).
        drop_path_rate: stochastic-depth rate of the last block (linear decay from 0);
            None = the architecture's default (SparK: R50 .05, R101 .08, R152 .10,
            R200 .15, ConvNeXt-S/B/L .2/.3/.4; see README.md, "Backbones").
        weights: optional checkpoint (torchvision / timm / official SparK / ours) loaded
            with `load_backbone_weights` before conversion.
        **kwargs: passed to the architecture's factory.

    Returns:
        A `HierarchicalBackbone`: ``.downsample_ratio`` (32), ``.channels`` (4 ints,
        strides 4, 8, 16, 32), ``forward(images, visible, return_sparse=False)``.
    """
    _import_builtin()
    entry = _lookup(name)
    model = entry.factory(drop_path_rate=drop_path_rate, **kwargs)
    from ._base import HierarchicalBackbone

    if not isinstance(model, HierarchicalBackbone):
        raise TypeError(f"factory of backbone {name!r} returned {type(model).__name__}, which is not a "
                        "sparse_mim.backbones.HierarchicalBackbone; subclass it (see README.md, 'Backbones')")
    model.backbone_name = name
    if weights is not None:
        from .weights import load_backbone_weights

        load_backbone_weights(model, weights)
    return model.to_sparse() if sparse else model.to_dense_masked()


def _import_builtin() -> None:
    """Register the built-in families on first use (keeps `import sparse_mim` cheap)."""
    from . import convnext, resnet  # noqa: F401
