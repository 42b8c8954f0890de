"""SparK: sparse and hierarchical masked image modelling for convnets, on true sparse tensors.

"Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked
Modeling" (Tian et al., ICLR 2023). The official code (keyu-tian/SparK,
``pretrain/spark.py``) simulates sparsity with dense ops on a zero-filled image;
here the encoder computes on the visible sites only (``sparse_mim.sparse``) and
the dense-masked simulation is kept as a reference mode of the same model.

The class reads like the method (MAE style), one method per step:

1. ``mask``            random patch mask, a fixed number of visible patches per image
2. ``forward_encoder`` sparse encoder on the visible patches -> 4 maps, strides 4..32
3. ``densify``         norm on visible features, fill hidden sites with mask tokens,
                       project to the decoder's width, coarsest first
4. ``forward_decoder`` light UNet decoder -> per-patch-normalised pixels
5. ``forward_loss``    MSE to per-patch-normalised targets, hidden patches only

Parameter names follow the official module (``sparse_encoder.sp_cnn.*``,
``dense_decoder.*``, ``densify_norms.i``, ``densify_projs.i``, ``mask_tokens.i``),
so ``load_spark_checkpoint`` reads the official ``*_withdecoder_*`` files.
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from timm.layers import trunc_normal_

from .decoder import LightDecoder
from .utils.misc import to_pair
from .sparse.tensor import SparseMap, check_visible_mask, upsample_mask

__all__ = ["SparK", "param_groups", "load_spark_checkpoint", "patchify", "unpatchify", "mask_seed_generator",
           "INIT_CHOICES", "NotASparKCheckpointError"]

INIT_CHOICES = ("official", "trunc_normal")


class NotASparKCheckpointError(ValueError):
    """The file is a checkpoint, but not of a SparK model (e.g. an fgvc or backbone-only file)."""

# Buffers of the official module that it never uses (its own comment says so); dropped on import.
_OFFICIAL_UNUSED_KEYS = ("imn_m", "imn_s", "norm_black")
_ENCODER_PREFIX = "sparse_encoder.sp_cnn."


def mask_seed_generator(seed: int) -> torch.Generator:
    """The CPU generator a sample's mask is drawn from, given the sample's seed (decorrelated from its crop)."""
    return torch.Generator().manual_seed((int(seed) ^ 0x5DEECE66D) & ((1 << 63) - 1))


def _init_last_bn(backbone: nn.Module, value: float = 0.0) -> int:
    """Set the last BatchNorm weight of every residual block to ``value``.

    0 is the timm / official SparK ResNet init (timm's ``zero_init_last``, torchvision's
    ``zero_init_residual``); 1 is torchvision's default. Bottlenecks: ``bn3``, basic blocks:
    ``bn2``. Returns the number of blocks changed.
    """
    params = dict(backbone.named_parameters())
    blocks = sorted({n.rsplit(".", 2)[0] for n in params if re.search(r"(^|\.)layer\d+\.\d+\.bn\d\.weight$", n)})
    count = 0
    for block in blocks:
        for last in ("bn3", "bn2"):
            w = params.get(f"{block}.{last}.weight")
            if w is not None:
                with torch.no_grad():
                    w.fill_(value)
                count += 1
                break
    return count

def random_visible_mask(batch_size: int, grid: tuple[int, int], num_visible: int,
                        generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """SparK's random patch mask: bool [B, f_h, f_w], True = visible, exactly ``num_visible`` per image.

    Chosen as ``rand(B, f_h*f_w).argsort()[:, :num_visible]`` (official). Random numbers are
    drawn on the generator's device (CPU by default), so a seeded generator gives the same
    mask on any device. The one mask generator of the project (`SparK.mask`, tests).
    """
    fh, fw = grid
    noise = torch.rand(batch_size, fh * fw, generator=generator,
                       device=generator.device if generator is not None else "cpu")
    keep_idx = noise.argsort(dim=1)[:, :num_visible]
    visible = torch.zeros(batch_size, fh * fw, dtype=torch.bool, device=keep_idx.device)
    visible.scatter_(1, keep_idx, True)
    return visible.view(batch_size, fh, fw).to(device if device is not None else keep_idx.device)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, h*w, p*p*C] (row-major patches; each patch (py, px, c), like the official code)."""
    B, C, H, W = images.shape
    h, w = H // patch_size, W // patch_size
    x = images.reshape(B, C, h, patch_size, w, patch_size)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(B, h * w, patch_size * patch_size * C)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int]) -> Tensor:
    """[B, h*w, p*p*C] -> [B, C, h*p, w*p], the inverse of ``patchify``."""
    B, L, D = patches.shape
    h, w = grid
    if L != h * w:
        raise ValueError(f"{L} patches do not form a {h}x{w} grid")
    C = D // (patch_size * patch_size)
    x = patches.reshape(B, h, w, patch_size, patch_size, C)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(B, C, h * patch_size, w * patch_size)


class _SparseEncoder(nn.Module):
    """Holds the backbone under the official name ``sparse_encoder.sp_cnn``."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.sp_cnn = backbone


def _backbone_is_sparse(backbone: nn.Module) -> bool:
    flag = getattr(backbone, "is_sparse", getattr(backbone, "sparse", None))
    if isinstance(flag, bool):
        return flag
    return any(type(m).__module__.startswith("sparse_mim.sparse") for m in backbone.modules())


def _default_densify_norm(backbone: nn.Module) -> str:
    """Official choice: BN for ResNets, LN for ConvNeXts; decided by the norm layers the backbone holds."""
    for m in backbone.modules():
        if "BatchNorm" in type(m).__name__:
            return "bn"
    return "ln"


class SparK(nn.Module):
    """SparK pre-training model: sparse encoder, densify layers, light decoder, masked loss.

    Args:
        backbone: a backbone from ``sparse_mim.create_backbone`` (``.channels``,
            ``.downsample_ratio``, ``forward(images, visible)``), or its registry name.
        input_size: image size, int or (height, width); both multiples of the
            backbone's downsample ratio (32).
        mask_ratio: fraction of patches hidden; every image keeps exactly
            ``round(f_h * f_w * (1 - mask_ratio))`` patches.
        decoder_width: the decoder's width at the coarsest scale (768 in the paper).
        sbn: SyncBatchNorm in the decoder and the densify norms (multi-process runs).
        densify_norm: 'bn', 'ln' or 'identity'; default: 'bn' if the backbone has
            BatchNorm layers (ResNet), else 'ln' (ConvNeXt), as in the official code.
        sparse: only when ``backbone`` is a name: build the sparse backbone (True)
            or its dense-masked simulation twin (False).
        init: ``"official"`` (default; as the official SparK code): a ResNet built here from its
            name starts with the last BatchNorm weight of every block at 0 (timm's
            ``zero_init_last``; a backbone module passed in is left as it is), the densify
            projections keep PyTorch's default conv init. ``"trunc_normal"``: BatchNorm
            weights 1 and trunc-normal(0.02) projections with zero bias (this project's
            earlier init). Mask tokens and the decoder are initialised the same way in both.
        backbone_kwargs: extra arguments for ``create_backbone`` when ``backbone`` is a name.
    """

    def __init__(
            self,
            backbone: nn.Module | str,
            input_size: int | Sequence[int] = 224,
            mask_ratio: float = 0.6,
            decoder_width: int = 768,
            sbn: bool = False,
            densify_norm: str | None = None,
            sparse: bool = True,
            init: str = "official",
            **backbone_kwargs: Any,
    ):
        super().__init__()
        if init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {INIT_CHOICES}, got {init!r}")
        self.init = init
        self.backbone_name = None
        self.backbone_kwargs = dict(backbone_kwargs)
        built_here = False
        if isinstance(backbone, str):
            from . import create_backbone  # lazy: the registry lives in sparse_mim.backbones
            self.backbone_name = backbone
            backbone = create_backbone(backbone, sparse=sparse, **backbone_kwargs)
            built_here = True
        elif backbone_kwargs:
            raise ValueError(f"backbone kwargs {sorted(backbone_kwargs)} need a backbone *name*; "
                             "pass them to create_backbone instead")
        else:
            self.backbone_name = getattr(backbone, "name", None) or getattr(backbone, "backbone_name", None)
        for attr in ("channels", "downsample_ratio"):
            if not hasattr(backbone, attr):
                raise TypeError(f"the backbone {type(backbone).__name__} has no `.{attr}`; SparK needs a backbone "
                                "with `.channels` (4 widths, stride 4 to 32), `.downsample_ratio` and "
                                "`forward(images, visible)` (see sparse_mim.create_backbone)")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio} (0 hides nothing: the loss is 0)")

        self.sparse_encoder = _SparseEncoder(backbone)
        self.is_sparse = _backbone_is_sparse(backbone)
        self.patch_size = int(backbone.downsample_ratio)
        self.input_size = to_pair(input_size, "input_size")
        self.patch_grid = self.check_image_size(*self.input_size)
        self.mask_ratio = float(mask_ratio)
        self.num_visible = self.visible_count(self.patch_grid)
        self.sbn = sbn

        self.dense_decoder = LightDecoder(self.patch_size, width=decoder_width, sbn=sbn)
        self.densify_norm_type = (densify_norm or _default_densify_norm(backbone)).lower()
        if self.densify_norm_type not in ("bn", "ln", "identity"):
            raise ValueError(f"densify_norm must be 'bn', 'ln' or 'identity', got {densify_norm!r}")

        # Densify layers, coarsest scale first (official order).
        encoder_widths = list(backbone.channels)[::-1]
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        self.mask_tokens = nn.ParameterList()
        decoder_chs = decoder_width
        for i, enc_chs in enumerate(encoder_widths):
            token = nn.Parameter(torch.zeros(1, enc_chs, 1, 1))
            trunc_normal_(token, mean=0., std=.02, a=-.02, b=.02)
            self.mask_tokens.append(token)
            if self.densify_norm_type == "bn":
                norm = (nn.SyncBatchNorm if sbn else nn.BatchNorm1d)(enc_chs)  # over visible rows [N, C]
            elif self.densify_norm_type == "ln":
                norm = nn.LayerNorm(enc_chs, eps=1e-6)
            else:
                norm = nn.Identity()
            self.densify_norms.append(norm)
            if i == 0 and enc_chs == decoder_chs:
                proj = nn.Identity()
            else:
                k = 1 if i == 0 else 3
                proj = nn.Conv2d(enc_chs, decoder_chs, kernel_size=k, stride=1, padding=k // 2, bias=True)
                if init == "trunc_normal":
                    trunc_normal_(proj.weight, std=.02)
                    nn.init.zeros_(proj.bias)
                # "official": PyTorch's default conv init (Kaiming-uniform weight, uniform bias), as SparK
            self.densify_projs.append(proj)
            decoder_chs //= 2
        # from-scratch backbones only (built here from a name without weights); a given module is left as it is
        if built_here and not backbone_kwargs.get("weights"):
            _init_last_bn(backbone, 0.0 if init == "official" else 1.0)

    # ------------------------------------------------------------------ accessors
    @property
    def backbone(self) -> nn.Module:
        """The encoder (a ``create_backbone`` module); its state_dict is the exportable backbone."""
        return self.sparse_encoder.sp_cnn

    def check_image_size(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid (f_h, f_w) of an image; a clear error if a side is not a multiple of the patch size."""
        p = self.patch_size
        if height % p or width % p or height <= 0 or width <= 0:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the backbone's downsample ratio {p}: SparK masks "
                f"{p}x{p} patches. Resize or crop to a multiple of {p} (e.g. {max(p, height // p * p)}x"
                f"{max(p, width // p * p)})")
        return height // p, width // p

    def visible_count(self, grid: tuple[int, int]) -> int:
        keep = round(grid[0] * grid[1] * (1 - self.mask_ratio))
        if keep < 1:
            raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible patch on a {grid[0]}x{grid[1]} grid; "
                             "lower mask_ratio or use larger images")
        return keep

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this model (stored in checkpoints; see ``from_checkpoint``)."""
        if self.backbone_name is None:
            raise ValueError("this SparK model was built from an unnamed backbone module, so a checkpoint cannot "
                             "describe it; build it as SparK('resnet50', ...) or from sparse_mim.create_backbone")
        return {"backbone": self.backbone_name, "backbone_kwargs": dict(self.backbone_kwargs),
                "input_size": list(self.input_size), "mask_ratio": self.mask_ratio,
                "decoder_width": int(self.dense_decoder.width), "densify_norm": self.densify_norm_type,
                "sparse": bool(self.is_sparse), "init": self.init}

    @classmethod
    def from_checkpoint(cls, path_or_checkpoint, sparse: bool | None = None, **overrides: Any) -> "SparK":
        """Rebuild a SparK model from its own checkpoint and load its weights (refusing NaN / inf ones).

        Reads ``spark`` (the ``init_args`` stored by ``sparse_mim.train``); an official
        ``*_withdecoder_*`` release file is rebuilt from its ``arch`` / ``input_size`` /
        stored config. ``sparse``: override the sparse / dense-masked choice; ``overrides``:
        other constructor arguments (e.g. ``mask_ratio``). Drop-path is 0 (inference).
        """
        from .utils.checkpoint import check_state_finite, load_checkpoint, require_checkpoint_kind
        if isinstance(path_or_checkpoint, (str, os.PathLike)):
            checkpoint, source = load_checkpoint(path_or_checkpoint), str(path_or_checkpoint)
            require_checkpoint_kind(checkpoint, source, ["spark-pretrain", "spark-weights", "unknown"],
                                    "reading a SparK model", NotASparKCheckpointError)
        else:
            checkpoint, source = path_or_checkpoint, "the given checkpoint"
        args = spark_args_from_checkpoint(checkpoint, source)
        args.update({k: v for k, v in overrides.items() if v is not None})
        if sparse is not None:
            args["sparse"] = sparse
        kwargs = dict(args.pop("backbone_kwargs", None) or {})
        kwargs["drop_path_rate"] = 0.0
        name = args.pop("backbone")
        model = cls(name, **args, **kwargs)
        check_state_finite(_unwrap_checkpoint(checkpoint)[0], f"{source} is not usable")
        load_spark_checkpoint(model, checkpoint)
        return model

    def masks_from_seeds(self, seeds: Tensor | Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """Visible masks [B, f_h, f_w], one per sample, each drawn from its own sample seed.

        A sample's mask depends on its seed only (not on the batch, process layout or a restart).
        """
        seeds = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
        masks = torch.cat([self.mask(1, generator=mask_seed_generator(s)) for s in seeds])
        return masks.to(device) if device is not None else masks

    # ------------------------------------------------------------------ 1. masking
    def mask(self, batch_size: int, device: torch.device | str | None = None, generator: torch.Generator | None = None,
             grid: tuple[int, int] | None = None) -> Tensor:
        """Random visible mask [B, f_h, f_w] (True = visible), exactly ``num_visible`` per image.

        Chosen as ``rand(B, f_h*f_w).argsort()[:, :keep]`` (official). Random numbers are
        drawn on the generator's device (CPU by default), so a seeded generator
        gives the same mask on any device.
        """
        fh, fw = grid or self.patch_grid
        return random_visible_mask(batch_size, (fh, fw), self.visible_count((fh, fw)), generator, device)

    # ------------------------------------------------------------------ 2. encoder
    def forward_encoder(self, images: Tensor, visible: Tensor) -> list[Tensor | SparseMap]:
        """4 feature maps, stride 4 first: ``SparseMap``s from a sparse backbone, dense maps from the twin."""
        if self.is_sparse:
            return list(self.backbone(images, visible, return_sparse=True))
        return list(self.backbone(images, visible))

    # ------------------------------------------------------------------ 3. densify
    def densify(self, features: Sequence[Tensor | SparseMap], visible: Tensor) -> list[Tensor]:
        """Dense decoder inputs, coarsest first: norm(visible features), mask tokens at hidden sites, projection.

        The norm sees the visible rows only (BN statistics over visible sites),
        whether they come as a ``SparseMap`` or are gathered from a dense map: the
        two paths perform the same operations on the same rows in the same order.
        """
        to_decoder = []
        for i, feat in enumerate(reversed(list(features))):
            # rows are gathered / scattered through the flat index of the visible sites (built once per scale),
            # not the bool mask: indexing by a mask is a nonzero, a host-device synchronisation, every time
            if isinstance(feat, SparseMap):
                rows, site_mask, sites = feat.features, feat.mask, feat.flat_index
            else:
                factor = feat.shape[-1] // visible.shape[-1]
                site_mask = upsample_mask(visible, factor)
                sites = site_mask.flatten().nonzero().flatten()
                rows = feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1]).index_select(0, sites)
            rows = self.densify_norms[i](rows)
            token = self.mask_tokens[i]
            B, (h, w), C = site_mask.shape[0], site_mask.shape[1:], token.shape[1]
            # Channels-last buffer of mask tokens, visible rows written in (differentiable w.r.t. both).
            dense = token.view(1, C).to(rows.dtype).expand(B * h * w, C).clone()
            dense = dense.index_put((sites,), rows).view(B, h, w, C).permute(0, 3, 1, 2)
            to_decoder.append(self.densify_projs[i](dense))
        return to_decoder

    # ------------------------------------------------------------------ 4. decoder
    def forward_decoder(self, to_decoder: Sequence[Tensor]) -> Tensor:
        return self.dense_decoder(to_decoder)

    # ------------------------------------------------------------------ 5. loss
    def patchify(self, images: Tensor) -> Tensor:
        return patchify(images, self.patch_size)

    def unpatchify(self, patches: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        return unpatchify(patches, self.patch_size, grid or self.patch_grid)

    def target_patches(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-patch-normalised target [B, L, p*p*3], with each patch's mean and std (unbiased var + 1e-6)."""
        target = self.patchify(images)
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6) ** .5
        return (target - mean) / std, mean, std

    def forward_loss(self, images: Tensor, reconstruction: Tensor, visible: Tensor) -> Tensor:
        """MSE per patch against the normalised target, averaged over the hidden patches only."""
        target, _, _ = self.target_patches(images)
        pred = self.patchify(reconstruction)
        per_patch = ((pred - target) ** 2).mean(dim=-1)  # [B, L]
        hidden = (~visible).flatten(1).to(per_patch.dtype)
        return (per_patch * hidden).sum() / hidden.sum().clamp_min(1.0)

    # ------------------------------------------------------------------ forward
    def _prepare_visible(self, images: Tensor, visible: Tensor | None, generator=None) -> Tensor:
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        grid = self.check_image_size(images.shape[2], images.shape[3])
        if visible is None:
            return self.mask(images.shape[0], images.device, generator=generator, grid=grid)
        if visible.dim() == 4 and visible.shape[1] == 1:  # official (B, 1, f, f) layout
            visible = visible[:, 0]
        check_visible_mask(visible, images.shape[2], images.shape[3], batch_size=images.shape[0],
                           device=images.device)
        if tuple(visible.shape[1:]) != grid:
            raise ValueError(f"visible mask grid {tuple(visible.shape[1:])} does not match the {grid[0]}x{grid[1]} "
                             f"patch grid of {images.shape[2]}x{images.shape[3]} images (patch {self.patch_size})")
        return visible

    def forward(self, images: Tensor, visible: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(loss, reconstruction [B, 3, H, W] in per-patch-normalised pixels, visible [B, f_h, f_w])``.

        Without ``visible`` a random mask is drawn (``mask``); given one, the result is deterministic.
        """
        visible = self._prepare_visible(images, visible)
        features = self.forward_encoder(images, visible)
        to_decoder = self.densify(features, visible)
        reconstruction = self.forward_decoder(to_decoder)
        loss = self.forward_loss(images, reconstruction, visible)
        return loss, reconstruction, visible

    # ------------------------------------------------------------------ visualisation
    @torch.no_grad()
    def reconstruct(self, images: Tensor, visible: Tensor | None = None, generator=None) -> dict[str, Tensor]:
        """Images-space views: ``masked`` input, ``reconstruction`` (visible patches pasted back), ``original``.

        The prediction is un-normalised with each patch's own mean / std, as the
        loss normalised the target. All in the same (e.g. ImageNet-normalised) space as ``images``.
        """
        visible = self._prepare_visible(images, visible, generator=generator)
        _, pred, visible = self.forward(images, visible)
        _, mean, std = self.target_patches(images)
        grid = tuple(visible.shape[1:])
        pred_pixels = self.unpatchify(self.patchify(pred) * std + mean, grid)
        visible_px = upsample_mask(visible, self.patch_size)[:, None]
        return {
            "masked": images * visible_px,
            "reconstruction": torch.where(visible_px, images, pred_pixels),
            "original": images,
            "visible": visible,
        }

    # ------------------------------------------------------------------ reference mode
    def dense_reference(self, **backbone_kwargs: Any) -> "SparK":
        """A copy of this model whose encoder is the dense-masked simulation twin, with the same weights.

        The reference every sparse result must equal (tests, benchmarks). The twin is
        rebuilt from the backbone's registry name (``SparK('resnet50', ...)`` or a backbone
        from ``create_backbone``) with the same drop-path rate; pass the other
        ``create_backbone`` arguments the sparse backbone was built with (e.g. ``depths``)
        as ``backbone_kwargs`` when SparK was given a module.
        """
        if not self.is_sparse:
            return copy.deepcopy(self)
        name = self.backbone_name
        if name is None:
            raise ValueError("dense_reference() needs the backbone's registry name: build SparK with "
                             "SparK('resnet50', ...) or a backbone from sparse_mim.create_backbone")
        from . import create_backbone
        kwargs = {**self.backbone_kwargs, **backbone_kwargs}
        if "drop_path_rate" not in kwargs and getattr(self.backbone, "drop_path_rate", None) is not None:
            kwargs["drop_path_rate"] = self.backbone.drop_path_rate
        twin = create_backbone(name, sparse=False, **kwargs)
        # per-block drop-path probabilities, in case they were changed after construction
        twin_modules = dict(twin.named_modules())
        for module_name, module in self.backbone.named_modules():
            if hasattr(module, "drop_prob") and hasattr(twin_modules.get(module_name), "drop_prob"):
                twin_modules[module_name].drop_prob = module.drop_prob
        ref = SparK(twin, input_size=self.input_size, mask_ratio=self.mask_ratio,
                    decoder_width=self.dense_decoder.width, sbn=self.sbn, densify_norm=self.densify_norm_type,
                    init=self.init)
        ref.backbone_name = name
        ref.backbone_kwargs = dict(self.backbone_kwargs)
        ref.to(device=self.mask_tokens[0].device, dtype=self.mask_tokens[0].dtype)
        try:
            ref.load_state_dict(self.state_dict(), strict=True)
        except RuntimeError as e:
            raise ValueError(f"the dense twin of {name!r} built with {kwargs} does not match this model's encoder; "
                             f"pass the create_backbone arguments it was built with to dense_reference(): {e}") from e
        return ref.train(self.training)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, patch_grid={self.patch_grid}, mask_ratio={self.mask_ratio}, "
                f"visible_per_image={self.num_visible}, densify_norm={self.densify_norm_type}, sparse={self.is_sparse}")


# ---------------------------------------------------------------------- optimiser groups
def param_groups(model: nn.Module, weight_decay: float, no_decay_names: Sequence[str] = ("mask_token", "gamma"),
                 ) -> list[dict[str, Any]]:
    """Two parameter groups: with weight decay, and without (1-D params, biases, mask tokens, layer-scale gamma).

    Each group carries ``apply_weight_decay`` so a weight-decay schedule only
    touches the first; frozen parameters are left out.
    """
    from timm.optim import param_groups_weight_decay
    extra = [name for name, _ in model.named_parameters()
             if any(key in name for key in no_decay_names) or name.rsplit(".", 1)[-1] == "gamma"]
    groups = param_groups_weight_decay(model, 1.0, no_weight_decay_list=extra)  # 1.0: only to split the two sets
    decay = [p for g in groups if g["weight_decay"] for p in g["params"]]
    no_decay = [p for g in groups if not g["weight_decay"] for p in g["params"]]
    return [  # flagged for the weight-decay schedule (sparse_mim.utils.schedules.set_optimizer_values)
        {"params": decay, "weight_decay": weight_decay, "apply_weight_decay": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_weight_decay": False},
    ]


# ---------------------------------------------------------------------- checkpoints
def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _to_our_encoder_layout(encoder_state: dict[str, Tensor], backbone: nn.Module) -> dict[str, Tensor]:
    """Map an encoder state dict (e.g. the official ConvNeXt layout) to the backbone's (timm) names."""
    from .backbones import convert_state_dict
    return convert_state_dict(encoder_state, backbone)


def _unwrap_checkpoint(checkpoint: Any) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    if not isinstance(checkpoint, dict):
        raise ValueError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    if "module" in checkpoint and isinstance(checkpoint["module"], dict):
        state, kind = dict(checkpoint["module"]), "official SparK (*_withdecoder_*)"
    elif "model" in checkpoint and isinstance(checkpoint["model"], dict):
        state, kind = dict(checkpoint["model"]), "sparse_mim training checkpoint"
    else:
        state, kind = dict(checkpoint), "plain SparK state_dict"
    config = state.pop("config", None) or checkpoint.get("config") or {}
    if not isinstance(config, dict):
        config = {}
    state = _strip_prefix(state, "module.")  # DistributedDataParallel
    return state, kind, config


def load_spark_checkpoint(model: SparK, path_or_state: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """Load a whole SparK model (encoder, densify layers, mask tokens, decoder) from a checkpoint.

    Accepts the official ``*_withdecoder_1kpretrained_spark_style.pth`` files (a dict
    with ``module``; ConvNeXt encoders renamed to timm's layout), this project's
    training checkpoints (a dict with ``model``) and plain SparK state dicts. Files
    are read with ``weights_only=True``. Raises ``ValueError`` listing missing /
    unexpected / mis-shaped keys when the checkpoint is for another architecture.
    Returns a small report: the format, the checkpoint's config, the keys ignored
    (the official file's unused buffers) and the model keys kept as they were (the
    encoder's unused head).
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        from .utils.checkpoint import load_checkpoint
        checkpoint, source = load_checkpoint(path_or_state), str(path_or_state)
    else:
        checkpoint, source = path_or_state, "the given state dict"
    state, kind, config = _unwrap_checkpoint(checkpoint)
    ignored = [k for k in state if k in _OFFICIAL_UNUSED_KEYS]
    for k in ignored:
        state.pop(k)
    if not any(k.startswith(_ENCODER_PREFIX) for k in state):
        hint = ""
        if any(re.match(r"(conv1|stem|layer1|stages|downsample_layers)\.", k) for k in state):
            hint = (" It looks like a backbone-only file (e.g. *_1kpretrained_timm_style.pth): load it into the "
                    "encoder with sparse_mim.backbones.load_backbone_weights(model.backbone, path).")
        raise NotASparKCheckpointError(
            f"{source} is not a SparK checkpoint: no key starts with '{_ENCODER_PREFIX}'.{hint}")

    encoder_state = {k[len(_ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(_ENCODER_PREFIX)}
    encoder_state = _to_our_encoder_layout(encoder_state, model.backbone)
    state = {k: v for k, v in state.items() if not k.startswith(_ENCODER_PREFIX)}
    state.update({_ENCODER_PREFIX + k: v for k, v in encoder_state.items()})

    expected = model.state_dict()
    # The encoder's head (e.g. timm ConvNeXt's `head.norm`, kept for weight compatibility) is
    # unused in pre-training and absent from the official files: keep its current values.
    kept = sorted(k for k in set(expected) - set(state) if k.startswith(_ENCODER_PREFIX + "head."))
    for k in kept:
        state[k] = expected[k]
    from .utils.checkpoint import compare_state_dicts, format_keys
    diff = compare_state_dicts(state, expected)
    missing, unexpected, mis_shaped = diff["missing"], diff["unexpected"], diff["wrong_shape"]
    if missing or unexpected or mis_shaped:
        lines = [f"{source} ({kind}) does not fit this SparK model "
                 f"(backbone {model.backbone_name or type(model.backbone).__name__}, decoder width "
                 f"{model.dense_decoder.width}, densify norm {model.densify_norm_type})."]
        if config:
            lines.append(f"Checkpoint config: {config}.")
        if missing:
            lines.append(f"Missing keys ({len(missing)}): {format_keys(missing)}")
        if unexpected:
            lines.append(f"Unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
        if mis_shaped:
            lines.append(f"Shape mismatches ({len(mis_shaped)}): {format_keys(mis_shaped)}")
        lines.append("Build the model with the checkpoint's backbone, decoder width and densify norm.")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return {"format": kind, "config": config, "ignored_keys": ignored, "kept_keys": kept}


def spark_args_from_checkpoint(checkpoint: Any, source: str = "the checkpoint") -> dict[str, Any]:
    """SparK constructor arguments recorded in a checkpoint (ours: ``spark``; official: ``arch`` + config)."""
    if not isinstance(checkpoint, dict):
        raise NotASparKCheckpointError(f"{source} is not a SparK checkpoint (a {type(checkpoint).__name__}, "
                                       "not a dict)")
    if isinstance(checkpoint.get("spark"), dict):
        return copy.deepcopy(dict(checkpoint["spark"]))
    module = checkpoint.get("module")
    if isinstance(module, dict) and any(k.startswith(_ENCODER_PREFIX) for k in module):
        config = module.get("config", {}) if isinstance(module.get("config"), dict) else {}
        arch = checkpoint.get("arch")
        if not arch:
            raise NotASparKCheckpointError(f"{source} is an official SparK file without its 'arch' entry; build "
                                           "SparK(name, ...) and call load_spark_checkpoint(model, path)")
        args = {"backbone": arch, "input_size": checkpoint.get("input_size") or config.get("sparse_encoder.input_size")
                or 224, "mask_ratio": config.get("mask_ratio") or 0.6,
                "decoder_width": config.get("dense_decoder.width") or 768,
                "densify_norm": config.get("densify_norm_str") or None}
        return args
    state = checkpoint.get("model", checkpoint)
    if isinstance(state, dict) and any(str(k).startswith(("module." + _ENCODER_PREFIX, _ENCODER_PREFIX)) for k in state):
        raise NotASparKCheckpointError(f"{source} holds SparK weights but not the model's description ('spark' "
                                       "entry, written since format_version 1); build SparK(name, ...) and call "
                                       "load_spark_checkpoint(model, path)")
    raise NotASparKCheckpointError(
        f"{source} is not a SparK checkpoint (no 'spark' model description and no '{_ENCODER_PREFIX}*' weights; "
        f"top-level keys: {list(checkpoint)[:8]}). Fine-tuning (fgvc) and backbone-only files cannot be "
        "visualised or exported as SparK models.")
