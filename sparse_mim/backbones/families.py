"""The hand-registered names: ResNet-18 ... 200 and ConvNeXt V1 / V2 atto ... large.

Each is timm's own model (``timm.create_model(name, num_classes=0, global_pool="")``)
wrapped by `TimmBackbone`; nothing is re-implemented. What the registry adds is the
SparK pre-training defaults:

* **drop-path rate** (None = this default): SparK's values for R50 / 101 / 152 / 200
  (.05 / .08 / .10 / .15) and ConvNeXt-S / B / L (.2 / .3 / .4); the small nets
  regularise less;
* **zero-initialised last BN** of every ResNet block (``zero_init_last=True``, timm's
  and the official SparK encoder's default: each residual branch starts as identity);
  ``create_backbone("resnet50", zero_init_last=False)`` gives torchvision's init;
* ``depths=(d1, d2, d3, d4)``: blocks per stage (tests / experiments; timm's
  ``layers`` for ResNets, ``depths`` for ConvNeXts).

timm's ResNets have torchvision's parameter names, so their ``state_dict()`` loads
with ``strict=True`` into ``torchvision.models.resnetXX()`` without ``fc``;
ResNet-200 exists only in timm. ConvNeXts keep timm's ``head.norm`` (frozen; a
SparK encoder never uses it) so their state dict equals timm's ``num_classes=0`` model.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

from ._registry import register_backbone
from .timm_backbone import TimmBackbone, create_timm_backbone

__all__ = ["RESNET_DROP_PATH", "CONVNEXT_DROP_PATH"]

RESNET_DROP_PATH = {"resnet18": 0.0, "resnet34": 0.02, "resnet50": 0.05, "resnet101": 0.08, "resnet152": 0.10,
                    "resnet200": 0.15}
CONVNEXT_DROP_PATH = {"atto": 0.0, "femto": 0.0, "pico": 0.0, "nano": 0.05, "tiny": 0.1, "small": 0.2, "base": 0.3,
                      "large": 0.4}


def _resnet(name: str, drop_path_rate: Optional[float] = None, depths: Optional[Sequence[int]] = None,
            zero_init_last: Optional[bool] = None, **kwargs) -> TimmBackbone:
    if depths is not None:
        kwargs["layers"] = tuple(depths)
    rate = RESNET_DROP_PATH[name] if drop_path_rate is None else drop_path_rate
    return create_timm_backbone(name, drop_path_rate=rate, zero_init_last=True if zero_init_last is None else
                                zero_init_last, **kwargs)


def _convnext(name: str, default_rate: float, drop_path_rate: Optional[float] = None,
              depths: Optional[Sequence[int]] = None, zero_init_last: Optional[bool] = None, **kwargs) -> TimmBackbone:
    if zero_init_last:
        raise ValueError(f"{name} has no BatchNorm to zero-initialise (zero_init_last applies to ResNets)")
    if depths is not None:
        kwargs["depths"] = tuple(depths)
    rate = default_rate if drop_path_rate is None else drop_path_rate
    return create_timm_backbone(name, drop_path_rate=rate, **kwargs)


for _name in RESNET_DROP_PATH:
    register_backbone(_name, partial(_resnet, _name), family="resnet")
for _size, _rate in CONVNEXT_DROP_PATH.items():
    for _version in ("convnext", "convnextv2"):
        register_backbone(f"{_version}_{_size}", partial(_convnext, f"{_version}_{_size}", _rate), family="convnext")
