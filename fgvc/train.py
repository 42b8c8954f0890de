"""Fine-tune MetaFormer (or a convnet + meta-token hybrid) on a fine-grained dataset with meta.

``train(cfg) -> summary`` runs one job from a resolved config (``DEFAULTS`` below, loaded
with :func:`sparse_mim.utils.config.load_config`; the command line is ``fgvc-train`` /
``tools/train_fgvc.py``, see :mod:`fgvc.cli`). It builds the task (data, model, optimizer,
schedule, amp policy, evaluation) on the shared run skeleton
(:class:`sparse_mim.utils.training_run.TrainingRun`: run folder, resume, checkpoints, stops,
logging); :mod:`fgvc.finetune_loop` runs the steps, :mod:`fgvc.eval_loop` evaluates.

Model selection is honest by default: ``data.val_split`` (0.1) holds out a stratified,
seeded part of the training set; the best epoch is chosen on it and the test split is
evaluated once at the end with the best weights. ``data.val_split=0`` reproduces the
official code (best epoch picked on the test set; the number is then optimistic).

Outputs in ``output_dir``: ``config.yaml`` (resolved), ``last.pth`` (every epoch, every
``checkpoint.every_steps`` steps and on pre-emption; ``resume=auto`` continues from it),
``best.pth`` (weights + config + classes + meta layout: what evaluation and prediction
read), ``metrics.jsonl``, ``final.json``, ``wandb/``. A folder that already holds a run is
never overwritten (:func:`sparse_mim.utils.rundir.prepare_run_dir`).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional

import torch

from fgvc.builders import (build_mixup, build_model, build_optimizer, build_splits, eval_loader,
                           model_meta_spec, resolve_data_config)
from fgvc.demo import DEMO_DIR_NAME
from sparse_mim.utils.config import Config, ConfigError, K

__all__ = ["DEFAULTS", "train", "validate_config", "DEMO_DIR_NAME"]

_DATASETS = ("cub", "nabirds", "inat2017", "inat2018", "inat2021", "custom")

DEFAULTS = {
    "output_dir": K("outputs/fgvc", "folder of this run (checkpoints, metrics, config); never overwritten"),
    "seed": K(0, "random seed: every random stream (augmentation, Mixup, meta dropout, drop path, order) derives "
                 "from it", min=0),
    "device": K("auto", "where to run (auto: CUDA when available)", choices=("auto", "cuda", "cpu")),
    "resume": K("", "'' = a new run; auto = continue the newest loadable checkpoint in output_dir; or a .pth path"),
    "model": {
        "name": K("metaformer_0", "fgvc model name (fgvc.list_models(): metaformer_0/1/2, metaformer_tiny, "
                                  "metaformer_resnet50, ...)"),
        "img_size": K(224, "input size in pixels, an int or [h, w]; each side a multiple of 32",
                      check=lambda v: _img_size_error(v)),
        "drop_path_rate": K(0.1, "stochastic depth rate, linear over the blocks", min=0.0, lt=1.0),
        "pretrained": K("", "official MetaFormer file (ImageNet / iNat21 pre-trained); heads re-made as needed"),
        "init_backbone": K("", "sparse_mim exported backbone for the hybrids (metaformer_resnet50, ...)"),
        "kwargs": K(None, "extra fgvc.create_model arguments, a mapping (e.g. {attn_impl: explicit})", nullable=True,
                    check=lambda v: None if v is None or isinstance(v, dict) else "a mapping like {attn_impl: sdpa}"),
    },
    "data": {
        "dataset": K("custom", "dataset layout (custom: your CSVs)", choices=_DATASETS),
        "root": K("", "dataset folder (nothing is hard-coded)"),
        "demo": K(False, "use the generated demo dataset (written only into <output_dir>/demo_data)"),
        "use_meta": K(True, "false: image-only model and data"),
        "attributes": K(False, "CUB: + the 312-d attribute token"),
        "text_dir": K("", "CUB: caption embeddings from tools/prepare_text_meta.py (+ 32 caption tokens)"),
        "use_hour": K(True, "iNat: encode the hour when the date has one"),
        "train_split": K("train", "iNat 2021 training annotations",
                         choices=("train", "train_mini")),
        "train_csv": K("", "custom: training CSV (relative to data.root)"),
        "test_csv": K("", "custom: test CSV (relative to data.root)"),
        "image_root": K("", "custom: folder the CSV paths are relative to (default: the CSV's folder)"),
        "path_column": K("path", "custom: image path column"),
        "label_column": K("label", "custom: label column (class names or integer indices)"),
        "meta_groups": K([], "custom: [{name, type: date|month_hour|latlon|numeric, columns: [...]}]"),
        "num_classes": K(0, "custom with integer labels: class count (0 = max label + 1)", min=0),
        "val_split": K(0.1, "held-out fraction of train for model selection; 0 = select on test (official)",
                       min=0.0, lt=1.0),
        "split_seed": K(0, "seed of the held-out split", min=0),
        "check_files": K(True, "stat every listed image once at start-up"),
        "strict": K(False, "any data issue (bad line, out-of-range meta, missing image) is an error"),
        "num_workers": K(8, "data-loader worker processes per training process", min=0),
        "batch_size": K(32, "images per process and step", min=1),
        "eval_batch_size": K(64, "images per process in evaluation", min=1),
        "sampler": K("uniform", "training sampler: uniform (every image once per epoch), class_balanced (every "
                                "class equally likely) or sqrt (class probability ~ sqrt of its image count); the "
                                "last two draw with replacement", choices=("uniform", "class_balanced", "sqrt")),
    },
    "aug": {
        "scale": K([0.08, 1.0], "RandomResizedCrop area range", length=2, item_gt=0.0, item_max=1.0,
                   check=lambda v: None if v[0] <= v[1] else "[min, max] with min <= max"),
        "hflip": K(0.5, "horizontal flip probability", min=0.0, max=1.0),
        "rand_augment": K("rand-m9-mstd0.5", "timm RandAugment spec ('' = off)"),
        "reprob": K(0.25, "random erasing probability", min=0.0, max=1.0),
        "mixup": K(0.8, "Mixup alpha (0 = off)", min=0.0),
        "cutmix": K(1.0, "CutMix alpha (0 = off)", min=0.0),
        "mixup_prob": K(1.0, "probability of mixing a batch", min=0.0, max=1.0),
        "mixup_switch_prob": K(0.5, "probability of CutMix instead of Mixup when both are on", min=0.0, max=1.0),
        "smoothing": K(0.1, "label smoothing", min=0.0, lt=1.0),
    },
    "optim": {
        "lr": K(1e-4, "peak learning rate at optim.lr_base_batch images per step (scaled by total batch / it)",
                gt=0.0),
        "min_lr": K(1e-5, "final learning rate of the cosine (scaled like lr)", min=0.0),
        "warmup_lr": K(5e-7, "learning rate at step 0 of the warm-up (scaled like lr)", min=0.0),
        "lr_base_batch": K(512, "total batch the lr values refer to", min=1),
        "weight_decay": K(0.05, "AdamW weight decay (none on 1-D params, biases, class tokens)", min=0.0),
        "betas": K([0.9, 0.999], "AdamW betas", length=2, item_min=0.0, item_lt=1.0),
        "eps": K(1e-8, "AdamW eps", gt=0.0),
        "clip_grad": K(5.0, "global gradient-norm clip (0 = off)", min=0.0),
        "accum_steps": K(1, "micro-batches per optimizer step", min=1),
        "opt": K("adamw", "optimizer (timm names): adamw, sgd (Nesterov momentum), momentum (plain SGD with "
                          "momentum), lamb", choices=("adamw", "sgd", "momentum", "lamb")),
        "momentum": K(0.9, "SGD momentum (opt=sgd / momentum)", min=0.0, lt=1.0),
        "layer_decay": K(1.0, "layer-wise lr decay (timm --layer-decay): layer i of L gets lr * layer_decay^(L-i), "
                              "blocks of the conv and token stages input first, head on top (1 = off)",
                         gt=0.0, max=1.0),
        "backbone_lr_mult": K(1.0, "lr multiplier of the conv part (MetaFormer's stem + MBConv stages, a hybrid's "
                                   "convnet trunk)", min=0.0),
        "sched": K("cosine", "lr schedule after the warm-up: cosine (to min_lr) or step (x decay_rate every "
                             "decay_epochs)", choices=("cosine", "step")),
        "decay_epochs": K(30, "step schedule: epochs between lr drops", min=1),
        "decay_rate": K(0.1, "step schedule: lr factor at each drop", gt=0.0, max=1.0),
    },
    "train": {
        "epochs": K(300, "training epochs", min=1),
        "warmup_epochs": K(20, "linear lr warm-up epochs", min=0),
        "meta_dropout": K(True, "the official linear meta-dropout schedule p = 1 - epoch / epochs"),
        "amp": K("auto", "mixed precision (auto picks bf16 / fp16 / fp32 from the hardware)", choices=("auto", "bf16", "fp16", "off")),
        "ema": K(False, "keep an EMA of the weights (timm ModelEmaV3); evaluation and best.pth use it"),
        "ema_decay": K(0.9998, "EMA decay per step", gt=0.0, lt=1.0),
        "ema_warmup": K(True, "ramp the EMA decay up as timm's ModelEmaV3 does (1 - (1 + step)^-2/3, capped at "
                              "ema_decay), so the EMA follows the weights on a short run"),
        "loss": K("ce", "training loss: ce, logit_adjusted (Menon et al. 2021: logits + logit_tau * log class "
                        "prior during training) or balanced_softmax (the same with logit_tau = 1)",
                  choices=("ce", "logit_adjusted", "balanced_softmax")),
        "logit_tau": K(1.0, "temperature of the logit-adjusted loss", min=0.0),
        "cpu_threads": K(0, "torch intra-op threads on CPU (0 = torch default)", min=0),
        "eval_every": K(1, "evaluate every N epochs (and after the last)", min=1),
        "eval_meta_zeroed": K(False, "also report accuracy with meta zeroed at every evaluation"),
        "stop_at_step": K(0, "debugging / tests: stop after this optimizer step as if pre-empted (0 = off)", min=0),
        "dist_timeout": K(600, "seconds a process waits for the others before naming the silent rank(s)", gt=0),
    },
    "log": {
        "every": K(20, "log the running loss every N optimizer steps", min=1),
        "progress": K(True, "progress bars"),
        "sample_predictions": K(16, "images in the sample-prediction table at every evaluation (0 = none)", min=0),
        "confusion_max_classes": K(100, "log the confusion matrix at every evaluation up to this many classes",
                                   min=0),
    },
    "wandb": {
        "enabled": K(True, "log to Weights & Biases (mode from WANDB_MODE, offline by default)"),
        "project": K("fgvc", "wandb project"),
        "name": K("", "wandb run name"),
        "entity": K("", "wandb entity"),
        "group": K("", "wandb group ('' = the training run's id); fgvc-eval runs join their training run's group"),
        "log_model": K("auto", "best.pth to wandb: auto = upload when online, nothing offline; reference = a "
                                        "file:// link, no copy",
                       choices=("auto", "off", "reference", "upload")),
    },
    "checkpoint": {
        "every_steps": K(0, "also write last.pth every N optimizer steps (0 = at epoch ends only)", min=0),
        "keep_every_steps": K(0, "also keep a copy checkpoint-<step>.pth every N optimizer steps (0 = none); "
                                 "resume=auto falls back to the newest one when last.pth is damaged", min=0),
    },
}


def _img_size_error(v) -> Optional[str]:
    sizes = list(v) if isinstance(v, (list, tuple)) else [v]
    if len(sizes) not in (1, 2) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 and s % 32 == 0
                                           for s in sizes):
        return "a positive multiple of 32, or [h, w] of them"
    return None


def validate_config(cfg: Config) -> None:
    """Cross-key checks (single keys are checked by their ``K`` ranges when the config loads)."""
    if cfg.train.warmup_epochs > cfg.train.epochs:
        raise ConfigError(f"train.warmup_epochs={cfg.train.warmup_epochs} is longer than "
                          f"train.epochs={cfg.train.epochs}; it must be at most train.epochs")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr} is above optim.lr={cfg.optim.lr}; the cosine decays "
                          f"from lr to min_lr")
    if cfg.train.loss == "balanced_softmax" and cfg.train.logit_tau != 1.0:
        raise ConfigError(f"train.loss=balanced_softmax is the logit-adjusted loss with logit_tau=1, but "
                          f"train.logit_tau={cfg.train.logit_tau}; use train.loss=logit_adjusted for another tau")
    if cfg.data.dataset != "custom" and cfg.data.demo:
        raise ConfigError(f"data.demo=true generates a custom-layout dataset but data.dataset={cfg.data.dataset!r}; "
                          f"set data.demo=false to train on {cfg.data.dataset}")


# --------------------------------------------------------------------------------------- main
def train(cfg: Config, log: Callable = print, guard=None) -> Dict:
    """Run one fine-tuning job from a resolved config; returns the final summary dict (also ``final.json``).

    The run folder, resume, checkpoints and stops are the shared run skeleton's
    (:class:`sparse_mim.utils.training_run.TrainingRun`, as in pre-training). ``guard``: a
    ``PreemptionGuard`` (tests may pass one and call ``guard.request()``), else one is installed.
    A run stopped by a pre-emption signal or ``train.stop_at_step`` writes ``last.pth`` and returns
    ``{"stopped": True, "preempted": <a signal?>, "stop_signal": <its name>, "step": ...}``; the CLI
    turns a pre-emption into the requeue exit status. A folder that already holds a run raises
    :class:`~sparse_mim.utils.rundir.RunDirError` unless ``resume`` is set.
    """
    from sparse_mim.utils.training_run import TrainingRun
    validate_config(cfg)
    with TrainingRun(cfg, kind="fgvc", job_type="fgvc-train", format="fgvc.train", weights_option="model.pretrained",
                     guard=guard, log=log) as run:
        return _FineTuning(cfg, run).execute()


class _FineTuning:
    """The task half of a fine-tuning run (data, model, optimizer, one epoch, evaluation, the final test)
    on a :class:`~sparse_mim.utils.training_run.TrainingRun` (folder, resume, checkpoints, stops)."""

    def __init__(self, cfg: Config, run):
        self.cfg, self.run, self.say, self.device = cfg, run, run.say, run.device
        self.state = run.state

    def execute(self) -> Dict:
        from sparse_mim.utils.streams import RandomStreams
        cfg, run = self.cfg, self.run
        ck = run.load_resume()
        self._build_data()
        self._build_model(init_weights=ck is None)
        self._build_optimization()
        run.attach(self.model, self.optimizer, self.scaler, total_steps=self.total_steps,
                   steps_per_epoch=self.updates_per_epoch, accum_steps=self.accum, global_batch=self.total_batch,
                   info=self.meta_info, extra_state=self._ema_state, where=self._where)
        finished = run.restore(ck, schedule=f"train.epochs={cfg.train.epochs} at this batch size; resume with the "
                                            f"run's own train.epochs / data.batch_size / optim.accum_steps")
        if finished is not None:
            return finished
        if ck is not None and self.ema is not None and "model_ema" in ck:
            self.ema.module.load_state_dict(ck["model_ema"])
        del ck
        self.train_model = self.model
        if run.dist.distributed:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        group = cfg.wandb.group or run.wandb_run_id  # fgvc-eval runs of its checkpoints join this group
        self.logger = run.open_logger(amp=self.amp, log_model=cfg.wandb.log_model, group=group)
        run.info["wandb_group"] = group
        self.streams = RandomStreams(cfg.seed, run.rank)
        if run.train(self._run_epoch, self._end_epoch):
            return run.summary()
        return self._final_test()

    def _build_data(self) -> None:
        from torch.utils.data import DataLoader
        from fgvc.data import FGVCDataset, build_transform, collate_skip_bad
        from fgvc.finetune_loop import SeededDataset
        from sparse_mim.utils.distributed import barrier
        cfg, run, say = self.cfg, self.run, self.say
        demo_dir = os.path.join(run.out_dir, DEMO_DIR_NAME)  # demo data: generated by rank 0, into the run's folder
        data_cfg = resolve_data_config(cfg.data.to_dict(), demo_dir, log=say) if run.is_main else None
        barrier()
        if not run.is_main:
            data_cfg = resolve_data_config(cfg.data.to_dict(), demo_dir, generate=False)
        self.data_cfg = data_cfg
        self.train_rec, val_rec, self.test_rec = build_splits(data_cfg, say)
        if self.train_rec.name.endswith("/train_mini") and cfg.data.train_split != "train_mini":
            cfg.data.train_split = "train_mini"  # the fall-back the reader took: the saved config records what was read
            run.save_config()
        self.select_rec, self.select_name = (val_rec, "val") if val_rec is not None else (self.test_rec, "test")
        if val_rec is None:
            say("[note] data.val_split=0: the best epoch is picked on the TEST split (official protocol); "
                "the reported test accuracy is then optimistic.")
        a, world = cfg.aug, run.world_size
        self.bs, self.accum = data_cfg["batch_size"], cfg.optim.accum_steps
        train_tf = build_transform(True, cfg.model.img_size, rand_augment=a.rand_augment, reprob=a.reprob,
                                   scale=a.scale, hflip=a.hflip)
        self.train_ds = SeededDataset(FGVCDataset(self.train_rec, train_tf, train=True), cfg.seed)
        if len(self.train_ds) // world < self.bs * self.accum:
            raise ValueError(f"train split has {len(self.train_ds)} images: fewer than one step per process "
                             f"(data.batch_size={self.bs} x optim.accum_steps={self.accum} x {world} process(es)); "
                             f"lower data.batch_size")
        self.sampler = self._build_sampler()
        nw, pin, ebs = data_cfg["num_workers"], self.device.type == "cuda", data_cfg["eval_batch_size"]
        self.train_loader = DataLoader(self.train_ds, batch_size=self.bs, sampler=self.sampler, drop_last=True,
                                       num_workers=nw, collate_fn=collate_skip_bad, pin_memory=pin)
        self.select_loader = eval_loader(self.select_rec, cfg.model.img_size, ebs, nw, run.rank, world, pin)
        self.test_loader = eval_loader(self.test_rec, cfg.model.img_size, ebs, nw, run.rank, world, pin)
        self.batches_per_epoch = len(self.train_ds) // world // self.bs
        self.updates_per_epoch = self.batches_per_epoch // self.accum

    def _build_sampler(self):
        from sparse_mim.utils.streams import ResumableSampler
        run, mode = self.run, self.data_cfg.get("sampler", "uniform")
        if mode == "uniform":
            return ResumableSampler(len(self.train_ds), run.world_size, run.rank, seed=self.cfg.seed)
        from fgvc.longtail import ClassAwareSampler  # class-balanced / square-root
        return ClassAwareSampler(self.train_rec.labels, mode, num_replicas=run.world_size, rank=run.rank,
                                 seed=self.cfg.seed)

    def _build_model(self, init_weights: bool) -> None:
        from sparse_mim.utils import device_perf
        from sparse_mim.utils.misc import count_parameters
        cfg, rec = self.cfg, self.train_rec
        self.groups = rec.meta_groups
        torch.manual_seed(self.run.init_seed)  # the same initial weights on every rank and run
        self.model = build_model(cfg.model, rec.num_classes, self.groups, init_weights=init_weights,
                                 classes=list(rec.classes), log=self.say).to(self.device)
        self.perf = device_perf.apply_perf_settings(self.device, self.model)  # cudnn.benchmark / channels-last
        self.say(f"[model] {cfg.model.name}: {count_parameters(self.model) / 1e6:.2f}M params, {rec.num_classes} "
                 f"classes, meta groups {model_meta_spec(self.groups)}; train {len(rec)} / {self.select_name} "
                 f"{len(self.select_rec)} / test {len(self.test_rec)} images")

    def _build_optimization(self) -> None:
        from fgvc.longtail import build_loss, class_counts
        from fgvc.optim import build_lr_schedule, describe_param_groups
        from sparse_mim.utils.amp import resolve_amp
        cfg, rec, upe = self.cfg, self.train_rec, self.updates_per_epoch
        self.total_batch = self.bs * self.accum * self.run.world_size
        scale = self.total_batch / cfg.optim.lr_base_batch
        lr, min_lr, warmup_lr = cfg.optim.lr * scale, cfg.optim.min_lr * scale, cfg.optim.warmup_lr * scale
        self.total_steps = upe * cfg.train.epochs
        self.lr_schedule = build_lr_schedule(cfg.optim, lr, min_lr, warmup_lr, self.total_steps,
                                             min(upe * cfg.train.warmup_epochs, self.total_steps), upe)
        self.optimizer = build_optimizer(self.model, cfg.optim, lr)
        self.amp = resolve_amp(cfg.train.amp, self.device)
        self.scaler = self.amp.make_scaler()
        self.say(f"[setup] {self.amp.describe()}; {self.perf.describe()}; total batch {self.total_batch} -> peak lr "
                 f"{lr:.3g}; {upe} steps/epoch; {describe_param_groups(self.optimizer)}")
        self.ema = None
        if cfg.train.ema:
            from timm.utils import ModelEmaV3
            from fgvc.average import ema_warning
            self.ema = ModelEmaV3(self.model, decay=cfg.train.ema_decay, use_warmup=cfg.train.ema_warmup)
            warning = ema_warning(self.ema, self.total_steps)
            if warning:
                self.say(f"[warning] {warning}")
        self.train_counts = class_counts(rec.labels, rec.num_classes)
        self.mixup, criterion = build_mixup(cfg.aug, rec.num_classes)
        self.criterion = build_loss(criterion, cfg.train.loss, self.train_counts, cfg.train.logit_tau)
        self.meta_info = {"classes": list(rec.classes), "meta_groups": model_meta_spec(self.groups),
                          "train_class_counts": self.train_counts.tolist()}

    # ---- per epoch
    def _ema_state(self) -> Dict:
        return {"model_ema": self.ema.module.state_dict()} if self.ema is not None else {}

    def _where(self, state) -> str:
        from fgvc.report import position
        return position(state.epoch, state.batch, self.cfg.train.epochs, self.batches_per_epoch)

    def _eval_model(self):
        return self.ema.module if self.ema is not None else self.model

    def _run_epoch(self, epoch: int, start: int, steps: int) -> Dict:
        from fgvc.finetune_loop import meta_dropout_prob, train_one_epoch
        cfg, run, epochs = self.cfg, self.run, self.cfg.train.epochs
        self.sampler.set_epoch(epoch, self.state.batch * self.bs)
        self.train_ds.set_epoch(epoch)
        self.epoch_t0 = time.time()
        p_drop = meta_dropout_prob(epoch, epochs) if cfg.train.meta_dropout and self.groups else 0.0
        return train_one_epoch(
            self.train_model, self.train_loader, self.optimizer, self.lr_schedule, self.state,
            criterion=self.criterion, epochs=epochs, streams=self.streams, amp=self.amp, scaler=self.scaler,
            mixup=self.mixup, ema=self.ema, accum_steps=self.accum, clip_grad=cfg.optim.clip_grad, meta_drop_p=p_drop,
            batches_per_epoch=self.batches_per_epoch, should_stop=run.should_stop, on_step=run.on_step,
            log_fn=self.logger.log, log_every=cfg.log.every, progress=cfg.log.progress and run.is_main,
            peer_timeout=cfg.train.dist_timeout if run.dist.distributed else None)

    def _end_epoch(self, epoch: int, stats: Dict) -> None:
        cfg, run, epochs = self.cfg, self.run, self.cfg.train.epochs
        row = {"epoch": epoch + 1, "train/loss": stats["loss"], "train/lr": stats["lr"],
               "train/images_per_s": stats["images_per_s"], "train/meta_drop_p": stats["meta_drop_p"],
               "train/skipped_images": stats["skipped"], "time/epoch_s": time.time() - self.epoch_t0}
        ev = None
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs:
            ev = self._evaluate_selection(row, epoch)
        if run.is_main:
            self.logger.log(row, self.state.step)
            if ev is not None:
                from fgvc.dashboard import log_evaluation
                log_evaluation(self.logger, ev, self.select_name, self.state.step, self.train_rec.classes,
                               self.select_rec, self.train_counts)
            msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            self.say(f"[epoch {epoch + 1}/{epochs}] {msg}")
        run.save("last")

    def _evaluate_selection(self, row: Dict, epoch: int) -> Dict:
        """Evaluate on the selection split into ``row``; a new best writes ``best.pth``."""
        from fgvc.dashboard import evaluate_detailed, evaluation_row
        from fgvc.eval_loop import evaluate
        from sparse_mim.utils.checkpoint import unwrap_model
        lg, name, loader, amp, st = self.cfg.log, self.select_name, self.select_loader, self.amp, self.state
        ev = evaluate_detailed(self._eval_model(), loader, self.device, self.train_rec.num_classes, amp=amp,
                               confusion_max=lg.confusion_max_classes, samples=lg.sample_predictions)
        row.update(evaluation_row(ev, name, self.train_counts))
        if self.ema is not None:  # the raw weights too: the EMA is not always the better one
            row[f"{name}/top1_raw"] = evaluate(self.model, loader, self.device, amp=amp)["top1"]
        if self.cfg.train.eval_meta_zeroed and self.groups:
            row[f"{name}/top1_meta_zeroed"] = evaluate(self._eval_model(), loader, self.device, meta_mode="zero",
                                                       amp=amp)["top1"]
        if ev["top1"] > st.best["top1"]:
            st.best = {"top1": ev["top1"], "top5": ev["top5"], "epoch": epoch + 1}
            self.run.save("best", weights=unwrap_model(self._eval_model()).state_dict())
        row[f"{name}/best_top1"] = st.best["top1"]
        return ev

    # ---- the end: the honest number, the test split evaluated once with the weights picked on the held-out split
    def _final_test(self) -> Dict:
        from fgvc.dashboard import evaluate_detailed, evaluation_row
        from fgvc.eval_loop import evaluate
        from fgvc.report import split_label
        run, st, amp, name, loader = self.run, self.state, self.amp, self.select_name, self.test_loader
        final_model = self._best_model()
        ev = evaluate_detailed(final_model, loader, self.device, self.train_rec.num_classes, amp=amp,
                               confusion_max=0, samples=0)
        summary = {"best_epoch": st.best["epoch"], f"best_{name}_top1": st.best["top1"], "selected_on": name,
                   "test/top1": ev["top1"], "test/top5": ev["top5"], "test/n": ev["n"],
                   "test_split": f"{self.test_rec.name}: {split_label(self.data_cfg['dataset'])}"}
        summary.update({k: v for k, v in evaluation_row(ev, "test", self.train_counts).items()
                        if k.rsplit("/", 1)[1] in ("mean_per_class_top1", "many_shot", "medium_shot", "few_shot")})
        if self.ema is not None:  # the raw (non-EMA) weights at the end of training, for comparison
            summary["test/top1_raw_last"] = evaluate(self.model, loader, self.device, amp=amp)["top1"]
        if self.groups:
            summary["test/top1_meta_zeroed"] = evaluate(final_model, loader, self.device, meta_mode="zero",
                                                        amp=amp)["top1"]
        summary = run.summary(**summary)
        if run.is_main:
            self.say(f"[final] best epoch {st.best['epoch']} ({name} top1 {st.best['top1']:.2f}); "
                     f"{split_label(self.data_cfg['dataset'])} ({self.test_rec.name}) top1 {summary['test/top1']:.2f}"
                     + (f", meta zeroed {summary['test/top1_meta_zeroed']:.2f}" if self.groups else ""))
            run.finish(summary)
            self.logger.summary(summary)
            best_path = run.best_path
            if os.path.isfile(best_path):
                self.logger.log_model(best_path, name=f"fgvc-{self.cfg.model.name}-{self.logger.run_id}",
                                      metadata=summary, aliases=["best"])
        return summary

    def _best_model(self):
        from sparse_mim.utils.checkpoint import load_checkpoint
        best_path = self.run.best_path
        if not os.path.isfile(best_path):
            return self._eval_model()
        rec = self.train_rec
        model = build_model(self.cfg.model, rec.num_classes, self.groups, init_weights=False).to(self.device)
        model.load_state_dict(load_checkpoint(best_path, check_finite=True)["model"])
        return model
