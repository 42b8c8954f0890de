"""Run logger: Weights & Biases (offline by default) plus plain files in the output folder.

Only rank 0 logs; on other ranks every method is a no-op. wandb is imported only
when a run starts (never at package import). The user's ``WANDB_MODE`` decides the
mode; we only default it to ``offline`` so nothing leaves the machine unasked. With
``WANDB_MODE=disabled`` (or ``use_wandb=False``, the ``wandb.enabled`` key) wandb is
never started; the local files are still written:

- ``metrics.jsonl``: one JSON object per ``log`` call (``{"step": .., "lr": ..}``),
- ``images/<key>_<step>.png``: every logged image, always,
- ``wandb/``: everything wandb writes for this run, so copying the output folder
  elsewhere and running ``wandb sync <output_dir>/wandb/offline-run-*`` there uploads the
  complete run: the run files and media (``wandb/offline-run-*``), and wandb's artifact
  staging and cache (``wandb/data``, ``wandb/cache``, ``wandb/artifacts``: by default these
  live under the home folder, where they pile up unseen). Set ``WANDB_DATA_DIR`` /
  ``WANDB_CACHE_DIR`` / ``WANDB_ARTIFACT_DIR`` yourself to choose other places.
- the wandb run id is kept in checkpoints: a resumed run continues the same wandb run
  (``resume="allow"``).

Model files (``log_model``): ``auto`` uploads the file as a wandb artifact only when the
run is online and logs nothing offline (an offline run would otherwise stage a full copy
of every checkpoint); ``upload`` always logs it (offline: synced later, no staging copy:
the artifact points at the file in the output folder, so keep the file until synced);
``reference`` logs a ``file://`` reference (no copy, no upload; the file stays where it
is); ``off`` never.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import string
from typing import Any, Mapping

import numpy as np

__all__ = ["RunLogger", "new_run_id", "to_pil", "LOG_MODEL_CHOICES", "wandb_dirs"]

LOG_MODEL_CHOICES = ("auto", "off", "reference", "upload")
_WANDB_DIR_VARS = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache", "WANDB_ARTIFACT_DIR": "artifacts"}
_USER_SET = {k for k in _WANDB_DIR_VARS if k in os.environ}  # the user's own choice is never overridden


def wandb_dirs(out_dir: str) -> dict:
    """The wandb folders (staging, cache, artifacts) of a run in ``out_dir``: all under ``out_dir/wandb``."""
    return {var: os.path.join(os.path.abspath(out_dir), "wandb", sub) for var, sub in _WANDB_DIR_VARS.items()}


def _append_line(path: str, line: str) -> None:
    """Append one whole line or nothing: a failed write (a full disk) is cut back to the last full
    line and reported as ``DiskFullError`` naming the file."""
    with open(path, "ab") as f:
        end = f.tell()
        try:
            f.write(line.encode())
            f.flush()
        except OSError as e:
            try:
                f.truncate(end)
            except OSError:
                pass
            from .checkpoint import disk_full_error, is_disk_full
            if is_disk_full(e):
                raise disk_full_error(path, "the lines written before are intact") from e
            raise


def new_run_id() -> str:
    """An 8-character id in wandb's alphabet (lower-case letters and digits)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def to_pil(image):
    """PIL image from a PIL image, an HWC uint8/float array, or a CHW / HWC torch tensor in [0, 1]."""
    from PIL import Image
    if isinstance(image, Image.Image):
        return image
    try:
        import torch
        if isinstance(image, torch.Tensor):
            image = image.detach().float().cpu()
            if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
                image = image.permute(1, 2, 0)
            image = image.numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr)


def _jsonable(v: Any):
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            return None
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)


class RunLogger:
    """Rank-0 logger: scalars, images, config and model artifacts to wandb + local files.

    Args:
        out_dir: output folder (wandb's ``dir``; metrics.jsonl and images/ go here).
        config: the resolved run config (logged to wandb as its config).
        project / name / entity / tags: wandb run fields.
        run_id: wandb run id to continue (from a checkpoint); a new one is made if None.
        enabled: False on ranks other than 0 (everything becomes a no-op).
        use_wandb: False keeps the local files but never starts wandb (the ``wandb.enabled`` key).
        log_model: what :meth:`log_model` does with model files (module docstring).
        group: wandb group (e.g. a training run and the evaluations of its checkpoints).
    """

    def __init__(self, out_dir: str, config: Mapping | None = None, project: str = "sparse_mim",
                 name: str | None = None, entity: str | None = None, run_id: str | None = None,
                 tags=None, enabled: bool = True, job_type: str | None = None, use_wandb: bool = True,
                 log_model: str = "auto", group: str | None = None):
        if log_model not in LOG_MODEL_CHOICES:
            raise ValueError(f"log_model={log_model!r}: choose one of {', '.join(LOG_MODEL_CHOICES)}")
        self.enabled = bool(enabled)
        self.out_dir = out_dir
        self.run_id = run_id or new_run_id()
        self.run = None
        self._wandb = None
        self.log_model_policy = log_model
        self.mode = "disabled"
        if not self.enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.image_dir = os.path.join(out_dir, "images")
        if not use_wandb:
            return
        os.environ.setdefault("WANDB_MODE", "offline")
        self.mode = os.environ["WANDB_MODE"]
        if self.mode == "disabled":
            return
        for var, path in wandb_dirs(out_dir).items():  # staging / cache inside the run's folder
            if var not in _USER_SET:
                os.environ[var] = path
                os.makedirs(path, exist_ok=True)
        import wandb  # imported only where a run starts
        self._wandb = wandb
        cfg = config.to_dict() if hasattr(config, "to_dict") else (dict(config) if config else None)
        self.run = wandb.init(project=project, name=name, entity=entity, id=self.run_id, resume="allow",
                              dir=out_dir, config=cfg, tags=tags, job_type=job_type, group=group or None,
                              reinit="finish_previous")

    @property
    def wandb_dir(self) -> str | None:
        return getattr(self.run, "dir", None) if self.run is not None else None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Scalars at a global step: one line in metrics.jsonl and a wandb.log call."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        _append_line(self.metrics_path, json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

    def log_image(self, key: str, image, step: int, caption: str | None = None) -> str | None:
        """Save ``image`` as ``images/<key>_<step>.png`` and log it as a wandb.Image; returns the PNG path."""
        if not self.enabled:
            return None
        os.makedirs(self.image_dir, exist_ok=True)
        pil = to_pil(image)
        path = os.path.join(self.image_dir, f"{key.replace('/', '_')}_{int(step):08d}.png")
        from .checkpoint import atomic_write
        atomic_write(path, lambda f: pil.save(f, format="PNG"))
        if self.run is not None:
            self.run.log({key: self._wandb.Image(pil, caption=caption)}, step=int(step))
        return path

    def log_config(self, config: Mapping) -> None:
        if not self.enabled or self.run is None:
            return
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        self.run.config.update(cfg, allow_val_change=True)

    def log_artifact(self, path: str, name: str, type: str = "model", metadata: Mapping | None = None,
                     aliases=None) -> None:
        """Attach a file (e.g. the exported backbone) to the run as an artifact."""
        if not self.enabled or self.run is None:
            return
        art = self._wandb.Artifact(name=name, type=type, metadata=dict(metadata or {}))
        art.add_file(path)
        self.run.log_artifact(art, aliases=aliases)

    def log_model(self, path: str, name: str, metadata: Mapping | None = None, aliases=None) -> str | None:
        """Log a model file by the ``log_model`` policy; returns what was done (None: nothing)."""
        if not self.enabled or self.run is None:
            return None
        policy = self.log_model_policy
        if policy == "auto":
            policy = "upload" if self.mode == "online" else "off"
        if policy == "off":
            return None
        art = self._wandb.Artifact(name=name, type="model", metadata=dict(metadata or {}))
        if policy == "reference":
            art.add_reference("file://" + os.path.abspath(path), checksum=False)
        else:
            art.add_file(path, policy="immutable")  # no staging copy: the file in the output folder is used
        self.run.log_artifact(art, aliases=aliases)
        return policy

    def summary(self, values: Mapping[str, Any]) -> None:
        if not self.enabled or self.run is None:
            return
        for k, v in values.items():
            self.run.summary[k] = _jsonable(v)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
