"""SparK encoders: sparse ResNets and ConvNeXts (V1 / V2) with torchvision / timm weight names.

    >>> import sparse_mim
    >>> net = sparse_mim.create_backbone("resnet50")          # sparse (spconv-style) encoder
    >>> maps = net(images, visible)                           # 4 maps, strides 4 / 8 / 16 / 32
    >>> twin = sparse_mim.create_backbone("resnet50", sparse=False)   # dense-masked reference

Custom backbones subclass `HierarchicalBackbone` (see README.md, "Backbones").
"""
from ._base import (HierarchicalBackbone, global_avg_pool, scale_channels, to_channels_first,
                    to_channels_last)
from ._registry import backbone_family, create_backbone, list_backbones, register_backbone
from .convnext import ConvNeXt, ConvNeXtBlock
from .resnet import BasicBlock, Bottleneck, ResNet
from .weights import (convert_state_dict, format_keys, load_backbone_weights, read_checkpoint, split_spark_checkpoint,
                      unwrap_state_dict)

__all__ = [
    "HierarchicalBackbone", "create_backbone", "list_backbones", "register_backbone", "backbone_family",
    "load_backbone_weights", "split_spark_checkpoint", "convert_state_dict", "read_checkpoint",
    "unwrap_state_dict", "format_keys",
    "ResNet", "BasicBlock", "Bottleneck", "ConvNeXt", "ConvNeXtBlock",
    "global_avg_pool", "scale_channels", "to_channels_first", "to_channels_last",
]
