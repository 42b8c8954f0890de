"""A generated fine-grained dataset where some classes differ ONLY by where / when they were seen.

The functional proof that the meta pathway works end to end: ``n_looks`` visual
"species" (a coloured shape on a textured background, with random position, size,
colour jitter and noise) are each split into two classes that have the *same* image
distribution:

* even looks split by **latitude**: ``<look>_north`` observed at latitude 25..65,
  ``<look>_south`` at -65..-25 (longitude uniform, month uniform);
* odd looks split by **season**: ``<look>_summer`` observed in months 5..8,
  ``<look>_winter`` in months 11..2 (location uniform over the globe).

An image-only classifier can at best tell the looks apart (50 % on the pairs), one
that reads the meta tokens can reach ~100 %. ``tools/eval_fgvc.py`` shows this as the
gap between "with meta" and "meta zeroed" accuracy.

Written in the custom CSV layout (``train.csv`` / ``test.csv``: ``path,label,lat,lon,date``
plus ``images/``), so the demo also exercises the custom reader users bring their own
data with.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np

from sparse_mim.utils.checkpoint import atomic_write_dir, atomic_write_text

DEMO_DIR_NAME = "demo_data"  # the demo dataset's folder inside a run folder (training and evaluation find it there)

__all__ = ["DEMO_DIR_NAME", "make_demo_dataset", "demo_data_config", "is_demo_dataset", "DEMO_META_GROUPS"]

_SHAPES = ("disc", "square", "triangle", "cross", "ring", "bar")
_COLOURS = ((220, 60, 50), (50, 160, 70), (60, 90, 220), (230, 190, 40), (170, 70, 200), (40, 190, 200))

DEMO_META_GROUPS = [
    {"name": "temporal", "type": "date", "columns": ["date"]},
    {"name": "spatial", "type": "latlon", "columns": ["lat", "lon"]},
]


def _draw(rng: np.random.Generator, look: int, size: int):
    from PIL import Image, ImageDraw
    bg = rng.integers(90, 160, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    arr = np.clip(bg[None, None, :] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in _COLOURS[look % len(_COLOURS)])
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = (size / 2 + rng.uniform(-0.15, 0.15) * size for _ in range(2))
    box = (cx - r, cy - r, cx + r, cy + r)
    shape = _SHAPES[look % len(_SHAPES)]
    if shape == "disc":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 2.5
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    elif shape == "ring":
        d.ellipse(box, outline=colour, width=max(2, int(r / 2.5)))
    else:
        d.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=colour)
    return img


def _meta(rng: np.random.Generator, look: int, side: int):
    """(lat, lon, month) for one sample; side 0/1 = the two classes of a look."""
    lon = rng.uniform(-180, 180)
    if look % 2 == 0:  # latitude-separated pair, any month
        lat = rng.uniform(25, 65) * (1 if side == 0 else -1)
        month = int(rng.integers(1, 13))
    else:  # season-separated pair, anywhere
        lat = float(np.degrees(np.arcsin(rng.uniform(-0.95, 0.95))))
        month = int(rng.choice([5, 6, 7, 8] if side == 0 else [11, 12, 1, 2]))
    return lat, lon, month


def class_names(n_looks: int):
    names = []
    for look in range(n_looks):
        a, b = ("north", "south") if look % 2 == 0 else ("summer", "winter")
        names += [f"{_SHAPES[look % len(_SHAPES)]}{look}_{a}", f"{_SHAPES[look % len(_SHAPES)]}{look}_{b}"]
    return names


def _write_demo(root: str, settings: Dict) -> None:
    n_looks, train_per_class, test_per_class = settings["n_looks"], settings["train_per_class"], \
        settings["test_per_class"]
    image_size, seed, train_counts = settings["image_size"], settings["seed"], settings.get("train_counts")
    stamp = os.path.join(root, "demo.json")
    rng = np.random.default_rng(seed)
    names = class_names(n_looks)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        rows = []
        for look in range(n_looks):
            for side in (0, 1):
                label = names[2 * look + side]
                n = per_class if split == "test" or train_counts is None else int(train_counts[2 * look + side])
                for k in range(n):
                    rel = f"images/{split}/{label}/{k:04d}.png"
                    os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
                    _draw(rng, look, image_size).save(os.path.join(root, rel))
                    lat, lon, month = _meta(rng, look, side)
                    day, hour = int(rng.integers(1, 29)), int(rng.integers(0, 24))
                    rows.append((rel, label, f"{lat:.4f}", f"{lon:.4f}", f"2020-{month:02d}-{day:02d} {hour:02d}:00:00"))
        order = rng.permutation(len(rows))
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(["path", "label", "lat", "lon", "date"])
        w.writerows(rows[i] for i in order)
        atomic_write_text(os.path.join(root, f"{split}.csv"), buf.getvalue())
    atomic_write_text(stamp, json.dumps(settings))


def make_demo_dataset(root: str, n_looks: int = 4, train_per_class: int = 48, test_per_class: int = 24,
                      image_size: int = 64, seed: int = 0, overwrite: bool = False,
                      train_counts: Optional[Sequence[int]] = None) -> Dict:
    """Write the demo dataset under ``root`` (idempotent: reuses a complete one with the same settings).

    ``train_counts`` (one per class, in :func:`class_names` order) replaces ``train_per_class`` for a
    long-tailed training split (the long-tail demo, ``tools/longtail_fgvc.py``); the test split stays balanced.

    Returns the ``data:`` config entries that read it with the custom reader.
    """
    settings = dict(n_looks=n_looks, train_per_class=train_per_class, test_per_class=test_per_class,
                    image_size=image_size, seed=seed, version=1)
    if train_counts is not None:
        if len(train_counts) != 2 * n_looks or min(train_counts) < 1:
            raise ValueError(f"train_counts needs {2 * n_looks} positive counts (two classes per look), got "
                             f"{list(train_counts)}")
        settings["train_counts"] = [int(n) for n in train_counts]
    stamp = os.path.join(root, "demo.json")
    if not overwrite and os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == settings:
                return demo_data_config(root)
    if os.path.isdir(root) and os.listdir(root) and not os.path.isfile(stamp):
        raise FileExistsError(f"{root!r} is not empty and holds no demo dataset (demo.json); the demo data is only "
                              f"written into an empty folder or over an earlier demo dataset")
    # written into a temp folder that takes root's place at the end: a kill or a full disk leaves no partial data
    atomic_write_dir(root, lambda tmp: _write_demo(tmp, settings))
    return demo_data_config(root)


def is_demo_dataset(root: str) -> bool:
    """Whether ``root`` holds a generated demo dataset (its ``demo.json`` stamp)."""
    return os.path.isfile(os.path.join(root, "demo.json"))


def demo_data_config(root: str) -> Dict:
    return {"dataset": "custom", "root": root, "train_csv": "train.csv", "test_csv": "test.csv",
            "image_root": "", "path_column": "path", "label_column": "label", "meta_groups": DEMO_META_GROUPS}
