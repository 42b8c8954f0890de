"""Fine-tune MetaFormer (or a convnet + meta-token hybrid) on a fine-grained dataset with meta.

``train(cfg) -> summary`` runs one job from a resolved config (``DEFAULTS`` below, loaded
with :func:`sparse_mim.utils.config.load_config`; the command line is ``fgvc-train`` /
``tools/train_fgvc.py``, see :mod:`fgvc.cli`). It builds data, model, optimizer, schedule,
amp policy, logger and checkpoints; :mod:`fgvc.engine` runs the steps.

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

import json
import os
import time
from typing import Callable, Dict, Optional

import torch

from fgvc.builders import (build_mixup, build_model, build_optimizer, build_splits, eval_loader as _eval_loader,
                           model_meta_spec, resolve_data_config)
from sparse_mim.utils.config import Config, ConfigError, K

__all__ = ["DEFAULTS", "train", "validate_config", "DEMO_DIR_NAME", "Preempted"]

DEMO_DIR_NAME = "demo_data"
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


class Preempted(Exception):
    """Raised inside the loop by a stop request; never escapes :func:`train`."""


def _agree(flag: bool, device: torch.device) -> bool:
    """True on every process if ``flag`` is true on any (one all-reduce; the flag itself with one process)."""
    from sparse_mim.utils.distributed import all_reduce_sum, is_distributed
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device if device.type == "cuda" else "cpu")
    return bool(all_reduce_sum(t).item() > 0)


def _write_json(path: str, obj) -> None:
    from sparse_mim.utils.checkpoint import atomic_write_text
    atomic_write_text(path, json.dumps(obj, indent=2))


# --------------------------------------------------------------------------------------- main
def train(cfg: Config, log: Callable = print) -> Dict:
    """Run one fine-tuning job from a resolved config; returns the final summary dict.

    A run stopped by a pre-emption signal or ``train.stop_at_step`` writes ``last.pth`` and
    returns ``{"stopped": True, "preempted": <signal or None>, "step": ...}``; the CLI turns a
    pre-emption into the requeue exit status. A folder that already holds a run raises
    :class:`~sparse_mim.utils.rundir.RunDirError` unless ``resume`` is set.
    """
    from sparse_mim.utils.checkpoint import remove_orphan_temps
    from sparse_mim.utils.distributed import cleanup, init_distributed
    from sparse_mim.utils.rundir import prepare_run_dir

    validate_config(cfg)
    if cfg.train.cpu_threads > 0:
        torch.set_num_threads(cfg.train.cpu_threads)
    dist_info = init_distributed(cfg.device, timeout_s=cfg.train.dist_timeout)
    is_main, device = dist_info.is_main, dist_info.device
    say = log if is_main else (lambda *_: None)
    out_dir = cfg.output_dir
    run_dir, error = None, None
    if is_main:
        try:
            run_dir = prepare_run_dir(out_dir, cfg.resume, log=say)
            remove_orphan_temps(out_dir)
        except Exception as e:  # noqa: BLE001 - re-raised below on this rank, after telling the others
            error = e
    if _agree(error is not None, device):
        cleanup()
        if error is not None:
            raise error
        raise RuntimeError("the main process refused the output folder (see its message)")
    try:
        return _train(cfg, log, say, dist_info, run_dir)
    finally:
        if run_dir is not None:
            run_dir.release()
        cleanup()


def _train(cfg, log, say, dist_info, run_dir) -> Dict:
    from torch.utils.data import DataLoader
    from fgvc.data import FGVCDataset, build_transform, collate_skip_bad
    from fgvc.engine import (RandomStreams, ResumableSampler, SeededDataset, TrainState, evaluate,
                             meta_dropout_prob, train_one_epoch)
    from sparse_mim.utils.amp import load_scaler_state, resolve_amp
    from sparse_mim.utils.checkpoint import (checkpoint_name, load_checkpoint, resume_auto, save_checkpoint,
                                             unwrap_model)
    from sparse_mim.utils.config import save_config
    from sparse_mim.utils.distributed import barrier
    from sparse_mim.utils.logger import RunLogger
    from sparse_mim.utils.misc import count_parameters
    from sparse_mim.utils import device_perf
    from sparse_mim.utils.preemption import PreemptionGuard

    is_main, device, rank, world = dist_info.is_main, dist_info.device, dist_info.rank, dist_info.world_size
    out_dir = cfg.output_dir

    # ---- resume: the newest loadable, finite checkpoint (a truncated last.pth falls back to a keep)
    ckpt, resume_path = None, None
    if cfg.resume == "auto":
        resume_path, ckpt = resume_auto(out_dir, log=say)  # raises when checkpoints exist but none loads
        if resume_path is None:
            say(f"[resume] resume=auto: no checkpoint in {out_dir} yet, starting a new run")
    elif cfg.resume:
        resume_path, ckpt = cfg.resume, load_checkpoint(cfg.resume, check_finite=True)
    state = TrainState()
    if ckpt is not None:
        from sparse_mim.utils.checkpoint import CheckpointError, require_checkpoint_kind
        require_checkpoint_kind(ckpt, resume_path, ["fgvc"], "resume")  # a SparK / MetaFormer file named as such
        if "optimizer" not in ckpt or "train_state" not in ckpt:
            raise CheckpointError(f"resume: {resume_path} holds the weights only (best.pth keeps no optimizer "
                                  f"state); resume from the run's last.pth, or start a new run from these weights")
        state.load_state_dict(ckpt["train_state"])
        final_path = os.path.join(out_dir, "final.json")
        if state.epoch >= cfg.train.epochs and os.path.isfile(final_path):
            say(f"[resume] {out_dir} holds a finished run ({state.epoch}/{cfg.train.epochs} epochs, final.json): "
                f"nothing to do; start a new run with another output_dir")
            with open(final_path) as f:
                return dict(json.load(f), already_finished=True)
        if state.epoch > cfg.train.epochs:
            raise ConfigError(f"the checkpoint {resume_path} is at epoch {state.epoch}, beyond "
                              f"train.epochs={cfg.train.epochs}; resume with train.epochs >= {state.epoch}")

    # ---- data (demo data generated on the main process, into the run's own folder)
    demo_dir = os.path.join(out_dir, DEMO_DIR_NAME)
    if is_main:
        data_cfg = resolve_data_config(cfg.data.to_dict(), demo_dir, log=say)
    barrier()
    if not is_main:
        data_cfg = resolve_data_config(cfg.data.to_dict(), demo_dir, generate=False)
    train_rec, val_rec, test_rec = build_splits(data_cfg, say)
    if train_rec.name.endswith("/train_mini") and cfg.data.train_split != "train_mini":
        cfg.data.train_split = "train_mini"  # the fall-back the reader took: the saved config records what was read
    select_rec, select_name = (val_rec, "val") if val_rec is not None else (test_rec, "test")
    if val_rec is None:
        say("[note] data.val_split=0: the best epoch is picked on the TEST split (official protocol); "
            "the reported test accuracy is then optimistic.")
    groups = train_rec.meta_groups
    a = cfg.aug
    bs, accum = data_cfg["batch_size"], cfg.optim.accum_steps
    train_tf = build_transform(True, cfg.model.img_size, rand_augment=a.rand_augment, reprob=a.reprob,
                               scale=a.scale, hflip=a.hflip)
    train_ds = SeededDataset(FGVCDataset(train_rec, train_tf, train=True), cfg.seed)
    if len(train_ds) // world < bs * accum:
        raise ValueError(f"train split has {len(train_ds)} images: fewer than one step per process "
                         f"(data.batch_size={bs} x optim.accum_steps={accum} x {world} process(es)); "
                         f"lower data.batch_size")
    sampler = ResumableSampler(train_ds, num_replicas=world, rank=rank, seed=cfg.seed)
    if data_cfg.get("sampler", "uniform") != "uniform":  # class-balanced / square-root (fgvc.longtail)
        from fgvc.longtail import ClassAwareSampler
        sampler = ClassAwareSampler(train_rec.labels, data_cfg["sampler"], num_replicas=world, rank=rank,
                                    seed=cfg.seed)
    nw, pin = data_cfg["num_workers"], device.type == "cuda"
    train_loader = DataLoader(train_ds, batch_size=bs, sampler=sampler, drop_last=True, num_workers=nw,
                              collate_fn=collate_skip_bad, pin_memory=pin)
    ebs = data_cfg["eval_batch_size"]
    select_loader = _eval_loader(select_rec, cfg.model.img_size, ebs, nw, rank, world, pin)
    test_loader = _eval_loader(test_rec, cfg.model.img_size, ebs, nw, rank, world, pin)
    batches_per_epoch = len(train_ds) // world // bs
    updates_per_epoch = batches_per_epoch // accum

    # ---- model, optimizer, schedule, precision
    torch.manual_seed(RandomStreams(cfg.seed).seed_for("init"))  # the same initial weights on every rank and run
    model = build_model(cfg.model, train_rec.num_classes, groups, init_weights=ckpt is None,
                        classes=list(train_rec.classes), log=say).to(device)
    perf = device_perf.apply_perf_settings(device, model)  # cudnn.benchmark / channels-last, as pre-training
    say(f"[model] {cfg.model.name}: {count_parameters(model) / 1e6:.2f}M params, {train_rec.num_classes} classes, "
        f"meta groups {model_meta_spec(groups)}; train {len(train_rec)} / {select_name} {len(select_rec)} / "
        f"test {len(test_rec)} images")
    total_batch = bs * accum * world
    scale = total_batch / cfg.optim.lr_base_batch
    lr, min_lr, warmup_lr = cfg.optim.lr * scale, cfg.optim.min_lr * scale, cfg.optim.warmup_lr * scale
    total_steps = updates_per_epoch * cfg.train.epochs
    from fgvc.optim import build_lr_schedule, describe_param_groups
    lr_schedule = build_lr_schedule(cfg.optim, lr, min_lr, warmup_lr, total_steps,
                                    min(updates_per_epoch * cfg.train.warmup_epochs, total_steps), updates_per_epoch)
    if state.step > total_steps:
        raise ConfigError(f"the checkpoint {resume_path} is at step {state.step}, beyond the {total_steps} steps of "
                          f"train.epochs={cfg.train.epochs} at this batch size; resume with the run's own "
                          f"train.epochs / data.batch_size / optim.accum_steps")
    optimizer = build_optimizer(model, cfg.optim, lr)
    amp = resolve_amp(cfg.train.amp, device)
    scaler = amp.make_scaler()
    say(f"[setup] {amp.describe()}; {perf.describe()}; total batch {total_batch} -> peak lr {lr:.3g}; "
        f"{updates_per_epoch} steps/epoch; {describe_param_groups(optimizer)}")
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3
        from fgvc.average import ema_warning
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=cfg.train.ema_warmup)
        warning = ema_warning(ema, total_steps)
        if warning:
            say(f"[warning] {warning}")
    from fgvc.longtail import build_loss, class_counts
    train_counts = class_counts(train_rec.labels, train_rec.num_classes)
    mixup, criterion = build_mixup(cfg.aug, train_rec.num_classes)
    criterion = build_loss(criterion, cfg.train.loss, train_counts, cfg.train.logit_tau)

    wandb_id = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        load_scaler_state(scaler, ckpt.get("scaler"))
        if ema is not None and "model_ema" in ckpt:
            ema.module.load_state_dict(ckpt["model_ema"])
        wandb_id = ckpt.get("wandb_id") or None
        from fgvc.report import position
        where = position(state.epoch, state.batch, cfg.train.epochs, batches_per_epoch)
        say(f"[resume] {resume_path}: step {state.step}, {where}, "
            f"best {select_name} top1 {state.best['top1']:.2f}")
    del ckpt

    train_model = model
    if dist_info.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if is_main:
        save_config(cfg, out_dir)
    from sparse_mim.utils.logger import new_run_id
    wandb_id = wandb_id or new_run_id()
    logger = RunLogger(out_dir, cfg, project=cfg.wandb.project, name=cfg.wandb.name or None,
                       entity=cfg.wandb.entity or None, run_id=wandb_id, enabled=is_main, use_wandb=cfg.wandb.enabled,
                       job_type="fgvc-train", log_model=cfg.wandb.log_model, group=cfg.wandb.group or wandb_id)
    logger.log_config({"amp_resolved": amp.as_dict()})  # what train.amp picked on this hardware (bf16/fp16/fp32)
    meta_info = {"classes": list(train_rec.classes), "meta_groups": model_meta_spec(groups),
                 "train_class_counts": train_counts.tolist(), "wandb_group": cfg.wandb.group or wandb_id}
    streams = RandomStreams(cfg.seed, rank)

    def eval_model():
        return ema.module if ema is not None else model

    def checkpoint_state(weights=None) -> Dict:
        return {"model": weights if weights is not None else unwrap_model(model).state_dict(),
                "config": cfg.to_dict(), "train_state": state.state_dict(), **meta_info}

    def save_last(path=None):
        if not is_main:
            return
        st = checkpoint_state()
        st.update(optimizer=optimizer.state_dict(), wandb_id=logger.run_id)
        if scaler is not None:
            st["scaler"] = scaler.state_dict()
        if ema is not None:
            st["model_ema"] = ema.module.state_dict()
        save_checkpoint(st, path or os.path.join(out_dir, "last.pth"))

    every, keep = cfg.checkpoint.every_steps, cfg.checkpoint.keep_every_steps

    def on_step(s):
        if every and s.step % every == 0:
            save_last()
        if keep and s.step % keep == 0:
            save_last(os.path.join(out_dir, checkpoint_name(s.step)))

    preempt = PreemptionGuard()
    stop_at = cfg.train.stop_at_step

    def should_stop(s) -> bool:  # collective (every rank calls it after the same step)
        signalled = preempt.should_stop(device if device.type == "cuda" else "cpu")
        return signalled or bool(stop_at and s.step >= stop_at)

    epochs = cfg.train.epochs
    try:
        with preempt:
            while state.epoch < epochs:
                epoch = state.epoch
                sampler.set_epoch(epoch)
                sampler.set_start(state.batch * bs)
                train_ds.set_epoch(epoch)
                t0 = time.time()
                p_drop = meta_dropout_prob(epoch, epochs) if cfg.train.meta_dropout and groups else 0.0
                stats = train_one_epoch(
                    train_model, train_loader, optimizer, lr_schedule, state, criterion=criterion, epochs=epochs,
                    streams=streams, amp=amp, scaler=scaler, mixup=mixup, ema=ema, accum_steps=accum,
                    clip_grad=cfg.optim.clip_grad, meta_drop_p=p_drop, batches_per_epoch=batches_per_epoch,
                    should_stop=should_stop, on_step=on_step, log_fn=logger.log, log_every=cfg.log.every,
                    progress=cfg.log.progress and is_main,
                    peer_timeout=cfg.train.dist_timeout if dist_info.distributed else None)
                if stats["stopped"]:
                    raise Preempted()
                state.epoch, state.batch = epoch + 1, 0
                row = {"epoch": epoch + 1, "train/loss": stats["loss"], "train/lr": stats["lr"],
                       "train/images_per_s": stats["images_per_s"], "train/meta_drop_p": stats["meta_drop_p"],
                       "train/skipped_images": stats["skipped"], "time/epoch_s": time.time() - t0}
                if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs:
                    from fgvc.dashboard import evaluate_detailed, evaluation_row, log_evaluation
                    lg = cfg.log
                    ev = evaluate_detailed(eval_model(), select_loader, device, train_rec.num_classes, amp=amp,
                                           confusion_max=lg.confusion_max_classes, samples=lg.sample_predictions)
                    row.update(evaluation_row(ev, select_name, train_counts))
                    if ema is not None:  # the raw weights too: the EMA is not always the better one
                        row[f"{select_name}/top1_raw"] = evaluate(model, select_loader, device, amp=amp)["top1"]
                    if cfg.train.eval_meta_zeroed and groups:
                        ev0 = evaluate(eval_model(), select_loader, device, meta_mode="zero", amp=amp)
                        row[f"{select_name}/top1_meta_zeroed"] = ev0["top1"]
                    if ev["top1"] > state.best["top1"]:
                        state.best = {"top1": ev["top1"], "top5": ev["top5"], "epoch": epoch + 1}
                        if is_main:
                            save_checkpoint(checkpoint_state(unwrap_model(eval_model()).state_dict()),
                                            os.path.join(out_dir, "best.pth"))
                    row[f"{select_name}/best_top1"] = state.best["top1"]
                if is_main:
                    logger.log(row, state.step)
                    if f"{select_name}/top1" in row:
                        log_evaluation(logger, ev, select_name, state.step, train_rec.classes, select_rec, train_counts)
                    msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                    say(f"[epoch {epoch + 1}/{epochs}] {msg}")
                save_last()
                barrier()
                if state.epoch < epochs and should_stop(state):
                    raise Preempted()
    except Preempted:
        save_last()
        barrier()
        why = preempt.signal_name if preempt.requested else f"train.stop_at_step={stop_at}"
        from fgvc.report import position
        where = position(state.epoch, state.batch, epochs, batches_per_epoch)
        say(f"[stop] {why}: stopped after step {state.step} ({where}); "
            f"last.pth written; continue with resume=auto")
        logger.finish()
        return {"stopped": True, "preempted": preempt.signal_name if preempt.requested else None,
                "step": state.step, "epoch": state.epoch, "batch": state.batch}

    # ---- the honest number: the test split evaluated once, with the weights picked on the held-out split
    summary = {"best_epoch": state.best["epoch"], f"best_{select_name}_top1": state.best["top1"],
               "selected_on": select_name}
    best_path = os.path.join(out_dir, "best.pth")
    if os.path.isfile(best_path):
        final_model = build_model(cfg.model, train_rec.num_classes, groups, init_weights=False).to(device)
        final_model.load_state_dict(load_checkpoint(best_path, check_finite=True)["model"])
    else:
        final_model = eval_model()
    from fgvc.dashboard import evaluate_detailed, evaluation_row
    ev = evaluate_detailed(final_model, test_loader, device, train_rec.num_classes, amp=amp, confusion_max=0,
                           samples=0)
    from fgvc.report import split_label
    summary.update({"test/top1": ev["top1"], "test/top5": ev["top5"], "test/n": ev["n"],
                    "test_split": f"{test_rec.name}: {split_label(data_cfg['dataset'])}"})
    summary.update({k: v for k, v in evaluation_row(ev, "test", train_counts).items()
                    if k.rsplit("/", 1)[1] in ("mean_per_class_top1", "many_shot", "medium_shot", "few_shot")})
    if ema is not None:  # the raw (non-EMA) weights at the end of training, for comparison
        summary["test/top1_raw_last"] = evaluate(model, test_loader, device, amp=amp)["top1"]
    if groups:
        ev0 = evaluate(final_model, test_loader, device, meta_mode="zero", amp=amp)
        summary["test/top1_meta_zeroed"] = ev0["top1"]
    if is_main:
        say(f"[final] best epoch {state.best['epoch']} ({select_name} top1 {state.best['top1']:.2f}); "
            f"{split_label(data_cfg['dataset'])} ({test_rec.name}) top1 "
            f"{summary['test/top1']:.2f}" + (f", meta zeroed {summary['test/top1_meta_zeroed']:.2f}" if groups else ""))
        _write_json(os.path.join(out_dir, "final.json"), summary)
        logger.summary(summary)
        if os.path.isfile(best_path):
            logger.log_model(best_path, name=f"fgvc-{cfg.model.name}-{logger.run_id}", metadata=summary,
                             aliases=["best"])
    logger.finish()
    return summary
