"""Model registry: ``register_model`` decorates a factory, ``create_model`` builds by name.

Kept separate from the model files (timm's ``_registry.py`` pattern) so tools
never special-case a model: they ask the registry.
"""
from typing import Callable, Dict, List

_model_entrypoints: Dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Register ``fn`` under its function name (``metaformer_1``, ...)."""
    name = fn.__name__
    if name in _model_entrypoints:
        raise ValueError(f"model {name!r} is registered twice")
    _model_entrypoints[name] = fn
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
    """Build a registered model.

    Args:
        name: a name from :func:`list_models` (``metaformer_0/1/2``, ``metaformer_resnet50``, ...).
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
    model = _model_entrypoints[name](
        num_classes=num_classes, img_size=img_size, meta_dims=meta_dims,
        drop_path_rate=drop_path_rate, **kwargs)
    if pretrained:
        from .metaformer import load_pretrained
        load_pretrained(model, pretrained)
    return model
