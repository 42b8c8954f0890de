"""Running a fine-tuned model over a loader: logits (``predict``) and top-1 / top-5 (``evaluate``).

Deterministic, under one meta condition: the meta as given, zeroed (the official "mask-meta" test)
or with some meta groups dropped. ``fgvc-train`` evaluates with these at every evaluation epoch,
``fgvc-eval`` / ``fgvc-predict`` / the dashboard read them too.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["predict", "evaluate", "topk_accuracy", "forward_model", "drop_meta_groups", "group_slices",
           "autocast_of"]


def group_slices(meta_sizes: Sequence[int]) -> List[slice]:
    """Column slice of each group in the flat meta vector (``meta_sizes`` = dim * tokens)."""
    out, start = [], 0
    for n in meta_sizes:
        out.append(slice(start, start + int(n)))
        start += int(n)
    return out


def drop_meta_groups(meta: torch.Tensor, meta_present: torch.Tensor, groups: Sequence[int], meta_sizes: Sequence[int]):
    """Zero the columns of ``groups`` (indices into meta_sizes) and mark them absent."""
    slices = group_slices(meta_sizes)
    bad = [g for g in groups if not 0 <= int(g) < len(slices)]
    if bad:
        raise ValueError(f"drop_groups {list(groups)}: group index {bad[0]} out of range for {len(slices)} meta "
                         f"group(s) of sizes {list(meta_sizes)}")
    meta, meta_present = meta.clone(), meta_present.clone()
    for g in groups:
        meta[:, slices[g]] = 0
        if meta_present.numel():
            meta_present[:, g] = False
    return meta, meta_present


def forward_model(model, images, meta, meta_present):
    """``model(images, meta, meta_present)``; image-only models (no meta groups) get no meta."""
    if meta is None or meta.shape[-1] == 0:
        return model(images)
    return model(images, meta, meta_present)


def autocast_of(amp):
    """``amp`` is an AmpPolicy (sparse_mim.utils.amp) or None (full precision)."""
    return amp.autocast() if amp is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, meta_mode: str = "full",
            drop_groups: Sequence[int] = (), meta_sizes: Optional[Sequence[int]] = None, amp=None,
            progress: bool = False, desc: str = "eval", allow_empty: bool = False) -> Dict[str, torch.Tensor]:
    """Logits of every sample in ``loader`` (in loader order) under one meta condition.

    ``meta_mode``: "full" (meta as given), "zero" (whole meta vector zeroed and marked
    absent: the official "mask-meta" test) or "drop" (zero the groups ``drop_groups``, indices
    into the model's meta groups). ``meta_sizes`` (flat width of each group) defaults to the
    loader's dataset (``loader.dataset.records.meta_groups``). ``amp``: an AmpPolicy or None.
    Returns ``logits`` [N, K] float32, ``labels`` [N], ``index`` [N] (rows in the records)
    and ``skipped`` (unreadable images).
    """
    if meta_mode not in ("full", "zero", "drop"):
        raise ValueError(f"meta_mode must be 'full', 'zero' or 'drop', got {meta_mode!r}")
    if meta_mode == "drop" and meta_sizes is None:
        records = getattr(getattr(loader, "dataset", None), "records", None)
        if records is None:
            raise ValueError("meta_mode='drop' needs meta_sizes (the flat width of each meta group) when the loader's "
                             "dataset is not an fgvc.data.FGVCDataset")
        meta_sizes = [g.dim * g.tokens for g in records.meta_groups]
    model.eval()
    logits_all, labels_all, index_all, skipped = [], [], [], 0
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for batch in it:
        skipped += batch["skipped"]
        if batch["images"] is None:
            continue
        images = batch["images"].to(device, non_blocking=True)
        meta = batch["meta"].to(device)
        present = batch["meta_present"].to(device)
        if meta_mode == "zero":
            meta, present = torch.zeros_like(meta), torch.zeros_like(present)
        elif meta_mode == "drop":
            meta, present = drop_meta_groups(meta, present, drop_groups, meta_sizes)
        with autocast_of(amp):
            logits = forward_model(model, images, meta, present)
        logits_all.append(logits.float().cpu())
        labels_all.append(batch["labels"])
        index_all.append(batch["index"])
    if not logits_all:
        if not allow_empty:
            raise RuntimeError("evaluation saw no readable image; check the dataset paths")
        return {"logits": torch.zeros(0, 0), "labels": torch.zeros(0, dtype=torch.long),
                "index": torch.zeros(0, dtype=torch.long), "skipped": skipped}
    logits = torch.cat(logits_all)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(1).sum())
        raise FloatingPointError(f"the model gave non-finite logits for {bad} of {logits.shape[0]} images: its weights "
                                 f"are not usable (a diverged run?); evaluate an earlier checkpoint")
    return {"logits": logits, "labels": torch.cat(labels_all), "index": torch.cat(index_all), "skipped": skipped}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> Dict[str, float]:
    """Top-k accuracy in percent (k clipped to the class count)."""
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        hit = (logits.topk(kk, dim=1).indices == labels[:, None]).any(1).float().mean().item()
        out[f"top{k}"] = 100.0 * hit
    return out


def evaluate(model: torch.nn.Module, loader, device: torch.device, meta_mode: str = "full",
             drop_groups: Sequence[int] = (), meta_sizes: Optional[Sequence[int]] = None, amp=None,
             progress: bool = False) -> Dict[str, float]:
    """top-1 / top-5 (percent) and mean cross-entropy under one meta condition.

    Under torch.distributed each process evaluates its own shard of ``loader`` (see
    ``fgvc.data.ShardSampler``) and the counts are summed over processes, so every rank
    gets the same numbers; with one process this is a plain evaluation.
    """
    from sparse_mim.utils.distributed import all_reduce_sum, is_distributed
    out = predict(model, loader, device, meta_mode, drop_groups, meta_sizes, amp, progress,
                  allow_empty=is_distributed())
    logits, labels = out["logits"], out["labels"]
    sums = torch.zeros(5, dtype=torch.float64)
    if labels.numel():
        k5 = min(5, logits.shape[1])
        top = logits.topk(k5, dim=1).indices
        sums[0] = float((top[:, 0] == labels).sum())
        sums[1] = float((top == labels[:, None]).any(1).sum())
        sums[2] = float(F.cross_entropy(logits, labels, reduction="sum"))
        sums[3] = labels.numel()
    sums[4] = out["skipped"]
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    sums = all_reduce_sum(sums.to(comm_device)).cpu()
    n = max(sums[3].item(), 1.0)
    return {"top1": 100.0 * sums[0].item() / n, "top5": 100.0 * sums[1].item() / n, "loss": sums[2].item() / n,
            "n": int(sums[3].item()), "skipped": int(sums[4].item())}
