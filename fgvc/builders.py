"""What a fine-tuning run is built from, shared by training, evaluation, prediction and export.

* data: :func:`resolve_data_config` (the ``data`` section with the demo dataset resolved),
  :func:`build_splits` (train / held-out val / test records), :func:`eval_loader`;
* model: :func:`build_model` (``fgvc.create_model`` from the ``model`` section and a meta layout;
  also what rebuilds a checkpoint's model), :func:`model_meta_spec` (the meta layout a checkpoint
  stores);
* optimisation: :func:`build_optimizer`, :func:`build_mixup` (Mixup / CutMix and the criterion).

:func:`fgvc.train.train` runs a job from them; :mod:`fgvc.evaluate`, :class:`fgvc.Predictor` and
:mod:`fgvc.export` rebuild a trained model with the same :func:`build_model`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional

import torch

__all__ = ["resolve_data_config", "build_splits", "eval_loader", "build_model", "model_meta_spec", "build_optimizer",
           "build_mixup"]


# --------------------------------------------------------------------------------------- data
def resolve_data_config(data: Mapping, demo_dir: str, generate: bool = True, log: Callable = print) -> Dict:
    """The ``data`` section as a plain dict, with the demo dataset resolved.

    The generated demo data only ever lives in ``demo_dir`` (a folder the tool owns, e.g.
    ``<output_dir>/demo_data``); it is generated there when missing and ``generate``.
    With ``data.demo=true`` and ``data.root`` set, ``data.root`` must already hold a demo
    dataset (its ``demo.json``): nothing is ever written into a user's folder.
    """
    data = dict(data)
    if not data.get("demo"):
        return data
    from fgvc.demo import demo_data_config, is_demo_dataset, make_demo_dataset
    root = data.get("root") or ""
    if root:
        if not is_demo_dataset(root):
            raise FileNotFoundError(
                f"data.demo=true with data.root={root!r}, which holds no generated demo dataset (demo.json); the "
                f"demo writes its data only into {demo_dir}. Drop data.root to use it, or set data.demo=false "
                f"(and data.dataset=...) to read the data in {root}")
        demo = demo_data_config(root)
    elif is_demo_dataset(demo_dir):
        demo = demo_data_config(demo_dir)
    elif generate:
        log(f"[data] generating the demo dataset into {demo_dir}")
        demo = make_demo_dataset(demo_dir)
    else:
        raise FileNotFoundError(f"the demo dataset is not in {demo_dir}")
    for k, v in demo.items():
        if k == "meta_groups" and data.get("meta_groups"):
            continue
        data[k] = v
    return data


def build_splits(data_cfg: Mapping, log: Callable = print):
    """(train records, held-out val records or None, test records)."""
    from fgvc.data import build_records, stratified_split
    train_rec = build_records(dict(data_cfg), "train")
    test = build_records(dict(data_cfg), "test")
    for rec in (train_rec, test):
        if rec.issues:
            log(f"[data] {rec.name}: {len(rec.issues)} issue(s):\n{rec.issues.summary()}")
    if test.num_classes != train_rec.num_classes:
        raise ValueError(f"train has {train_rec.num_classes} classes but test has {test.num_classes}; "
                         f"both splits must share one label mapping")
    val = None
    if data_cfg["val_split"] > 0:
        tr_idx, val_idx = stratified_split(train_rec.labels, data_cfg["val_split"], data_cfg["split_seed"])
        val = train_rec.subset(val_idx)
        val.name = train_rec.name + f"[val {data_cfg['val_split']:.0%}]"
        train_rec = train_rec.subset(tr_idx)
    return train_rec, val, test


def eval_loader(rec, img_size, batch_size, num_workers, rank=0, world=1, pin=False, transform=None):
    """The evaluation loader of ``rec``: this process's shard (``rank, rank + world, ...``, in order, every
    image once over all processes), the evaluation transform (or ``transform``, e.g. a TTA one)."""
    from torch.utils.data import DataLoader
    from fgvc.data import FGVCDataset, ShardSampler, build_transform, collate_skip_bad
    transform = transform if transform is not None else build_transform(False, img_size)
    return DataLoader(FGVCDataset(rec, transform, train=False), batch_size=batch_size,
                      sampler=ShardSampler(len(rec), rank, world), num_workers=num_workers,
                      collate_fn=collate_skip_bad, pin_memory=pin)


# --------------------------------------------------------------------------------------- model
def build_model(model_cfg: Mapping, num_classes: int, meta_groups, init_weights: bool = True,
                classes: Optional[List[str]] = None, log: Optional[Callable] = None) -> torch.nn.Module:
    """``fgvc.create_model`` from the ``model`` config section; ``init_weights=False`` skips
    ``pretrained`` / ``init_backbone`` (when a full checkpoint is loaded next anyway). ``log`` gets
    what ``init_backbone`` / ``pretrained`` loaded, skipped and resized, and what happened to a
    pretrained head given the dataset's ``classes`` (:func:`fgvc.report.load_pretrained_reported`)."""
    from fgvc.models import create_model
    from fgvc.report import load_pretrained_reported, log_lines
    m = model_cfg
    log = log or (lambda *_: None)
    kwargs = dict(m.get("kwargs") or {})
    if any(g.tokens > 1 for g in meta_groups):
        kwargs["meta_tokens"] = [g.tokens for g in meta_groups]
    if m.get("init_backbone") and init_weights:
        if not m["name"].startswith(("metaformer_resnet", "metaformer_convnext")):
            raise ValueError(f"model.init_backbone is for the convnet hybrids (metaformer_resnet50, "
                             f"metaformer_convnextv2_tiny, ...), not {m['name']!r}; for MetaFormer files "
                             f"use model.pretrained")
        kwargs["init_backbone"] = m["init_backbone"]
    model = create_model(m["name"], num_classes=num_classes, img_size=m["img_size"],
                         meta_dims=[g.dim for g in meta_groups], drop_path_rate=m["drop_path_rate"], **kwargs)
    if m.get("init_backbone") and init_weights:
        log_lines(log, f"[init] model.init_backbone={m['init_backbone']}:", getattr(model, "init_notes", []))
    if m.get("pretrained") and init_weights:
        log_lines(log, "[init] model.pretrained:", load_pretrained_reported(model, m["pretrained"], classes))
    return model


def model_meta_spec(meta_groups) -> List[Dict]:
    """The meta layout a checkpoint stores (``meta_groups``): name, width, tokens and encoder kind per group."""
    return [{"name": g.name, "dim": g.dim, "tokens": g.tokens, "kind": getattr(g, "kind", "")}
            for g in meta_groups]


def build_optimizer(model: torch.nn.Module, optim_cfg: Mapping, lr: float) -> torch.optim.Optimizer:
    """``optim.opt`` over timm's weight-decay groups (no decay on 1-D params, biases and ``no_weight_decay()``),
    with ``optim.layer_decay`` / ``optim.backbone_lr_mult`` as per-group lr scales (:mod:`fgvc.optim`)."""
    from fgvc.optim import build_optimizer as _build
    return _build(model, optim_cfg, lr)


def build_mixup(aug: Mapping, num_classes: int):
    """(timm Mixup or None, training criterion)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if aug["mixup"] > 0 or aug["cutmix"] > 0:
        mix = Mixup(mixup_alpha=aug["mixup"], cutmix_alpha=aug["cutmix"], prob=aug["mixup_prob"],
                    switch_prob=aug["mixup_switch_prob"], mode="batch", label_smoothing=aug["smoothing"],
                    num_classes=num_classes)
        return mix, SoftTargetCrossEntropy()
    if aug["smoothing"] > 0:
        return None, LabelSmoothingCrossEntropy(aug["smoothing"])
    return None, torch.nn.CrossEntropyLoss()
