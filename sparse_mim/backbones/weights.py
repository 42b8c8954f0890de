"""Weight exchange between our backbones and torchvision / timm / official SparK files.

Our backbones hold their parameters under the dense twin's names (torchvision for
ResNets, timm for ConvNeXt), so exporting is just ``state_dict()``. Importing accepts:

* torchvision / timm state dicts (the classifier ``fc.*`` / ``head.fc.*`` is dropped);
* official ConvNeXt (V1 / V2, facebookresearch) names ``downsample_layers.i.j``,
  ``stages.i.j.dwconv / pwconv1 / grn.gamma`` ..., which the official SparK ConvNeXt
  encoder also uses: translated to timm's names (GRN [1, 1, 1, C] -> [C], linear
  <-> 1x1-conv weights reshaped to the model's form);
* official SparK release files: ``*_1kpretrained_timm_style.pth`` (a plain state dict)
  and ``*_withdecoder_1kpretrained_spark_style.pth`` (a dict holding ``module`` whose
  encoder keys start with ``sparse_encoder.sp_cnn.``; `split_spark_checkpoint` separates
  encoder and decoder parts);
* wrappers ``{"model": ...}`` / ``{"state_dict": ...}`` and the prefixes ``module.``
  (DDP), ``backbone.``, ``encoder.``.

Every file is read with ``torch.load(..., weights_only=True)``. A checkpoint of another
architecture raises an error naming the missing and unexpected keys and shape
mismatches.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Union

from torch import Tensor, nn

from ..utils.checkpoint import compare_state_dicts, format_keys  # noqa: F401  (format_keys re-exported)

__all__ = ["load_backbone_weights", "split_spark_checkpoint", "convert_state_dict", "read_checkpoint",
           "SPARK_ENCODER_PREFIX"]

SPARK_ENCODER_PREFIX = "sparse_encoder.sp_cnn."
_WRAPPER_KEYS = ("module", "model", "state_dict", "model_state", "backbone")
_PREFIXES = ("module.", SPARK_ENCODER_PREFIX, "backbone.", "encoder.", "model.")
# Keys a backbone may lack in a foreign checkpoint and keep its own values for:
# timm's unused final norm (absent from official SparK / FCMAE encoder files) and
# BatchNorm step counters (absent from very old torchvision files).
_OPTIONAL_KEYS = re.compile(r"^head\.norm\.(weight|bias)$|(^|\.)num_batches_tracked$")
_CLASSIFIER_KEYS = re.compile(r"^(fc|head\.fc|head|classifier)\.(weight|bias)$")


def read_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with a readable error (the one reader,
    ``sparse_mim.utils.checkpoint.load_checkpoint``)."""
    from ..utils.checkpoint import load_checkpoint
    return load_checkpoint(path)


def split_spark_checkpoint(checkpoint: Mapping[str, Any],
                           encoder_prefix: str = SPARK_ENCODER_PREFIX) -> tuple[dict, dict]:
    """Split an official ``*_withdecoder_*_spark_style.pth`` dict into (encoder, rest).

    ``checkpoint`` is the loaded file (holding ``module``) or its ``module`` dict. The
    encoder part has ``encoder_prefix`` stripped (our backbone names); ``rest`` keeps
    every other entry of the model dict under its original name: ``dense_decoder.*``,
    ``densify_norms.*``, ``densify_projs.*``, ``mask_tokens.*``, ``config``, ... (the
    SparK model's business).
    """
    module = checkpoint.get("module", checkpoint)
    if not isinstance(module, Mapping):
        raise ValueError(f"checkpoint['module'] is a {type(module).__name__}, expected a state dict")
    encoder, rest = {}, {}
    for k, v in module.items():
        if k.startswith(encoder_prefix):
            encoder[k[len(encoder_prefix):]] = v
        else:
            rest[k] = v
    if not encoder:
        raise ValueError(f"no key of the checkpoint starts with {encoder_prefix!r}; first keys: "
                         f"{list(module)[:8]} (is this an official SparK *_withdecoder_* file?)")
    return encoder, rest


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """Find the state dict inside a checkpoint and strip wrapper prefixes."""
    for _ in range(3):  # nested wrappers, e.g. {"model": {"module": ...}}
        nested = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not nested or any(isinstance(v, Tensor) for v in obj.values()) and "module" not in nested:
            break
        obj = obj[nested[0]]
    if any(k.startswith(SPARK_ENCODER_PREFIX) for k in obj):
        obj, _ = split_spark_checkpoint(obj)
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    changed = True
    while changed and state:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in state):
                state = {k[len(p):]: v for k, v in state.items()}
                changed = True
    if not state:
        raise ValueError(f"the checkpoint holds no tensors; top-level keys: {list(obj)[:10]}")
    return state


def _from_official_convnext(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """facebookresearch ConvNeXt V1/V2 (and official SparK encoder) names -> timm names."""
    out = {}
    for k, v in state.items():
        k = k.replace("downsample_layers.0.", "stem.")
        k = re.sub(r"^downsample_layers\.(\d+)\.(\d+)", r"stages.\1.downsample.\2", k)
        k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
        if ".grn." in k:  # official GRN: gamma / beta of shape [1, 1, 1, C]
            k = k.replace(".grn.gamma", ".mlp.grn.weight").replace(".grn.beta", ".mlp.grn.bias")
            v = v.reshape(-1)
        if k.startswith("norm."):
            k = "head." + k
        elif k.startswith("head."):
            k = k.replace("head.", "head.fc.", 1)
        out[k] = v
    return out


def convert_state_dict(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Translate a foreign backbone state dict to ``model``'s names and shapes (no loading).

    Drops classifier weights; maps official ConvNeXt names to timm's; reshapes
    linear <-> 1x1-conv weights to the form ``model`` uses. Unknown keys pass through
    unchanged (the caller reports them).
    """
    state = dict(state)
    if any(k.startswith(("downsample_layers.", "stages.0.0.")) for k in state):
        state = _from_official_convnext(state)
    own = model.state_dict()
    out = {}
    for k, v in state.items():
        if k not in own and _CLASSIFIER_KEYS.match(k):
            continue
        target = own.get(k)
        if target is not None and v.shape != target.shape and v.numel() == target.numel() \
                and [d for d in v.shape if d != 1] == [d for d in target.shape if d != 1]:
            v = v.reshape(target.shape)  # nn.Linear [O, I] <-> 1x1 conv [O, I, 1, 1]
        out[k] = v
    return out


def load_backbone_weights(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
                          strict: bool = True) -> dict[str, list[str]]:
    """Load torchvision / timm / official SparK / our weights into a backbone (sparse or dense).

    Args:
        model: a backbone from `create_backbone` (or any module with the same names).
        checkpoint: a file path (read with ``weights_only=True``) or an already loaded dict.
        strict: raise when keys are missing (beyond timm's unused ``head.norm`` and BN
            counters), unexpected, or of another shape. With False, load what matches
            and return the lists.

    Returns:
        ``{"missing": [...], "unexpected": [...], "mismatched": [...]}`` (what was not loaded).
    """
    obj = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if not isinstance(obj, Mapping):
        raise ValueError(f"a backbone checkpoint must be a dict (state dict or wrapper), got {type(obj).__name__}")
    state = convert_state_dict(unwrap_state_dict(obj), model)
    from ..utils.checkpoint import check_state_finite
    source = f"{os.fspath(checkpoint)!r}" if isinstance(checkpoint, (str, os.PathLike)) else "the given state dict"
    check_state_finite(state, f"backbone weights {source} are not usable")
    own = model.state_dict()
    diff = compare_state_dicts(state, own)
    missing, unexpected, mismatched = diff["missing"], diff["unexpected"], diff["wrong_shape"]
    required_missing = [k for k in missing if not _OPTIONAL_KEYS.search(k)]
    if strict and (required_missing or unexpected or mismatched):
        name = getattr(model, "backbone_name", type(model).__name__)
        lines = [f"checkpoint does not match backbone {name!r} (is it another architecture or size?)"]
        if required_missing:
            lines.append(f"  missing keys ({len(required_missing)}): {format_keys(required_missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {format_keys(mismatched, 6)}")
        raise ValueError("\n".join(lines))
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
