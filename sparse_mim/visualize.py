"""Reconstruction grids: (masked input | reconstruction | original), one image per row.

``reconstruction_grid(model, images)`` draws a SparK model's reconstructions (its
``reconstruct`` views) as such a grid; ``make_grid_rows`` tiles any views into one: a float
[3, H', W'] tensor in [0, 1], the layout ``wandb.Image`` takes; ``save_grid`` writes it as a PNG with PIL. Kept free of
wandb and matplotlib so it runs anywhere.

``visualize_checkpoint(checkpoint, images, out)`` draws the grid of any SparK checkpoint:
the model is rebuilt from what the checkpoint stores (``SparK.from_checkpoint``: backbone,
input size, mask ratio, decoder width, densify norm), refusing non-finite weights and files
that are not SparK checkpoints. Command line: ``sparse_mim.cli.visualize``
(``tools/visualize_reconstruction.py``, ``spark-visualize``)::

    python tools/visualize_reconstruction.py outputs/pretrain_demo/last.pth img1.jpg folder/ --out grid.png
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "denormalize", "make_grid_rows", "reconstruction_grid", "save_grid",
           "list_images", "load_images", "visualize_checkpoint"]


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


@torch.no_grad()
def reconstruction_grid(model, images: Tensor, visible: Tensor | None = None, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None, generator=None, padding: int = 2) -> Tensor:
    """(masked input | reconstruction | original) of a SparK ``model``, one image per row: float [3, H', W'] in [0, 1].

    The views come from ``model.reconstruct(images, visible, generator=generator)`` (a random mask when
    ``visible`` is None). ``mean`` / ``std``: the normalisation of ``images`` (default ImageNet). The
    tensor goes straight into ``wandb.Image``; :func:`save_grid` writes a PNG.
    """
    views = model.reconstruct(images, visible, generator=generator)
    return make_grid_rows([views["masked"], views["reconstruction"], views["original"]], mean=mean, std=std,
                          padding=padding)


def save_grid(grid: Tensor, path: str | os.PathLike) -> str:
    """Write a [3, H, W] float grid in [0, 1] as an image file (format from the suffix, e.g. PNG), atomically."""
    from PIL import Image
    from .utils.checkpoint import atomic_write
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    fmt = Image.registered_extensions().get(os.path.splitext(os.fspath(path))[1].lower(), "PNG")
    return atomic_write(path, lambda f: Image.fromarray(array).save(f, format=fmt))


def list_images(paths: Sequence[str]) -> list[str]:
    """Image files from a list of files and folders (folders searched recursively, links followed once)."""
    from .data import find_images
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += find_images(path)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"image path {path!r} does not exist")
    if not files:
        raise FileNotFoundError(f"no images found in {list(paths)}")
    return files


def load_images(files: Sequence[str], size: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tensor:
    """Resize the shorter side (bicubic), centre-crop to ``size`` (H, W), normalise; 16-bit images decoded right."""
    from torchvision.transforms import v2 as T
    from .data import load_rgb
    transform = T.Compose([T.ToImage(), T.Resize(min(size), interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(size), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])
    return torch.stack([transform(load_rgb(f)) for f in files])


def visualize_checkpoint(checkpoint: str | os.PathLike, images: Sequence[str], out: str | os.PathLike,
                         seed: int = 0, dense: bool = False, device: str = "cpu", mask_ratio: float | None = None,
                         img_size: int | Sequence[int] | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """Reconstructions of ``images`` by the SparK model in ``checkpoint``, written as a grid to ``out``.

    The model comes from the checkpoint itself (``SparK.from_checkpoint``); ``mask_ratio`` /
    ``img_size`` override its values, ``dense`` runs the dense-masked reference encoder.
    Returns ``{"path", "backbone", "input_size", "mask_ratio", "images"}``.
    """
    from .spark import SparK
    overrides = {"mask_ratio": mask_ratio}
    if img_size is not None:
        overrides["input_size"] = img_size
    model = SparK.from_checkpoint(checkpoint, sparse=False if dense else None, **overrides).to(device).eval()
    files = list_images(images)
    batch = load_images(files, model.input_size, mean, std).to(device)
    grid = reconstruction_grid(model, batch, mean=mean, std=std, generator=torch.Generator().manual_seed(seed))
    path = save_grid(grid, out)
    return {"path": path, "backbone": model.backbone_name, "input_size": list(model.input_size),
            "mask_ratio": model.mask_ratio, "images": len(files)}
