"""torch Dataset over :class:`FGVCRecords`: images + meta + labels, bad images skipped and counted.

An image that cannot be read (truncated JPEG, deleted file) must not crash a worker
deep inside the DataLoader: ``__getitem__`` returns ``None`` for it and
:func:`collate_skip_bad` drops it from the batch and reports how many were dropped in
``batch["skipped"]``; the engine sums and prints that count per epoch.

A batch is a dict: ``images`` [B,3,H,W], ``meta`` [B, D] (groups concatenated in
``records.meta_groups`` order; a text group is flattened tokens x dim), ``meta_present``
[B, G] bool, ``labels`` [B] int64, ``index`` [B] int64 (row in the records) and
``skipped`` (int).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .readers import FGVCRecords

__all__ = ["FGVCDataset", "collate_skip_bad", "load_image", "ShardSampler"]


def load_image(path: str):
    """Open an image as 8-bit RGB, fully decoded (a truncated file fails here, not later).

    The toolkit's one image reader (``sparse_mim.data.load_rgb``): 16-bit and float greyscale
    images are scaled to 8 bits, not clipped to white; an image with more pixels than
    ``sparse_mim.data.DEFAULT_MAX_PIXELS`` (PIL's decompression-bomb limit, ~179 Mpixel) is
    refused from its header before any pixel is decoded (``ImageTooLargeError``); the dataset
    skips and counts it like any unreadable image.
    """
    from sparse_mim.data import load_rgb
    return load_rgb(path)


class FGVCDataset(Dataset):
    """Images of ``records`` through ``transform``, with their meta vector and label.

    Args:
        records: one split from a reader (``fgvc.data.build_records``).
        transform: PIL image -> tensor.
        train: text meta picks a random caption per access when True; at evaluation the
            caption is fixed (caption 0) so evaluation is deterministic.
    """

    def __init__(self, records: FGVCRecords, transform=None, train: bool = False):
        self.records = records
        self.transform = transform
        self.train = train
        self.text_index = next((i for i, g in enumerate(records.meta_groups) if g.tokens > 1 or g.name == "text"), None)

    def __len__(self):
        return len(self.records)

    @property
    def meta_dim(self) -> int:
        return sum(g.dim * g.tokens for g in self.records.meta_groups)

    def _text(self, i: int) -> np.ndarray:
        g = self.records.meta_groups[self.text_index]
        path = self.records.text_files[i]
        if path is None:
            return np.zeros(g.tokens * g.dim, np.float32)
        caps = np.load(path, mmap_mode="r")
        c = int(np.random.randint(len(caps))) if self.train else 0
        return np.asarray(caps[c], dtype=np.float32).reshape(-1)

    def meta_vector(self, i: int) -> np.ndarray:
        """The flat meta vector of record ``i`` (vector groups first, then the text group)."""
        meta = self.records.meta[i]
        if self.text_index is not None:
            meta = np.concatenate([meta, self._text(i)])
        return meta

    def __getitem__(self, i: int):
        path = self.records.paths[i]
        try:
            img = load_image(path)
        except Exception as e:  # unreadable / missing: skipped by the collate function, counted
            warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
            return None
        if self.transform is not None:
            img = self.transform(img)
        return (img, torch.from_numpy(np.ascontiguousarray(self.meta_vector(i), dtype=np.float32)),
                torch.from_numpy(self.records.meta_present[i].copy()), int(self.records.labels[i]), i)


def collate_skip_bad(batch):
    """Stack the good samples; ``skipped`` counts the ``None`` ones (unreadable images)."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return {"images": None, "meta": None, "meta_present": None, "labels": None, "index": None,
                "skipped": skipped}
    images, meta, present, labels, index = zip(*good)
    return {
        "images": torch.stack(images),
        "meta": torch.stack(meta),
        "meta_present": torch.stack(present),
        "labels": torch.tensor(labels, dtype=torch.long),
        "index": torch.tensor(index, dtype=torch.long),
        "skipped": skipped,
    }


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...`` in order: each sample evaluated exactly once over
    all processes (DistributedSampler pads with repeats, which would bias the accuracy)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
