"""Test-time augmentation: averaged class probabilities over flipped / cropped views.

Modes (``--tta`` of ``fgvc-eval``, ``fgvc-predict`` and ``fgvc-export``):

* ``none``: the evaluation transform (short side resized to ``S / crop_pct``, bicubic, centre
  crop ``S``; ``crop_pct`` = 224/256), one view;
* ``hflip``: the same crop and its mirror image, 2 views;
* ``multicrop``: the short side resized to ``R = round(S / crop_pct)`` and the centre ``R x R``
  region kept (the input then is ``R x R``, e.g. 256 for S = 224); the views are the centre and
  the four corner ``S x S`` crops of it and the mirror image of each, 10 views ("10-crop").

:class:`TTAModel` wraps a model: its input is one image per sample (``S x S``, or ``R x R`` for
multicrop) with the meta as usual; it runs every view (the meta of a sample is the same for all
its views) and returns ``log(mean_v softmax(logits_v))``. The softmax of that output is the
averaged probability itself, so everything downstream of a model (top-k, cross-entropy,
``Predictor``, export) reads it unchanged. Flips and crops are plain tensor ops, so the wrapped
model exports with ``torch.export`` / ONNX like the plain one.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from sparse_mim.utils.misc import to_pair

__all__ = ["TTA_MODES", "TTAModel", "tta_input_size", "tta_transform", "tta_views"]

TTA_MODES = ("none", "hflip", "multicrop")
_CROP_PCT = 224 / 256


def tta_input_size(img_size, mode: str, crop_pct: float = _CROP_PCT):
    """(h, w) of the image a ``mode`` model takes: the model's size, or ``round(S / crop_pct)`` for multicrop."""
    h, w = to_pair(img_size, "img_size")
    if mode == "multicrop":
        return int(round(h / crop_pct)), int(round(w / crop_pct))
    return h, w


def tta_transform(img_size, mode: str, crop_pct: float = _CROP_PCT):
    """The image transform that feeds a ``mode`` model (the evaluation transform; multicrop keeps the
    whole ``R x R`` centre region the crops are taken from)."""
    from .data.transforms import build_transform
    _check(mode)
    if mode != "multicrop":
        return build_transform(False, img_size, crop_pct=crop_pct)
    return build_transform(False, tta_input_size(img_size, mode, crop_pct), crop_pct=1.0)


def _check(mode: str) -> None:
    if mode not in TTA_MODES:
        raise ValueError(f"tta={mode!r}: choose one of {', '.join(TTA_MODES)}")


def tta_views(images: torch.Tensor, mode: str, img_size) -> List[torch.Tensor]:
    """The views of a batch (see the module docstring), each [B, 3, S, S]."""
    _check(mode)
    if mode == "none":
        return [images]
    if mode == "hflip":
        return [images, images.flip(-1)]
    h, w = to_pair(img_size, "img_size")
    H, W = images.shape[-2:]
    if H < h or W < w:
        raise ValueError(f"multicrop takes images of at least {h}x{w} (the crops); got {H}x{W}: use tta_transform")
    top, left = (H - h) // 2, (W - w) // 2
    crops = [images[..., top:top + h, left:left + w], images[..., :h, :w], images[..., :h, W - w:],
             images[..., H - h:, :w], images[..., H - h:, W - w:]]
    return crops + [c.flip(-1) for c in crops]


class TTAModel(torch.nn.Module):
    """``model`` under test-time augmentation ``mode`` (module docstring); same call as the model."""

    def __init__(self, model: torch.nn.Module, mode: str):
        super().__init__()
        _check(mode)
        self.model, self.mode = model, mode
        self.crop_size = tuple(model.img_size)
        self.img_size = tta_input_size(self.crop_size, mode)       # what this module takes
        self.meta_dims = tuple(getattr(model, "meta_dims", ()))
        self.num_classes = getattr(model, "num_classes", None)
        cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        if mode == "multicrop":
            cfg.update(input_size=(3, *self.img_size), crop_pct=1.0)
        self.pretrained_cfg = dict(cfg, tta=mode)

    def forward(self, images: torch.Tensor, meta: Optional[torch.Tensor] = None,
                meta_present: Optional[torch.Tensor] = None) -> torch.Tensor:
        views = tta_views(images, self.mode, self.crop_size)
        n, b = len(views), images.shape[0]
        x = torch.cat(views, 0)
        if meta is None or not self.meta_dims:
            logits = self.model(x)
        else:
            logits = self.model(x, meta.repeat(n, 1), meta_present.repeat(n, 1))
        probs = logits.float().softmax(-1).reshape(n, b, -1).mean(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
