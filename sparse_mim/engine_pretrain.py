"""One pre-training epoch (MAE's engine_pretrain split): forward, backward, step, log.

``sparse_mim.train.pretrain`` builds everything (config, distributed, data, model, optimizer,
resume) and calls :func:`train_one_epoch` per epoch with explicit objects (the convention of
``fgvc.engine.train_one_epoch`` too); this module knows nothing about configs or files.
What happens per micro-batch:

1. the visible masks are drawn per sample from the sample's seed (so masks do not
   depend on the process layout or on restarts);
2. the global torch generator (drop-path draws from it) is seeded from
   ``(seed, "drop_path", rank, step, micro-batch)``: drop-path is a function of the
   position in the run, whatever happened before (loader workers starting, a resume);
3. forward under the run's autocast policy; the loss averaged over processes, so every rank
   sees the same NaN / inf and stops together (a non-finite loss makes the gradients
   non-finite, so the optimizer step is skipped before the run stops);
4. backward and, after ``accum_steps`` micro-batches, the shared ``optimizer_step``
   (unscale, clip, LAMB step; DDP's all-reduce only on the last micro-batch); lr /
   weight decay for the next step; then ``on_step(state)`` (checkpoints, pictures) and
   ``should_stop(state)`` (pre-emption, debug stop).

Host read-backs: one per optimizer step. The step's loss, image counts, gradient norm and loss
scale come back in one transfer with the gradient norm (``optimizer_step(read_with=...)``); the
skip decision for non-finite gradients needs that norm on the host before the optimizer runs
(timm's LAMB has no device-side skip, unlike torch's fused optimizers with ``found_inf``).
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .utils import distributed as dist_utils
from .utils.misc import AverageMeter, Throughput, check_finite, peak_memory_mb
from .utils.schedules import set_optimizer_values

__all__ = ["TrainState", "train_one_epoch", "seed_step_stream"]


@dataclass
class TrainState:
    """Position in the run (what a checkpoint must restore besides the modules)."""
    step: int = 0                 # optimizer steps done
    epoch: int = 0
    images_seen: int = 0
    failed_images: int = 0        # unreadable images skipped so far (all ranks)
    skipped_steps: int = 0        # optimizer steps skipped for non-finite gradients
    first_loss: float | None = None
    last_loss: float | None = None
    history: list = field(default_factory=list)  # (step, loss) at log points, for the final summary

    def state_dict(self) -> dict:
        return dict(step=self.step, epoch=self.epoch, images_seen=self.images_seen,
                    failed_images=self.failed_images, skipped_steps=self.skipped_steps,
                    first_loss=self.first_loss, last_loss=self.last_loss,
                    history=[list(h) for h in self.history])

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if hasattr(self, k):
                setattr(self, k, [tuple(h) for h in v] if k == "history" else v)


def seed_step_stream(seed: int, rank: int, step: int, micro: int) -> int:
    """Seed the global torch generator (CPU and CUDA) for one micro-batch; drop-path draws from it."""
    digest = hashlib.blake2b(f"{seed}:drop_path:{rank}:{step}:{micro}".encode(), digest_size=8).digest()
    s = int.from_bytes(digest, "little") >> 1
    torch.manual_seed(s)
    return s


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

    ``stats["stopped"]`` tells whether ``should_stop`` ended the epoch early. ``peer_timeout``
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
    micro, step_images, stopped, steps_done = 0, 0, False, 0
    step_failed = torch.zeros((), dtype=torch.long)
    step_loss = torch.zeros((), device=device)
    for images, seeds, n_failed in loader:
        if micro == 0 and peer_timeout:
            dist_utils.check_peers(peer_timeout, f"step {state.step + 1}")
        images = images.to(device, non_blocking=True)
        visible = model.masks_from_seeds(seeds, device)
        seed_step_stream(seed, rank, state.step, micro)
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
        if should_stop is not None and should_stop(state):
            stopped = True
            break
        steps_done += 1
        if steps_this_epoch is not None and steps_done >= steps_this_epoch:
            break
    if bar is not None:
        bar.close()
    return {"loss": loss_meter.avg, "grad_norm": norm_meter.avg, "stopped": stopped}
