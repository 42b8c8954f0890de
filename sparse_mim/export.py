"""Export the pre-trained encoder of a SparK checkpoint as a plain backbone state dict.

``export_from_checkpoint(ckpt, out)`` reads a pre-training checkpoint (``last.pth`` or a
``checkpoint-<step>.pth``), rebuilds nothing but the dense twin of the encoder it describes
(its ``spark`` entry: backbone name and arguments), checks the weights load into it with
``strict=True`` and are finite, and writes them (atomically, mode 0644) in the dense model's
names and torch layout: the official SparK "timm style" file. It loads with
``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)`` into
``torchvision.models.resnet50()`` with ``fc`` removed / timm ``convnext_small(num_classes=0)``
(and into ``sparse_mim.create_backbone``). Command line: ``sparse_mim.cli.export``
(``tools/export_backbone.py``, ``spark-export``)::

    python tools/export_backbone.py outputs/pretrain_demo/last.pth resnet18_spark.pth
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from .utils.checkpoint import atomic_write, check_state_finite, load_checkpoint, require_checkpoint_kind

__all__ = ["backbone_state_dict", "export_backbone", "backbone_from_checkpoint", "export_from_checkpoint"]


def backbone_state_dict(model: nn.Module) -> dict:
    """The encoder's weights alone, in the dense twin's names and torch layout, on CPU."""
    backbone = model.backbone if hasattr(model, "backbone") else model
    return {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}


def export_backbone(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> str:
    """Write a backbone state dict (from a SparK model, a backbone, or a dict) atomically; refuses NaN / inf."""
    state = dict(model_or_state) if isinstance(model_or_state, Mapping) else backbone_state_dict(model_or_state)
    check_state_finite(state, f"refusing to export a backbone to {os.fspath(path)}")
    return atomic_write(path, lambda f: torch.save(state, f))


def backbone_from_checkpoint(checkpoint: Mapping[str, Any], source: str = "the checkpoint"
                             ) -> tuple[dict, str | None, dict]:
    """(backbone state_dict, backbone name, its create_backbone kwargs) from a pre-training checkpoint."""
    from .spark import NotASparKCheckpointError, spark_args_from_checkpoint
    if not isinstance(checkpoint, Mapping):
        raise NotASparKCheckpointError(f"{source} is not a SparK checkpoint (a {type(checkpoint).__name__})")
    model_state = checkpoint.get("model", checkpoint.get("module", checkpoint))
    prefix = checkpoint.get("backbone_prefix", "sparse_encoder.sp_cnn.")
    if isinstance(model_state, Mapping) and model_state and all(str(k).startswith("module.") for k in model_state):
        model_state = {k[len("module."):]: v for k, v in model_state.items()}
    state = {k[len(prefix):]: v for k, v in model_state.items() if str(k).startswith(prefix)}
    if not state:
        spark_args_from_checkpoint(checkpoint, source)  # raises the "not a SparK checkpoint" message
        raise NotASparKCheckpointError(f"no backbone weights (keys starting with {prefix!r}) in {source}")
    try:
        args = spark_args_from_checkpoint(checkpoint, source)
        name, kwargs = args.get("backbone"), dict(args.get("backbone_kwargs") or {})
    except NotASparKCheckpointError:  # weights without a description (older files): take the run config's
        model_cfg = (checkpoint.get("config") or {}).get("model", {})
        name, kwargs = model_cfg.get("backbone"), dict(model_cfg.get("backbone_kwargs") or {})
    return state, name, kwargs


def export_from_checkpoint(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike,
                           verify: bool = True) -> dict:
    """Export the encoder of a pre-training checkpoint to ``out_path``; returns a small report."""
    source = os.fspath(checkpoint_path)
    ck = load_checkpoint(source)
    from .spark import NotASparKCheckpointError
    require_checkpoint_kind(ck, source, ["spark-pretrain", "spark-weights", "unknown"], "spark-export",
                            NotASparKCheckpointError)
    state, name, kwargs = backbone_from_checkpoint(ck, source)
    check_state_finite(state, f"{source} is not usable (its encoder weights)")
    if verify and name:
        from .backbones import create_backbone
        kwargs.pop("drop_path_rate", None)
        dense = create_backbone(name, sparse=False, **kwargs)
        dense.load_state_dict(state, strict=True)  # raises with the mismatching keys if the names are wrong
    path = export_backbone(state, out_path)
    step = (ck.get("train_state") or {}).get("step") if isinstance(ck, Mapping) else None
    return {"path": path, "backbone": name, "step": step, "tensors": len(state), "verified": bool(verify and name)}
