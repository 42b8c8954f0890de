"""Convnet + meta-token hybrids: a (SparK-)pre-trained ResNet / ConvNeXt under MetaFormer's token head.

Design (so ``sparse_mim`` pre-training and ``fgvc`` fine-tuning meet):

    images -> convnet stem + stages 1-3 (stride 16, weights from ``tools/export_backbone.py``)
           -> stage 3: 1x1 projection + LayerNorm to tokens, [cls_1, meta tokens] prepended,
              transformer blocks with the relative-position bias   (stride 16)
           -> stage 4: overlapping 3x3/s2 embed, [cls_2, meta tokens], blocks  (stride 32)
           -> cls_1 / cls_2 aggregated exactly as in MetaFormer -> head

Why stages 1-3: they hold most of the pre-trained representation (ResNet-50's
``layer3`` alone is 7.1M of its 23.5M parameters) and stride 16 is where
MetaFormer's token stages start, so the meta heads, class tokens,
aggregation, ``checkpoint_filter_fn`` and the trainer are shared unchanged.
The convnet's last stage is replaced by MetaFormer's stage 4, which the meta
tokens reach; its pre-trained weights (``layer4.*`` / ``stages.3.*``) are
reported as unused when a backbone file is loaded.

The conv part is built from timm's ResNet (torchvision's parameter names) / ConvNeXt with
``pretrained=False`` and kept under ``backbone.`` with the SAME key names
(``backbone.layer1.0.conv1.weight``, ``backbone.stages.0.blocks.0...``), so the
plain torchvision / timm state dicts that ``tools/export_backbone.py`` writes
(also the files of torchvision / timm themselves) load with
``init_backbone=PATH`` (``weights_only=True``; missing or mis-shaped keys are an
error that lists them).
"""
import logging
import os
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint

from sparse_mim.backbones import backbone_family, list_backbones

from ._registry import register_model
from .metaformer import MetaFormer, _unwrap_state_dict

_logger = logging.getLogger(__name__)

__all__ = ["MetaFormerHybrid", "load_backbone_weights", "build_conv_trunk"]

# The same backbone list as SparK pre-training (sparse_mim.list_backbones): every pre-trained encoder fits a hybrid.
_RESNETS = tuple(n for n in list_backbones() if backbone_family(n) == "resnet")
_CONVNEXTS = tuple(n for n in list_backbones() if backbone_family(n) == "convnext")


class ResNetTrunk(nn.Module):
    """ResNet stem + layer1-3 (stride 16), torchvision's attribute and parameter names (timm's model, as SparK's)."""

    def __init__(self, name: str):
        super().__init__()
        import timm

        # timm's ResNets have torchvision's parameter names and include ResNet-200; torchvision's init (BN weight 1)
        net = timm.create_model(name, pretrained=False, num_classes=0, zero_init_last=False)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.act1, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.channels = [blocks[-1].conv3.out_channels if hasattr(blocks[-1], "conv3") else blocks[-1].conv2.out_channels
                         for blocks in (self.layer1, self.layer2, self.layer3)]
        self.reductions = [4, 8, 16]
        self.name = name
        self.unused_prefixes = ("layer4.", "fc.")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class ConvNeXtTrunk(nn.Module):
    """timm ConvNeXt / ConvNeXt-V2 stem + stages 0-2 (stride 16), same attribute names as timm."""

    def __init__(self, name: str, drop_path_rate: float = 0.):
        super().__init__()
        import timm

        net = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
        self.stem = net.stem
        self.stages = net.stages[:3]
        self.channels = [info["num_chs"] for info in net.feature_info[:3]]
        self.reductions = [4, 8, 16]
        self.name = name
        self.unused_prefixes = ("stages.3.", "norm_pre.", "head.")

    def forward(self, x):
        return self.stages(self.stem(x))


def build_conv_trunk(name: str, drop_path_rate: float = 0.) -> nn.Module:
    if name in _RESNETS:
        return ResNetTrunk(name)
    if name in _CONVNEXTS:
        return ConvNeXtTrunk(name, drop_path_rate)
    raise ValueError(f"unknown hybrid backbone {name!r}; available: {', '.join(_RESNETS + _CONVNEXTS)}")


def _read_backbone_state(trunk: nn.Module, checkpoint) -> Dict[str, torch.Tensor]:
    """The file's backbone state dict in torchvision / timm names.

    Uses ``sparse_mim.backbones`` (when importable) so that besides plain
    torchvision / timm state dicts, official SparK ``*_spark_style.pth`` files and
    facebookresearch ConvNeXt names are translated too; otherwise unwraps
    ``model`` / ``state_dict`` / ``module.`` itself.
    """
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        from sparse_mim.utils.checkpoint import load_checkpoint
        checkpoint = load_checkpoint(checkpoint, check_finite=True)
    if not isinstance(checkpoint, dict):
        raise TypeError(f"backbone weights must be a state dict or a checkpoint dict, got {type(checkpoint).__name__}")
    try:
        from sparse_mim.backbones.weights import convert_state_dict, unwrap_state_dict
    except ImportError:
        return _unwrap_state_dict(checkpoint)
    return convert_state_dict(unwrap_state_dict(checkpoint), trunk)


def load_backbone_weights(trunk: nn.Module, checkpoint) -> List[str]:
    """Load torchvision / timm style backbone weights (e.g. from ``tools/export_backbone.py``) into a trunk.

    ``checkpoint``: a path (``torch.load(weights_only=True)``) or a dict. Every
    key of the trunk must be present with its shape (BN step counters aside),
    and every other key must belong to a stage the hybrid replaces (``layer4`` /
    ``fc`` / ``stages.3`` / ``norm_pre`` / ``head``, reported in the returned
    notes), else ``ValueError`` listing the offending keys.
    """
    source = ""
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        from sparse_mim.utils.checkpoint import checkpoint_kind, load_checkpoint, require_checkpoint_kind
        path = os.fspath(checkpoint)
        checkpoint = load_checkpoint(path, check_finite=True)
        require_checkpoint_kind(checkpoint, path, ["backbone", "spark-pretrain", "spark-weights", "unknown"],
                                "model.init_backbone")
        source = f": {path} is {checkpoint_kind(checkpoint)[1]}"
    state_dict = _read_backbone_state(trunk, checkpoint)
    target = trunk.state_dict()
    missing = sorted(k for k in target if k not in state_dict and not k.endswith("num_batches_tracked"))
    wrong_shape = sorted(f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}"
                         for k in target if k in state_dict and state_dict[k].shape != target[k].shape)
    ignored = sorted(k for k in state_dict if k not in target)
    stray = [k for k in ignored if not k.startswith(trunk.unused_prefixes)]
    if missing or wrong_shape or stray:
        def _fmt(title, keys, sep=", "):
            return f"  {title} ({len(keys)}): " + sep.join(keys[:20]) + (" ..." if len(keys) > 20 else "")
        lines = [f"backbone weights do not fit the {trunk.name} trunk{source} (is the file of another backbone or "
                 "size?)"]
        if missing:
            lines.append(_fmt("missing in the file", missing))
        if wrong_shape:
            lines.append(_fmt("shape mismatches", wrong_shape, "; "))
        if stray:
            lines.append(_fmt(f"keys {trunk.name} does not have", stray))
        raise ValueError("\n".join(lines))
    trunk.load_state_dict({k: state_dict[k] for k in target if k in state_dict}, strict=False)
    notes = [f"loaded {sum(1 for k in target if k in state_dict)} tensors into the {trunk.name} trunk"]
    if ignored:
        notes.append(f"backbone file: {len(ignored)} keys of the stages the hybrid replaces were not used "
                     f"({', '.join(sorted({k.split('.')[0] for k in ignored}))})")
    for n in notes:
        _logger.info(n)
    return notes


class MetaFormerHybrid(MetaFormer):
    """A convnet trunk (stride 16) + MetaFormer's token stages 3-4 with class and meta tokens.

    Args:
        backbone: ``resnet18/34/50/101/152`` or ``convnext[v2]_{atto..large}``.
        init_backbone: optional path / state dict of torchvision / timm backbone weights.
        embed_dims, depths: widths and depths of the two token stages.
        backbone_drop_path_rate: stochastic depth inside a ConvNeXt trunk (ResNets have none).
        Other arguments as :class:`MetaFormer`.
    """

    def __init__(self, backbone: str = "resnet50", init_backbone=None, embed_dims: Sequence[int] = (384, 768),
                 depths: Sequence[int] = (2, 2), backbone_drop_path_rate: float = 0., **kwargs):
        for k in ("conv_embed_dims", "conv_depths"):
            if k in kwargs:
                raise TypeError(f"{k} does not apply to a hybrid (the conv part is the {backbone} trunk)")
        super().__init__(attn_embed_dims=embed_dims, attn_depths=depths,
                         _conv_cfg=dict(backbone=backbone, backbone_drop_path_rate=backbone_drop_path_rate),
                         **kwargs)
        self.backbone_name = backbone
        self.init_notes = load_backbone_weights(self.backbone, init_backbone) if init_backbone is not None else []

    def _build_conv_stages(self, in_chans, conv_embed_dims, conv_depths, mlp_ratio, drop_path_rate,
                           num_token_blocks, backbone="resnet50", backbone_drop_path_rate=0.) -> Tuple[int, int, int]:
        if in_chans != 3:
            raise ValueError("hybrid backbones take 3-channel images")
        self.backbone = build_conv_trunk(backbone, backbone_drop_path_rate)
        return 0, self.backbone.channels[-1], 16

    def _conv_stages(self) -> List[List[List[str]]]:
        """The trunk's stem and stages as layer prefixes (a ConvNeXt downsample goes with its stage's first block)."""
        b = self.backbone
        if isinstance(b, ResNetTrunk):
            return [[["backbone.conv1.", "backbone.bn1."]]] + [
                [[f"backbone.{n}.{i}."] for i in range(len(getattr(b, n)))] for n in ("layer1", "layer2", "layer3")]
        stages = [[["backbone.stem."]]]
        for s, stage in enumerate(b.stages):
            blocks = [[f"backbone.stages.{s}.blocks.{i}."] for i in range(len(stage.blocks))]
            blocks[0].append(f"backbone.stages.{s}.downsample.")
            stages.append(blocks)
        return stages

    def forward_conv_stages(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.backbone, x, use_reentrant=False)
        return self.backbone(x)

    def _feature_info(self, conv_embed_dims, conv_out_chs, conv_stride) -> List[Dict]:
        C3, C4 = self.attn_embed_dims
        names = ("layer1", "layer2", "layer3") if isinstance(self.backbone, ResNetTrunk) else \
            ("stages.0", "stages.1", "stages.2")
        info = [dict(num_chs=c, reduction=r, module=f"backbone.{n}")
                for c, r, n in zip(self.backbone.channels, self.backbone.reductions, names)]
        return info + [dict(num_chs=C3, reduction=16, module="stage_3"),
                       dict(num_chs=C4, reduction=32, module="stage_4")]


_HYBRID_DIMS = {name: ((256, 512) if name in ("resnet18", "resnet34") else (384, 768), (2, 2)) for name in _RESNETS}
for _size, _dims in (("atto", (160, 320)), ("femto", (192, 384)), ("pico", (256, 512)), ("nano", (320, 640)),
                     ("tiny", (384, 768)), ("small", (384, 768)), ("base", (512, 1024)), ("large", (768, 1536))):
    for _family in ("convnext", "convnextv2"):
        _HYBRID_DIMS[f"{_family}_{_size}"] = (_dims, (2, 2))


def _create_hybrid(backbone: str, **kwargs) -> MetaFormerHybrid:
    dims, depths = _HYBRID_DIMS[backbone]
    kwargs.setdefault("embed_dims", dims)
    kwargs.setdefault("depths", depths)
    return MetaFormerHybrid(backbone=backbone, **kwargs)


def _register_hybrid(backbone: str):
    def factory(**kwargs) -> MetaFormerHybrid:
        return _create_hybrid(backbone, **kwargs)

    factory.__name__ = factory.__qualname__ = f"metaformer_{backbone}"
    dims, depths = _HYBRID_DIMS[backbone]
    factory.__doc__ = (f"{backbone} stem + stages 1-3 (stride 16) -> token stages {dims[0]}/{dims[1]} wide, "
                       f"{depths[0]}/{depths[1]} blocks, with class + meta tokens.")
    register_model(factory)
    globals()[factory.__name__] = factory


for _bb in _HYBRID_DIMS:
    _register_hybrid(_bb)
