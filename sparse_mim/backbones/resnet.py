"""ResNet-18/34/50/101/152/200 as SparK encoders (torchvision / timm parameter names).

Paper: "Deep Residual Learning for Image Recognition" (He et al., CVPR 2016), with the
torchvision "v1.5" bottleneck (stride on the 3x3 conv). ResNet-200 is the bottleneck
[3, 24, 36, 3] model of "Identity Mappings in Deep Residual Networks" as timm builds it.

The modules below are the *dense twin*: plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` /
``nn.ReLU`` / ``nn.MaxPool2d`` under exactly torchvision's names, so
``state_dict()`` loads with ``strict=True`` into ``torchvision.models.resnet50()`` once
its classifier ``fc`` is removed (and into ``timm.create_model('resnet50',
num_classes=0)``). Every forward is format-agnostic: it only calls layers and adds
tensors, so the same code runs on a dense NCHW tensor and, after
``sparse_mim.sparse.sparsify``, on a ``SparseMap``. What the blocks add over
torchvision is a per-sample DropPath on the residual branch (SparK pre-trains ResNets
with drop-path .05 - .15) and a ``forward_features`` that returns the four stage maps.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

from torch import nn

from ._base import DropPath, HierarchicalBackbone, drop_path_rates
from ._registry import register_backbone

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34), torchvision names ``conv1 bn1 conv2 bn2 downsample``."""

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 drop_path: float = 0.0):
        super().__init__()
        self.conv1 = _conv3x3(in_chs, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.drop_path(out) + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 bottleneck, torchvision names ``conv1..3 bn1..3 downsample``."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 drop_path: float = 0.0):
        super().__init__()
        self.conv1 = _conv1x1(in_chs, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + shortcut)


class ResNet(HierarchicalBackbone):
    """ResNet trunk without ``avgpool`` / ``fc``: stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), 4 stages.

    ``forward_features`` returns the outputs of ``layer1..layer4`` (strides 4, 8, 16, 32).
    Weight init follows torchvision (Kaiming-normal fan-out convs, BN weight 1 / bias 0).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int],
                 drop_path_rate: float = 0.0, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        # The SparK equivalence of max-pooling needs non-negative inputs (hidden sites act as 0):
        # it sits right after a ReLU here.
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # Linear drop-path decay over all blocks, as timm / SparK build it.
        drop_rates = drop_path_rates(drop_path_rate, sum(layers))
        in_chs, first = 64, 0
        for stage, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if stage == 0 else 2
            out_chs = planes * block.expansion
            downsample = None
            if stride != 1 or in_chs != out_chs:
                downsample = nn.Sequential(_conv1x1(in_chs, out_chs, stride), nn.BatchNorm2d(out_chs))
            blocks = [block(in_chs, planes, stride, downsample, drop_rates[first])]
            blocks += [block(out_chs, planes, drop_path=drop_rates[first + j]) for j in range(1, depth)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            in_chs, first = out_chs, first + depth

        self.layers = tuple(layers)
        self.block_type = block.__name__
        self.drop_path_rate = drop_path_rate
        self.channels = [p * block.expansion for p in (64, 128, 256, 512)]
        self.downsample_ratio = 32
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x) -> list:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


def _resnet(block, layers, default_drop_path: float, drop_path_rate: Optional[float] = None,
            depths: Optional[tuple[int, int, int, int]] = None, **kwargs) -> ResNet:
    """``depths`` overrides the blocks per stage (tests / experiments: the weights then differ from the name's)."""
    rate = default_drop_path if drop_path_rate is None else drop_path_rate
    return ResNet(block, tuple(depths or layers), drop_path_rate=rate, **kwargs)


# Default drop-path rates: SparK's pre-training values for R50/101/152/200; the small
# BasicBlock nets regularise less (they underfit rather than overfit ImageNet).
register_backbone("resnet18", partial(_resnet, BasicBlock, (2, 2, 2, 2), 0.0), family="resnet")
register_backbone("resnet34", partial(_resnet, BasicBlock, (3, 4, 6, 3), 0.02), family="resnet")
register_backbone("resnet50", partial(_resnet, Bottleneck, (3, 4, 6, 3), 0.05), family="resnet")
register_backbone("resnet101", partial(_resnet, Bottleneck, (3, 4, 23, 3), 0.08), family="resnet")
register_backbone("resnet152", partial(_resnet, Bottleneck, (3, 8, 36, 3), 0.10), family="resnet")
register_backbone("resnet200", partial(_resnet, Bottleneck, (3, 24, 36, 3), 0.15), family="resnet")
