"""Reconstruction grids: (masked input | reconstruction | original), one image per row.

``make_grid_rows`` returns a float [3, H', W'] tensor in [0, 1], the layout
``wandb.Image`` takes; ``save_grid`` writes it as a PNG with PIL. Kept free of
wandb and matplotlib so it runs anywhere.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "denormalize", "make_grid_rows", "save_grid"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize(images: Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Tensor:
    """Normalised [B, 3, H, W] -> pixels in [0, 1] (clamped)."""
    mean = torch.tensor(IMAGENET_MEAN if mean is None else mean, dtype=images.dtype, device=images.device)
    std = torch.tensor(IMAGENET_STD if std is None else std, dtype=images.dtype, device=images.device)
    return (images * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).clamp(0, 1)


def make_grid_rows(columns: Sequence[Tensor], mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile ``columns`` (each [B, 3, H, W], normalised) into rows: image b's views side by side on row b.

    Returns float [3, B*(H+p)+p, n*(W+p)+p] in [0, 1], on the CPU.
    """
    if not columns:
        raise ValueError("nothing to tile")
    shape = columns[0].shape
    if any(c.shape != shape for c in columns):
        raise ValueError(f"all views must have the same shape, got {[tuple(c.shape) for c in columns]}")
    B, C, H, W = shape
    n = len(columns)
    grid = torch.full((C, B * (H + padding) + padding, n * (W + padding) + padding), pad_value)
    for j, view in enumerate(columns):
        pixels = denormalize(view.detach().float().cpu(), mean, std)
        for b in range(B):
            y, x = padding + b * (H + padding), padding + j * (W + padding)
            grid[:, y:y + H, x:x + W] = pixels[b]
    return grid


def save_grid(grid: Tensor, path: str | os.PathLike) -> None:
    """Write a [3, H, W] float grid in [0, 1] as an image file (format from the suffix, e.g. PNG)."""
    from PIL import Image
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    Image.fromarray(array).save(path)
