"""One fine-tuning epoch of MetaFormer (the task part of ``fgvc-train``), and its random streams.

``train_one_epoch`` runs one epoch of the official recipe: per-step warm-up + cosine
lr, Mixup / CutMix on images and labels only (never on meta), meta dropout on the
linear schedule ``p = 1 - epoch / epochs`` (the whole meta vector of ``floor(B * p)``
random samples is zeroed), mixed precision through an :class:`~sparse_mim.utils.amp.AmpPolicy`,
gradient accumulation, gradient clipping, a NaN guard and an optional EMA. Evaluation
(``evaluate`` / ``predict``) lives in :mod:`fgvc.eval_loop`.

Same convention as the pre-training loop (``sparse_mim.pretrain_loop``): ``fgvc.train.train``
builds the task on the shared run skeleton (:mod:`sparse_mim.utils.training_run`: folder, resume,
checkpoints, stops) and passes the objects (model, loader, optimizer, schedule, amp policy, ...)
explicitly, together with the :class:`~sparse_mim.utils.training_run.TrainState` (where the run is)
that this function advances; nothing here reads a config, a file or wandb.

**Every random stream is a pure function of (seed, epoch, batch, sample)**, so a run
stopped at any optimizer step and resumed from its checkpoint continues bit-exactly
(:class:`~sparse_mim.utils.streams.RandomStreams`): the augmentation of each sample
(:class:`SeededDataset`), the loader order (:class:`~sparse_mim.utils.streams.ResumableSampler`,
which also skips the batches already done), the Mixup / CutMix draw, the meta-dropout rows and
the global torch generator that drop path draws from (reseeded before every micro-batch).
"""
from __future__ import annotations

import random
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from sparse_mim.utils.misc import AverageMeter, Throughput, check_finite, peak_memory_mb
from sparse_mim.utils.schedules import set_optimizer_values
from sparse_mim.utils.streams import RandomStreams
from sparse_mim.utils.training_run import TrainState

from .eval_loop import autocast_of, forward_model
from .models import meta_dropout_mask

__all__ = ["meta_dropout", "meta_dropout_prob", "train_one_epoch", "SeededDataset"]


# ------------------------------------------------------------------------------------------- augmentation seeds
def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class SeededDataset(Dataset):
    """Wraps a training dataset so each sample's augmentation is drawn from a seed derived
    from (seed, epoch, index): the same in any loader worker, with any worker count, and
    after a resume. Call :meth:`set_epoch` before each epoch (as for a DistributedSampler).
    The stream is independent of the rank: a sample gets the same crop on any process."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.streams = RandomStreams(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # records, transform, meta_dim, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i):
        _seed_globals(self.streams.seed_for("aug", self.epoch, int(i)))
        return self.dataset[i]


# ------------------------------------------------------------------------------------------- meta helpers
def meta_dropout_prob(epoch: int, epochs: int) -> float:
    """Official MetaFormer schedule: 1 at the first epoch, linearly to 0 at the end."""
    return max(0.0, 1.0 - epoch / max(epochs, 1))


def meta_dropout(meta: torch.Tensor, meta_present: torch.Tensor, p: float, generator: Optional[torch.Generator] = None):
    """Zero the whole meta vector (and its presence flags) of ``floor(B * p)`` random samples.

    Returns new tensors; the chosen rows are a uniform random subset of the batch.
    """
    if meta.numel() == 0:
        return meta, meta_present
    dropped = ~meta_dropout_mask(meta.shape[0], 1, p, generator)[:, 0].to(meta.device)
    if not dropped.any():
        return meta, meta_present
    meta, meta_present = meta.clone(), meta_present.clone()
    meta[dropped] = 0
    meta_present[dropped] = False
    return meta, meta_present


# ------------------------------------------------------------------------------------------- training
def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer,
                    lr_schedule: Callable[[int], float], state: TrainState, *, criterion: Callable,
                    epochs: int, streams: RandomStreams, amp=None, scaler=None, mixup=None, ema=None,
                    accum_steps: int = 1, clip_grad: float = 0.0, meta_drop_p: float = 0.0,
                    batches_per_epoch: Optional[int] = None, should_stop: Optional[Callable[[TrainState], bool]] = None,
                    on_step: Optional[Callable[[TrainState], None]] = None,
                    log_fn: Optional[Callable[[Dict, int], None]] = None, log_every: int = 20,
                    progress: bool = False, peer_timeout: Optional[float] = None) -> Dict:
    """Train from ``state`` (epoch, step, batch) to the end of the epoch; returns averaged stats.

    ``loader`` yields the batches of ``state.epoch`` from batch ``state.batch`` on (see
    :class:`~sparse_mim.utils.streams.ResumableSampler`); ``batches_per_epoch`` is the full epoch length (default
    ``len(loader)``). With ``accum_steps`` > 1 the loss is divided by ``accum_steps`` and the
    optimizer steps every ``accum_steps`` micro-batches. After each optimizer step ``on_step``
    is called (periodic checkpoints) and ``should_stop`` is asked (pre-emption, debug stop):
    when it says yes the epoch ends there with ``stats["stopped"] = True``. With ``peer_timeout``
    (distributed runs) every rank meets at the start of each optimizer step; a rank that does not
    within that many seconds is named in a ``DeadPeerError``.
    A micro-batch left with no image (every image unreadable, or one image that Mixup's even
    batch requirement trims away) is skipped; the optimizer still steps on the others.
    """
    from sparse_mim.utils.amp import optimizer_step
    from sparse_mim.utils.distributed import check_peers
    model.train()
    loss_meter, skipped, empty, nonfinite_steps = AverageMeter(), 0, 0, 0
    norm_meter, grad_norm = AverageMeter(), float("nan")
    throughput = Throughput()
    n_batches = batches_per_epoch if batches_per_epoch is not None else len(loader) + state.batch
    updates = n_batches // accum_steps
    end = updates * accum_steps  # an incomplete accumulation window at the end is skipped (as drop_last)
    it = loader
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=end, initial=state.batch, desc=f"train {state.epoch + 1}/{epochs}", leave=False,
                   dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    lr = lr_schedule(state.step)
    stopped, has_grad = False, False
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for batch in it:
        i = state.batch
        if i >= end:
            break
        if i % accum_steps == 0:
            if peer_timeout:
                check_peers(peer_timeout, f"step {state.step + 1}")
            lr = lr_schedule(state.step)
            set_optimizer_values(optimizer, lr)
        skipped += batch["skipped"]
        images = batch["images"]
        n_img = 0 if images is None else images.shape[0]
        if n_img:
            device = next(model.parameters()).device
            images = images.to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            meta = batch["meta"].to(device, non_blocking=True)
            present = batch["meta_present"].to(device, non_blocking=True)
            if meta_drop_p > 0:
                meta, present = meta_dropout(meta, present, meta_drop_p, streams.generator("meta", state.epoch, i))
            targets = labels
            if mixup is not None:
                if n_img % 2:  # timm Mixup needs an even batch (a skipped image can make it odd)
                    n_img -= 1
                    images, labels, meta, present = images[:n_img], labels[:n_img], meta[:n_img], present[:n_img]
                if n_img:
                    with streams.numpy_global("mixup", state.epoch, i):
                        images, targets = mixup(images, labels)  # meta is not mixed: it stays per sample
        if n_img:
            streams.seed_torch("torch", state.epoch, i)  # drop path, dropout
            with autocast_of(amp):
                logits = forward_model(model, images, meta, present)
                loss = criterion(logits, targets)
            loss_value = check_finite(loss, "training loss", state.step)
            optimizer_step(loss, optimizer, scaler=scaler, params=params, accum_steps=accum_steps, boundary=False)
            has_grad = True
            loss_meter.update(loss_value, n_img)
        else:
            empty += 1
        state.batch = i + 1
        rate = throughput.update(n_img)
        if (i + 1) % accum_steps == 0:
            if has_grad:
                res = optimizer_step(None, optimizer, scaler=scaler, params=params, clip_grad=clip_grad)
                nonfinite_steps += int(res.skipped)
                if res.grad_norm is not None and res.grad_norm == res.grad_norm:
                    grad_norm = float(res.grad_norm)
                    norm_meter.update(grad_norm)
                if ema is not None:
                    ema.update(model, step=state.step)
            optimizer.zero_grad(set_to_none=True)
            has_grad = False
            state.step += 1
            if log_fn is not None and (state.step % max(log_every, 1)) == 0:
                log_fn({"train/loss_step": loss_meter.smooth, "train/lr": lr, "train/images_per_s": rate,
                        "train/grad_norm": grad_norm,
                        "sys/peak_memory_mb": peak_memory_mb(next(model.parameters()).device)},
                       state.step)
            if on_step is not None:
                on_step(state)
            if should_stop is not None and state.batch < end and should_stop(state):
                stopped = True
                break
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_meter.smooth:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
    if bar is not None:
        bar.close()
    return {"loss": loss_meter.avg, "lr": lr, "images_per_s": throughput.rate, "skipped": skipped,
            "empty_batches": empty, "nonfinite_grad_steps": nonfinite_steps, "grad_norm": norm_meter.avg,
            "meta_drop_p": meta_drop_p, "step": state.step, "stopped": stopped}
