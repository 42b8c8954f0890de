"""Train / eval loops for MetaFormer fine-tuning (the MAE ``engine_*.py`` split).

``train_one_epoch`` runs one epoch of the official recipe: per-step warm-up + cosine
lr, Mixup / CutMix on images and labels only (never on meta), meta dropout on the
linear schedule ``p = 1 - epoch / epochs`` (the whole meta vector of ``floor(B * p)``
random samples is zeroed), AMP on CUDA, gradient accumulation, gradient clipping, a
NaN guard and an optional EMA. ``evaluate`` computes top-1 / top-5 with the meta as
given, zeroed, or with one meta group dropped, deterministically.

The tool (``tools/train_fgvc.py``) builds everything; this file knows nothing about
configs, files or wandb beyond a ``log_fn`` callback.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from sparse_mim.utils.misc import AverageMeter, Throughput, check_finite
from sparse_mim.utils.schedules import set_optimizer_values

from .models import meta_dropout_mask

__all__ = ["meta_dropout", "meta_dropout_prob", "drop_meta_groups", "train_one_epoch", "evaluate", "predict",
           "group_slices", "forward_model"]


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
    meta, meta_present = meta.clone(), meta_present.clone()
    slices = group_slices(meta_sizes)
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


def _autocast(device: torch.device, amp: bool, dtype=torch.float16):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, criterion: Callable,
                    device: torch.device, epoch: int, epochs: int, lr_schedule: Callable[[int], float],
                    start_step: int, accum_steps: int = 1, scaler=None, amp: bool = False,
                    amp_dtype=torch.float16, mixup_fn=None, clip_grad: float = 0.0, ema=None,
                    use_meta_dropout: bool = True, log_fn: Optional[Callable[[Dict, int], None]] = None,
                    log_every: int = 20, progress: bool = True, generator: Optional[torch.Generator] = None) -> Dict:
    """One training epoch; returns averaged stats and the next global optimizer step.

    ``start_step`` is the global optimizer-step count before this epoch (the lr schedule is a
    pure function of it, so a resumed run gets the same lr). With ``accum_steps`` > 1 the loss
    is divided by ``accum_steps`` and the optimizer steps every ``accum_steps`` batches.
    """
    model.train()
    loss_meter, skipped = AverageMeter(), 0
    throughput = Throughput()
    p_drop = meta_dropout_prob(epoch, epochs) if use_meta_dropout else 0.0
    step = start_step
    n_batches = len(loader)
    updates = n_batches // accum_steps
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc=f"train {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    lr = lr_schedule(step)
    for i, batch in enumerate(it):
        if i >= updates * accum_steps:
            break  # an incomplete accumulation window at the end is skipped (as drop_last)
        skipped += batch["skipped"]
        if batch["images"] is None:
            continue
        if i % accum_steps == 0:
            lr = lr_schedule(step)
            set_optimizer_values(optimizer, lr)
        images = batch["images"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        meta = batch["meta"].to(device, non_blocking=True)
        present = batch["meta_present"].to(device, non_blocking=True)
        if p_drop > 0:
            meta, present = meta_dropout(meta, present, p_drop, generator)
        if mixup_fn is not None:
            if images.shape[0] % 2:  # timm Mixup needs an even batch (a skipped image can make it odd)
                images, labels, meta, present = images[:-1], labels[:-1], meta[:-1], present[:-1]
            images, targets = mixup_fn(images, labels)  # meta is not mixed: it stays per sample
        else:
            targets = labels
        with _autocast(device, amp, amp_dtype):
            logits = forward_model(model, images, meta, present)
            loss = criterion(logits, targets)
        loss_value = check_finite(loss, "training loss", step)
        loss = loss / accum_steps
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if (i + 1) % accum_steps == 0:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip_grad and clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model, step=step)
            step += 1
        loss_meter.update(loss_value, images.shape[0])
        rate = throughput.update(images.shape[0])
        if progress:
            it.set_postfix(loss=f"{loss_meter.smooth:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        if log_fn is not None and (i + 1) % (log_every * accum_steps) == 0:
            log_fn({"train/loss_step": loss_meter.smooth, "train/lr": lr, "train/images_per_s": rate}, step)
    return {"loss": loss_meter.avg, "lr": lr, "images_per_s": throughput.rate, "skipped": skipped,
            "meta_drop_p": p_drop, "step": step}


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, meta_mode: str = "full",
            drop_groups: Sequence[int] = (), meta_sizes: Sequence[int] = (), amp: bool = False,
            progress: bool = False, desc: str = "eval", allow_empty: bool = False) -> Dict[str, torch.Tensor]:
    """Logits of every sample in ``loader`` (in loader order) under one meta condition.

    ``meta_mode``: "full" (meta as given), "zero" (whole meta vector zeroed and marked
    absent: the official "mask-meta" test) or "drop" (zero ``drop_groups`` only).
    Returns ``logits`` [N, K] float32, ``labels`` [N], ``index`` [N] (rows in the records)
    and ``skipped`` (unreadable images).
    """
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
        elif meta_mode != "full":
            raise ValueError(f"meta_mode must be 'full', 'zero' or 'drop', got {meta_mode!r}")
        with _autocast(device, amp):
            logits = forward_model(model, images, meta, present)
        logits_all.append(logits.float().cpu())
        labels_all.append(batch["labels"])
        index_all.append(batch["index"])
    if not logits_all:
        if not allow_empty:
            raise RuntimeError("evaluation saw no readable image; check the dataset paths")
        return {"logits": torch.zeros(0, 0), "labels": torch.zeros(0, dtype=torch.long),
                "index": torch.zeros(0, dtype=torch.long), "skipped": skipped}
    return {"logits": torch.cat(logits_all), "labels": torch.cat(labels_all), "index": torch.cat(index_all),
            "skipped": skipped}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> Dict[str, float]:
    """Top-k accuracy in percent (k clipped to the class count)."""
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        hit = (logits.topk(kk, dim=1).indices == labels[:, None]).any(1).float().mean().item()
        out[f"top{k}"] = 100.0 * hit
    return out


def evaluate(model: torch.nn.Module, loader, device: torch.device, meta_mode: str = "full",
             drop_groups: Sequence[int] = (), meta_sizes: Sequence[int] = (), amp: bool = False,
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
