"""Saying what a run actually did: weights loaded, heads kept or re-made, splits used, epochs.

* :func:`load_pretrained_reported` loads ``model.pretrained`` and returns one line per fact:
  how many tensors came from the file and which modules stayed freshly initialised, what was
  resized or dropped, and what happened to the classifier. A file that stores its class list
  (an fgvc checkpoint) is compared with the dataset's: a head whose classes differ (names or
  order) is re-initialised and the first difference named; a file without a class list (an
  official MetaFormer file) whose head has the dataset's class count is kept, and the line
  says that its classes are assumed to be the dataset's, in the same order.
* :func:`split_label`: the official evaluation split by its real name (iNaturalist's
  ``val.json`` is its validation set; its test labels are not public).
* :func:`position`: one numbering of where a run is, shared by the stop and the resume
  messages ("epoch 3/10, 4 of 12 batches done").
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

__all__ = ["load_pretrained_reported", "split_label", "position"]


def load_pretrained_reported(model: torch.nn.Module, path: str, classes: Optional[Sequence[str]] = None) -> List[str]:
    """Load the MetaFormer file ``path`` into ``model`` (:func:`fgvc.models.load_pretrained`'s mapping);
    returns the report lines (module docstring)."""
    from fgvc.models.metaformer import checkpoint_filter_fn, read_pretrained
    ck = read_pretrained(path)
    state, notes = checkpoint_filter_fn(ck, model)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: unexpected keys after filtering: {result.unexpected_keys}")
    fresh = sorted({k.split(".")[0] for k in result.missing_keys if not k.endswith("relative_position_index")})
    lines = [f"{path}: loaded {len(state)} of the model's {len(model.state_dict())} tensors"
             + (f"; freshly initialised: {', '.join(fresh)}" if fresh else "")] + list(notes)
    file_classes = ck.get("classes") if isinstance(ck, dict) else None
    if "head.weight" not in state or classes is None:
        return lines
    if file_classes is None:
        lines.append(f"kept the file's {len(classes)}-class head: the file has no class list to compare, so its "
                     f"classes are taken to be this dataset's in the same order (if not, train with a fresh head: "
                     f"use a file whose class count differs, or the classes get mixed up)")
        return lines
    a, b = list(file_classes), list(classes)
    if a == b:
        lines.append(f"kept the file's head: its {len(a)} classes are this dataset's, in the same order")
        return lines
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    i = diff[0]
    model.reset_classifier(len(b))
    lines.append(f"re-initialised the head: the file's {len(a)} classes are not this dataset's ({len(diff)} of "
                 f"{len(a)} differ in name or order; class {i} is {a[i]!r} in the file, {b[i]!r} in the data)")
    return lines


def split_label(dataset: str, split: str = "test") -> str:
    """What the ``test`` (official evaluation) or ``val`` (held-out) split of ``dataset`` really is."""
    if split == "val":
        return "held-out part of the training set"
    if str(dataset).startswith("inat"):
        return "validation set (val.json; iNaturalist's test labels are not public)"
    return "test set"


def position(epoch: int, batch: int, epochs: int, batches_per_epoch: int) -> str:
    """Where a run is, 1-based, as both the stop and the resume message say it: ``epoch`` epochs and
    ``batch`` batches of the next one are done."""
    if batch == 0:
        return f"after epoch {epoch}/{epochs}" if epoch else "at the start"
    return f"in epoch {epoch + 1}/{epochs}, {batch} of {batches_per_epoch} batches done"


def log_lines(log: Callable, prefix: str, lines: Sequence[str]) -> None:
    for line in lines:
        log(f"{prefix} {line}")
