"""Pre-training data: unlabelled images from a folder, an ImageFolder tree, a list file, or built in.

- ``data.root`` a folder: every image PIL can open, found recursively (an ImageFolder
  tree is just such a folder; its labels are ignored).
- ``data.root`` a text file: one image path per line (relative paths are relative to
  the list file; a trailing label column, ``path 17``, is ignored; ``#`` comments).
- ``data.root`` empty or ``builtin``: procedurally generated images (gradients,
  stripes, checkerboards, blobs, rings), made deterministically in memory, so the
  default run needs no download and no data set.

Augmentation is the official SparK one: RandomResizedCrop(input, scale 0.67-1,
bicubic) + horizontal flip + ImageNet normalisation. Rectangular inputs are
allowed; the crop's aspect-ratio range is centred on the target's aspect ratio.

Determinism (exact resume, DDP == single process): the ``ResumableBatchSampler``
shuffles with a generator seeded by (seed, epoch), can start mid-epoch, and hands
each sample a seed derived from (seed, epoch, position in the epoch). The dataset
seeds that sample's augmentation with it (without touching the global RNG), and
the training loop draws that sample's mask from it: a sample's crop, flip and mask
depend only on where it sits in the epoch, not on the number of processes, workers
or on whether the run was restarted.

A corrupt or unreadable image never stops a run: it is replaced by another
(deterministically chosen) image, and the number of failures travels with the
batch so the training loop can count and log it. The same holds for images larger
than ``data.max_pixels`` (default 178,956,970 pixels, PIL's own decompression-bomb
threshold; a 16k x 11k photo): the header is read, the pixels are not decoded, the
file is skipped and counted. 16-bit greyscale PNG / TIFF files are scaled to 8 bits
(``convert("RGB")`` would clip them to near-white). Folders are scanned with links
followed, but each real folder once: a symlink loop neither hangs the scan nor counts
an image twice.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .utils.streams import ResumableSampler, stream_seed

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_MAX_PIXELS", "ImageTooLargeError", "load_rgb", "upright",
    "PretrainTransform",
    "ImageFileDataset", "SyntheticImageDataset",
    "ResumableBatchSampler", "build_pretrain_dataset", "find_images", "read_image_list", "sample_seed",
    "generate_image", "DataError",
]

_logger = logging.getLogger(__name__)

from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD  # noqa: E402

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's Image.MAX_IMAGE_PIXELS: ~ a 16k x 11k image


class ImageTooLargeError(ValueError):
    """An image with more pixels than allowed (a decompression bomb or an unusable giant)."""


class DataError(ValueError):
    """The data option points at nothing usable (message says how to fix it)."""


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the sample at ``position`` of ``epoch`` (independent of process layout): the
    untagged ``stream_seed(seed, epoch, position)``."""
    return stream_seed(seed, epoch, position)


# ---------------------------------------------------------------------------- augmentation
class PretrainTransform:
    """RandomResizedCrop(scale 0.67-1, bicubic) + flip + normalisation, seeded per sample.

    ``__call__(img, seed)`` draws its randomness from ``seed`` inside a forked RNG,
    so the global torch RNG is untouched and a sample is augmented identically in
    any process layout or after a resume.
    """

    def __init__(self, input_size, scale=(0.67, 1.0), hflip: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        from torchvision import transforms as T
        from torchvision.transforms import InterpolationMode
        from .utils.misc import to_pair
        self.size = to_pair(input_size, "img_size")
        h, w = self.size
        aspect = w / h  # keep the usual (3/4, 4/3) spread around the target's own aspect ratio
        steps = [T.RandomResizedCrop(self.size, scale=tuple(scale), ratio=(aspect * 3 / 4, aspect * 4 / 3),
                                     interpolation=InterpolationMode.BICUBIC)]
        if hflip:
            steps.append(T.RandomHorizontalFlip())
        self.transform = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])  # picklable for spawn workers

    def __call__(self, img, seed: int | None = None) -> torch.Tensor:
        if seed is None:
            return self.transform(img)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img)

    def __repr__(self):
        return f"PretrainTransform({self.transform})"


# ---------------------------------------------------------------------------- finding images
def _image_extensions() -> set[str]:
    from PIL import Image
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def find_images(root: str) -> list[str]:
    """All files under ``root`` (recursively) whose extension PIL can open; sorted.

    Links are followed, but every real folder is entered once and every real file listed
    once: a symlink loop (``a/b -> a``) or two links to one folder neither hang the scan
    nor count an image twice.
    """
    exts = _image_extensions()
    paths, seen_dirs, seen_files = [], set(), set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(folder, d)) not in seen_dirs)
        for f in sorted(files):
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts:
                path = os.path.join(folder, f)
                key = os.path.realpath(path)
                if key not in seen_files:
                    seen_files.add(key)
                    paths.append(path)
    return sorted(paths)


def read_image_list(list_file: str) -> list[str]:
    """Paths from a list file (one per line; relative to the list file; a trailing label column is ignored)."""
    from .utils.config import read_text_file  # UTF-8 (a BOM is fine); other bytes name the file and line
    base = os.path.dirname(os.path.abspath(list_file))
    paths = []
    for line in read_text_file(list_file, "image list", error=DataError).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = line if os.path.isabs(line) else os.path.join(base, line)
        if not os.path.exists(path) and len(line.split()) > 1:  # "path label"
            first = line.rsplit(None, 1)[0]
            path = first if os.path.isabs(first) else os.path.join(base, first)
        paths.append(path)
    return paths


def _to_rgb(img):
    """Any PIL mode -> 8-bit RGB; high-bit-depth greyscale is scaled, not clipped."""
    from PIL import Image
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")  # forces the decode; palette / grey / CMYK / alpha -> RGB


def load_rgb(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Open an image as 8-bit RGB (16-bit decoded right); ``ImageTooLargeError`` above ``max_pixels``
    (checked from the header, before any pixel is decoded)."""
    from PIL import Image
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # our own limit below, with our own message
        try:
            img = Image.open(f)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
        w, h = img.size
        if max_pixels and w * h > max_pixels:
            raise ImageTooLargeError(f"{w}x{h} = {w * h} pixels is more than data.max_pixels={max_pixels}")
        return _to_rgb(upright(img))


def upright(img):
    """The image as it is meant to be seen: its EXIF orientation applied (a phone photo stored rotated is
    turned upright, as every viewer shows it); an unreadable EXIF block leaves the pixels as stored."""
    from PIL import ImageOps
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block is not a damaged image
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001
        return img



class ImageFileDataset(Dataset):
    """Unlabelled images from a list of paths; unreadable files are replaced and counted.

    ``__getitem__(key)`` with ``key`` an index or an ``(index, seed)`` pair (from
    ``ResumableBatchSampler``) returns ``(image [3, H, W], seed, n_failed)`` where
    ``n_failed`` counts the unreadable files skipped to produce this sample.
    """

    def __init__(self, paths: Sequence[str], transform: PretrainTransform, max_retries: int = 20, source: str = "",
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.paths = list(paths)
        self.transform = transform
        self.max_retries = max_retries
        self.source = source
        self.max_pixels = max_pixels
        self.failed_paths: set[str] = set()  # this process's record (workers keep their own)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int):
        return load_rgb(self.paths[index], self.max_pixels)

    def __getitem__(self, key):
        index, seed = (key if isinstance(key, (tuple, list)) else (key, key))
        index, seed = int(index), int(seed)
        failures, last_error = 0, None
        for attempt in range(self.max_retries + 1):
            # a deterministic replacement: the same bad file is always replaced by the same image
            i = (index + attempt * 7919) % len(self.paths)
            try:
                img = self.load(i)
            except Exception as e:  # corrupt, truncated, unreadable, vanished: skip it
                failures += 1
                last_error = f"{self.paths[i]}: {type(e).__name__}: {e}"
                if self.paths[i] not in self.failed_paths:
                    self.failed_paths.add(self.paths[i])
                    _logger.warning("skipping unreadable image %s", last_error)
                continue
            return self.transform(img, seed), seed, failures
        raise RuntimeError(
            f"{failures} images in a row could not be read (last: {last_error}). Most files in "
            f"{self.source or 'the data set'} seem unreadable: check data.root and the files' format.")


# ---------------------------------------------------------------------------- built-in images
def generate_image(index: int, size: int = 96) -> np.ndarray:
    """A deterministic procedural RGB image (uint8 HWC) with structure a model can learn.

    Each image mixes a smooth colour gradient with one pattern: stripes at an angle,
    a checkerboard, soft blobs, or concentric rings. Masked patches can be predicted
    from their neighbours (patterns continue across patch borders).
    """
    rng = np.random.default_rng(index + 1234567)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    img = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    kind = index % 4
    colour = rng.uniform(0, 1, 3)
    if kind == 0:  # stripes
        freq = rng.uniform(3, 9)
        theta = rng.uniform(0, math.pi)
        pattern = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy))
    elif kind == 1:  # checkerboard
        cells = rng.integers(3, 8)
        pattern = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
    elif kind == 2:  # soft blobs
        pattern = np.zeros_like(xx)
        for _ in range(rng.integers(2, 6)):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.25)
            pattern += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        pattern = np.clip(pattern, 0, 1)
    else:  # rings
        cx, cy, freq = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(4, 10)
        pattern = 0.5 + 0.5 * np.cos(2 * math.pi * freq * np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2))
    strength = rng.uniform(0.5, 0.9)
    img = img * (1 - strength * pattern[..., None]) + colour * strength * pattern[..., None]
    img += rng.normal(0, 0.02, img.shape)  # a little sensor noise
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


class SyntheticImageDataset(ImageFileDataset):
    """``num_images`` generated images (see ``generate_image``), made on the fly; same interface."""

    def __init__(self, num_images: int, transform: PretrainTransform, image_size: int = 96):
        super().__init__([f"<builtin:{i}>" for i in range(num_images)], transform, source="built-in images")
        self.image_size = image_size

    def load(self, index: int):
        from PIL import Image
        return Image.fromarray(generate_image(index, self.image_size))


# ---------------------------------------------------------------------------- building
def _check_some_readable(paths: Sequence[str], where: str, n_check: int = 16,
                         max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Fail early, with the fix, when a data source holds no readable image (checks up to 16, spread out)."""
    idx = sorted(set(np.linspace(0, len(paths) - 1, num=min(n_check, len(paths))).round().astype(int).tolist()))
    errors = []
    for i in idx:
        try:
            load_rgb(paths[i], max_pixels)
            return
        except Exception as e:
            errors.append(f"{paths[i]}: {type(e).__name__}: {e}")
    raise DataError(
        f"none of the {len(idx)} images checked in {where} could be read, e.g. {errors[0]}.\n"
        "Point data.root at a folder of images PIL can open (JPEG, PNG, WebP, ...), an ImageFolder tree "
        "or a list file, or leave it empty to use the built-in images.")


def build_pretrain_dataset(root: str | None, input_size, scale=(0.67, 1.0), hflip: bool = True, mean=IMAGENET_MEAN,
                           std=IMAGENET_STD, builtin_images: int = 512, builtin_size: int = 96,
                           check: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageFileDataset:
    """The pre-training dataset for ``data.root`` (folder, list file, or ''/'builtin' for generated images)."""
    if root is None:
        raise DataError("this recipe needs data: pass data.root=/path/to/images (a folder, an ImageFolder tree or a "
                        "list file), or data.root=builtin for the generated demo images")
    transform = PretrainTransform(input_size, scale=scale, hflip=hflip, mean=mean, std=std)
    if not root or root == "builtin":
        if builtin_images < 1:
            raise DataError("data.builtin_images must be at least 1")
        return SyntheticImageDataset(builtin_images, transform, image_size=builtin_size)
    root = os.path.expanduser(root)
    if os.path.isdir(root):
        paths = find_images(root)
        if not paths:
            exts = ", ".join(sorted(e for e in _image_extensions() if e in (".jpg", ".jpeg", ".png", ".webp",
                                                                               ".bmp", ".tif", ".tiff")))
            raise DataError(
                f"no images found in {root!r} (searched recursively for {exts}, ...). Put images in that "
                f"folder (any sub-folder layout, e.g. an ImageFolder tree), point data.root at a list file, "
                f"or leave data.root empty to use the built-in images.")
        where = f"folder {root!r}"
    elif os.path.isfile(root):
        paths = read_image_list(root)
        if not paths:
            raise DataError(f"list file {root!r} holds no image paths; write one path per line")
        where = f"list file {root!r}"
    else:
        raise DataError(f"data.root={root!r} does not exist; give a folder of images, an ImageFolder tree, a "
                        f"list file with one image path per line, or leave it empty for the built-in images")
    if check:
        _check_some_readable(paths, where, max_pixels=max_pixels)
    return ImageFileDataset(paths, transform, source=where, max_pixels=max_pixels)


# ---------------------------------------------------------------------------- sampling
class ResumableBatchSampler(ResumableSampler):
    """Deterministic, resumable, distributed batch sampler that also hands out per-sample seeds.

    A :class:`~sparse_mim.utils.streams.ResumableSampler` (the epoch's order is the seeded uniform
    shuffle, ``randperm(n)`` seeded by ``seed + epoch``) whose share of the epoch is cut in
    micro-batches: the order is cut into chunks of ``batch_size``; process ``rank`` takes chunks
    ``rank, rank + P, ...``, so micro-batch ``m`` of rank ``r`` is chunk ``m * P + r``. One optimizer
    step (``accum_steps`` micro-batches on every rank) therefore covers a contiguous slice of
    ``batch_size * P * accum_steps`` positions, whatever P and accum_steps are: 2 processes x 1
    accumulation step sees the same samples, grouped in the same micro-batches, as 1 process x 2
    accumulation steps. The incomplete last global batch is dropped. ``set_epoch(epoch, start_step)``
    restarts mid-epoch after ``start_step`` optimizer steps.

    Yields lists of ``(dataset_index, sample_seed)``.
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 accum_steps: int = 1, seed: int = 0, shuffle: bool = True):
        super().__init__(num_samples, num_replicas, rank, seed, shuffle)
        self.batch_size, self.accum_steps = int(batch_size), int(accum_steps)
        self.global_batch = self.batch_size * self.num_replicas * self.accum_steps
        if self.total < self.global_batch:
            raise DataError(
                f"the data set has {self.total} images, fewer than one global batch of {self.global_batch} "
                f"(batch_size {self.batch_size} x {self.num_replicas} processes x {self.accum_steps} accumulation "
                f"steps): lower data.batch_size / optim.accum_steps or add images")
        self.steps_per_epoch = self.total // self.global_batch

    @property
    def start_step(self) -> int:
        """Optimizer steps of this epoch already done (``start`` counts this process's micro-batches)."""
        return self.start // self.accum_steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        super().set_epoch(epoch, start_step * self.accum_steps)  # start: micro-batches of this process

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accum_steps - self.start

    def __iter__(self):
        order, b, P = self.epoch_order(), self.batch_size, self.num_replicas
        for m in range(self.start, self.steps_per_epoch * self.accum_steps):
            chunk = m * P + self.rank
            yield [(order[p], sample_seed(self.seed, self.epoch, p)) for p in range(chunk * b, (chunk + 1) * b)]
