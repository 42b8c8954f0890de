#!/usr/bin/env python
"""SparK pre-training (set-up half; the loop is sparse_mim.engine_pretrain.train_one_epoch).

    python tools/pretrain.py                                   # 2-minute CPU demo on built-in images
    python tools/pretrain.py -c configs/pretrain/resnet50.yaml data.root=/data/imagenet/train
    torchrun --nproc_per_node 8 tools/pretrain.py -c configs/pretrain/convnext_small.yaml data.root=...
    srun python tools/pretrain.py -c ...                        # Slurm: see docs/slurm_pretrain.sh
    python tools/pretrain.py -c ... output_dir=runs/r50 resume=auto   # continue a killed run

Every key of DEFAULTS below can be set in the YAML file or on the command line as
``section.key=value`` (or ``--section.key value``); ``--print-config`` shows the result.
The resolved config is written to ``<output_dir>/config.yaml``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=r"`torch.cuda.amp.custom_(fwd|bwd)", category=FutureWarning)

import torch  # noqa: E402

from sparse_mim.utils import distributed as dist_utils  # noqa: E402
from sparse_mim.utils.checkpoint import (  # noqa: E402
    checkpoint_name, get_rng_state, load_checkpoint, resolve_resume, save_checkpoint, set_rng_state)
from sparse_mim.utils.config import Config, parse_config, save_config  # noqa: E402
from sparse_mim.utils.misc import NonFiniteLossError, count_parameters  # noqa: E402
from sparse_mim.utils.schedules import WarmupCosine, cosine_weight_decay  # noqa: E402

DEFAULTS = {
    "name": "spark_demo",            # run name (wandb run name, artifact prefix)
    "output_dir": "outputs/pretrain_demo",
    "seed": 0,
    "device": "auto",                # auto | cuda | cpu
    "cpu_threads": 1,                # torch threads per process; 0 = torch's default. 1 is 5-10x faster on a
                                     # shared/busy CPU; on an idle many-core CPU raise it
    "resume": "",                    # "" (fresh), "auto" (last checkpoint in output_dir, if any) or a path
    "init_from": "",                 # weights to start from (official SparK release / our checkpoint), not resumed
    "model": {
        "backbone": "resnet18",      # any name from sparse_mim.list_backbones()
        "sparse": True,              # False: the dense-masked simulation (official SparK's computation)
        "input_size": [64, 64],      # int or [height, width], multiples of 32
        "mask_ratio": 0.6,
        "decoder_width": 128,        # 768 in the paper
        "densify_norm": "",          # "" = bn for ResNets, ln for ConvNeXts (official); or bn | ln | identity
        "drop_path_rate": 0.0,       # official pre-training: 0
        "backbone_kwargs": {},       # extra create_backbone arguments, e.g. {depths: [1, 1, 1, 1]}
    },
    "data": {
        "root": "",                  # folder / ImageFolder tree / list file; "" or "builtin": generated images
        "builtin_images": 512,
        "builtin_size": 96,
        "scale": [0.67, 1.0],        # RandomResizedCrop scale (official)
        "hflip": True,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "num_workers": 0,            # loader processes (the built-in images are cheap; use 4-10 for JPEG folders)
    },
    "optim": {
        "batch_size": 16,            # per process; global = batch_size x processes x accum_steps
        "accum_steps": 1,
        "epochs": 4,
        "warmup_epochs": 0.5,
        "base_lr": 0.1,              # lr = base_lr x global_batch / 256 (official: 2e-4; the 2-minute demo needs more)
        "lr_start_factor": 0.005,    # warm-up starts at lr x this (official)
        "lr_end_factor": 0.001,      # cosine ends at lr x this (official)
        "weight_decay": 0.04,        # cosine from weight_decay ...
        "weight_decay_end": 0.2,     # ... to weight_decay_end (official)
        "betas": [0.9, 0.95],        # LAMB; official: 0.95 ResNet, 0.999 ConvNeXt
        "clip_grad": 5.0,            # global grad-norm clip; 0 = off
        "amp": True,                 # fp16 autocast + GradScaler on CUDA (fp32 on CPU regardless)
        "sync_bn": True,             # SyncBatchNorm (sparse BN included) in multi-GPU runs; needs CUDA
        "stop_at_step": 0,           # debug: stop after this step without a final checkpoint (like a kill)
    },
    "log": {
        "every": 10,                 # scalars every N steps
        "vis_every": 100,            # reconstruction grid every N steps (and at the end); 0 = only at the end
        "vis_images": 4,
        "project": "sparse_mim",
        "entity": "",
        "progress": True,
    },
    "checkpoint": {
        "every_steps": 200,          # last.pth every N steps (and at every epoch end)
        "keep_every_steps": 0,       # also keep checkpoint-<step>.pth every N steps; 0 = no periodic keeps
        "export_backbone": True,     # write backbone.pth (dense names, torch layout) at the end
    },
}


class UsageError(ValueError):
    """A config value that cannot work (the message names the fix)."""


def build_model(cfg: Config) -> torch.nn.Module:
    """SparK around the configured backbone; clear errors for an unknown name or a bad input size."""
    from sparse_mim.backbones import create_backbone, list_backbones
    from sparse_mim.spark import SparK
    name = cfg.model.backbone
    if name not in list_backbones():
        import difflib
        close = difflib.get_close_matches(name, list_backbones(), n=3)
        raise UsageError(f"unknown backbone model.backbone={name!r}"
                         + (f" (did you mean {' or '.join(close)}?)" if close else "")
                         + f"; choose one of: {', '.join(list_backbones())}")
    size = cfg.model.input_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) == 1:
        size = (size[0], size[0])
    if any(s % 32 or s <= 0 for s in size):
        fix = [max(32, round(s / 32) * 32) for s in size]
        raise UsageError(f"model.input_size={list(size)} is not divisible by 32: SparK masks the backbone's "
                         f"stride-32 grid in 32x32 patches. Use a multiple of 32, e.g. "
                         f"model.input_size={fix[0] if fix[0] == fix[1] else fix}")
    backbone = create_backbone(name, sparse=cfg.model.sparse, drop_path_rate=cfg.model.drop_path_rate,
                               **dict(cfg.model.backbone_kwargs))
    return SparK(backbone, input_size=size, mask_ratio=cfg.model.mask_ratio, decoder_width=cfg.model.decoder_width,
                 densify_norm=cfg.model.densify_norm or None)


def build_optimizer(model: torch.nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """LAMB (timm) over SparK's parameter groups (no decay on 1-D params, biases, mask tokens, gamma)."""
    from timm.optim import Lamb
    from sparse_mim.spark import param_groups
    groups = param_groups(model, cfg.optim.weight_decay)
    # clipping is done by the loop (clip_grad, after unscaling fp16 grads), not inside LAMB
    return Lamb(groups, lr=lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay, max_grad_norm=None)


def _convert_sync_bn(model: torch.nn.Module) -> torch.nn.Module:
    try:
        from sparse_mim.sparse.convert import convert_sync_batchnorm  # converts the sparse BN too
    except ImportError:  # pragma: no cover - the engine's converter is the supported path
        convert_sync_batchnorm = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    return convert_sync_batchnorm(model)


def _backbone_prefix(model: torch.nn.Module) -> str:
    for name, module in model.named_modules():
        if module is model.backbone:
            return name + "."
    raise RuntimeError("the model's backbone is not one of its sub-modules")


def run(cfg: Config) -> dict:
    """Pre-train with the resolved config; returns a summary (paths, losses, steps) on every rank."""
    from sparse_mim.data import ResumableBatchSampler, build_pretrain_dataset, sample_seed
    from sparse_mim.engine_pretrain import TrainState, export_backbone, masks_from_seeds, train_one_epoch
    from sparse_mim.utils.checkpoint import unwrap_model
    from sparse_mim.utils.logger import RunLogger

    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    info = dist_utils.init_distributed(cfg.device)
    device, is_main = info.device, info.is_main
    out_dir = cfg.output_dir
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        save_config(cfg, out_dir)
    # ---- model (first: it validates the backbone name and the input size); same init on every rank
    dist_utils.seed_everything(cfg.seed, rank=0)
    model = build_model(cfg).to(device)
    dist_utils.seed_everything(cfg.seed, info.rank)  # then one seed per rank (drop-path etc.)
    if info.distributed and cfg.optim.sync_bn:
        if device.type == "cuda":
            model = _convert_sync_bn(model)
        elif is_main:
            print("note: SyncBatchNorm needs CUDA; on CPU each process keeps its own BatchNorm statistics")

    # ---- data
    dataset = build_pretrain_dataset(cfg.data.root, model.input_size, scale=cfg.data.scale, hflip=cfg.data.hflip,
                                     mean=cfg.data.mean, std=cfg.data.std, builtin_images=cfg.data.builtin_images,
                                     builtin_size=cfg.data.builtin_size)
    sampler = ResumableBatchSampler(len(dataset), cfg.optim.batch_size, info.world_size, info.rank,
                                    accum_steps=cfg.optim.accum_steps, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0)

    # ---- optimisation
    global_batch = sampler.global_batch
    lr = cfg.optim.base_lr * global_batch / 256
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = max(1, int(round(cfg.optim.epochs * steps_per_epoch)))
    warmup_steps = min(total_steps, int(round(cfg.optim.warmup_epochs * steps_per_epoch)))
    lr_schedule = WarmupCosine(lr, lr * cfg.optim.lr_end_factor, total_steps, warmup_steps,
                               warmup_start=lr * cfg.optim.lr_start_factor)
    wd_schedule = cosine_weight_decay(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total_steps)
    optimizer = build_optimizer(model, cfg, lr)
    use_amp = cfg.optim.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    state = TrainState()

    # ---- resume / init
    run_id = None
    resume_path = resolve_resume(cfg.resume, out_dir)
    if resume_path:
        ck = load_checkpoint(resume_path, map_location="cpu")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if use_amp and "scaler" in ck:
            scaler.load_state_dict(ck["scaler"])
        state.load_state_dict(ck["train_state"])
        run_id = ck.get("wandb_run_id")
        rng = ck.get("rng", [])
        if len(rng) == info.world_size:
            set_rng_state(rng[info.rank])
        else:
            dist_utils.seed_everything(cfg.seed + state.step, info.rank)
        if ck.get("global_batch") not in (None, global_batch) and is_main:
            print(f"warning: resuming with global batch {global_batch}, the checkpoint used {ck['global_batch']}: "
                  "the data order after the resume point differs from the original run")
        if is_main:
            print(f"resumed from {resume_path} at step {state.step}/{total_steps}")
        del ck
    elif cfg.resume == "auto" and is_main:
        print(f"resume=auto: no checkpoint in {out_dir}, starting from scratch")
    if cfg.init_from and not resume_path:
        from sparse_mim.spark import load_spark_checkpoint
        load_spark_checkpoint(model, cfg.init_from)

    train_model = model
    if info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    logger = RunLogger(out_dir, cfg, project=cfg.log.project, name=cfg.name, entity=cfg.log.entity or None,
                       run_id=run_id, enabled=is_main, job_type="pretrain")
    prefix = _backbone_prefix(model)

    def save(kind: str) -> None:
        rng_all = [None] * info.world_size
        if info.distributed:
            torch.distributed.all_gather_object(rng_all, get_rng_state())
        else:
            rng_all = [get_rng_state()]
        if not is_main:
            return
        ck = {"model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
              "scaler": scaler.state_dict(), "train_state": state.state_dict(),
              "lr_schedule": lr_schedule.state_dict(), "wd_schedule": wd_schedule.state_dict(),
              "rng": rng_all, "config": cfg.to_dict(), "wandb_run_id": logger.run_id,
              "world_size": info.world_size, "global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
              "backbone_prefix": prefix, "format": "sparse_mim.pretrain/1"}
        name = checkpoint_name(state.step) if kind == "keep" else "last.pth"
        save_checkpoint(ck, os.path.join(out_dir, name))

    vis_items = [(i % len(dataset), sample_seed(cfg.seed, -1, i)) for i in range(cfg.log.vis_images)]
    last_png = [None]

    def visualize(step: int) -> None:
        if not is_main:
            return
        batch = [dataset[k] for k in vis_items]
        images = torch.stack([b[0] for b in batch]).to(device)
        visible = masks_from_seeds(model, torch.tensor([b[1] for b in batch]), device)
        was_training = model.training
        model.eval()
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            grid = model.reconstruction_grid(images, visible, mean=cfg.data.mean, std=cfg.data.std)
        model.train(was_training)
        last_png[0] = logger.log_image("reconstruction", grid.float().clamp(0, 1), step,
                                       caption="masked input | reconstruction | original")

    if is_main:
        n_params = count_parameters(model)
        n_bb = count_parameters(model.backbone)
        print(f"SparK {cfg.model.backbone} ({'sparse' if cfg.model.sparse else 'dense-masked'}), "
              f"{n_params / 1e6:.2f} M params ({n_bb / 1e6:.2f} M backbone), input {list(model.input_size)}, "
              f"{len(dataset)} images, {info.world_size} process(es) on {device.type}, global batch {global_batch}, "
              f"lr {lr:.3g}, {total_steps} steps ({steps_per_epoch}/epoch), output {out_dir}")

    stopped = False
    epoch_means = []
    t0 = time.time()
    try:
        first_epoch = state.step // steps_per_epoch
        for epoch in range(first_epoch, math.ceil(total_steps / steps_per_epoch)):
            start = state.step - epoch * steps_per_epoch
            remaining = min(steps_per_epoch, total_steps - epoch * steps_per_epoch) - start
            if remaining <= 0:
                continue
            sampler.set_epoch(epoch, start)
            state.epoch = epoch
            epoch_stats = train_one_epoch(model, train_model, loader, optimizer, scaler, lr_schedule, wd_schedule, state, cfg,
                            device, logger=logger, save_checkpoint=save, visualize=visualize,
                            steps_this_epoch=remaining, progress=cfg.log.progress)
            if cfg.optim.stop_at_step and state.step >= cfg.optim.stop_at_step:
                stopped = True
                break
            epoch_done = state.step - epoch * steps_per_epoch >= steps_per_epoch
            if epoch_done or state.step >= total_steps:
                save("last")
                epoch_means.append((epoch, epoch_stats["loss"]))
                if is_main:
                    print(f"epoch {epoch} done: step {state.step}/{total_steps}, mean loss {epoch_stats['loss']:.4f}, "
                          f"unreadable images skipped so far: {state.failed_images}")
            if state.step >= total_steps:
                break
    except NonFiniteLossError:
        if is_main:
            print(f"stopped: non-finite loss; the last good checkpoint in {out_dir} is kept")
        logger.finish()
        raise

    summary = {"output_dir": out_dir, "step": state.step, "total_steps": total_steps,
               "first_loss": state.first_loss, "last_loss": state.last_loss, "history": list(state.history),
               "failed_images": state.failed_images, "wandb_run_id": logger.run_id, "epoch_means": epoch_means,
               "checkpoint": os.path.join(out_dir, "last.pth"), "backbone": None, "reconstruction_png": None,
               "stopped_early": stopped}
    if not stopped:
        if is_main:
            visualize(state.step)
            summary["reconstruction_png"] = last_png[0]
            if cfg.checkpoint.export_backbone:
                bb_path = os.path.join(out_dir, "backbone.pth")
                export_backbone(unwrap_model(model), bb_path)
                summary["backbone"] = bb_path
                logger.log_artifact(bb_path, name=f"{cfg.name}-{cfg.model.backbone}-backbone", type="model",
                                    metadata={"backbone": cfg.model.backbone, "step": state.step,
                                              "input_size": list(model.input_size)})
            logger.summary({"final_loss": state.last_loss, "failed_images": state.failed_images})
        dist_utils.barrier()
    wandb_dir = logger.wandb_dir
    logger.finish()
    if is_main:
        mins = (time.time() - t0) / 60
        if epoch_means:
            print("mean loss per epoch: " + "  ".join(f"{e}: {l:.4f}" for e, l in epoch_means))
        print(f"loss {state.first_loss:.4f} (first step) -> {state.last_loss:.4f} (step {state.step}), "
              f"{mins:.1f} min; unreadable images skipped: {state.failed_images}")
        print(f"  config:          {os.path.join(out_dir, 'config.yaml')}")
        print(f"  checkpoint:      {summary['checkpoint']}")
        if summary["backbone"]:
            print(f"  backbone:        {summary['backbone']}  (loads strict=True into the dense "
                  f"torchvision/timm model)")
        if summary["reconstruction_png"]:
            print(f"  reconstructions: {summary['reconstruction_png']}  (masked | reconstruction | original)")
        print(f"  metrics:         {os.path.join(out_dir, 'metrics.jsonl')}")
        mode = os.environ.get("WANDB_MODE", "offline")
        if wandb_dir:
            print(f"  wandb run:       {os.path.dirname(wandb_dir)} (mode {mode}; upload with `wandb sync`)")
        else:
            print(f"  wandb:           disabled (WANDB_MODE={mode})")
    return summary


def main(argv=None) -> dict:
    cfg, _ = parse_config(DEFAULTS, argv, description=__doc__)
    try:
        return run(cfg)
    finally:
        dist_utils.cleanup()


if __name__ == "__main__":
    from sparse_mim.data import DataError
    try:
        main()
    except (UsageError, DataError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
