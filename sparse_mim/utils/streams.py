"""Random streams and resumable samplers: every random draw of a run is a function of its position.

Both trainers derive each random stream from the run's seed and where the run is, never from how
many numbers were drawn before, so a run stopped at any optimizer step and resumed from its
checkpoint draws exactly what the uninterrupted run would have drawn:

* :func:`stream_seed` ``(seed, tag, *position)``: a 63-bit seed from a BLAKE2b hash of the parts,
  e.g. ``stream_seed(seed, "drop_path", rank, step, micro_batch)`` (pre-training's drop path),
  ``stream_seed(seed, "init")`` (the initial weights, the same on every rank);
* :class:`RandomStreams` ``(seed, rank)``: the same streams seen from one process
  (``seed_for(tag, *position)`` = ``stream_seed(seed, tag, rank, *position)``), with a torch
  generator or numpy's global generator (timm's Mixup draws from it) on demand;
* :class:`ResumableSampler`: one epoch's order of dataset indices, this process's share of it and
  a start position (the samples already done are skipped, not loaded). The order is a strategy:
  the uniform seeded shuffle here (``DistributedSampler``'s), class-aware draws in
  :class:`fgvc.longtail.ClassAwareSampler`, micro-batches with per-sample seeds in
  :class:`sparse_mim.data.ResumableBatchSampler`.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch

__all__ = ["stream_seed", "RandomStreams", "ResumableSampler"]


def stream_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed for one named random stream at one position (e.g. ``("drop_path", rank, step, micro)``)."""
    digest = hashlib.blake2b(":".join(str(p) for p in (seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RandomStreams:
    """The run's random streams as one process sees them: ``seed_for("mixup", epoch, batch)`` is
    ``stream_seed(seed, "mixup", rank, epoch, batch)``; nothing but the position has to be checkpointed."""

    def __init__(self, seed: int, rank: int = 0):
        self.seed, self.rank = int(seed), int(rank)

    def seed_for(self, tag: str, *position: int) -> int:
        return stream_seed(self.seed, tag, self.rank, *(int(p) for p in position))

    def generator(self, tag: str, *position: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed_for(tag, *position))

    def seed_torch(self, tag: str, *position: int) -> int:
        """Seed the global torch generator (CPU and CUDA; drop path and dropout draw from it); returns the seed."""
        s = self.seed_for(tag, *position)
        torch.manual_seed(s)
        return s

    @contextlib.contextmanager
    def numpy_global(self, tag: str, *position: int):
        """Run a block that draws from numpy's global generator from a derived seed; the caller's numpy
        state is restored afterwards."""
        saved = np.random.get_state()
        np.random.seed(self.seed_for(tag, *position) % (2 ** 32))
        try:
            yield
        finally:
            np.random.set_state(saved)


class ResumableSampler(torch.utils.data.Sampler):
    """This process's share of one epoch's order, from a start position.

    :meth:`epoch_order` (the strategy; here the uniform shuffle ``randperm`` seeded by ``seed + epoch``,
    as ``DistributedSampler``) lists the whole epoch for all processes; :meth:`indices` is this
    process's share (every ``num_replicas``-th from ``rank``, the incomplete tail dropped);
    ``set_epoch(epoch, start)`` / ``set_start(start)`` skip the first ``start`` of them, so a run
    resumed part-way reads exactly what the uninterrupted run would have read next.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        self.total, self.num_replicas, self.rank = int(num_samples), int(num_replicas), int(rank)
        self.seed, self.shuffle = int(seed), shuffle
        self.num_samples = self.total // self.num_replicas  # per process (drop_last)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), max(0, int(start))

    def set_start(self, start: int) -> None:
        self.start = max(0, int(start))

    def epoch_order(self) -> Sequence[int]:
        """The whole epoch's order (all processes): the seeded uniform shuffle."""
        if not self.shuffle:
            return range(self.total)
        return torch.randperm(self.total, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def indices(self) -> list:
        """This process's whole epoch (before the start position)."""
        order = self.epoch_order()
        return list(order[self.rank:self.num_samples * self.num_replicas:self.num_replicas])

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)
