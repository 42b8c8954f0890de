"""SparK encoders: torchvision / timm convnets, unchanged, made sparse by the engine.

    >>> import sparse_mim
    >>> net = sparse_mim.create_backbone("resnet50")          # sparse encoder (timm's ResNet-50)
    >>> maps = net(images, visible)                           # 4 maps, strides 4 / 8 / 16 / 32
    >>> twin = sparse_mim.create_backbone("resnet50", sparse=False)   # dense-masked reference
    >>> any_net = sparse_mim.create_backbone("efficientnet_b0")      # any timm convnet by name

Custom backbones subclass `HierarchicalBackbone` (see docs/backbones.md).
"""
from ._base import (HierarchicalBackbone, global_avg_pool, scale_channels, to_channels_first,
                    to_channels_last)
from ._registry import backbone_family, create_backbone, is_backbone, list_backbones, register_backbone
from .timm_backbone import TimmBackbone, create_timm_backbone, feature_modules_from_info
from .weights import (convert_state_dict, format_keys, load_backbone_weights, read_checkpoint, split_spark_checkpoint,
                      unwrap_state_dict)

__all__ = [
    "HierarchicalBackbone", "TimmBackbone", "create_backbone", "create_timm_backbone", "list_backbones",
    "is_backbone", "register_backbone", "backbone_family", "feature_modules_from_info",
    "load_backbone_weights", "split_spark_checkpoint", "convert_state_dict", "read_checkpoint",
    "unwrap_state_dict", "format_keys",
    "global_avg_pool", "scale_channels", "to_channels_first", "to_channels_last",
]
