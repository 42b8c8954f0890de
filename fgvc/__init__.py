"""fgvc: fine-grained classification with MetaFormer and meta-information tokens.

``fgvc.create_model(name, num_classes, img_size, meta_dims)`` (the models are also in timm's
registry: ``timm.create_model("metaformer_0", ...)`` works after ``import fgvc``);
``fgvc.list_models()``; ``fgvc.Predictor.from_checkpoint(path)`` classifies photos with their
date / place / attributes. Importing this package pulls in torch and timm only (torchvision /
wandb load when data, predictions or hybrids are used).
"""
from .models import create_model, list_models

__all__ = ["create_model", "list_models", "Predictor"]


def __getattr__(name):  # lazy: the predictor pulls in torchvision / PIL
    if name == "Predictor":
        from .predict import Predictor
        return Predictor
    raise AttributeError(f"module 'fgvc' has no attribute {name!r}")
