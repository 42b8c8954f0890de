#!/usr/bin/env python
"""Fine-tune MetaFormer (or a convnet + meta-token hybrid) on a fine-grained dataset with meta.

    python tools/train_fgvc.py                                   # the CPU demo (configs/fgvc/demo.yaml)
    python tools/train_fgvc.py -c configs/fgvc/inat21_metaformer2_384.yaml data.root=/data/inat21
    torchrun --nproc_per_node 8 tools/train_fgvc.py -c configs/fgvc/cub_metaformer1_384.yaml data.root=/data/CUB_200_2011

Set-up only (the MAE split): this script reads the config, builds data, model,
optimizer, schedules, logger and checkpoints; ``fgvc/engine.py`` runs the epochs.

Model selection is honest by default: ``data.val_split`` (0.1) holds out a stratified,
seeded part of the training set; the best epoch is chosen on it and the test split is
evaluated once at the end with the best weights. ``data.val_split=0`` reproduces the
official code (best epoch picked on the test set; the number is then optimistic).

Outputs in ``output_dir``: ``config.yaml`` (resolved), ``last.pth`` (every epoch,
atomic; ``resume=auto`` continues from it), ``best.pth`` (weights + config + classes,
what ``tools/eval_fgvc.py`` reads), ``metrics.jsonl``, ``final.json``, ``wandb/``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

import torch  # noqa: E402

from sparse_mim.utils.checkpoint import (get_rng_state, load_checkpoint, resolve_resume, save_checkpoint,  # noqa: E402
                                         set_rng_state, unwrap_model)
from sparse_mim.utils.config import Config, parse_config, save_config  # noqa: E402
from sparse_mim.utils.distributed import (barrier, cleanup, get_world_size, init_distributed,  # noqa: E402
                                          seed_everything)
from sparse_mim.utils.misc import count_parameters  # noqa: E402
from sparse_mim.utils.schedules import WarmupCosine  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "fgvc", "demo.yaml")

DEFAULTS = {
    "output_dir": "outputs/fgvc",
    "resume": "",                 # "" | "auto" | path to a last.pth
    "model": {
        "name": "metaformer_0",
        "img_size": 224,
        "drop_path": 0.1,
        "pretrained": "",         # official MetaFormer file (ImageNet / iNat21 pre-trained): heads re-made as needed
        "init_backbone": "",      # sparse_mim exported backbone for the hybrids (metaformer_resnet50, ...)
        "kwargs": None,           # extra create_model kwargs (e.g. reduced widths for the demo)
    },
    "data": {
        "dataset": "custom",      # cub | nabirds | inat2017 | inat2018 | inat2021 | custom
        "root": "",
        "demo": False,            # generate the demo dataset into data.root first
        "use_meta": True,         # False: image-only model and data
        "attributes": False,      # CUB: 312-d attribute token
        "text_dir": "",           # CUB: caption embeddings from tools/prepare_text_meta.py
        "use_hour": True,         # iNat: encode the hour when the date has one
        "train_split": "train",   # iNat2021: train | train_mini
        "train_csv": "", "test_csv": "", "image_root": "",
        "path_column": "path", "label_column": "label",
        "meta_groups": [],        # custom: [{name, type: date|month_hour|latlon|numeric, columns: [...]}]
        "num_classes": 0,         # custom with integer labels: class count (0 = max label + 1)
        "val_split": 0.1,         # held-out fraction of train for model selection; 0 = select on test (official)
        "split_seed": 0,
        "check_files": True,
        "strict": False,          # any data issue -> error
        "num_workers": 8,
        "batch_size": 32,         # per process
        "eval_batch_size": 64,
    },
    "aug": {
        "scale": [0.08, 1.0],
        "hflip": 0.5,
        "rand_augment": "rand-m9-mstd0.5",
        "reprob": 0.25,
        "mixup": 0.8,
        "cutmix": 1.0,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "smoothing": 0.1,
    },
    "optim": {
        "lr": 1e-4,               # at total batch 512 (scaled by total batch / 512)
        "min_lr": 1e-5,
        "warmup_lr": 5e-7,
        "lr_base_batch": 512,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "clip_grad": 5.0,
        "accum_steps": 1,
    },
    "train": {
        "epochs": 300,
        "warmup_epochs": 20,
        "meta_dropout": True,
        "amp": True,              # CUDA only
        "amp_dtype": "float16",   # float16 (with a GradScaler) | bfloat16
        "ema": False,
        "ema_decay": 0.9998,
        "seed": 0,
        "device": "auto",
        "cpu_threads": 0,         # torch intra-op threads on CPU (0 = torch default; 1 is fastest for tiny models on busy CPUs)
        "eval_every": 1,
        "eval_meta_zeroed": False,  # also report accuracy with meta zeroed at every evaluation
        "stop_after_epoch": 0,    # debugging / tests: exit after this many epochs as if killed (0 = off)
        "log_every": 20,
        "progress": True,
    },
    "wandb": {
        "enabled": True,          # mode from WANDB_MODE (default offline)
        "project": "fgvc",
        "name": "",
        "entity": "",
    },
}


# --------------------------------------------------------------------------------------- data
def prepare_data_config(cfg: Config) -> Dict:
    """The ``data`` section as a plain dict; generates the demo dataset when asked."""
    data = cfg.data.to_dict()
    if data["demo"]:
        from fgvc.demo import demo_data_config, make_demo_dataset
        root = data["root"] or os.path.join(cfg.output_dir, "data")
        # an existing demo folder (any size: tests write smaller ones) is reused as it is
        exists = os.path.isfile(os.path.join(root, "demo.json"))
        demo = demo_data_config(root) if exists else make_demo_dataset(root)
        for k, v in demo.items():
            if k == "meta_groups" and data["meta_groups"]:
                continue
            data[k] = v
    return data


def build_splits(data_cfg: Dict, log=print):
    """(train records, selection records or None, test records); selection = held-out val or test."""
    from fgvc.data import build_records, stratified_split
    train = build_records(data_cfg, "train")
    test = build_records(data_cfg, "test")
    for rec in (train, test):
        if rec.issues:
            log(f"[data] {rec.name}: {len(rec.issues)} issue(s):\n{rec.issues.summary()}")
    if test.num_classes != train.num_classes:
        raise ValueError(f"train has {train.num_classes} classes but test has {test.num_classes}; "
                         f"both splits must share one label mapping")
    val = None
    if data_cfg["val_split"] > 0:
        tr_idx, val_idx = stratified_split(train.labels, data_cfg["val_split"], data_cfg["split_seed"])
        val = train.subset(val_idx)
        val.name = train.name + f"[val {data_cfg['val_split']:.0%}]"
        train = train.subset(tr_idx)
    return train, val, test


def build_loaders(cfg: Config, data_cfg: Dict, train_rec, eval_recs: List, dist_info):
    from torch.utils.data import DataLoader, DistributedSampler
    from fgvc.data import FGVCDataset, ShardSampler, build_transform, collate_skip_bad
    a = cfg.aug
    train_tf = build_transform(True, cfg.model.img_size, rand_augment=a.rand_augment, reprob=a.reprob,
                               scale=a.scale, hflip=a.hflip)
    eval_tf = build_transform(False, cfg.model.img_size)
    train_ds = FGVCDataset(train_rec, train_tf, train=True)
    sampler = DistributedSampler(train_ds, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True,
                                 seed=cfg.train.seed, drop_last=True)
    if len(train_ds) // dist_info.world_size < data_cfg["batch_size"] * cfg.optim.accum_steps:
        raise ValueError(f"train split has {len(train_ds)} images: fewer than one batch per process "
                         f"(batch_size={data_cfg['batch_size']} x accum_steps={cfg.optim.accum_steps}); "
                         f"lower data.batch_size")
    nw = data_cfg["num_workers"]
    common = dict(num_workers=nw, collate_fn=collate_skip_bad, pin_memory=dist_info.device.type == "cuda",
                  persistent_workers=False)
    train_loader = DataLoader(train_ds, batch_size=data_cfg["batch_size"], sampler=sampler, drop_last=True,
                              generator=torch.Generator(), **common)
    # evaluation: every process takes its own shard, counts are summed (fgvc.engine.evaluate)
    eval_loaders = [None if r is None else DataLoader(
        FGVCDataset(r, eval_tf, train=False), batch_size=data_cfg["eval_batch_size"],
        sampler=ShardSampler(len(r), dist_info.rank, dist_info.world_size), **common) for r in eval_recs]
    return train_loader, sampler, eval_loaders


# --------------------------------------------------------------------------------------- model
def build_model(cfg: Config, num_classes: int, meta_groups, init_weights: bool = True) -> torch.nn.Module:
    """``fgvc.create_model`` from the config; ``init_weights=False`` skips model.pretrained /
    model.init_backbone (when a full checkpoint is loaded next anyway)."""
    from fgvc.models import create_model, load_pretrained
    kwargs = dict(cfg.model.kwargs or {})
    if any(g.tokens > 1 for g in meta_groups):
        kwargs["meta_tokens"] = [g.tokens for g in meta_groups]
    if cfg.model.init_backbone and init_weights:
        if not cfg.model.name.startswith(("metaformer_resnet", "metaformer_convnext")):
            raise ValueError(f"model.init_backbone is for the convnet hybrids (metaformer_resnet50, "
                             f"metaformer_convnextv2_tiny, ...), not {cfg.model.name!r}; for MetaFormer files "
                             f"use model.pretrained")
        kwargs["init_backbone"] = cfg.model.init_backbone
    model = create_model(cfg.model.name, num_classes=num_classes, img_size=cfg.model.img_size,
                         meta_dims=[g.dim for g in meta_groups], drop_path_rate=cfg.model.drop_path, **kwargs)
    if cfg.model.pretrained and init_weights:
        load_pretrained(model, cfg.model.pretrained)
    return model


def model_meta_spec(meta_groups) -> List[Dict]:
    return [{"name": g.name, "dim": g.dim, "tokens": g.tokens} for g in meta_groups]


# --------------------------------------------------------------------------------------- main
def train(cfg: Config, log=print) -> Dict:
    """Run one training job from a resolved config; returns the final summary dict."""
    from fgvc.engine import evaluate, train_one_epoch
    from fgvc.models import param_groups_for_weight_decay
    from sparse_mim.utils.logger import RunLogger

    if cfg.train.cpu_threads > 0:
        torch.set_num_threads(cfg.train.cpu_threads)
    dist_info = init_distributed(cfg.train.device)
    is_main = dist_info.is_main
    device = dist_info.device
    out_dir = cfg.output_dir
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
    data_cfg = prepare_data_config(cfg) if is_main else None
    barrier()
    if not is_main:
        data_cfg = prepare_data_config(cfg)
    seed_everything(cfg.train.seed, dist_info.rank)

    train_rec, val_rec, test_rec = build_splits(data_cfg, log if is_main else (lambda *_: None))
    select_rec = val_rec if val_rec is not None else test_rec
    select_name = "val" if val_rec is not None else "test"
    if val_rec is None and is_main:
        log("[note] data.val_split=0: the best epoch is picked on the TEST split (official protocol); "
            "the reported test accuracy is then optimistic.")
    groups = train_rec.meta_groups
    train_loader, sampler, (select_loader, test_loader) = build_loaders(
        cfg, data_cfg, train_rec, [select_rec, test_rec], dist_info)

    model = build_model(cfg, train_rec.num_classes, groups).to(device)
    if is_main:
        log(f"[model] {cfg.model.name}: {count_parameters(model) / 1e6:.2f}M params, {train_rec.num_classes} classes, "
            f"meta groups {model_meta_spec(groups)}; train {len(train_rec)} / {select_name} {len(select_rec)} / "
            f"test {len(test_rec)} images")

    world = get_world_size()
    total_batch = data_cfg["batch_size"] * cfg.optim.accum_steps * world
    scale = total_batch / cfg.optim.lr_base_batch
    lr, min_lr, warmup_lr = cfg.optim.lr * scale, cfg.optim.min_lr * scale, cfg.optim.warmup_lr * scale
    updates_per_epoch = len(train_loader) // cfg.optim.accum_steps
    total_steps = updates_per_epoch * cfg.train.epochs
    lr_schedule = WarmupCosine(lr, min_lr, total_steps, min(updates_per_epoch * cfg.train.warmup_epochs, total_steps),
                               warmup_start=warmup_lr)
    optimizer = torch.optim.AdamW(param_groups_for_weight_decay(model, cfg.optim.weight_decay), lr=lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    amp = bool(cfg.train.amp) and device.type == "cuda"
    if cfg.train.amp_dtype not in ("float16", "bfloat16"):
        raise ValueError(f"train.amp_dtype must be float16 or bfloat16, got {cfg.train.amp_dtype!r}")
    amp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.train.amp_dtype]
    scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype == torch.float16 else None

    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)

    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    a = cfg.aug
    mixup_fn = None
    if a.mixup > 0 or a.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                         mode="batch", label_smoothing=a.smoothing, num_classes=train_rec.num_classes)
        criterion = SoftTargetCrossEntropy()
    elif a.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(a.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    # ---- resume
    start_epoch, step, best = 0, 0, {"top1": -1.0, "epoch": -1}
    wandb_id = None
    resume_path = resolve_resume(cfg.resume, out_dir)
    if resume_path:
        ckpt = load_checkpoint(resume_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and "model_ema" in ckpt:
            ema.module.load_state_dict(ckpt["model_ema"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        best = dict(ckpt.get("best", best))
        wandb_id = ckpt.get("wandb_id") or None
        if dist_info.rank == 0:
            set_rng_state(ckpt["rng"])  # only rank 0's state is saved; other ranks re-seed per epoch
        else:
            seed_everything(cfg.train.seed + 7919 * start_epoch, dist_info.rank)
        if is_main:
            log(f"[resume] {resume_path}: epoch {start_epoch}, step {step}, best {select_name} top1 {best['top1']:.2f}")

    train_model = model
    if dist_info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if is_main:
        save_config(cfg, out_dir)
    if not cfg.wandb.enabled:
        os.environ["WANDB_MODE"] = "disabled"  # the local metrics.jsonl is still written
    logger = RunLogger(out_dir, cfg, project=cfg.wandb.project, name=cfg.wandb.name or None,
                       entity=cfg.wandb.entity or None, run_id=wandb_id, enabled=is_main,
                       job_type="fgvc-train")

    meta_info = {"classes": list(train_rec.classes), "meta_groups": model_meta_spec(groups)}

    def checkpoint_state(epoch: int, weights=None) -> Dict:
        return {"model": weights if weights is not None else unwrap_model(model).state_dict(),
                "config": cfg.to_dict(), "epoch": epoch, "step": step, "best": dict(best), **meta_info}

    def eval_model():
        return ema.module if ema is not None else model

    epochs = cfg.train.epochs
    stop_after = cfg.train.stop_after_epoch
    history = []
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(cfg.train.seed * 100003 + epoch * 1009 + dist_info.rank)
        t0 = time.time()
        stats = train_one_epoch(
            train_model, train_loader, optimizer, criterion, device, epoch, epochs, lr_schedule, step,
            accum_steps=cfg.optim.accum_steps, scaler=scaler, amp=amp, amp_dtype=amp_dtype, mixup_fn=mixup_fn,
            clip_grad=cfg.optim.clip_grad, ema=ema, use_meta_dropout=cfg.train.meta_dropout and len(groups) > 0,
            log_fn=logger.log, log_every=cfg.train.log_every, progress=cfg.train.progress and is_main)
        step = stats["step"]
        row = {"epoch": epoch + 1, "train/loss": stats["loss"], "train/lr": stats["lr"],
               "train/images_per_s": stats["images_per_s"], "train/meta_drop_p": stats["meta_drop_p"],
               "train/skipped_images": stats["skipped"], "time/epoch_s": time.time() - t0}
        is_eval_epoch = (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs
        if is_eval_epoch:  # all ranks: sharded evaluation, identical all-reduced numbers everywhere
            ev = evaluate(eval_model(), select_loader, device, amp=amp)
            row.update({f"{select_name}/top1": ev["top1"], f"{select_name}/top5": ev["top5"],
                        f"{select_name}/loss": ev["loss"], f"{select_name}/images": ev["n"]})
            if cfg.train.eval_meta_zeroed and groups:
                ev0 = evaluate(eval_model(), select_loader, device, meta_mode="zero", amp=amp)
                row[f"{select_name}/top1_meta_zeroed"] = ev0["top1"]
            if ev["top1"] > best["top1"]:
                best = {"top1": ev["top1"], "top5": ev["top5"], "epoch": epoch + 1}
                if is_main:
                    save_checkpoint(checkpoint_state(epoch + 1, unwrap_model(eval_model()).state_dict()),
                                    os.path.join(out_dir, "best.pth"))
            row[f"{select_name}/best_top1"] = best["top1"]
        if is_main:
            logger.log(row, step)
            history.append(row)
            msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            log(f"[epoch {epoch + 1}/{epochs}] {msg}")
            state = checkpoint_state(epoch + 1)
            state.update(optimizer=optimizer.state_dict(), rng=get_rng_state(), wandb_id=logger.run_id)
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if ema is not None:
                state["model_ema"] = ema.module.state_dict()
            save_checkpoint(state, os.path.join(out_dir, "last.pth"))
        barrier()
        if stop_after and epoch + 1 >= stop_after and epoch + 1 < epochs:
            if is_main:
                log(f"[stop] train.stop_after_epoch={stop_after}: stopping (resume with resume=auto)")
            logger.finish()
            cleanup()
            return {"stopped_at_epoch": epoch + 1}

    summary = {"best_epoch": best["epoch"], f"best_{select_name}_top1": best["top1"], "selected_on": select_name}
    # The honest number: the test split evaluated once, with the weights picked on the held-out split.
    best_path = os.path.join(out_dir, "best.pth")
    if os.path.isfile(best_path):
        final_model = build_model(cfg, train_rec.num_classes, groups, init_weights=False).to(device)
        final_model.load_state_dict(load_checkpoint(best_path)["model"])
    else:
        final_model = eval_model()
    ev = evaluate(final_model, test_loader, device, amp=amp)
    summary.update({"test/top1": ev["top1"], "test/top5": ev["top5"], "test/n": ev["n"]})
    if groups:
        ev0 = evaluate(final_model, test_loader, device, meta_mode="zero", amp=amp)
        summary["test/top1_meta_zeroed"] = ev0["top1"]
    if is_main:
        log(f"[final] best epoch {best['epoch']} ({select_name} top1 {best['top1']:.2f}); test top1 "
            f"{summary['test/top1']:.2f}" + (f", meta zeroed {summary['test/top1_meta_zeroed']:.2f}" if groups else ""))
        with open(os.path.join(out_dir, "final.json.tmp"), "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(os.path.join(out_dir, "final.json.tmp"), os.path.join(out_dir, "final.json"))
        logger.summary(summary)
        if os.path.isfile(best_path):
            logger.log_artifact(best_path, name=f"fgvc-{cfg.model.name}-{logger.run_id}", type="model",
                                metadata=summary, aliases=["best"])
    logger.finish()
    cleanup()
    return summary


def main(argv: Optional[List[str]] = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        argv = ["-c", DEMO_CONFIG] + argv  # no recipe given: the offline CPU demo
    cfg, _ = parse_config(DEFAULTS, argv, description=__doc__)
    return train(cfg)


if __name__ == "__main__":
    main()
