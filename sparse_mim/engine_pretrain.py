"""One pre-training epoch (MAE's engine_pretrain split): forward, backward, step, log, checkpoint.

``tools/pretrain.py`` builds everything (config, distributed, data, model, optimizer,
resume) and calls :func:`train_one_epoch` per epoch; this module knows nothing
about how they were made. What happens per micro-batch:

1. the visible masks are drawn per sample from the sample's seed (so masks do not
   depend on the process layout or on restarts);
2. forward under fp16 autocast on CUDA (fp32 on CPU), the loss averaged over
   processes *before* backward so every rank sees the same NaN/inf and stops
   together (with a clear message; the last good checkpoint is kept);
3. backward of ``loss / accum_steps`` (DDP's gradient all-reduce only on the last
   micro-batch: ``no_sync``);
4. after ``accum_steps`` micro-batches: unscale, clip, LAMB step, lr / weight-decay
   for the next step; log, visualise and checkpoint on schedule (rank 0 writes).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .utils import distributed as dist_utils
from .utils.misc import AverageMeter, Throughput, check_finite, peak_memory_mb
from .utils.schedules import set_optimizer_values

__all__ = ["TrainState", "masks_from_seeds", "train_one_epoch"]


@dataclass
class TrainState:
    """Position in the run (what a checkpoint must restore besides the modules)."""
    step: int = 0                 # optimizer steps done
    epoch: int = 0
    images_seen: int = 0
    failed_images: int = 0        # unreadable images skipped so far (all ranks)
    first_loss: float | None = None
    last_loss: float | None = None
    history: list = field(default_factory=list)  # (step, loss) at log points, for the final summary

    def state_dict(self) -> dict:
        return dict(step=self.step, epoch=self.epoch, images_seen=self.images_seen,
                    failed_images=self.failed_images, first_loss=self.first_loss, last_loss=self.last_loss,
                    history=[list(h) for h in self.history])

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if hasattr(self, k):
                setattr(self, k, [tuple(h) for h in v] if k == "history" else v)


def masks_from_seeds(model: nn.Module, seeds: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Visible masks [B, f_h, f_w], one per sample, each drawn from a generator seeded by its sample seed."""
    masks = []
    for s in seeds.tolist():
        g = torch.Generator().manual_seed((int(s) ^ 0x5DEECE66D) & ((1 << 63) - 1))  # decorrelated from the crop
        masks.append(model.mask(1, generator=g))
    return torch.cat(masks).to(device, non_blocking=True)


def _grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def train_one_epoch(
        model: nn.Module,                # the SparK module (unwrapped)
        train_model: nn.Module,          # what runs forward: DDP(model) or model itself
        loader: Iterable,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        lr_schedule: Callable[[int], float],
        wd_schedule: Callable[[int], float],
        state: TrainState,
        cfg,                             # resolved Config (optim.*, log.*, checkpoint.*)
        device: torch.device,
        logger=None,                     # RunLogger (no-op on ranks > 0)
        save_checkpoint: Callable[[str], None] | None = None,   # save_checkpoint(kind) with kind "last"/"keep"
        visualize: Callable[[int], None] | None = None,          # visualize(step) on rank 0
        steps_this_epoch: int | None = None,
        progress: bool = True,
) -> dict:
    """Train until the loader is exhausted (or ``optim.stop_at_step``); returns epoch averages."""
    accum = int(cfg.optim.accum_steps)
    clip = float(cfg.optim.clip_grad or 0.0)
    use_amp = bool(cfg.optim.amp) and device.type == "cuda"
    world = dist_utils.get_world_size()
    is_main = dist_utils.is_main_process()
    distributed = isinstance(train_model, nn.parallel.DistributedDataParallel)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_meter, norm_meter, speed = AverageMeter(), AverageMeter(), Throughput()
    stop_at = int(cfg.optim.stop_at_step or 0)
    log_every, vis_every = int(cfg.log.every), int(cfg.log.vis_every)
    ckpt_every, keep_every = int(cfg.checkpoint.every_steps), int(cfg.checkpoint.keep_every_steps)

    model.train(True)
    bar = None
    if progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=steps_this_epoch, desc=f"epoch {state.epoch}", dynamic_ncols=True, leave=False)
    set_optimizer_values(optimizer, lr_schedule(state.step), wd_schedule(state.step))
    optimizer.zero_grad(set_to_none=True)
    micro, step_failed, step_images = 0, 0, 0
    step_loss = torch.zeros((), device=device)
    for images, seeds, n_failed in loader:
        images = images.to(device, non_blocking=True)
        visible = masks_from_seeds(model, seeds, device)
        last_micro = micro == accum - 1
        sync = contextlib.nullcontext() if (last_micro or not distributed) else train_model.no_sync()
        with sync:
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss, _, _ = train_model(images, visible)
            loss_global = dist_utils.all_reduce_mean(loss.detach().float())
            check_finite(loss_global, "loss", step=state.step + 1,
                         hint="The last good checkpoint is kept in the output folder.")
            scaler.scale(loss / accum).backward()
        step_loss += loss_global
        step_failed += int(n_failed.sum())
        step_images += images.shape[0]
        micro += 1
        if not last_micro:
            continue

        # ---- optimizer step
        scaler.unscale_(optimizer)
        if clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            grad_norm = _grad_norm(params)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr, wd = lr_schedule(state.step), wd_schedule(state.step)  # values used for this step
        state.step += 1
        micro = 0

        counts = dist_utils.all_reduce_sum(torch.tensor([float(step_failed), float(step_images)], device=device))
        state.failed_images += int(counts[0])
        state.images_seen += int(counts[1])
        step_loss_value = float(step_loss) / accum
        loss_meter.update(step_loss_value)
        norm_meter.update(float(grad_norm))
        rate = speed.update(int(counts[1]))
        if state.first_loss is None:
            state.first_loss = step_loss_value
        state.last_loss = step_loss_value
        step_loss.zero_()
        step_failed, step_images = 0, 0
        set_optimizer_values(optimizer, lr_schedule(state.step), wd_schedule(state.step))

        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_meter.smooth:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}", refresh=False)
        if logger is not None and (state.step % log_every == 0 or state.step == 1):
            state.history.append((state.step, step_loss_value))
            logger.log({
                "train/loss": step_loss_value, "train/loss_avg": loss_meter.smooth, "train/lr": lr,
                "train/weight_decay": wd, "train/grad_norm": float(grad_norm), "train/images_per_s": rate,
                "train/epoch": state.epoch, "train/images_seen": state.images_seen,
                "train/failed_images": state.failed_images, "train/loss_scale": scaler.get_scale()
                if scaler.is_enabled() else 1.0, "sys/peak_memory_mb": peak_memory_mb(device),
            }, step=state.step)
        if visualize is not None and is_main and vis_every > 0 and state.step % vis_every == 0:
            visualize(state.step)
        if save_checkpoint is not None:
            if keep_every > 0 and state.step % keep_every == 0:
                save_checkpoint("keep")
            if ckpt_every > 0 and state.step % ckpt_every == 0:
                save_checkpoint("last")
        if stop_at and state.step >= stop_at:
            break
    if bar is not None:
        bar.close()
    return {"loss": loss_meter.avg, "grad_norm": norm_meter.avg}


# ---------------------------------------------------------------------------- export
def backbone_state_dict(model: nn.Module) -> dict:
    """The encoder's weights alone, in the dense twin's names and torch layout, on CPU."""
    backbone = model.backbone if hasattr(model, "backbone") else model
    return {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}


def export_backbone(model_or_state, path: str) -> str:
    """Write the backbone as a plain state_dict (the official "timm style" file), atomically.

    ``model_or_state``: a SparK model, a backbone, or an already extracted state_dict.
    The file loads with ``torch.load(weights_only=True)`` and ``strict=True`` into the
    dense model (torchvision ResNet with ``fc`` removed, timm ConvNeXt with num_classes=0).
    """
    from .utils.checkpoint import save_checkpoint
    state = model_or_state if isinstance(model_or_state, dict) else backbone_state_dict(model_or_state)
    return save_checkpoint(state, path)
