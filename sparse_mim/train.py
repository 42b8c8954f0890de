"""SparK pre-training: the task wiring (``pretrain(cfg)``); the loop is ``pretrain_loop.train_one_epoch``.

``pretrain(cfg)`` takes a resolved config (``load_config(DEFAULTS, recipe, overrides)``) and
builds the task (model, data, optimizer, schedules, reconstruction grids, k-NN monitor,
``backbone.pth``) on the shared run skeleton (:class:`sparse_mim.utils.training_run.TrainingRun`:
run folder, resume, checkpoints ``last.pth`` every ``checkpoint.every_steps``, at every epoch end
and on a stop, ``checkpoint-<step>.pth`` keeps, stops, logging); returns a summary dict
(also written to ``final.json`` when the run reaches its end). The command line is ``sparse_mim.cli.pretrain``
(``tools/pretrain.py``, ``spark-pretrain``)::

    python tools/pretrain.py                                   # 2-minute CPU demo on built-in images
    python tools/pretrain.py -c configs/pretrain/resnet50.yaml data.root=/data/imagenet/train
    torchrun --nproc_per_node 8 tools/pretrain.py -c configs/pretrain/convnext_small.yaml data.root=...
    python tools/pretrain.py -c ... output_dir=runs/r50 resume=auto   # continue a stopped run

Guarantees (tested): a stopped and resumed run equals an uninterrupted one (every random
stream is a function of the seed and the position: crops and masks of the sample's place
in the epoch, drop-path of the step); every checkpoint holds finite values only; SIGTERM /
SIGUSR1 finish the current step, write ``last.pth`` and return with ``preempted=True``
(the CLI exits with status 75 for the batch script to requeue); ``train.stop_at_step`` does the
same without a signal.
"""
from __future__ import annotations

import os
import time
import warnings

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from . import knn
from .sparse import autotune
from .utils import distributed as dist_utils
from .utils.config import Config, ConfigError, K
from .utils.misc import count_parameters
from .utils.streams import stream_seed
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
        "stop_at_step": K(0, "debugging / tests: stop after this optimizer step as if pre-empted (writes last.pth); "
                             "0 = off", min=0),
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
    from .utils.training_run import TrainingRun
    validate_config(cfg)
    with TrainingRun(cfg, kind="spark-pretrain", job_type="pretrain", format="sparse_mim.pretrain",
                     weights_option="model.pretrained", guard=guard) as run:
        return _Pretraining(cfg, run).execute()


def _knn_monitor(cfg: Config, model, device, steps_per_epoch: int, logger, say, amp, init_seed: int):
    """The k-NN monitor of the run (``eval.*``), or None when ``eval.knn_root`` resolves to off."""
    if not knn.knn_root_of(cfg):
        return None

    def random_backbone():  # the encoder this run started from (same seed, same init), for resumed runs
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return build_model(cfg).backbone

    return knn.PretrainKnn(cfg, model, device, steps_per_epoch, logger.log, say, amp.autocast, random_backbone)


class _Pretraining:
    """The task half of a pre-training run (data, model, optimizer, one epoch, pictures, backbone export)
    on a :class:`~sparse_mim.utils.training_run.TrainingRun` (folder, resume, checkpoints, stops)."""

    def __init__(self, cfg: Config, run):
        self.cfg, self.run, self.say, self.device = cfg, run, run.say, run.device
        self.state = run.state
        self.epoch_means: list = []
        self.last_png = None
        self.settled = False

    def execute(self) -> dict:
        from .utils.amp import resolve_amp
        cfg, run = self.cfg, self.run
        ck = run.load_resume()
        self.amp = resolve_amp(cfg.train.amp, self.device)
        self.scaler = self.amp.make_scaler()
        autotune.configure(cfg.train.conv_backend, cfg.train.autotune_cache)
        self._build_model()
        self._build_data()
        self._build_optimization()
        run.attach(self.model, self.optimizer, self.scaler, total_steps=self.total_steps,
                   steps_per_epoch=self.steps_per_epoch, accum_steps=cfg.optim.accum_steps,
                   global_batch=self.global_batch, info={"spark": self.model.init_args(),
                                                         "backbone_prefix": _backbone_prefix(self.model)})
        finished = run.restore(ck, schedule=f"train.epochs={cfg.train.epochs} x {self.steps_per_epoch} steps per "
                                            f"epoch; resume with the run's train.epochs (or more)")
        if finished is not None:
            return finished
        del ck
        if cfg.model.pretrained and run.resume_path is None:
            self._load_pretrained()
        self.train_model = self.model
        if run.dist.distributed:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        self.logger = run.open_logger(amp=self.amp, perf=self.perf)
        self._describe()
        self.knn = _knn_monitor(cfg, self.model, self.device, self.steps_per_epoch, self.logger, self.say, self.amp,
                                run.init_seed)
        run.step_hooks += [self._settle, self._visualize_every]
        if self.knn is not None:
            run.step_hooks.append(self.knn.step)
            self.knn.start(self.state)
        t0 = time.time()
        if run.train(self._run_epoch, self._end_epoch):
            return run.summary(**self._results())
        return self._finish((time.time() - t0) / 60)

    def _build_model(self) -> None:
        cfg, run = self.cfg, self.run
        torch.manual_seed(run.init_seed)  # the same initial weights on every rank
        model = build_model(cfg).to(self.device)
        if run.dist.distributed and cfg.train.sync_bn:
            if self.device.type == "cuda":
                model = _convert_sync_bn(model)
            else:
                self.say("note: SyncBatchNorm needs CUDA; on CPU each process keeps its own BatchNorm statistics")
        from .utils import device_perf
        self.perf = device_perf.apply_perf_settings(self.device, model)  # cudnn.benchmark / channels-last
        self.model = model

    def _build_data(self) -> None:
        from .data import ResumableBatchSampler, build_pretrain_dataset, sample_seed
        cfg, d = self.cfg, self.cfg.data
        self.dataset = build_pretrain_dataset(
            d.root, self.model.input_size, scale=cfg.aug.scale, hflip=cfg.aug.hflip, mean=d.mean, std=d.std,
            builtin_images=d.builtin_images, builtin_size=d.builtin_size, max_pixels=d.max_pixels)
        self.sampler = ResumableBatchSampler(len(self.dataset), d.batch_size, self.run.world_size, self.run.rank,
                                             accum_steps=cfg.optim.accum_steps, seed=cfg.seed)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=d.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=d.num_workers > 0)
        self.vis_items = [(i % len(self.dataset), sample_seed(cfg.seed, -1, i)) for i in range(cfg.log.vis_images)]

    def _build_optimization(self) -> None:
        from .utils.schedules import WarmupCosine, cosine_weight_decay
        cfg, o = self.cfg, self.cfg.optim
        self.global_batch = self.sampler.global_batch
        self.lr = o.lr * self.global_batch / o.lr_base_batch
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = max(1, int(round(cfg.train.epochs * self.steps_per_epoch)))
        warmup_steps = min(self.total_steps, int(round(cfg.train.warmup_epochs * self.steps_per_epoch)))
        self.lr_schedule = WarmupCosine(self.lr, self.lr * o.lr_end_factor, self.total_steps, warmup_steps,
                                        warmup_start=self.lr * o.lr_start_factor)
        self.wd_schedule = cosine_weight_decay(o.weight_decay, o.weight_decay_end, self.total_steps)
        self.optimizer = build_optimizer(self.model, cfg, self.lr)

    def _load_pretrained(self) -> None:
        from .spark import load_spark_checkpoint
        from .utils.checkpoint import check_state_finite, load_checkpoint, require_checkpoint_kind
        path = self.cfg.model.pretrained
        start = load_checkpoint(path, check_finite=True)
        require_checkpoint_kind(start, path, ["spark-pretrain", "spark-weights", "unknown"], "model.pretrained")
        check_state_finite(start, f"model.pretrained={path!r}")
        load_spark_checkpoint(self.model, start)

    def _describe(self) -> None:
        cfg, m, run = self.cfg, self.model, self.run
        self.say(f"SparK {cfg.model.backbone} ({'sparse' if cfg.model.sparse else 'dense-masked'}), "
                 f"{count_parameters(m) / 1e6:.2f} M params ({count_parameters(m.backbone) / 1e6:.2f} M backbone), "
                 f"input {list(m.input_size)}, {len(self.dataset)} images, {run.world_size} process(es) on "
                 f"{self.device.type}, {self.amp.describe()}, {self.perf.describe()}, global batch "
                 f"{self.global_batch}, lr {self.lr:.3g}, {self.total_steps} steps ({self.steps_per_epoch}/epoch), "
                 f"output {run.out_dir}")

    # ---- per step / per epoch
    def _settle(self, state) -> None:
        if not self.settled:  # the first step met every training shape: every rank takes rank 0's kernel choices
            self.settled = True
            self.logger.log_config({"autotune": autotune.settle(self.say)})

    def _visualize_every(self, state) -> None:
        if self.cfg.log.vis_every > 0 and state.step % self.cfg.log.vis_every == 0:
            self._visualize(state.step)

    def _visualize(self, step: int) -> None:
        if not self.run.is_main or not self.vis_items:
            return
        cfg, model = self.cfg, self.model
        batch = [self.dataset[k] for k in self.vis_items]
        images = torch.stack([b[0] for b in batch]).to(self.device)
        visible = model.masks_from_seeds([b[1] for b in batch], self.device)
        was_training = model.training
        model.eval()
        with self.amp.autocast():
            grid = reconstruction_grid(model, images, visible, mean=cfg.data.mean, std=cfg.data.std)
        model.train(was_training)
        self.last_png = self.logger.log_image("reconstruction", grid.float().clamp(0, 1), step,
                                              caption="masked input | reconstruction | original")

    def _run_epoch(self, epoch: int, start: int, steps: int) -> dict:
        from .pretrain_loop import train_one_epoch
        cfg, run = self.cfg, self.run
        self.sampler.set_epoch(epoch, start)
        return train_one_epoch(
            self.model, self.loader, self.optimizer, self.lr_schedule, self.state, wd_schedule=self.wd_schedule,
            train_model=self.train_model, amp=self.amp, scaler=self.scaler, accum_steps=cfg.optim.accum_steps,
            clip_grad=cfg.optim.clip_grad, seed=cfg.seed, rank=run.rank, steps_this_epoch=steps,
            should_stop=run.should_stop, on_step=run.on_step, log_fn=self.logger.log, log_every=cfg.log.every,
            progress=cfg.log.progress and run.is_main,
            peer_timeout=cfg.train.dist_timeout if run.dist.distributed else None)

    def _end_epoch(self, epoch: int, stats: dict) -> None:
        st = self.state
        self.run.save("last")
        self.epoch_means.append((epoch, stats["loss"]))
        self.say(f"epoch {epoch} done: step {st.step}/{self.total_steps}, mean loss {stats['loss']:.4f}, "
                 f"unreadable images skipped so far: {st.failed_images}")

    # ---- the end
    def _results(self) -> dict:
        st, run = self.state, self.run
        saved = run.last_good_path()
        return {"first_loss": st.first_loss, "last_loss": st.last_loss, "history": list(st.history),
                "failed_images": st.failed_images, "skipped_steps": st.skipped_steps,
                "epoch_means": self.epoch_means, "checkpoint": saved, "backbone": None, "reconstruction_png": None,
                "knn": None}

    def _finish(self, minutes: float) -> dict:
        from .export import export_backbone
        from .utils.checkpoint import unwrap_model
        cfg, run, st = self.cfg, self.run, self.state
        summary = run.summary(**self._results())
        if self.knn is not None:
            self.knn.end(st)
            summary["knn"] = self.knn.results
        if run.is_main:
            self._visualize(st.step)
            summary["reconstruction_png"] = self.last_png
            if cfg.checkpoint.export_backbone:
                bb_path = os.path.join(run.out_dir, "backbone.pth")
                export_backbone(unwrap_model(self.model), bb_path)
                summary["backbone"] = bb_path
                self.logger.log_artifact(bb_path, name=f"{cfg.wandb.name}-{cfg.model.backbone}-backbone",
                                         type="model", metadata={"backbone": cfg.model.backbone, "step": st.step,
                                                                 "input_size": list(self.model.input_size)})
            self.logger.summary({"final_loss": st.last_loss, "failed_images": st.failed_images})
            if self.knn is not None:
                self.logger.summary(self.knn.summary())
        dist_utils.barrier()
        run.finish(summary)
        if run.is_main:
            _print_summary(summary, st, self.epoch_means, minutes, run.out_dir, self.logger.wandb_dir)
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
