"""SparK's light UNet decoder.

From "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked
Modeling" (Tian et al., ICLR 2023); same structure and parameter names as the
official `pretrain/decoder.py` (keyu-tian/SparK), so the official
``*_withdecoder_*`` files load into it.

The decoder is dense: it reconstructs every pixel, hidden and visible. It takes
the densified encoder maps, coarsest first, and runs one UNet block per factor 2
of up-sampling (5 blocks for a 32x encoder). Block ``i`` starts at width
``width // 2**i`` and ends at ``width // 2**(i+1)``; the densified map ``i``
(already projected to ``width // 2**i`` channels) is added to the running
feature before block ``i``.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn
from timm.layers import trunc_normal_

__all__ = ["UNetBlock", "LightDecoder", "decoder_widths"]


def decoder_widths(width: int, num_blocks: int) -> list[int]:
    """Channel width at the input of each block, plus the final width: ``width / 2**i``."""
    if width % (2 ** num_blocks):
        raise ValueError(f"decoder width {width} must be divisible by 2**{num_blocks} = {2 ** num_blocks} "
                         f"(it halves in each of the {num_blocks} up-sampling blocks); e.g. 768, 512, 384 or 256")
    return [width // 2 ** i for i in range(num_blocks + 1)]


class UNetBlock(nn.Module):
    """2x up-sampling: ConvTranspose2d(k4, s2, p1) -> conv3x3-BN-ReLU6 -> conv3x3-BN.

    The transposed conv and the first 3x3 conv keep the input width; the second
    3x3 conv halves it (``out_chs``).
    """

    def __init__(self, in_chs: int, out_chs: int, norm_layer: type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.up_sample = nn.ConvTranspose2d(in_chs, in_chs, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(in_chs, in_chs, kernel_size=3, stride=1, padding=1, bias=False), norm_layer(in_chs),
            nn.ReLU6(inplace=True),
            nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False), norm_layer(out_chs),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.up_sample(x))


class LightDecoder(nn.Module):
    """UNet decoder from the encoder's coarsest scale to full resolution, then a 1x1 conv to RGB.

    Args:
        up_sample_ratio: the encoder's total downsample ratio (32); a power of 2.
        width: channels at the coarsest scale (768 in the paper); halves per block.
        sbn: SyncBatchNorm instead of BatchNorm2d (multi-process training).
        out_chans: channels of the reconstruction (3 for RGB).
    """

    def __init__(self, up_sample_ratio: int = 32, width: int = 768, sbn: bool = False, out_chans: int = 3):
        super().__init__()
        if up_sample_ratio < 2 or up_sample_ratio & (up_sample_ratio - 1):
            raise ValueError(f"up_sample_ratio must be a power of 2 >= 2, got {up_sample_ratio}")
        self.width = width
        self.up_sample_ratio = up_sample_ratio
        num_blocks = round(math.log2(up_sample_ratio))
        self.widths = decoder_widths(width, num_blocks)
        norm_layer = nn.SyncBatchNorm if sbn else nn.BatchNorm2d
        self.dec = nn.ModuleList([
            UNetBlock(cin, cout, norm_layer) for cin, cout in zip(self.widths[:-1], self.widths[1:])])
        self.proj = nn.Conv2d(self.widths[-1], out_chans, kernel_size=1, stride=1, bias=True)
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: trunc-normal(.02) convs, Kaiming (fan-out) transposed convs, unit BN."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._NormBase):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, to_decoder: Sequence[Tensor | None]) -> Tensor:
        """``to_decoder``: densified maps, coarsest first (``None`` skips a scale); returns [B, 3, H, W]."""
        if len(to_decoder) > len(self.dec):
            raise ValueError(f"got {len(to_decoder)} maps for a decoder of {len(self.dec)} blocks")
        x: Tensor | int = 0
        for i, block in enumerate(self.dec):
            if i < len(to_decoder) and to_decoder[i] is not None:
                x = x + to_decoder[i]
            if not isinstance(x, Tensor):
                raise ValueError("the coarsest densified map must not be None")
            x = block(x)
        return self.proj(x)

    def extra_repr(self) -> str:
        return f"width={self.width}"
