"""MetaFormer: a unified meta framework for fine-grained recognition.

Paper: "MetaFormer: A Unified Meta Framework for Fine-Grained Recognition",
Diao et al., 2022 (arXiv 2203.02751). Official code: github.com/dqshuai/MetaFormer
(models/MetaFG.py, MetaFG_meta.py, MBConv.py, MHSA.py, meta_encoder.py).
Not Yu et al.'s "MetaFormer" (PoolFormer), an unrelated model.

The model is a hybrid: a 3-conv stem and two MBConv stages (stride 4 and 8),
then two transformer stages (stride 16 and 32) whose first block embeds the
map with an overlapping 3x3/s2 conv and prepends extra tokens: a class token
and the meta-information tokens (one or more per meta group, each group
embedded by its own head per stage). Attention has a Swin-style relative
position bias over the token grid; every extra token reads table row 0,
exactly as the official index does. The class tokens of both stages are
aggregated by a 1x1 Conv1d into the final embedding.

This re-implementation keeps the official parameter names and shapes (so the
official checkpoints load through :func:`checkpoint_filter_fn`), and runs
attention through ``torch.nn.functional.scaled_dot_product_attention`` with
the relative-position bias as the additive mask (``attn_impl="sdpa"``, the
default) or through the explicit softmax(QK^T/sqrt(d) + B)V of the official
code (``attn_impl="explicit"``, the reference for tests and benchmarks).

Differences from the official code (deliberate):
- ``relative_position_index`` is a non-persistent buffer over the grid only;
  the extra-token rows/columns (index 0) are added at run time, so the number
  of meta tokens is read from the input. Official files carry the buffer: the
  filter drops it.
- Meta may be absent (zeros, as at training's meta dropout) or partially
  present (``meta_present`` [B, n_groups]); the official forward asserts on
  a missing meta.
- ``reset_classifier`` works (the official one reads an undefined attribute).
- Meta dropout is not hidden in ``forward`` (the official model reads
  ``cur_epoch`` in it): the trainer draws a mask with :func:`meta_dropout_mask`.
"""
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, drop_path  # noqa: F401  (re-exported)
from torch.utils.checkpoint import checkpoint

from sparse_mim.utils.misc import to_pair

from ._registry import register_model

_logger = logging.getLogger(__name__)

__all__ = [
    "MetaFormer", "MBConvBlock", "MHSABlock", "RelativeAttention", "OverlapPatchEmbed", "Mlp",
    "ResNormLayer", "checkpoint_filter_fn", "load_pretrained", "resize_relative_position_bias_table",
    "param_groups_for_weight_decay", "meta_dropout_mask", "read_weights", "describe_state_dict",
    "mismatch_message", "load_state_dict_exact", "OFFICIAL_CONFIG_GLOBALS",
]

ATTN_IMPLS = ("sdpa", "explicit")


def _tracing() -> bool:
    """True under torch.compile / torch.export tracing (no data pointers there: the SDPA mask is not cached)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and (compiler.is_compiling() or
                                          (hasattr(compiler, "is_exporting") and compiler.is_exporting())))


# ---------------------------------------------------------------------------------------------
# Small blocks (DropPath / Mlp are timm's: the same computation and the official key names)
# ---------------------------------------------------------------------------------------------

class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck with squeeze-excite (official ``MBConv.MBConvBlock``).

    1x1 expand (``expand_ratio`` x the INPUT channels), BN, Swish, depthwise 3x3
    (the stride lives here), BN, Swish, SE (reduce to int(se_ratio * in_chs)),
    1x1 projection, BN; residual with drop-connect only when the shape is kept.
    BN eps 0.01 / momentum 0.1 as in the official block.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expand_ratio: int = 4,
                 se_ratio: float = 0.25, drop_path: float = 0., bn_eps: float = 0.01, bn_momentum: float = 0.1):
        super().__init__()
        mid_chs = in_chs * expand_ratio
        self.expand_ratio = expand_ratio
        if expand_ratio != 1:
            self._expand_conv = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid_chs, eps=bn_eps, momentum=bn_momentum)
        self._depthwise_conv = nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, groups=mid_chs, bias=False)
        self._bn1 = nn.BatchNorm2d(mid_chs, eps=bn_eps, momentum=bn_momentum)
        squeezed_chs = max(1, int(in_chs * se_ratio))
        self._se_reduce = nn.Conv2d(mid_chs, squeezed_chs, 1)
        self._se_expand = nn.Conv2d(squeezed_chs, mid_chs, 1)
        self._project_conv = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_chs, eps=bn_eps, momentum=bn_momentum)
        self.act = nn.SiLU()  # Swish
        self.has_skip = stride == 1 and in_chs == out_chs
        self.drop_path = DropPath(drop_path) if self.has_skip and drop_path > 0. else nn.Identity()

    def forward(self, x):
        shortcut = x
        if self.expand_ratio != 1:
            x = self.act(self._bn0(self._expand_conv(x)))
        x = self.act(self._bn1(self._depthwise_conv(x)))
        se = x.mean((2, 3), keepdim=True)
        se = self._se_expand(self.act(self._se_reduce(se)))
        x = x * torch.sigmoid(se)
        x = self._bn2(self._project_conv(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class ResNormLayer(nn.Module):
    """Residual MLP of the meta heads: x + LN(ReLU(W2 LN(ReLU(W1 x)))) (official ``meta_encoder``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, dim)
        self.w2 = nn.Linear(dim, dim)
        self.norm_fn1 = nn.LayerNorm(dim)
        self.norm_fn2 = nn.LayerNorm(dim)

    def forward(self, x):
        y = self.norm_fn1(F.relu(self.w1(x)))
        y = self.norm_fn2(F.relu(self.w2(y)))
        return x + y


def meta_head(meta_dim: int, embed_dim: int) -> nn.Sequential:
    """One meta group's embedding for one stage: Linear -> ReLU -> LN -> ResNorm (keys 0, 2, 3.*)."""
    return nn.Sequential(nn.Linear(meta_dim, embed_dim), nn.ReLU(), nn.LayerNorm(embed_dim), ResNormLayer(embed_dim))


class OverlapPatchEmbed(nn.Module):
    """Conv (k x k, stride s, padding k//2) + LayerNorm; NCHW map -> [B, h*w, C] tokens."""

    def __init__(self, patch_size: int = 3, stride: int = 2, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2))


def grid_relative_position_index(grid_size: Tuple[int, int]) -> torch.Tensor:
    """[h*w, h*w] index into the (2h-1)(2w-1) grid rows of the table (Swin's formula)."""
    h, w = grid_size
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # 2, hw
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # hw, hw, 2
    return (rel[..., 0] + h - 1) * (2 * w - 1) + (rel[..., 1] + w - 1)


class RelativeAttention(nn.Module):
    """Multi-head self-attention with a relative position bias over a token grid plus extra tokens.

    Table: (2h-1)(2w-1)+1 rows x heads. Grid token pairs read the row of their
    offset; every pair involving an extra token (cls, meta) reads row 0, as the
    official zero-padded index does (row 0 is also the (-(h-1), -(w-1)) offset,
    and the last row is never read). The number of extra tokens is
    ``N - h*w`` of the input, so any number of meta tokens works.

    ``attn_impl="sdpa"`` passes the bias as the additive float mask of
    ``F.scaled_dot_product_attention`` (fused kernels on CPU and CUDA);
    ``"explicit"`` is the official softmax(q k^T * scale + bias) v.

    On CPU the fused kernel gives no gradient for a float mask: SDPA then falls
    back to its math path, which measured slower than the explicit computation,
    so "sdpa" computes explicitly when the table needs a gradient on CPU
    (``sdpa_grad_on_cpu = True`` forces SDPA there; tests use it).
    """

    sdpa_grad_on_cpu = False

    def __init__(self, dim: int, grid_size, num_heads: int = 8, qkv_bias: bool = False,
                 attn_drop: float = 0., proj_drop: float = 0., attn_impl: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.grid_size = to_pair(grid_size, "grid_size")
        h, w = self.grid_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1) + 1, num_heads))
        self.register_buffer("relative_position_index", grid_relative_position_index(self.grid_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_impl = attn_impl
        self._mask_cache = None  # (key, mask) of the last no-grad SDPA call
        nn.init.trunc_normal_(self.relative_position_bias_table, std=.02)

    @property
    def attn_impl(self) -> str:
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str):
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        self._attn_impl = impl

    def relative_position_bias(self, num_extra_tokens: int) -> torch.Tensor:
        """[heads, N, N] bias for ``num_extra_tokens`` extra tokens first, then the grid."""
        index = self.relative_position_index
        if num_extra_tokens:
            index = F.pad(index, (num_extra_tokens, 0, num_extra_tokens, 0))  # extra tokens -> row 0
        n = index.shape[0]
        bias = self.relative_position_bias_table[index.reshape(-1)].view(n, n, self.num_heads)
        return bias.permute(2, 0, 1)

    def _sdpa_mask(self, num_extra_tokens: int, q: torch.Tensor) -> torch.Tensor:
        """The bias as SDPA's float mask [1, heads, N, N] in q's dtype.

        Without autograd (evaluation) the gathered mask is cached, keyed on the
        table's storage and version counter, so an optimizer step or a
        ``load_state_dict`` invalidates it.
        """
        table = self.relative_position_bias_table
        cacheable = not torch.is_grad_enabled() and not _tracing()
        key = (num_extra_tokens, q.dtype, q.device, table.data_ptr(), table._version) if cacheable else None
        if cacheable and self._mask_cache is not None and self._mask_cache[0] == key:
            return self._mask_cache[1]
        bias = self.relative_position_bias(num_extra_tokens).to(q.dtype)
        N = bias.shape[-1]
        if q.is_cuda and N % 8:
            # The memory-efficient CUDA kernel wants the mask's row stride 16-byte aligned;
            # hand it a view of a padded buffer instead of letting it copy every call.
            padded = bias.new_zeros(self.num_heads, N, -(-N // 8) * 8)
            padded[..., :N] = bias
            bias = padded[..., :N]
        bias = bias.unsqueeze(0)
        self._mask_cache = (key, bias) if cacheable else None
        return bias

    def forward(self, x):
        B, N, C = x.shape
        num_grid = self.grid_size[0] * self.grid_size[1]
        if N < num_grid:
            raise ValueError(f"attention over a {self.grid_size} grid got only {N} tokens")
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self._attn_impl == "sdpa" and (q.is_cuda or self.sdpa_grad_on_cpu or not (
                torch.is_grad_enabled() and self.relative_position_bias_table.requires_grad)):
            bias = self._sdpa_mask(N - num_grid, q)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias,
                dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            bias = self.relative_position_bias(N - num_grid)
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class MHSABlock(nn.Module):
    """Pre-norm transformer block; block 0 of a stage embeds the map and prepends the extra tokens."""

    def __init__(self, in_dim: int, dim: int, grid_size, num_heads: int = 8, mlp_ratio: float = 4.,
                 qkv_bias: bool = False, drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 embed_stride: Optional[int] = None, embed_kernel: int = 3, attn_impl: str = "sdpa"):
        super().__init__()
        # embed_stride None: a plain block on tokens; 2: the official overlapping 3x3/s2 embed;
        # 1: a projection without downsampling (used by the convnet hybrids).
        if embed_stride is not None:
            self.patch_embed = OverlapPatchEmbed(embed_kernel, embed_stride, in_dim, dim)
        else:
            if in_dim != dim:
                raise ValueError(f"a block without patch embed keeps the width, got {in_dim} -> {dim}")
            self.patch_embed = None
        self.grid_size = to_pair(grid_size, "grid_size")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RelativeAttention(dim, self.grid_size, num_heads, qkv_bias, attn_drop, drop, attn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x, extra_tokens: Sequence[torch.Tensor] = ()):
        if self.patch_embed is not None:
            x = self.patch_embed(x)
            B = x.shape[0]
            x = torch.cat([t.expand(B, -1, -1) for t in extra_tokens] + [x], dim=1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

MetaInput = Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]]]


class MetaFormer(nn.Module):
    """MetaFormer (official ``MetaFG_Meta``; with ``meta_dims=()`` the image-only ``MetaFG``).

    Args:
        img_size: int or (H, W), multiples of 32; the relative-position tables are sized for it.
        num_classes: classifier outputs (0: ``head`` is Identity).
        conv_embed_dims: (stem, stage 1, stage 2) widths.
        attn_embed_dims: (stage 3, stage 4) widths.
        conv_depths: (stem [unused, kept for the official layout], stage 1, stage 2) depths.
        attn_depths: (stage 3, stage 4) depths.
        meta_dims: one int per meta group.
        meta_tokens: tokens per meta group (default 1 each); a group with T tokens
            takes [B, T, d] (e.g. 32 BERT tokens of 768). Used to shape the zeros
            of an absent group and to check inputs.
        attn_impl: "sdpa" (fused) or "explicit" (reference).
    """

    def __init__(
            self,
            img_size=224,
            in_chans: int = 3,
            num_classes: int = 1000,
            conv_embed_dims: Sequence[int] = (64, 96, 192),
            attn_embed_dims: Sequence[int] = (384, 768),
            conv_depths: Sequence[int] = (2, 2, 3),
            attn_depths: Sequence[int] = (5, 2),
            num_heads: int = 8,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            meta_dims: Sequence[int] = (),
            meta_tokens: Optional[Sequence[int]] = None,
            attn_impl: str = "sdpa",
            _conv_cfg: Optional[dict] = None,
    ):
        super().__init__()
        self.img_size = to_pair(img_size, "img_size")
        if any(s <= 0 or s % 32 for s in self.img_size):
            raise ValueError(f"img_size must be positive multiples of 32 (stride of stage 4), got {img_size!r}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.meta_dims = tuple(int(d) for d in meta_dims)
        if any(d <= 0 for d in self.meta_dims):
            raise ValueError(f"meta_dims must be positive ints (one per meta group), got {list(meta_dims)}")
        self.meta_tokens = tuple(int(t) for t in meta_tokens) if meta_tokens is not None else (1,) * len(self.meta_dims)
        if len(self.meta_tokens) != len(self.meta_dims) or any(t <= 0 for t in self.meta_tokens):
            raise ValueError(f"meta_tokens needs one positive int per meta group {list(self.meta_dims)}, "
                             f"got {meta_tokens!r}")
        self.attn_embed_dims = tuple(attn_embed_dims)
        self.num_features = self.embed_dim = self.attn_embed_dims[-1]
        self.drop_rate = drop_rate
        attn_depths = tuple(attn_depths)
        C3, C4 = self.attn_embed_dims

        # Meta heads first (official order): one pair (stage 3, stage 4) per group.
        for i, d in enumerate(self.meta_dims):
            setattr(self, f"meta_{i + 1}_head_1", meta_head(d, C3))
            setattr(self, f"meta_{i + 1}_head_2", meta_head(d, C4))

        conv_block_count, conv_out_chs, conv_stride = self._build_conv_stages(
            in_chans, tuple(conv_embed_dims), tuple(conv_depths), mlp_ratio, drop_path_rate,
            sum(attn_depths), **(_conv_cfg or {}))
        if conv_stride not in (8, 16):
            raise ValueError(f"the conv stages must end at stride 8 or 16, got {conv_stride}")
        # Stage 3 sits at stride 16: an overlapping 3x3/s2 embed after a stride-8 conv part (official),
        # a 1x1 projection after a stride-16 one (the convnet hybrids).
        embed_stride_3 = 2 if conv_stride == 8 else 1
        self.grid_3 = (self.img_size[0] // 16, self.img_size[1] // 16)
        self.grid_4 = (self.img_size[0] // 32, self.img_size[1] // 32)
        # One stochastic-depth schedule over all blocks after the stem (official dpr).
        dpr = torch.linspace(0, drop_path_rate, conv_block_count + sum(attn_depths), device="cpu").tolist()
        dpr_3 = dpr[conv_block_count:conv_block_count + attn_depths[0]]
        dpr_4 = dpr[conv_block_count + attn_depths[0]:]
        block_kw = dict(num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                        attn_drop=attn_drop_rate, attn_impl=attn_impl)

        self.cls_token_1 = nn.Parameter(torch.zeros(1, 1, C3))
        self.stage_3 = nn.ModuleList([
            MHSABlock(conv_out_chs if i == 0 else C3, C3, self.grid_3, drop_path=dpr_3[i],
                      embed_stride=embed_stride_3 if i == 0 else None,
                      embed_kernel=3 if embed_stride_3 == 2 else 1, **block_kw)
            for i in range(attn_depths[0])])
        self.cls_token_2 = nn.Parameter(torch.zeros(1, 1, C4))
        self.stage_4 = nn.ModuleList([
            MHSABlock(C3 if i == 0 else C4, C4, self.grid_4, drop_path=dpr_4[i],
                      embed_stride=2 if i == 0 else None, **block_kw)
            for i in range(attn_depths[1])])
        self.norm_2 = nn.LayerNorm(C4)
        # Aggregation of the two class tokens.
        self.cl_1_fc = nn.Sequential(Mlp(C3, C3, C4), nn.LayerNorm(C4))
        self.aggregate = nn.Conv1d(2, 1, kernel_size=1)
        self.norm = nn.LayerNorm(C4)
        self.norm_1 = nn.LayerNorm(C3)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(C4, num_classes) if num_classes > 0 else nn.Identity()

        self.feature_info = self._feature_info(conv_embed_dims, conv_out_chs, conv_stride)
        # Data settings the official recipe uses with this model (timm's pretrained_cfg keys).
        self.pretrained_cfg = dict(input_size=(in_chans, *self.img_size), mean=IMAGENET_DEFAULT_MEAN,
                                   std=IMAGENET_DEFAULT_STD, interpolation="bicubic", crop_pct=224 / 256,
                                   num_classes=num_classes, classifier="head")
        self.grad_checkpointing = False
        self._init_token_weights()

    # -- construction helpers (overridden by the convnet hybrids) --------------------------------
    def _build_conv_stages(self, in_chans, conv_embed_dims, conv_depths, mlp_ratio, drop_path_rate,
                           num_token_blocks) -> Tuple[int, int, int]:
        """Stem + MBConv stages 1-2. Returns (number of blocks, out channels, out stride)."""
        C0, C1, C2 = conv_embed_dims
        stem_chs = (3 * (C0 // 4), C0)
        self.stage_0 = nn.Sequential(
            nn.Conv2d(in_chans, stem_chs[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem_chs[0]),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_chs[0], stem_chs[1], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_chs[1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_chs[1], C0, 3, stride=1, padding=1, bias=False))
        self.bn1 = nn.BatchNorm2d(C0)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        n1, n2 = conv_depths[1], conv_depths[2]
        dpr = torch.linspace(0, drop_path_rate, n1 + n2 + num_token_blocks, device="cpu").tolist()
        expand = int(mlp_ratio)
        self.stage_1 = nn.ModuleList([
            MBConvBlock(C0 if i == 0 else C1, C1, stride=1, expand_ratio=expand, drop_path=dpr[i])
            for i in range(n1)])
        self.stage_2 = nn.ModuleList([
            MBConvBlock(C1 if i == 0 else C2, C2, stride=2 if i == 0 else 1, expand_ratio=expand,
                        drop_path=dpr[n1 + i])
            for i in range(n2)])
        return n1 + n2, C2, 8

    def forward_conv_stages(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the NCHW map that stage 3 embeds (stride 8 here)."""
        x = self.maxpool(self.act1(self.bn1(self.stage_0(x))))
        for blk in self.stage_1:
            x = self._run_block(blk, x)
        for blk in self.stage_2:
            x = self._run_block(blk, x)
        return x

    def _feature_info(self, conv_embed_dims, conv_out_chs, conv_stride) -> List[Dict]:
        C0, C1, C2 = conv_embed_dims
        C3, C4 = self.attn_embed_dims
        return [
            dict(num_chs=C0, reduction=4, module="maxpool"),
            dict(num_chs=C1, reduction=4, module="stage_1"),
            dict(num_chs=C2, reduction=8, module="stage_2"),
            dict(num_chs=C3, reduction=16, module="stage_3"),
            dict(num_chs=C4, reduction=32, module="stage_4"),
        ]

    def _token_modules(self):
        yield from (getattr(self, f"meta_{i + 1}_head_{j}") for i in range(len(self.meta_dims)) for j in (1, 2))
        yield from (self.stage_3, self.stage_4, self.norm_2, self.cl_1_fc, self.aggregate, self.norm,
                    self.norm_1, self.head)

    def _init_token_weights(self):
        """Official init: trunc-normal(.02) Linear, LN 1/0, Kaiming fan-out convs, BN 1/0."""
        nn.init.trunc_normal_(self.cls_token_1, std=.02)
        nn.init.trunc_normal_(self.cls_token_2, std=.02)
        modules = [self] if hasattr(self, "stage_0") else list(self._token_modules())
        for root in modules:
            root.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- timm-like surface -----------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return {"cls_token_1", "cls_token_2"}

    def _conv_stages(self) -> List[List[List[str]]]:
        """Parameter-name prefixes of the conv part, input first: stages, each a list of blocks,
        each a list of prefixes (the stem is a stage of one block)."""
        return [[["stage_0.", "bn1."]]] + [[[f"stage_{s}.{i}."] for i in range(len(getattr(self, f"stage_{s}")))]
                                          for s in (1, 2)]

    def layer_prefixes(self, coarse: bool = False) -> List[List[str]]:
        """Parameter-name prefixes of every layer, input first: each block of the conv part
        (:meth:`_conv_stages`), then each token block (a stage's class token goes with its first
        block); ``coarse``: one layer per stage. Parameters that match none (meta heads, class-token
        aggregation, final norms, head) form the top layer."""
        stages = self._conv_stages()
        for s in (3, 4):
            blocks = [[f"stage_{s}.{i}."] for i in range(len(getattr(self, f"stage_{s}")))]
            blocks[0].append(f"cls_token_{s - 2}")
            stages.append(blocks)
        if coarse:
            return [[p for block in st for p in block] for st in stages]
        return [block for st in stages for block in st]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """timm's layer grouping (``timm.optim.param_groups_layer_decay``, ``--layer-decay``): a function
        from a parameter name to its layer index, input first (:meth:`layer_prefixes`)."""
        layers = self.layer_prefixes(coarse)
        table = [(p, i) for i, prefixes in enumerate(layers) for p in prefixes]

        def layer_of(name: str) -> int:
            for p, i in table:
                if name == p or name.startswith(p):
                    return i
            return len(layers)
        return layer_of

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None):
        """New (freshly initialised) classifier for ``num_classes`` outputs; 0 removes it."""
        self.num_classes = num_classes
        device = self.norm.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
        self.head.apply(self._init_weights)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each block in the backward pass (the official ``use_checkpoint``): less memory at 384."""
        self.grad_checkpointing = enable

    def _run_block(self, blk, x, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, *args, use_reentrant=False)
        return blk(x, *args)

    def set_attn_impl(self, impl: str):
        """Switch every attention layer between "sdpa" and "explicit"."""
        for m in self.modules():
            if isinstance(m, RelativeAttention):
                m.attn_impl = impl
        return self

    @property
    def num_meta_groups(self) -> int:
        return len(self.meta_dims)

    # -- meta tokens -----------------------------------------------------------------------------
    def split_meta(self, meta: MetaInput, batch_size: int, device=None, dtype=None) -> List[torch.Tensor]:
        """Normalise ``meta`` to one [B, T_i, d_i] tensor per group (zeros where absent).

        Accepted: None (all groups absent); a [B, sum(T_i*d_i)] tensor (groups
        concatenated, each flattened); a [B, T, d] tensor when there is a single
        group; a list with one [B, d_i] / [B, T_i, d_i] tensor (or None) per group.
        """
        G = len(self.meta_dims)
        dtype = dtype or torch.get_default_dtype()
        if meta is not None and G == 0:
            raise ValueError("this model has no meta groups (meta_dims=()); call it without meta, "
                             "or create it with meta_dims=[...]")
        if meta is None:
            groups = [None] * G
        elif isinstance(meta, torch.Tensor):
            if meta.ndim == 3 and G == 1:
                groups = [meta]
            elif meta.ndim == 2:
                sizes = [t * d for t, d in zip(self.meta_tokens, self.meta_dims)]
                if meta.shape[1] != sum(sizes):
                    raise ValueError(
                        f"meta has {meta.shape[1]} features per sample, the model expects "
                        f"{sum(sizes)} (meta_dims={list(self.meta_dims)}, meta_tokens={list(self.meta_tokens)})")
                groups = list(torch.split(meta, sizes, dim=1))
            else:
                raise ValueError(f"meta must be [B, {sum(self.meta_dims)}] (or [B, T, d] for a single group, "
                                 f"or a list per group), got shape {tuple(meta.shape)}")
        elif isinstance(meta, (list, tuple)):
            if len(meta) != G:
                raise ValueError(f"meta list has {len(meta)} entries, the model has {G} groups "
                                 f"(meta_dims={list(self.meta_dims)})")
            groups = list(meta)
        else:
            raise TypeError(f"meta must be None, a tensor or a list of tensors, got {type(meta).__name__}")

        out = []
        for i, (g, d, t) in enumerate(zip(groups, self.meta_dims, self.meta_tokens)):
            if g is None:
                out.append(torch.zeros(batch_size, t, d, device=device, dtype=dtype))
                continue
            if g.ndim == 2:
                g = g.reshape(g.shape[0], -1, d) if g.shape[1] == t * d else g
            if g.ndim != 3 or g.shape[0] != batch_size or g.shape[1] != t or g.shape[2] != d:
                raise ValueError(f"meta group {i} must be [B={batch_size}, {d}] or [B, {t}, {d}] "
                                 f"(meta_tokens[{i}]={t}), got {tuple(g.shape)}")
            out.append(g.to(device=device, dtype=dtype) if device is not None else g.to(dtype))
        return out

    def embed_meta(self, meta: MetaInput, batch_size: int, meta_present: Optional[torch.Tensor] = None,
                   device=None, dtype=None) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Meta -> (stage-3 tokens, stage-4 tokens), one [B, T_i, C] tensor per group.

        ``meta_present`` [B, n_groups] bool zeroes the missing groups' inputs,
        the same zeros the training-time meta dropout feeds.
        """
        groups = self.split_meta(meta, batch_size, device, dtype)
        if meta_present is not None:
            meta_present = torch.as_tensor(meta_present, device=device)
            if meta_present.shape != (batch_size, len(groups)):
                raise ValueError(f"meta_present must be bool [B={batch_size}, groups={len(groups)}], "
                                 f"got {tuple(meta_present.shape)}")
            groups = [g * meta_present[:, i, None, None].to(g.dtype) for i, g in enumerate(groups)]
        C3, C4 = self.attn_embed_dims
        tokens_3, tokens_4 = [], []
        for i, g in enumerate(groups):
            tokens_3.append(getattr(self, f"meta_{i + 1}_head_1")(g).reshape(batch_size, -1, C3))
            tokens_4.append(getattr(self, f"meta_{i + 1}_head_2")(g).reshape(batch_size, -1, C4))
        return tokens_3, tokens_4

    # -- forward ---------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor):
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"images must be [B, {self.in_chans}, H, W], got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"model was built for img_size={self.img_size}, got {tuple(x.shape[-2:])} images: the relative "
                f"position tables are sized for one grid. Create the model with img_size={tuple(x.shape[-2:])} "
                f"and load these weights through fgvc.models.load_pretrained (it resizes the tables).")

    def forward_features(self, x: torch.Tensor, meta: MetaInput = None,
                         meta_present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images [B, 3, H, W] (+ meta) -> the aggregated class embedding [B, C4] (before the head)."""
        self._check_input(x)
        B = x.shape[0]
        tokens_3, tokens_4 = self.embed_meta(meta, B, meta_present, device=x.device, dtype=self.cls_token_1.dtype)
        x = self.forward_conv_stages(x)
        extra_3 = [self.cls_token_1] + tokens_3
        for i, blk in enumerate(self.stage_3):
            x = self._run_block(blk, x, extra_3) if i == 0 else self._run_block(blk, x)
        num_extra_3 = 1 + sum(t.shape[1] for t in tokens_3)
        cls_1 = self.cl_1_fc(self.norm_1(x[:, :1]))
        x = x[:, num_extra_3:].reshape(B, *self.grid_3, -1).permute(0, 3, 1, 2)
        extra_4 = [self.cls_token_2] + tokens_4
        for i, blk in enumerate(self.stage_4):
            x = self._run_block(blk, x, extra_4) if i == 0 else self._run_block(blk, x)
        cls_2 = self.norm_2(x[:, :1])
        cls = self.aggregate(torch.cat([cls_1, cls_2], dim=1)).squeeze(1)
        return self.norm(cls)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, meta: MetaInput = None, meta_present: Optional[torch.Tensor] = None):
        """Images (+ optional meta, optional per-group presence mask) -> logits [B, num_classes]."""
        return self.forward_head(self.forward_features(x, meta, meta_present))


# ---------------------------------------------------------------------------------------------
# Training helpers
# ---------------------------------------------------------------------------------------------

def meta_dropout_mask(batch_size: int, num_groups: int, drop_prob: float, generator: torch.Generator = None,
                      device=None) -> torch.Tensor:
    """Official meta dropout as a ``meta_present`` mask [B, num_groups] bool.

    floor(B * drop_prob) random samples lose their WHOLE meta vector (all groups);
    the official schedule is ``drop_prob = 1 - epoch / epochs``.
    """
    present = torch.ones(batch_size, num_groups, dtype=torch.bool)
    n_drop = int(batch_size * max(0., min(1., drop_prob)))
    if n_drop:
        present[torch.randperm(batch_size, generator=generator)[:n_drop]] = False
    return present.to(device) if device is not None else present


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float, skip_list: Sequence[str] = (),
                                  no_decay_keywords: Sequence[str] = ()) -> List[Dict]:
    """AdamW parameter groups as the official ``optimizer.set_weight_decay``.

    No decay on 1-D parameters (norms, biases of all kinds), names ending in
    ``.bias``, ``model.no_weight_decay()`` (the class tokens) and ``skip_list``.
    The official MetaFormer has no ``no_weight_decay_keywords``, so its
    relative-position tables (2-D) ARE decayed; pass
    ``no_decay_keywords=("relative_position_bias_table",)`` for the Swin habit.
    """
    from timm.optim import param_groups_weight_decay  # the one group builder (SparK's param_groups uses it too)
    skip = set(skip_list)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    skip |= {name for name, _ in model.named_parameters() if any(k in name for k in no_decay_keywords)}
    groups = param_groups_weight_decay(model, 1.0, no_weight_decay_list=skip)  # 1.0: only to split the two sets
    decay = [p for g in groups if g["weight_decay"] for p in g["params"]]
    no_decay = [p for g in groups if not g["weight_decay"] for p in g["params"]]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.}]


# ---------------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------------

def _unwrap_state_dict(checkpoint) -> Dict[str, torch.Tensor]:
    """The weights inside an official / training checkpoint (the toolkit's one unwrapper)."""
    from sparse_mim.utils.checkpoint import unwrap_state_dict
    if not isinstance(checkpoint, dict):
        raise TypeError(f"expected a state dict or a checkpoint dict, got {type(checkpoint).__name__}")
    return unwrap_state_dict(checkpoint)


def _grid_from_rows(rows: int, like: Tuple[int, int]) -> Tuple[int, int]:
    """(h, w) with (2h-1)(2w-1)+1 == rows, the aspect ratio nearest ``like``."""
    grid_rows = rows - 1
    best = None
    for a in range(1, grid_rows + 1, 2):
        if grid_rows % a == 0 and (grid_rows // a) % 2 == 1:
            h, w = (a + 1) // 2, (grid_rows // a + 1) // 2
            score = abs(math.log(h / w) - math.log(like[0] / like[1]))
            if best is None or score < best[0]:
                best = (score, (h, w))
    if best is None:
        raise ValueError(f"a relative position table of {rows} rows matches no (2h-1)(2w-1)+1 grid")
    return best[1]


def resize_relative_position_bias_table(table: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """Resize a MetaFormer table [(2h-1)(2w-1)+1, heads] to another token grid.

    Rows 0..(2h-1)(2w-1)-1 are the offset grid: resized bicubically
    (align_corners=False, as Swin / timm do). Row 0 is also the row every extra
    token (cls, meta) reads, so it is kept exactly; the last row (never read)
    is carried over. The official resize instead takes row 0 out as the "cls
    row" and interpolates rows 1..end, i.e. the grid shifted by one slot with
    the unused last row inside it.
    """
    (h, w), (nh, nw) = to_pair(old_grid, "old_grid"), to_pair(new_grid, "new_grid")
    rows, heads = table.shape
    if rows != (2 * h - 1) * (2 * w - 1) + 1:
        raise ValueError(f"table has {rows} rows, a {h}x{w} grid needs {(2 * h - 1) * (2 * w - 1) + 1}")
    if (h, w) == (nh, nw):
        return table.clone()
    n_old = (2 * h - 1) * (2 * w - 1)
    grid = table[:n_old].float().reshape(2 * h - 1, 2 * w - 1, heads).permute(2, 0, 1).unsqueeze(0)
    grid = F.interpolate(grid, size=(2 * nh - 1, 2 * nw - 1), mode="bicubic", align_corners=False)
    grid = grid.squeeze(0).permute(1, 2, 0).reshape(-1, heads).to(table.dtype)
    grid[0] = table[0]  # the extra-token row
    return torch.cat([grid, table[n_old:]], dim=0)


def _meta_layout(state_dict: Dict[str, torch.Tensor]) -> List[Tuple[int, int, int]]:
    """[(group, in_dim, embed_dim)] from ``meta_{i}_head_1.0.weight`` shapes."""
    layout = []
    for k, v in state_dict.items():
        if k.startswith("meta_") and k.endswith("_head_1.0.weight"):
            layout.append((int(k.split("_")[1]), int(v.shape[1]), int(v.shape[0])))
    return sorted(layout)


def checkpoint_filter_fn(state_dict, model: MetaFormer) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map an official MetaFormer checkpoint onto ``model``.

    Returns (state dict to load with ``strict=False``, notes on what was
    dropped/resized). Drops ``relative_position_index`` buffers; drops ``head.*``
    when the class count differs; drops all meta heads when the meta layout
    differs (they stay freshly initialised); resizes relative-position tables
    when the resolution differs. Any other difference (another architecture)
    raises ``ValueError`` listing the mismatched keys.
    """
    state_dict = _unwrap_state_dict(state_dict)
    target = model.state_dict()
    out, notes = {}, []
    for k, v in state_dict.items():
        if k.endswith("relative_position_index") or k.endswith("attn_mask"):
            continue  # rebuilt from the grid
        if k == "point_coord" and k not in target:
            notes.append("dropped point_coord (a buffer of the official training code, not of the model)")
            continue
        out[k] = v

    # Classifier.
    head_keys = [k for k in out if k.startswith("head.")]
    if head_keys and any(k not in target or target[k].shape != out[k].shape for k in head_keys):
        n_src = out["head.weight"].shape[0] if "head.weight" in out else "?"
        notes.append(f"dropped head.* (checkpoint has {n_src} classes, model has {model.num_classes}): "
                     f"the classifier stays freshly initialised")
        for k in head_keys:
            del out[k]

    # Meta heads.
    src_meta = [k for k in out if k.startswith("meta_")]
    dst_meta = [k for k in target if k.startswith("meta_")]
    same_layout = set(src_meta) == set(dst_meta) and all(out[k].shape == target[k].shape for k in src_meta)
    if src_meta and not same_layout:
        src_dims = [d for _, d, _ in _meta_layout(out)]
        notes.append(f"dropped the meta heads: checkpoint meta layout {src_dims} differs from the model's "
                     f"meta_dims={list(model.meta_dims)}; the model's meta heads stay freshly initialised")
        for k in src_meta:
            del out[k]
    elif dst_meta and not src_meta:
        notes.append(f"checkpoint has no meta heads: the model's meta heads (meta_dims={list(model.meta_dims)}) "
                     f"stay freshly initialised")

    # Relative-position tables.
    for k in [k for k in out if k.endswith("relative_position_bias_table")]:
        if k in target and out[k].shape != target[k].shape and out[k].shape[1] == target[k].shape[1]:
            attn = model.get_submodule(k.rsplit(".", 1)[0])
            old_grid = _grid_from_rows(out[k].shape[0], attn.grid_size)
            out[k] = resize_relative_position_bias_table(out[k], old_grid, attn.grid_size)
            notes.append(f"resized {k} from a {old_grid[0]}x{old_grid[1]} to a "
                         f"{attn.grid_size[0]}x{attn.grid_size[1]} grid")

    # Everything else must match.
    allowed_missing = {k for k in target if k.startswith("head.") or k.startswith("meta_")}
    unexpected = sorted(k for k in out if k not in target)
    missing = sorted(k for k in target if k not in out and k not in allowed_missing)
    wrong_shape = sorted(f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(target[k].shape)}"
                         for k in out if k in target and out[k].shape != target[k].shape)
    if unexpected or missing or wrong_shape:
        raise ValueError(mismatch_message(out, model, missing, unexpected, wrong_shape))
    return out, notes


def _plain(obj):
    """Config containers as plain dicts / lists (the stand-in of a pickled config class is an OrderedDict)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


# The official training script pickles its yacs config (``yacs.config.CfgNode``, a dict subclass) next
# to the weights. The weights-only unpickler may rebuild that one class, as a plain OrderedDict (its
# attributes land in the OrderedDict's __dict__; no yacs code is imported or run); every other object
# in a file stays refused.
OFFICIAL_CONFIG_GLOBALS = ((OrderedDict, "yacs.config.CfgNode"),)


def read_weights(path) -> dict:
    """Read a MetaFormer file safely: ``torch.load(weights_only=True)`` plus the official config class.

    Official MetaFormer training checkpoints (``model``, ``optimizer``, ``lr_scheduler``,
    ``max_accuracy``, ``epoch`` and the yacs ``config``) load directly: the config comes back
    as a plain dict under ``config``. A file that pickles anything else, a truncated file and a
    file that is not a PyTorch file are refused with a message saying which it is.
    """
    from sparse_mim.utils.checkpoint import load_checkpoint
    obj = load_checkpoint(path, allowed_globals=OFFICIAL_CONFIG_GLOBALS)
    if isinstance(obj, dict) and isinstance(obj.get("config"), OrderedDict):
        obj = dict(obj)
        obj["config"] = _plain(obj["config"])
    return obj


def read_pretrained(path: str) -> dict:
    """:func:`read_weights` for ``model.pretrained``: a file of another kind (a SparK checkpoint, an
    exported backbone) is refused and named as such, instead of a list of keys that do not fit."""
    from sparse_mim.utils.checkpoint import require_checkpoint_kind
    checkpoint = read_weights(path)
    require_checkpoint_kind(checkpoint, path, ["metaformer-weights", "fgvc", "unknown"], "model.pretrained")
    return checkpoint


# ---------------------------------------------------------------------------------------------
# What a state dict is: one-line descriptions for mismatch errors
# ---------------------------------------------------------------------------------------------

def _block_count(keys, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in keys
           if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    return max(idx) + 1 if idx else 0


def describe_state_dict(state_dict: Dict[str, torch.Tensor]) -> str:
    """What architecture a MetaFormer state dict belongs to, in one phrase.

    ``"metaformer_1 (widths 64/96/192/384/768, blocks 2/6/14/2, 200 classes, meta dims [4, 3])"``;
    a hybrid names its trunk; anything else says it is not a MetaFormer.
    """
    sd = state_dict
    keys = list(sd)
    if "cls_token_1" not in sd or "cls_token_2" not in sd:
        head = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        return f"not a MetaFormer ({len(keys)} tensors: {head})"
    c3, c4 = int(sd["cls_token_1"].shape[-1]), int(sd["cls_token_2"].shape[-1])
    d3, d4 = _block_count(keys, "stage_3."), _block_count(keys, "stage_4.")
    extra = []
    if "head.weight" in sd:
        extra.append(f"{int(sd['head.weight'].shape[0])} classes")
    meta = [d for _, d, _ in _meta_layout(sd)]
    extra.append(f"meta dims {meta}" if meta else "no meta")
    if any(k.startswith("backbone.") for k in keys):
        trunk = "ResNet" if any(k.startswith("backbone.layer1.") for k in keys) else "ConvNeXt"
        name = f"a {trunk}-trunk hybrid (token widths {c3}/{c4}, blocks {d3}/{d4}"
        return name + ", " + ", ".join(extra) + ")"
    try:
        c0 = int(sd["stage_0.6.weight"].shape[0])
        c1 = int(sd["stage_1.0._project_conv.weight"].shape[0])
        c2 = int(sd["stage_2.0._project_conv.weight"].shape[0])
    except KeyError:
        return f"an incomplete MetaFormer (token widths {c3}/{c4}, blocks {d3}/{d4})"
    d1, d2 = _block_count(keys, "stage_1."), _block_count(keys, "stage_2.")
    name = "a custom-size MetaFormer"
    for variant, cfg in _CFGS.items():
        if (tuple(cfg["conv_embed_dims"]) == (c0, c1, c2) and tuple(cfg["attn_embed_dims"]) == (c3, c4)
                and tuple(cfg["conv_depths"][1:]) == (d1, d2) and tuple(cfg["attn_depths"]) == (d3, d4)):
            name = variant
            break
    return (f"{name} (widths {c1}/{c2}/{c3}/{c4}, blocks {d1}/{d2}/{d3}/{d4}, " + ", ".join(extra) + ")")


def mismatch_message(state_dict, model: nn.Module, missing=None, unexpected=None, wrong_shape=None) -> str:
    """One line: what the checkpoint holds vs what the model is, with counts and one example each."""
    from sparse_mim.utils.checkpoint import compare_state_dicts
    target = model.state_dict()
    diff = compare_state_dicts(state_dict, target)
    missing = sorted(diff["missing"]) if missing is None else missing
    unexpected = sorted(diff["unexpected"]) if unexpected is None else unexpected
    wrong_shape = sorted(diff["wrong_shape"]) if wrong_shape is None else wrong_shape
    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing in the checkpoint (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} keys the model does not have (e.g. {unexpected[0]})")
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} shape mismatches (e.g. {wrong_shape[0]})")
    src = describe_state_dict(state_dict)
    dst = describe_state_dict({k: v for k, v in target.items()})
    if src == dst:  # same variant, e.g. only the classifier differs
        return f"checkpoint weights do not fit the model ({src}): " + "; ".join(parts)
    return f"checkpoint is {src} but the model is {dst}: " + "; ".join(parts)


def load_state_dict_exact(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> nn.Module:
    """``model.load_state_dict(state_dict)`` with every key and shape matching, else ONE line
    naming the expected and found variant (instead of torch's list of hundreds of keys)."""
    target = model.state_dict()
    bad = (set(target) != set(state_dict)) or any(
        state_dict[k].shape != v.shape for k, v in target.items() if k in state_dict)
    if bad:
        raise ValueError(mismatch_message(state_dict, model))
    model.load_state_dict(state_dict)
    return model


def load_pretrained(model: MetaFormer, checkpoint, strict: bool = True) -> List[str]:
    """Load an official MetaFormer file (or a state dict / checkpoint dict) into ``model``.

    ``checkpoint``: a path (``torch.load(weights_only=True)``), a dict holding
    ``model`` / ``state_dict_ema``, or a plain state dict. Returns the notes of
    :func:`checkpoint_filter_fn` (also logged).
    """
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        checkpoint = read_pretrained(os.fspath(checkpoint))
    state_dict, notes = checkpoint_filter_fn(checkpoint, model)
    result = model.load_state_dict(state_dict, strict=False)
    if strict and result.unexpected_keys:
        raise ValueError(f"unexpected keys after filtering: {result.unexpected_keys}")
    for n in notes:
        _logger.warning(n)
    return notes


# ---------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------

_CFGS = {
    # conv_embed_dims (stem, S1, S2), attn_embed_dims (S3, S4), conv_depths, attn_depths
    "metaformer_0": dict(conv_embed_dims=(64, 96, 192), attn_embed_dims=(384, 768),
                         conv_depths=(2, 2, 3), attn_depths=(5, 2)),
    "metaformer_1": dict(conv_embed_dims=(64, 96, 192), attn_embed_dims=(384, 768),
                         conv_depths=(2, 2, 6), attn_depths=(14, 2)),
    "metaformer_2": dict(conv_embed_dims=(128, 128, 256), attn_embed_dims=(512, 1024),
                         conv_depths=(2, 2, 6), attn_depths=(14, 2)),
    # Not an official size: the same architecture reduced for CPU runs, tests and demos.
    "metaformer_tiny": dict(conv_embed_dims=(16, 24, 48), attn_embed_dims=(64, 96),
                            conv_depths=(1, 1, 1), attn_depths=(1, 1), num_heads=4),
}


def _create(variant: str, **kwargs) -> MetaFormer:
    return MetaFormer(**{**_CFGS[variant], **kwargs})


@register_model
def metaformer_0(**kwargs) -> MetaFormer:
    """MetaFormer-0: 96/192/384/768, 2/3/5/2 blocks (28.7M params at 1000 classes)."""
    return _create("metaformer_0", **kwargs)


@register_model
def metaformer_1(**kwargs) -> MetaFormer:
    """MetaFormer-1: 96/192/384/768, 2/6/14/2 blocks (45.9M params)."""
    return _create("metaformer_1", **kwargs)


@register_model
def metaformer_2(**kwargs) -> MetaFormer:
    """MetaFormer-2: 128/256/512/1024, 2/6/14/2 blocks (81.3M params)."""
    return _create("metaformer_2", **kwargs)


@register_model
def metaformer_tiny(**kwargs) -> MetaFormer:
    """MetaFormer-tiny (not an official size): 24/48/64/96 wide, 1/1/1/1 blocks, 4 heads
    (about 0.3M params): the full architecture small enough to train on a CPU in minutes."""
    return _create("metaformer_tiny", **kwargs)
