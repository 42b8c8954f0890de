"""SparK pre-training: the set-up half (``pretrain(cfg)``); the loop is ``engine_pretrain.train_one_epoch``.

``pretrain(cfg)`` takes a resolved config (``load_config(DEFAULTS, recipe, overrides)``) and
builds everything: distributed set-up, model, data, optimizer, schedules, resume; then runs
the epochs, writes checkpoints (``last.pth`` every ``checkpoint.every_steps``, at every epoch
end and on pre-emption; ``checkpoint-<step>.pth`` keeps), reconstruction grids and
``backbone.pth``; returns a summary dict. The command line is ``sparse_mim.cli.pretrain``
(``tools/pretrain.py``, ``spark-pretrain``)::

    python tools/pretrain.py                                   # 2-minute CPU demo on built-in images
    python tools/pretrain.py -c configs/pretrain/resnet50.yaml data.root=/data/imagenet/train
    torchrun --nproc_per_node 8 tools/pretrain.py -c configs/pretrain/convnext_small.yaml data.root=...
    python tools/pretrain.py -c ... output_dir=runs/r50 resume=auto   # continue a stopped run

Guarantees (tested): a stopped and resumed run equals an uninterrupted one (every random
stream is a function of the seed and the position: crops and masks of the sample's place
in the epoch, drop-path of the step); every checkpoint holds finite values only; SIGTERM /
SIGUSR1 finish the current step, write ``last.pth`` and return with ``preempted=True``
(the CLI exits with status 75 for the batch script to requeue).
"""
from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from . import knn
from .sparse import autotune
from .utils import distributed as dist_utils
from .utils.config import Config, ConfigError, K
from .utils.misc import NonFiniteLossError, count_parameters
from .visualize import reconstruction_grid

warnings.filterwarnings("ignore", message=r"`torch.cuda.amp.custom_(fwd|bwd)", category=FutureWarning)

__all__ = ["DEFAULTS", "pretrain", "build_model", "build_optimizer", "validate_config", "stream_seed"]


def _ordered_pair(v) -> str | None:
    return None if v[0] <= v[1] else "expected [low, high] with low <= high"


def _img_size(v) -> str | None:
    sizes = [v] if isinstance(v, int) else list(v)
    if not 1 <= len(sizes) <= 2 or any(not isinstance(s, int) or isinstance(s, bool) for s in sizes):
        return "expected an int or [height, width]"
    if any(s <= 0 or s % 32 for s in sizes):
        fix = [max(32, round(s / 32) * 32) for s in sizes]
        return (f"expected multiples of 32 (SparK masks the backbone's stride-32 grid in 32x32 patches), e.g. "
                f"model.img_size={fix[0] if len(set(fix)) == 1 else fix}")
    return None


def _decoder_width(v) -> str | None:
    return None if v % 32 == 0 else "expected a multiple of 32 (the width halves in each of 5 up-sampling blocks)"


DEFAULTS = {
    "output_dir": K("outputs/pretrain_demo", "folder for checkpoints, config.yaml, metrics, images, backbone.pth"),
    "seed": K(0, "random seed; crops, masks and drop-path derive from it and the position in the run", min=0),
    "device": K("auto", "auto (CUDA if available) | cuda | cpu", choices=("auto", "cuda", "cpu")),
    "resume": K("", "'' fresh run | auto (newest loadable checkpoint in output_dir, if any) | path to a .pth"),
    "model": {
        "backbone": K("resnet18", "encoder: a name from sparse_mim.list_backbones() or any timm convnet name"),
        "backbone_kwargs": K({}, "extra create_backbone arguments, e.g. {depths: [1, 1, 1, 1]}"),
        "sparse": K(True, "true sparse encoder; false: the dense-masked simulation (official SparK's computation)"),
        "img_size": K([64, 64], "input size, int or [height, width], multiples of 32", check=_img_size),
        "mask_ratio": K(0.6, "fraction of 32x32 patches hidden", gt=0.0, lt=1.0),
        "decoder_width": K(128, "decoder width at the coarsest scale (768 in the paper)", gt=0,
                           check=_decoder_width),
        "densify_norm": K("", "'' (bn for ResNets, ln for ConvNeXts, official) | bn | ln | identity",
                          choices=("", "bn", "ln", "identity")),
        "drop_path_rate": K(0.0, "stochastic depth of the encoder (official pre-training: 0)", min=0.0, lt=1.0),
        "init": K("official", "from-scratch init: official (ResNet last BN of each block 0, default densify "
                  "projections) | trunc_normal (BN 1, trunc-normal(.02) projections)",
                  choices=("official", "trunc_normal")),
        "pretrained": K("", "weights to start from (official SparK *_withdecoder_* file or ours); not a resume"),
    },
    "data": {
        "root": K("", "folder / ImageFolder tree / list file; '' or builtin: generated demo images", nullable=True),
        "batch_size": K(16, "images per process per micro-batch (global = batch_size x processes x accum_steps)",
                        gt=0),
        "num_workers": K(0, "loader processes (4-10 for JPEG folders)", min=0),
        "builtin_images": K(512, "number of generated images when data.root is '' or builtin", min=1),
        "builtin_size": K(96, "side of the generated images", min=32),
        "max_pixels": K(178956970, "images with more pixels are skipped and counted (decompression-bomb guard; "
                        "PIL's default)", gt=0),
        "mean": K(list(IMAGENET_DEFAULT_MEAN), "normalisation mean (ImageNet)", length=3),
        "std": K(list(IMAGENET_DEFAULT_STD), "normalisation std (ImageNet)", length=3, item_gt=0.0),
    },
    "aug": {
        "scale": K([0.67, 1.0], "RandomResizedCrop scale range (official)", length=2, item_gt=0.0, item_max=1.0,
                   check=_ordered_pair),
        "hflip": K(True, "random horizontal flip"),
    },
    "optim": {
        "lr": K(0.1, "learning rate at lr_base_batch images (official 2e-4; the 2-minute demo needs more)", gt=0.0),
        "lr_base_batch": K(256, "lr is scaled by global batch / lr_base_batch", gt=0),
        "lr_start_factor": K(0.005, "warm-up starts at lr x this (official)", min=0.0),
        "lr_end_factor": K(0.001, "cosine ends at lr x this (official)", min=0.0),
        "weight_decay": K(0.04, "weight decay at the start (cosine schedule)", min=0.0),
        "weight_decay_end": K(0.2, "weight decay at the end (official)", min=0.0),
        "betas": K([0.9, 0.95], "LAMB betas (official: 0.95 ResNet, 0.999 ConvNeXt)", length=2, item_min=0.0,
                   item_lt=1.0),
        "clip_grad": K(5.0, "global gradient-norm clip; 0 = off", min=0.0),
        "accum_steps": K(1, "micro-batches per optimizer step", gt=0),
    },
    "train": {
        "epochs": K(4.0, "epochs (fractional allowed)", gt=0.0),
        "warmup_epochs": K(0.5, "linear warm-up epochs (fractional allowed)", min=0.0),
        "amp": K("auto", "mixed precision: auto | bf16 | fp16 | off", choices=("auto", "bf16", "fp16", "off")),
        "cpu_threads": K(1, "torch threads per process; 0 = torch's default (1 is fastest on a busy CPU)", min=0),
        "sync_bn": K(True, "SyncBatchNorm in multi-GPU runs (needs CUDA)"),
        "stop_at_step": K(0, "debug: stop after this step without a final checkpoint (like a kill); 0 = off", min=0),
        "dist_timeout": K(600, "seconds a process waits for the others before naming the silent rank(s)", gt=0),
        **autotune.CONFIG_DEFAULTS,  # conv_backend (autotune | table | forced path), autotune_cache
    },
    "eval": knn.CONFIG_DEFAULTS,  # the k-NN monitor: knn_root, knn_every, knn_k, knn_temperature, ...
    "log": {
        "every": K(10, "scalars every N steps", gt=0),
        "progress": K(True, "progress bar"),
        "vis_every": K(100, "reconstruction grid every N steps (and at the end); 0 = only at the end", min=0),
        "vis_images": K(4, "images in the reconstruction grid; 0 = no grids", min=0),
    },
    "wandb": {
        "enabled": K(True, "log to wandb (mode from WANDB_MODE; offline by default); metrics.jsonl either way"),
        "project": K("sparse_mim", "wandb project"),
        "name": K("spark_demo", "wandb run name (and artifact prefix)"),
        "entity": K("", "wandb entity (team); '' = your default"),
    },
    "checkpoint": {
        "every_steps": K(200, "rewrite last.pth every N steps (and at every epoch end); 0 = epoch ends only",
                         min=0),
        "keep_every_steps": K(0, "also keep checkpoint-<step>.pth every N steps; 0 = none", min=0),
        "export_backbone": K(True, "write backbone.pth (dense names, torch layout) at the end"),
    },
}


def validate_config(cfg: Config) -> None:
    """Cross-key checks (called by ``load_config``): things no single key can know."""
    from .backbones import is_backbone, list_backbones
    if not is_backbone(cfg.model.backbone):  # a registered name or any timm convnet name
        import difflib
        close = difflib.get_close_matches(cfg.model.backbone, list_backbones(), n=3)
        raise ConfigError(f"model.backbone={cfg.model.backbone!r}: unknown backbone"
                          + (f" (did you mean {' or '.join(close)}?)" if close else "")
                          + f"; choose one of: {', '.join(list_backbones())}")
    if cfg.train.warmup_epochs > cfg.train.epochs:
        raise ConfigError(f"train.warmup_epochs={cfg.train.warmup_epochs}: expected <= train.epochs="
                          f"{cfg.train.epochs}")
    knn.check_config(cfg)


def stream_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed for one named random stream at one position (e.g. ``("drop_path", rank, step, micro)``)."""
    digest = hashlib.blake2b(":".join(str(p) for p in (seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def build_model(cfg: Config) -> torch.nn.Module:
    """SparK around the configured backbone (built from its name, so checkpoints can describe it)."""
    from .spark import SparK
    return SparK(cfg.model.backbone, input_size=cfg.model.img_size, mask_ratio=cfg.model.mask_ratio,
                 decoder_width=cfg.model.decoder_width, densify_norm=cfg.model.densify_norm or None,
                 sparse=cfg.model.sparse, init=cfg.model.init, drop_path_rate=cfg.model.drop_path_rate,
                 **dict(cfg.model.backbone_kwargs))


def build_optimizer(model: torch.nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """LAMB (timm) over SparK's parameter groups (no decay on 1-D params, biases, mask tokens, gamma)."""
    from timm.optim import Lamb
    from .spark import param_groups
    # clipping is done by the shared optimizer_step (after unscaling fp16 grads), not inside LAMB
    return Lamb(param_groups(model, cfg.optim.weight_decay), lr=lr, betas=tuple(cfg.optim.betas),
                weight_decay=cfg.optim.weight_decay, max_grad_norm=None)


def _convert_sync_bn(model: torch.nn.Module) -> torch.nn.Module:
    from .sparse.convert import convert_sync_batchnorm  # converts the sparse BN too
    return convert_sync_batchnorm(model)


def _backbone_prefix(model: torch.nn.Module) -> str:
    for name, module in model.named_modules():
        if module is model.backbone:
            return name + "."
    raise RuntimeError("the model's backbone is not one of its sub-modules")


def pretrain(cfg: Config, guard=None) -> dict:
    """Pre-train with a resolved config; returns a summary (paths, losses, steps) on every rank.

    ``guard``: a ``PreemptionGuard`` (the CLI installs one for SIGTERM / SIGUSR1); tests may
    pass one and call ``guard.request()``. Raises ``NonFiniteLossError`` (with where the last
    good checkpoint is), ``ConfigError`` / ``DataError`` for unusable settings.
    """
    from .utils.preemption import PreemptionGuard
    if guard is None:
        with PreemptionGuard() as g:
            return pretrain(cfg, guard=g)
    holder: dict = {}
    try:
        return _pretrain(cfg, guard, holder)
    finally:
        if holder.get("run_dir") is not None:
            holder["run_dir"].release()
        dist_utils.cleanup()


def _knn_monitor(cfg: Config, model, device, steps_per_epoch: int, logger, say, amp):
    """The k-NN monitor of the run (``eval.*``), or None when ``eval.knn_root`` resolves to off."""
    if not knn.knn_root_of(cfg):
        return None

    def random_backbone():  # the encoder this run started from (same seed, same init), for resumed runs
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(cfg.seed, "init"))
            return build_model(cfg).backbone

    return knn.PretrainKnn(cfg, model, device, steps_per_epoch, logger.log, say, amp.autocast, random_backbone)


def _pretrain(cfg: Config, guard, holder: dict) -> dict:
    from .data import ResumableBatchSampler, build_pretrain_dataset, sample_seed
    from .engine_pretrain import TrainState, train_one_epoch
    from .export import export_backbone
    from .utils.amp import load_scaler_state, resolve_amp
    from .utils.checkpoint import (FORMAT_VERSION, NonFiniteStateError, checkpoint_name, resume_auto,
                                   require_checkpoint_kind, load_checkpoint, non_finite_tensors, remove_orphan_temps, save_checkpoint,
                                   unwrap_model)
    from .utils.config import save_config
    from .utils.logger import RunLogger
    from .utils.schedules import WarmupCosine, cosine_weight_decay

    validate_config(cfg)
    if cfg.train.cpu_threads > 0:
        torch.set_num_threads(cfg.train.cpu_threads)
    info = dist_utils.init_distributed(cfg.device, timeout_s=cfg.train.dist_timeout)
    device, is_main = info.device, info.is_main
    say = print if is_main else (lambda *a, **k: None)
    out_dir = cfg.output_dir
    if is_main:
        from .utils.rundir import prepare_run_dir
        holder["run_dir"] = prepare_run_dir(out_dir, cfg.resume, log=say)  # never overwrite a run; one per folder
        orphans = remove_orphan_temps(out_dir)
        if orphans:
            say(f"removed {len(orphans)} temporary file(s) left by an interrupted write in {out_dir}")
        save_config(cfg, out_dir)
    amp = resolve_amp(cfg.train.amp, device)
    scaler = amp.make_scaler()
    autotune.configure(cfg.train.conv_backend, cfg.train.autotune_cache)

    # ---- model: the same init on every rank
    torch.manual_seed(stream_seed(cfg.seed, "init"))
    model = build_model(cfg).to(device)
    if info.distributed and cfg.train.sync_bn:
        if device.type == "cuda":
            model = _convert_sync_bn(model)
        else:
            say("note: SyncBatchNorm needs CUDA; on CPU each process keeps its own BatchNorm statistics")
    from .utils import device_perf
    perf = device_perf.apply_perf_settings(device, model)  # cudnn.benchmark / channels-last: the one decision

    # ---- data
    dataset = build_pretrain_dataset(cfg.data.root, model.input_size, scale=cfg.aug.scale, hflip=cfg.aug.hflip,
                                     mean=cfg.data.mean, std=cfg.data.std, builtin_images=cfg.data.builtin_images,
                                     builtin_size=cfg.data.builtin_size, max_pixels=cfg.data.max_pixels)
    sampler = ResumableBatchSampler(len(dataset), cfg.data.batch_size, info.world_size, info.rank,
                                    accum_steps=cfg.optim.accum_steps, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0)

    # ---- optimisation
    global_batch = sampler.global_batch
    lr = cfg.optim.lr * global_batch / cfg.optim.lr_base_batch
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = max(1, int(round(cfg.train.epochs * steps_per_epoch)))
    warmup_steps = min(total_steps, int(round(cfg.train.warmup_epochs * steps_per_epoch)))
    lr_schedule = WarmupCosine(lr, lr * cfg.optim.lr_end_factor, total_steps, warmup_steps,
                               warmup_start=lr * cfg.optim.lr_start_factor)
    wd_schedule = cosine_weight_decay(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total_steps)
    optimizer = build_optimizer(model, cfg, lr)
    state = TrainState()

    # ---- resume / init
    run_id, ck, resume_path = None, None, None
    if cfg.resume == "auto":
        resume_path, ck = resume_auto(out_dir, log=say)  # raises when checkpoints exist but none loads
        if resume_path is None:
            say(f"resume=auto: no checkpoint in {out_dir} yet, starting from scratch")
    elif cfg.resume:
        resume_path, ck = cfg.resume, load_checkpoint(cfg.resume, check_finite=True)
    if ck is not None:
        require_checkpoint_kind(ck, resume_path, ["spark-pretrain"], "resume")  # names an fgvc / other file as such
        if not isinstance(ck, dict) or "train_state" not in ck or "model" not in ck:
            raise ConfigError(f"resume={resume_path!r} is not a pre-training checkpoint of this toolkit (no "
                              "'model' / 'train_state'); use model.pretrained=PATH to start from its weights")
        step = int(ck["train_state"].get("step", 0))
        if step > total_steps:
            raise ConfigError(
                f"resume: {resume_path} is at step {step}, past the end of this schedule ({total_steps} steps = "
                f"train.epochs={cfg.train.epochs} x {steps_per_epoch} steps per epoch); resume with the run's "
                f"train.epochs (or more), or start a new run in another output_dir")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        load_scaler_state(scaler, ck.get("scaler"))
        state.load_state_dict(ck["train_state"])
        run_id = ck.get("wandb_run_id")
        if ck.get("global_batch") not in (None, global_batch):
            say(f"warning: resuming with global batch {global_batch}, the checkpoint used {ck['global_batch']}: "
                "the data order after the resume point differs from the original run")
        say(f"resumed from {resume_path} at step {state.step}/{total_steps}")
        ck = None
    if cfg.model.pretrained and resume_path is None:
        from .spark import load_spark_checkpoint
        from .utils.checkpoint import check_state_finite
        start = load_checkpoint(cfg.model.pretrained, check_finite=True)
        require_checkpoint_kind(start, cfg.model.pretrained, ["spark-pretrain", "spark-weights", "unknown"],
                                "model.pretrained")
        check_state_finite(start, f"model.pretrained={cfg.model.pretrained!r}")
        load_spark_checkpoint(model, start)

    train_model = model
    if info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    logger = RunLogger(out_dir, cfg, project=cfg.wandb.project, name=cfg.wandb.name,
                       entity=cfg.wandb.entity or None, run_id=run_id, enabled=is_main, job_type="pretrain",
                       use_wandb=cfg.wandb.enabled)
    logger.log_config({"amp_resolved": amp.as_dict()})  # what train.amp picked on this hardware (bf16/fp16/fp32)
    logger.log_config({"perf": perf.as_dict()})
    prefix = _backbone_prefix(model)
    spark_args = model.init_args()
    last_path = os.path.join(out_dir, "last.pth")
    saved = {"step": None, "path": None}

    def save(kind: str = "last") -> str | None:
        """Write a checkpoint on rank 0; every rank agrees first that the state is finite."""
        model_state = unwrap_model(model).state_dict()
        opt_state = optimizer.state_dict()
        bad = non_finite_tensors({"model": model_state, "optimizer": opt_state}) if is_main else []
        n_bad = int(dist_utils.all_reduce_sum(torch.tensor([float(len(bad))], device=device))[0])
        if n_bad:
            good = (f"the last good checkpoint is {saved['path']} (step {saved['step']})" if saved["path"] else
                    (f"the last good checkpoint is {last_path}" if os.path.isfile(last_path) else
                     "no good checkpoint was written in this run"))
            raise NonFiniteStateError(
                f"step {state.step}: the training state became non-finite ({n_bad} tensor(s), e.g. "
                f"{', '.join(bad[:3]) or 'on rank 0'}); nothing was written, {good}. Usual fixes: lower "
                "optim.lr, keep optim.clip_grad on, or train.amp=off; then resume=auto")
        path = None
        if is_main:
            ck = {"model": model_state, "optimizer": opt_state, "train_state": state.state_dict(),
                  "spark": spark_args, "config": cfg.to_dict(), "wandb_run_id": logger.run_id,
                  "world_size": info.world_size, "global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
                  "total_steps": total_steps, "backbone_prefix": prefix, "format": "sparse_mim.pretrain",
                  "format_version": FORMAT_VERSION}
            if scaler is not None:
                ck["scaler"] = scaler.state_dict()
            path = os.path.join(out_dir, checkpoint_name(state.step) if kind == "keep" else "last.pth")
            save_checkpoint(ck, path, check_finite=False)  # checked above, on the same tensors
            saved.update(step=state.step, path=path)
        return path

    vis_items = [(i % len(dataset), sample_seed(cfg.seed, -1, i)) for i in range(cfg.log.vis_images)]
    last_png = [None]

    def visualize(step: int) -> None:
        if not is_main or not vis_items:
            return
        batch = [dataset[k] for k in vis_items]
        images = torch.stack([b[0] for b in batch]).to(device)
        visible = model.masks_from_seeds([b[1] for b in batch], device)
        was_training = model.training
        model.eval()
        with amp.autocast():
            grid = reconstruction_grid(model, images, visible, mean=cfg.data.mean, std=cfg.data.std)
        model.train(was_training)
        last_png[0] = logger.log_image("reconstruction", grid.float().clamp(0, 1), step,
                                       caption="masked input | reconstruction | original")

    ckpt_every, keep_every = cfg.checkpoint.every_steps, cfg.checkpoint.keep_every_steps
    vis_every = cfg.log.vis_every

    settled = [False]

    def on_step(st) -> None:
        if not settled[0]:  # the first step met every training shape: every rank takes rank 0's kernel choices
            settled[0] = True
            logger.log_config({"autotune": autotune.settle(say)})
        if vis_every > 0 and st.step % vis_every == 0:
            visualize(st.step)
        if keep_every > 0 and st.step % keep_every == 0:
            save("keep")
        if ckpt_every > 0 and st.step % ckpt_every == 0:
            save("last")
        if knn_monitor is not None:
            knn_monitor.step(st)

    stop_at = cfg.train.stop_at_step

    def should_stop(st) -> bool:
        if guard.should_stop(device):  # collective: every rank asks after every step
            return True
        return bool(stop_at and st.step >= stop_at)

    say(f"SparK {cfg.model.backbone} ({'sparse' if cfg.model.sparse else 'dense-masked'}), "
        f"{count_parameters(model) / 1e6:.2f} M params ({count_parameters(model.backbone) / 1e6:.2f} M backbone), "
        f"input {list(model.input_size)}, {len(dataset)} images, {info.world_size} process(es) on {device.type}, "
        f"{amp.describe()}, {perf.describe()}, global batch {global_batch}, lr {lr:.3g}, {total_steps} steps ({steps_per_epoch}/epoch), "
        f"output {out_dir}")

    knn_monitor = _knn_monitor(cfg, model, device, steps_per_epoch, logger, say, amp)
    if knn_monitor is not None:
        knn_monitor.start(state)
    stopped, preempted = False, False
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
            stats = train_one_epoch(
                model, loader, optimizer, lr_schedule, state, wd_schedule=wd_schedule, train_model=train_model,
                amp=amp, scaler=scaler, accum_steps=cfg.optim.accum_steps, clip_grad=cfg.optim.clip_grad,
                seed=cfg.seed, rank=info.rank, steps_this_epoch=remaining, should_stop=should_stop,
                on_step=on_step, log_fn=logger.log, log_every=cfg.log.every, progress=cfg.log.progress and is_main,
                peer_timeout=cfg.train.dist_timeout if info.distributed else None)
            if guard.requested:
                preempted = True
                save("last")
                dist_utils.barrier()  # nobody exits (and gets the job step killed) before rank 0 has written
                say(f"pre-empted ({guard.signal_name}) after step {state.step}/{total_steps}: wrote {last_path}; "
                    "run again with resume=auto to continue")
                break
            if stop_at and state.step >= stop_at:
                stopped = True
                break
            epoch_done = state.step - epoch * steps_per_epoch >= steps_per_epoch
            if epoch_done or state.step >= total_steps:
                save("last")
                epoch_means.append((epoch, stats["loss"]))
                say(f"epoch {epoch} done: step {state.step}/{total_steps}, mean loss {stats['loss']:.4f}, "
                    f"unreadable images skipped so far: {state.failed_images}")
            if state.step >= total_steps:
                break
    except NonFiniteLossError as e:
        logger.finish()
        if not isinstance(e, NonFiniteStateError):
            kept = (f"the last good checkpoint is {saved['path'] or last_path}" if saved["path"] or
                    os.path.isfile(last_path) else "no checkpoint was written before it")
            e.args = (f"{e.args[0]} ({kept})",) + e.args[1:]
        raise

    summary = {"output_dir": out_dir, "step": state.step, "total_steps": total_steps,
               "first_loss": state.first_loss, "last_loss": state.last_loss, "history": list(state.history),
               "failed_images": state.failed_images, "skipped_steps": state.skipped_steps,
               "wandb_run_id": logger.run_id, "epoch_means": epoch_means,
               "checkpoint": saved["path"] or (last_path if os.path.isfile(last_path) else None),
               "backbone": None, "reconstruction_png": None, "stopped_early": stopped or preempted,
                "preempted": preempted, "stop_signal": guard.signal_name if preempted else None, "knn": None}
    if knn_monitor is not None and not (stopped or preempted):
        knn_monitor.end(state)
        summary["knn"] = knn_monitor.results
    if not (stopped or preempted):
        if is_main:
            visualize(state.step)
            summary["reconstruction_png"] = last_png[0]
            if cfg.checkpoint.export_backbone:
                bb_path = os.path.join(out_dir, "backbone.pth")
                export_backbone(unwrap_model(model), bb_path)
                summary["backbone"] = bb_path
                logger.log_artifact(bb_path, name=f"{cfg.wandb.name}-{cfg.model.backbone}-backbone", type="model",
                                    metadata={"backbone": cfg.model.backbone, "step": state.step,
                                              "input_size": list(model.input_size)})
            logger.summary({"final_loss": state.last_loss, "failed_images": state.failed_images})
            if knn_monitor is not None:
                logger.summary(knn_monitor.summary())
        dist_utils.barrier()
    wandb_dir = logger.wandb_dir
    logger.finish()
    if is_main and not preempted:
        _print_summary(summary, state, epoch_means, (time.time() - t0) / 60, out_dir, wandb_dir)
    return summary


def _print_summary(summary, state, epoch_means, minutes, out_dir, wandb_dir) -> None:
    if epoch_means:
        print("mean loss per epoch: " + "  ".join(f"{e}: {l:.4f}" for e, l in epoch_means))
    if state.first_loss is not None:
        print(f"loss {state.first_loss:.4f} (first step) -> {state.last_loss:.4f} (step {state.step}), "
              f"{minutes:.1f} min; unreadable images skipped: {state.failed_images}")
    knn_results = summary.get("knn")
    if knn_results and knn_results.get("end") and knn_results.get("random_init"):
        base, end = knn_results["random_init"], knn_results["end"]
        print(f"k-NN top-1 {base['top1']:.1f} % (random init) -> {end['top1']:.1f} % (step {end['step']}); "
              f"top-5 {base['top5']:.1f} % -> {end['top5']:.1f} %")
    print(f"  config:          {os.path.join(out_dir, 'config.yaml')}")
    print(f"  checkpoint:      {summary['checkpoint']}")
    if summary["backbone"]:
        print(f"  backbone:        {summary['backbone']}  (loads strict=True into the dense torchvision/timm model)")
    if summary["reconstruction_png"]:
        print(f"  reconstructions: {summary['reconstruction_png']}  (masked | reconstruction | original)")
    print(f"  metrics:         {os.path.join(out_dir, 'metrics.jsonl')}")
    mode = os.environ.get("WANDB_MODE", "offline")
    if wandb_dir:
        print(f"  wandb run:       {os.path.dirname(wandb_dir)} (mode {mode}; upload with `wandb sync`)")
    else:
        print(f"  wandb:           disabled (WANDB_MODE={mode})")
