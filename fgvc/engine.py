"""Train / eval loops for MetaFormer fine-tuning (the MAE ``engine_*.py`` split).

``train_one_epoch`` runs one epoch of the official recipe: per-step warm-up + cosine
lr, Mixup / CutMix on images and labels only (never on meta), meta dropout on the
linear schedule ``p = 1 - epoch / epochs`` (the whole meta vector of ``floor(B * p)``
random samples is zeroed), mixed precision through an :class:`~sparse_mim.utils.amp.AmpPolicy`,
gradient accumulation, gradient clipping, a NaN guard and an optional EMA. ``evaluate``
computes top-1 / top-5 with the meta as given, zeroed, or with one meta group dropped,
deterministically.

Same convention as the pre-training loop: the caller builds the objects (model, loader,
optimizer, schedule, amp policy, ...) and passes them explicitly, together with a
:class:`TrainState` (where the run is) that this function advances; nothing here reads a
config, a file or wandb.

**Every random stream is a pure function of (seed, epoch, batch, sample)**, so a run
stopped at any optimizer step and resumed from its checkpoint continues bit-exactly
(:class:`RandomStreams`): the augmentation of each sample (:class:`SeededDataset`), the
loader order (:class:`ResumableSampler`, which also skips the batches already done), the
Mixup / CutMix draw, the meta-dropout rows and the global torch generator that drop path
draws from (reseeded before every micro-batch).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

from sparse_mim.utils.misc import AverageMeter, Throughput, check_finite, peak_memory_mb
from sparse_mim.utils.schedules import set_optimizer_values

from .models import meta_dropout_mask

__all__ = ["meta_dropout", "meta_dropout_prob", "drop_meta_groups", "train_one_epoch", "evaluate", "predict",
           "group_slices", "forward_model", "topk_accuracy", "TrainState", "RandomStreams", "SeededDataset",
           "ResumableSampler"]


# ------------------------------------------------------------------------------------------- random streams
class RandomStreams:
    """Named random streams derived from one seed: ``seed_for("mixup", epoch, batch)`` is a
    64-bit seed that depends only on its arguments (numpy ``SeedSequence``), never on how
    many numbers were drawn before, so nothing but the position has to be checkpointed."""

    TAGS = {"aug": 1, "mixup": 2, "meta": 3, "torch": 4, "order": 5, "init": 6}

    def __init__(self, seed: int, rank: int = 0):
        self.seed, self.rank = int(seed), int(rank)

    def seed_for(self, tag: str, *parts: int) -> int:
        entropy = [self.seed, self.TAGS[tag], self.rank, *[int(p) for p in parts]]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)

    def generator(self, tag: str, *parts: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed_for(tag, *parts))

    @contextlib.contextmanager
    def numpy_global(self, tag: str, *parts: int):
        """Run a block that draws from numpy's global generator (timm's Mixup does) from a
        derived seed; the caller's numpy state is restored afterwards."""
        saved = np.random.get_state()
        np.random.seed(self.seed_for(tag, *parts) % (2 ** 32))
        try:
            yield
        finally:
            np.random.set_state(saved)


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


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded shuffle per epoch, ``drop_last``) that can start an
    epoch part-way: :meth:`set_start` skips the first ``n`` indices of this rank's order, so
    a run resumed after ``k`` batches reads exactly the images the uninterrupted run would
    have read next, without loading the ones already done."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def set_start(self, n: int) -> None:
        self.start = max(0, int(n))

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


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


def group_slices(meta_sizes: Sequence[int]) -> List[slice]:
    """Column slice of each group in the flat meta vector (``meta_sizes`` = dim * tokens)."""
    out, start = [], 0
    for n in meta_sizes:
        out.append(slice(start, start + int(n)))
        start += int(n)
    return out


def drop_meta_groups(meta: torch.Tensor, meta_present: torch.Tensor, groups: Sequence[int], meta_sizes: Sequence[int]):
    """Zero the columns of ``groups`` (indices into meta_sizes) and mark them absent."""
    slices = group_slices(meta_sizes)
    bad = [g for g in groups if not 0 <= int(g) < len(slices)]
    if bad:
        raise ValueError(f"drop_groups {list(groups)}: group index {bad[0]} out of range for {len(slices)} meta "
                         f"group(s) of sizes {list(meta_sizes)}")
    meta, meta_present = meta.clone(), meta_present.clone()
    for g in groups:
        meta[:, slices[g]] = 0
        if meta_present.numel():
            meta_present[:, g] = False
    return meta, meta_present


def forward_model(model, images, meta, meta_present):
    """``model(images, meta, meta_present)``; image-only models (no meta groups) get no meta."""
    if meta is None or meta.shape[-1] == 0:
        return model(images)
    return model(images, meta, meta_present)


def _autocast(amp):
    """``amp`` is an AmpPolicy (sparse_mim.utils.amp) or None (full precision)."""
    return amp.autocast() if amp is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------- training
@dataclass
class TrainState:
    """Where a fine-tuning run is; what a checkpoint stores besides the modules.

    ``batch`` counts the micro-batches already done in ``epoch`` (a multiple of the
    accumulation steps: checkpoints are only taken at optimizer-step boundaries), so a run
    stopped mid-epoch resumes at the next batch.
    """
    epoch: int = 0
    step: int = 0                 # optimizer steps done (the lr schedule is a function of it)
    batch: int = 0                # micro-batches done in the current epoch
    best: Dict = field(default_factory=lambda: {"top1": -1.0, "epoch": -1})

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "batch": self.batch, "best": dict(self.best)}

    def load_state_dict(self, d: Dict) -> None:
        self.epoch, self.step, self.batch = int(d["epoch"]), int(d["step"]), int(d.get("batch", 0))
        self.best = dict(d.get("best", self.best))


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
    :class:`ResumableSampler`); ``batches_per_epoch`` is the full epoch length (default
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
            torch.manual_seed(streams.seed_for("torch", state.epoch, i))  # drop path, dropout
            with _autocast(amp):
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


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, meta_mode: str = "full",
            drop_groups: Sequence[int] = (), meta_sizes: Optional[Sequence[int]] = None, amp=None,
            progress: bool = False, desc: str = "eval", allow_empty: bool = False) -> Dict[str, torch.Tensor]:
    """Logits of every sample in ``loader`` (in loader order) under one meta condition.

    ``meta_mode``: "full" (meta as given), "zero" (whole meta vector zeroed and marked
    absent: the official "mask-meta" test) or "drop" (zero the groups ``drop_groups``, indices
    into the model's meta groups). ``meta_sizes`` (flat width of each group) defaults to the
    loader's dataset (``loader.dataset.records.meta_groups``). ``amp``: an AmpPolicy or None.
    Returns ``logits`` [N, K] float32, ``labels`` [N], ``index`` [N] (rows in the records)
    and ``skipped`` (unreadable images).
    """
    if meta_mode not in ("full", "zero", "drop"):
        raise ValueError(f"meta_mode must be 'full', 'zero' or 'drop', got {meta_mode!r}")
    if meta_mode == "drop" and meta_sizes is None:
        records = getattr(getattr(loader, "dataset", None), "records", None)
        if records is None:
            raise ValueError("meta_mode='drop' needs meta_sizes (the flat width of each meta group) when the loader's "
                             "dataset is not an fgvc.data.FGVCDataset")
        meta_sizes = [g.dim * g.tokens for g in records.meta_groups]
    model.eval()
    logits_all, labels_all, index_all, skipped = [], [], [], 0
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for batch in it:
        skipped += batch["skipped"]
        if batch["images"] is None:
            continue
        images = batch["images"].to(device, non_blocking=True)
        meta = batch["meta"].to(device)
        present = batch["meta_present"].to(device)
        if meta_mode == "zero":
            meta, present = torch.zeros_like(meta), torch.zeros_like(present)
        elif meta_mode == "drop":
            meta, present = drop_meta_groups(meta, present, drop_groups, meta_sizes)
        with _autocast(amp):
            logits = forward_model(model, images, meta, present)
        logits_all.append(logits.float().cpu())
        labels_all.append(batch["labels"])
        index_all.append(batch["index"])
    if not logits_all:
        if not allow_empty:
            raise RuntimeError("evaluation saw no readable image; check the dataset paths")
        return {"logits": torch.zeros(0, 0), "labels": torch.zeros(0, dtype=torch.long),
                "index": torch.zeros(0, dtype=torch.long), "skipped": skipped}
    logits = torch.cat(logits_all)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(1).sum())
        raise FloatingPointError(f"the model gave non-finite logits for {bad} of {logits.shape[0]} images: its weights "
                                 f"are not usable (a diverged run?); evaluate an earlier checkpoint")
    return {"logits": logits, "labels": torch.cat(labels_all), "index": torch.cat(index_all), "skipped": skipped}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> Dict[str, float]:
    """Top-k accuracy in percent (k clipped to the class count)."""
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        hit = (logits.topk(kk, dim=1).indices == labels[:, None]).any(1).float().mean().item()
        out[f"top{k}"] = 100.0 * hit
    return out


def evaluate(model: torch.nn.Module, loader, device: torch.device, meta_mode: str = "full",
             drop_groups: Sequence[int] = (), meta_sizes: Optional[Sequence[int]] = None, amp=None,
             progress: bool = False) -> Dict[str, float]:
    """top-1 / top-5 (percent) and mean cross-entropy under one meta condition.

    Under torch.distributed each process evaluates its own shard of ``loader`` (see
    ``fgvc.data.ShardSampler``) and the counts are summed over processes, so every rank
    gets the same numbers; with one process this is a plain evaluation.
    """
    from sparse_mim.utils.distributed import all_reduce_sum, is_distributed
    out = predict(model, loader, device, meta_mode, drop_groups, meta_sizes, amp, progress,
                  allow_empty=is_distributed())
    logits, labels = out["logits"], out["labels"]
    sums = torch.zeros(5, dtype=torch.float64)
    if labels.numel():
        k5 = min(5, logits.shape[1])
        top = logits.topk(k5, dim=1).indices
        sums[0] = float((top[:, 0] == labels).sum())
        sums[1] = float((top == labels[:, None]).any(1).sum())
        sums[2] = float(F.cross_entropy(logits, labels, reduction="sum"))
        sums[3] = labels.numel()
    sums[4] = out["skipped"]
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    sums = all_reduce_sum(sums.to(comm_device)).cpu()
    n = max(sums[3].item(), 1.0)
    return {"top1": 100.0 * sums[0].item() / n, "top5": 100.0 * sums[1].item() / n, "loss": sums[2].item() / n,
            "n": int(sums[3].item()), "skipped": int(sums[4].item())}
