"""One pre-training epoch: forward, backward, step, log (the task part of SparK pre-training).

``sparse_mim.train.pretrain`` builds the task (data, model, optimizer, schedules) on the shared run
skeleton (:mod:`sparse_mim.utils.training_run`: folder, resume, checkpoints, stops) and calls
:func:`train_one_epoch` per epoch with explicit objects (the convention of
``fgvc.finetune_loop.train_one_epoch`` too); this module knows nothing about configs or files.
What happens per micro-batch:

1. the visible masks are drawn per sample from the sample's seed (so masks do not
   depend on the process layout or on restarts);
2. the global torch generator (drop-path draws from it) is seeded from
   ``stream_seed(seed, "drop_path", rank, step, micro-batch)``: drop-path is a function of the
   position in the run, whatever happened before (loader workers starting, a resume);
3. forward under the run's autocast policy; the loss averaged over processes, so every rank
   sees the same NaN / inf and stops together (a non-finite loss makes the gradients
   non-finite, so the optimizer step is skipped before the run stops);
4. backward and, after ``accum_steps`` micro-batches, the shared ``optimizer_step``
   (unscale, clip, LAMB step; DDP's all-reduce only on the last micro-batch); lr /
   weight decay for the next step; then ``on_step(state)`` (checkpoints, pictures) and, except
   after the epoch's last step (the run skeleton asks after the epoch's end), ``should_stop(state)``
   (pre-emption, ``train.stop_at_step``).

Host read-backs: one per optimizer step. The step's loss, image counts, gradient norm and loss
scale come back in one transfer with the gradient norm (``optimizer_step(read_with=...)``); the
skip decision for non-finite gradients needs that norm on the host before the optimizer runs
(timm's LAMB has no device-side skip, unlike torch's fused optimizers with ``found_inf``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .utils import distributed as dist_utils
from .utils.misc import AverageMeter, Throughput, check_finite, peak_memory_mb
from .utils.schedules import set_optimizer_values
from .utils.streams import RandomStreams
from .utils.training_run import TrainState

__all__ = ["train_one_epoch"]


def train_one_epoch(
        model: nn.Module,                # the SparK module (unwrapped)
        loader: Iterable,
        optimizer: torch.optim.Optimizer,
        lr_schedule: Callable[[int], float],
        state: TrainState,
        *,
        wd_schedule: Optional[Callable[[int], float]] = None,
        train_model: Optional[nn.Module] = None,   # what runs forward: DDP(model); default the model itself
        amp=None,                        # AmpPolicy (sparse_mim.utils.amp); None = fp32
        scaler=None,                     # GradScaler for fp16, else None
        accum_steps: int = 1,
        clip_grad: float = 0.0,
        seed: int = 0,
        rank: int = 0,
        steps_this_epoch: Optional[int] = None,
        should_stop: Optional[Callable[[TrainState], bool]] = None,
        on_step: Optional[Callable[[TrainState], None]] = None,
        log_fn: Optional[Callable[[dict, int], None]] = None,
        log_every: int = 10,
        progress: bool = False,
        peer_timeout: Optional[float] = None,
) -> dict:
    """Train until the loader is exhausted, ``steps_this_epoch`` optimizer steps are done (a fractional
    last epoch) or ``should_stop(state)`` says so; returns epoch averages.

    ``stats["stopped"]`` tells whether ``should_stop`` ended the epoch early (it is not asked after the
    epoch's last step: the caller asks after its epoch-end work). ``peer_timeout``
    (multi-process runs): every rank checks in at the start of each optimizer step; a rank that
    does not within that many seconds is named in a ``DeadPeerError``.
    """
    from .utils.amp import optimizer_step
    train_model = model if train_model is None else train_model
    distributed = isinstance(train_model, nn.parallel.DistributedDataParallel)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    loss_meter, norm_meter, speed = AverageMeter(), AverageMeter(), Throughput()
    autocast = amp.autocast if amp is not None else contextlib.nullcontext

    model.train(True)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps_this_epoch, desc=f"epoch {state.epoch}", dynamic_ncols=True, leave=False)
    set_optimizer_values(optimizer, lr_schedule(state.step), wd_schedule(state.step) if wd_schedule else None)
    optimizer.zero_grad(set_to_none=True)
    streams = RandomStreams(seed, rank)
    micro, step_images, stopped, steps_done = 0, 0, False, 0
    step_failed = torch.zeros((), dtype=torch.long)
    step_loss = torch.zeros((), device=device)
    for images, seeds, n_failed in loader:
        if micro == 0 and peer_timeout:
            dist_utils.check_peers(peer_timeout, f"step {state.step + 1}")
        images = images.to(device, non_blocking=True)
        visible = model.masks_from_seeds(seeds, device)
        streams.seed_torch("drop_path", state.step, micro)
        last_micro = micro == accum_steps - 1
        sync = contextlib.nullcontext() if (last_micro or not distributed) else train_model.no_sync()
        with sync:
            with autocast():
                loss, _, _ = train_model(images, visible)
            loss_global = dist_utils.all_reduce_mean(loss.detach().float())
            step_loss += loss_global
            step_failed = step_failed + torch.as_tensor(n_failed).sum()  # the loader's counts, on the CPU
            step_images += images.shape[0]
            read_with = ()
            if last_micro:  # the step's scalars travel with the gradient norm: one host read-back per step
                counts = dist_utils.all_reduce_sum(
                    torch.stack([step_failed.float(), torch.tensor(float(step_images))]).to(device))
                read_with = (step_loss, counts[0], counts[1])
            result = optimizer_step(loss, optimizer, scaler=scaler, params=params, clip_grad=clip_grad,
                                    accum_steps=accum_steps, boundary=last_micro, read_with=read_with)
        micro += 1
        if not last_micro:
            continue

        loss_sum, n_failed_step, n_images_step = result.extra
        # a non-finite loss made the gradients non-finite: optimizer_step skipped the update; stop here (every
        # rank sees the same all-reduced loss)
        step_loss_value = check_finite(loss_sum / accum_steps, "loss", step=state.step + 1)
        lr = lr_schedule(state.step)  # the values used for this step
        wd = wd_schedule(state.step) if wd_schedule else None
        state.step += 1
        state.batch += accum_steps
        micro = 0
        state.failed_images += int(n_failed_step)
        state.images_seen += int(n_images_step)
        state.skipped_steps += int(result.skipped)
        loss_meter.update(step_loss_value)
        norm_meter.update(result.grad_norm)
        rate = speed.update(int(n_images_step))
        if state.first_loss is None:
            state.first_loss = step_loss_value
        state.last_loss = step_loss_value
        step_loss.zero_()
        step_failed, step_images = torch.zeros((), dtype=torch.long), 0
        set_optimizer_values(optimizer, lr_schedule(state.step), wd_schedule(state.step) if wd_schedule else None)

        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_meter.smooth:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}", refresh=False)
        if log_fn is not None and (state.step % log_every == 0 or state.step == 1):
            state.history.append((state.step, step_loss_value))
            log_fn({
                "train/loss": step_loss_value, "train/loss_avg": loss_meter.smooth, "train/lr": lr,
                "train/weight_decay": wd, "train/grad_norm": result.grad_norm, "train/images_per_s": rate,
                "train/epoch": state.epoch, "train/images_seen": state.images_seen,
                "train/failed_images": state.failed_images, "train/skipped_steps": state.skipped_steps,
                "train/loss_scale": result.scale, "sys/peak_memory_mb": peak_memory_mb(device),
            }, state.step)
        if on_step is not None:
            on_step(state)
        steps_done += 1
        if steps_this_epoch is not None and steps_done >= steps_this_epoch:
            break
        if should_stop is not None and should_stop(state):
            stopped = True
            break
    if bar is not None:
        bar.close()
    return {"loss": loss_meter.avg, "grad_norm": norm_meter.avg, "stopped": stopped}
