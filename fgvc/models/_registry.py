"""Model registry: one API for fgvc and timm.

``register_model`` decorates a factory: the model is then built by name with
:func:`create_model` (``fgvc.create_model``) *and* with ``timm.create_model``, which
finds it in timm's own registry after ``import fgvc``::

    import fgvc, timm
    m1 = fgvc.create_model("metaformer_0", num_classes=200, meta_dims=[4, 3])
    m2 = timm.create_model("metaformer_0", num_classes=200, meta_dims=[4, 3])   # the same model

Both calls run the same factory with the same defaults. timm's ``pretrained=True``
(downloads) is refused: these names have no hosted weights; pass a file with
``pretrained="path.pth"`` here or ``checkpoint_path=...`` in timm.
"""
import functools
from typing import Callable, Dict, List

_model_entrypoints: Dict[str, Callable] = {}


def _timm_entrypoint(name: str, fn: Callable) -> Callable:
    """The factory as timm calls it: ``fn(pretrained=..., pretrained_cfg=..., ...)`` -> our create_model."""

    @functools.wraps(fn)
    def entry(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
              device=None, dtype=None, **kwargs):
        if pretrained is True:
            raise ValueError(f"{name} has no downloadable weights; pass a local file: "
                             f"timm.create_model({name!r}, checkpoint_path='weights.pth') or "
                             f"fgvc.create_model({name!r}, pretrained='weights.pth')")
        model = create_model(name, pretrained=pretrained or None, **kwargs)
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        return model

    return entry


def register_model(fn: Callable) -> Callable:
    """Register ``fn`` under its function name (``metaformer_1``, ...), here and in timm's registry."""
    name = fn.__name__
    if name in _model_entrypoints:
        raise ValueError(f"model {name!r} is registered twice")
    _model_entrypoints[name] = fn
    try:
        from timm.models import register_model as timm_register
    except ImportError:  # timm is a dependency; without it only fgvc.create_model knows the names
        return fn
    timm_register(_timm_entrypoint(name, fn))
    return fn


def list_models(pattern: str = "") -> List[str]:
    """Sorted names of the registered models; ``pattern`` is a substring or fnmatch glob."""
    import fnmatch

    names = sorted(_model_entrypoints)
    if not pattern:
        return names
    if any(c in pattern for c in "*?["):
        return [n for n in names if fnmatch.fnmatch(n, pattern)]
    return [n for n in names if pattern in n]


def is_model(name: str) -> bool:
    return name in _model_entrypoints


def create_model(
        name: str,
        num_classes: int = 1000,
        img_size=224,
        meta_dims=(),
        drop_path_rate: float = 0.1,
        pretrained: str = None,
        **kwargs,
):
    """Build a registered model (``timm.create_model(name, ...)`` is the same call).

    Args:
        name: a name from :func:`list_models` (``metaformer_0/1/2``, ``metaformer_tiny``,
            ``metaformer_resnet50``, ...).
        num_classes: classifier outputs (0 = no classifier, features only).
        img_size: input size, an int or (H, W); each side a multiple of 32.
        meta_dims: one int per meta-information group (e.g. ``[4, 3]`` for
            iNaturalist location + time, ``[312]`` for CUB attributes, ``[768]``
            with ``meta_tokens=[32]`` for CUB text). Empty = image only.
        drop_path_rate: stochastic depth, linear over the blocks.
        pretrained: optional path of an official MetaFormer checkpoint, loaded
            through :func:`fgvc.models.load_pretrained` (heads dropped when the
            class count or the meta layout differ, tables resized).
        **kwargs: passed to the model (``meta_tokens``, ``attn_impl``, ``drop_rate``,
            ``init_backbone`` for the hybrids, ...).
    """
    if name not in _model_entrypoints:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if pretrained is True:
        raise ValueError(f"{name} has no downloadable weights; pass the path of a file: pretrained='weights.pth'")
    model = _model_entrypoints[name](
        num_classes=num_classes, img_size=img_size, meta_dims=meta_dims,
        drop_path_rate=drop_path_rate, **kwargs)
    if pretrained:
        from .metaformer import load_pretrained
        load_pretrained(model, pretrained)
    return model
