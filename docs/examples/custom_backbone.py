"""Worked example of a custom SparK backbone: a small ResNet-style net with Squeeze-Excite.

This file is yours to copy: it is not part of the installed package (nothing registers it
unless you import it), and ``tests/backbones/test_backbone_custom.py`` runs it so that it stays
true. ``python docs/examples/custom_backbone.py`` builds the sparse encoder and its dense-masked
twin and prints the maps and their largest difference.

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
4. register a factory that accepts ``drop_path_rate`` (in your own module, run when it is
   imported) and build it with ``sparse_mim.create_backbone(name)``; or skip the registry:
   ``TinySENet().to_sparse()``.
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import DropPath
from torch import nn

import sparse_mim
from sparse_mim.backbones import HierarchicalBackbone, global_avg_pool, register_backbone, scale_channels

__all__ = ["TinySENet", "tiny_senet", "main"]


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
        n_blocks = 4 * depth  # stochastic depth: linear from 0 to drop_path_rate over the blocks
        rates = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
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


def main() -> float:
    """Build the registered backbone sparse and dense-masked (same weights), run both on a masked batch, print
    the maps' shapes and their largest difference relative to the largest value; returns it."""
    sparse = sparse_mim.create_backbone("example_tiny_senet").eval()
    dense = sparse_mim.create_backbone("example_tiny_senet", sparse=False).eval()  # SparK's dense-masked twin
    dense.load_state_dict(sparse.state_dict())
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    visible = torch.rand(2, 2, 3, generator=torch.Generator().manual_seed(1)) > 0.6  # True: a visible 32x32 patch
    visible[:, 0, 0] = True  # at least one visible patch per image
    with torch.no_grad():
        rel = 0.0
        for s_map, d_map in zip(sparse(images, visible), dense(images, visible)):
            rel = max(rel, ((s_map - d_map).abs().max() / d_map.abs().max()).item())
            print(f"map {tuple(s_map.shape)}")
    print(f"largest |sparse - dense-masked| / largest |dense-masked|: {rel:.1e}")
    return rel


if __name__ == "__main__":
    main()
