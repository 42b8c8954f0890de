"""fgvc: fine-grained classification with MetaFormer and meta-information tokens.

``fgvc.create_model(name, num_classes, img_size, meta_dims)``; ``fgvc.list_models()``.
Importing this package pulls in torch only (no timm / torchvision / wandb until a hybrid is built).
"""
from .models import create_model, list_models

__all__ = ["create_model", "list_models"]
