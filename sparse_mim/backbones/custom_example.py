"""Worked example of a custom SparK backbone: a small ResNet-style net with Squeeze-Excite.

Everything a user-written backbone needs (documented in docs/backbones.md):

1. subclass `HierarchicalBackbone`; set ``self.channels`` (one width per map, stride 4
   first) and ``self.downsample_ratio`` (32);
2. build it from standard layers: convs (any kernel, stride, groups), BatchNorm /
   SyncBatchNorm, LayerNorm, timm ``LayerNorm2d`` / ``GlobalResponseNorm`` /
   ``DropPath``, max / average pooling, ``nn.Linear`` and element-wise activations have
   sparse twins; other layers run through the engine's exact dense fallback (reported);
3. write ``forward_features(x)`` as ordinary tensor code (``x`` is a `SparseMap` in the
   sparse model, which takes part in torch's dispatch), returning the maps at strides
   4, 8, 16, 32. This example uses the helpers `global_avg_pool` (mean over the
   *visible* sites) and `scale_channels`;
4. register a factory that accepts ``drop_path_rate`` and build it with
   ``sparse_mim.create_backbone(name)``.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ._base import DropPath, HierarchicalBackbone, drop_path_rates, global_avg_pool, scale_channels
from ._registry import register_backbone

__all__ = ["TinySENet"]


class SqueezeExcite(nn.Module):
    """Channel gates from the per-sample mean over visible sites (SparK: masked pixels must not leak in)."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(channels // reduction, channels)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        pooled = global_avg_pool(x)  # [B, C]
        return scale_channels(x, self.gate(self.fc2(self.act(self.fc1(pooled)))))


class SEBasicBlock(nn.Module):
    def __init__(self, channels: int, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.se = SqueezeExcite(channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(self.drop_path(self.se(out)) + x)


class TinySENet(HierarchicalBackbone):
    """4x4/4 stem, then per stage: (2x2/2 conv downsample) + ``depth`` SE basic blocks."""

    def __init__(self, widths=(32, 64, 128, 256), depth: int = 1, drop_path_rate: float = 0.0):
        super().__init__()
        self.channels = list(widths)
        self.downsample_ratio = 32
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 4, stride=4, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        rates = drop_path_rates(drop_path_rate, 4 * depth)
        self.stages = nn.ModuleList()
        for i, width in enumerate(widths):
            down = nn.Identity() if i == 0 else nn.Sequential(
                nn.Conv2d(widths[i - 1], width, 2, stride=2, bias=False), nn.BatchNorm2d(width))
            blocks = [SEBasicBlock(width, rates[i * depth + j]) for j in range(depth)]
            self.stages.append(nn.Sequential(down, *blocks))

    def forward_features(self, x) -> list:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


@register_backbone("example_tiny_senet", family="custom")
def tiny_senet(drop_path_rate: Optional[float] = None, **kwargs) -> TinySENet:
    return TinySENet(drop_path_rate=0.0 if drop_path_rate is None else drop_path_rate, **kwargs)
