"""sparse_mim: SparK masked-image pre-training for convnets on true sparse tensors.

Public entry points (imported lazily so that ``import sparse_mim`` stays cheap):

* `create_backbone(name, sparse=True, drop_path_rate=None, **kw)` / `list_backbones()` /
  `is_backbone(name)` / `register_backbone`: sparse ResNets, ConvNeXts and any timm
  convnet by name (`sparse_mim.backbones`).
* `SparK(backbone, input_size=224, mask_ratio=0.6, ...)`: the pre-training model
  (`sparse_mim.spark`).
* `sparse_mim.testing`: equivalence-test helpers (sparse == dense-masked), like ``torch.testing``.
"""
from __future__ import annotations

import importlib

__all__ = ["create_backbone", "list_backbones", "is_backbone", "register_backbone", "SparK", "testing"]

_LAZY = {
    "create_backbone": "sparse_mim.backbones",
    "list_backbones": "sparse_mim.backbones",
    "is_backbone": "sparse_mim.backbones",
    "register_backbone": "sparse_mim.backbones",
    "SparK": "sparse_mim.spark",
}


def __getattr__(name: str):
    if name == "testing":
        return importlib.import_module("sparse_mim.testing")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparse_mim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
