"""Train / eval image transforms of the official MetaFormer recipe (timm building blocks).

Train: RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment ``rand-m9-mstd0.5``
-> tensor -> normalise -> RandomErasing(0.25, per-pixel). Eval: resize the short side to
``S * 256 / 224`` (bicubic) -> center crop ``S``. Mixup / CutMix act on batches in the
engine (they must not touch the meta vector).
"""
from __future__ import annotations

from typing import Sequence

from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD
from torchvision import transforms as T

from sparse_mim.utils.misc import to_pair

__all__ = ["build_transform", "IMAGENET_MEAN", "IMAGENET_STD"]


def build_transform(train: bool, img_size, rand_augment: str = "rand-m9-mstd0.5", reprob: float = 0.25,
                    scale: Sequence[float] = (0.08, 1.0), hflip: float = 0.5, crop_pct: float = 224 / 256,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The MetaFormer transform for one split; empty ``rand_augment`` / zero ``reprob`` turn those off."""
    size = to_pair(img_size, "img_size")
    interp = T.InterpolationMode.BICUBIC
    if not train:
        resize = tuple(int(round(s / crop_pct)) for s in size)
        return T.Compose([
            T.Resize(resize[0] if size[0] == size[1] else resize, interpolation=interp),
            T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    ops = [T.RandomResizedCrop(size, scale=tuple(scale), interpolation=interp)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    if rand_augment:
        from PIL import Image
        from timm.data.auto_augment import rand_augment_transform
        hparams = dict(translate_const=int(min(size) * 0.45), img_mean=tuple(int(round(255 * m)) for m in mean),
                       interpolation=Image.BICUBIC)
        ops.append(rand_augment_transform(rand_augment, hparams))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    if reprob > 0:
        from timm.data.random_erasing import RandomErasing
        ops.append(RandomErasing(reprob, mode="pixel", max_count=1, device="cpu"))
    return T.Compose(ops)
