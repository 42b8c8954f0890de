"""Representation quality of a pre-trained encoder: DINO's weighted k-NN and MAE's linear probe.

The reconstruction loss of a SparK run keeps falling while the encoder's features can plateau
or collapse; a k-NN classifier on frozen features says whether they separate classes. Both
measures here use the *dense* encoder (the same weights as the sparse one, eval mode, every
patch visible): an image's feature is the global average of the last (stride-32) feature map.

- :func:`weighted_knn`: DINO's weighted k-NN (Caron et al., 2021, ``eval_knn.py``): cosine
  similarity of L2-normalised features, the ``k`` nearest training images vote for their
  class with weight ``exp(similarity / T)``; top-1 / top-5 of the summed votes (ties go to
  the lower class index). Defaults ``k=20``, ``T=0.07``.
- :func:`linear_probe`: MAE's linear probing (He et al., 2022): ``BatchNorm1d(affine=False)``
  + ``Linear`` trained on the frozen pooled features (SGD with momentum, warm-up + cosine lr,
  no weight decay); top-1 / top-5 on the validation features. The features are computed once
  (centre crops, no augmentation), so an epoch costs a pass over a [N, C] matrix.
- :class:`KnnMonitor`: the k-NN inside pre-training (``eval.*`` keys of ``spark-pretrain``).
  Every process embeds its share of the images (whole batches, so one process and several
  compute the same numbers), the features are gathered across processes
  (`sparse_mim.utils.distributed.all_gather_rows`, padded for uneven shares) and every process gets the
  same result.
- :func:`evaluate_checkpoint`: the ``spark-knn`` command on any checkpoint: ours (``last.pth``,
  ``checkpoint-*.pth``, ``backbone.pth`` with ``--backbone``), official SparK release files
  (``*_withdecoder_1kpretrained_spark_style.pth``; ``*_1kpretrained_timm_style.pth`` with
  ``--backbone``).

Labelled images come from an ImageFolder tree (``root/<class>/.../*.jpg``, classes sorted by
folder name), a list file (``path label`` per line: an integer index or a class name; relative
paths are relative to the list file) or ``builtin``: the generated demo images, labelled by
their kind (stripes, checkerboard, blobs, rings). Evaluation transform: resize the shorter side
to ``size / 0.875``, centre crop, normalise (DINO / MAE). An unreadable image is left out of the
measure and counted.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .data import DataError, IMAGENET_MEAN, IMAGENET_STD, find_images, generate_image, load_rgb
from .utils import distributed as dist_utils

__all__ = ["weighted_knn", "linear_probe", "LabelledImages", "BUILTIN_CLASSES", "builtin_labelled_images",
           "read_labelled", "labelled_split", "subsample", "eval_transform", "pooled_features", "extract_features",
           "dense_encoder", "KnnMonitor", "knn_sets", "evaluate_checkpoint", "format_result",
           "check_config", "knn_root_of", "PretrainKnn"]

BUILTIN_CLASSES = ("stripes", "checkerboard", "blobs", "rings")  # generate_image's kinds: index % 4
_BUILTIN_TRAIN_OFFSET = 1_000_000  # labelled built-in images never used for pre-training (indices < builtin_images)
_BUILTIN_VAL_OFFSET = 2_000_000


# ---------------------------------------------------------------------------- the two measures
@torch.no_grad()
def weighted_knn(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> dict[str, float]:
    """DINO's weighted k-NN accuracy (%) of ``test_features`` against ``train_features``.

    Features are L2-normalised here (rows [N, C]); the ``k`` most similar training rows (cosine
    similarity ``s``) vote for their label with weight ``exp(s / temperature)``; the class with
    the most votes is the prediction (ties: the lower class index). Returns ``top1``, ``top5``
    (top-min(5, classes)), ``k`` (the k used: at most the number of training rows) and ``n``.
    """
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError(f"k-NN needs training and test images; got {train_features.shape[0]} training and "
                         f"{test_features.shape[0]} test features")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float().to(train.device), dim=1)
    train_labels = train_labels.to(train.device).long()
    test_labels = test_labels.to(train.device).long()
    C = int(num_classes if num_classes is not None else int(max(train_labels.max(), test_labels.max())) + 1)
    k = max(1, min(int(k), train.shape[0]))
    top_n = min(5, C)
    correct1 = correct5 = 0
    for s in range(0, test.shape[0], chunk):
        sim = test[s:s + chunk] @ train.T                                   # [B, N]
        weights, idx = sim.topk(k, dim=1)                                  # [B, k]
        votes = torch.zeros(sim.shape[0], C, dtype=torch.float64, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (weights.double() / temperature).exp())
        order = votes.argsort(dim=1, descending=True, stable=True)
        hits = order == test_labels[s:s + chunk, None]
        correct1 += int(hits[:, :1].any(1).sum())
        correct5 += int(hits[:, :top_n].any(1).sum())
    n = test.shape[0]
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "k": k, "n": n}


def _accuracy(logits: Tensor, labels: Tensor) -> tuple[int, int]:
    order = logits.argsort(dim=1, descending=True, stable=True)
    hits = order == labels[:, None]
    return int(hits[:, :1].any(1).sum()), int(hits[:, :min(5, logits.shape[1])].any(1).sum())


def linear_probe(train_features: Tensor, train_labels: Tensor, val_features: Tensor, val_labels: Tensor,
                 epochs: int, num_classes: int | None = None, batch_size: int = 256, lr: float | None = None,
                 warmup_epochs: float | None = None, seed: int = 0, progress: bool = False) -> dict[str, float]:
    """MAE's linear probe on frozen features: ``BatchNorm1d(affine=False, eps=1e-6)`` + ``Linear``.

    The head (weights trunc-normal 0.01, bias 0, as MAE) is trained for ``epochs`` passes over
    ``train_features`` in shuffled mini-batches of ``batch_size`` with SGD (momentum 0.9, no
    weight decay), lr ``0.1 x batch / 256`` by default, linear warm-up over ``warmup_epochs``
    (default: a tenth of the epochs, as MAE's 10 of 90) then cosine to 0. Returns validation
    ``top1`` / ``top5`` (%), the training top-1 of the final head and the last epoch's mean loss.
    """
    from timm.layers import trunc_normal_
    from .utils.schedules import WarmupCosine
    if epochs < 1:
        raise ValueError(f"linear probe epochs must be >= 1, got {epochs}")
    n, dim = train_features.shape
    if n < 2:
        raise ValueError(f"the linear probe needs at least 2 training images, got {n}")
    C = int(num_classes if num_classes is not None else int(max(train_labels.max(), val_labels.max())) + 1)
    device = train_features.device
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, C)).to(device)
        trunc_normal_(head[1].weight, std=0.01)
        nn.init.zeros_(head[1].bias)
    batch_size = min(batch_size, n)
    steps_per_epoch = max(1, n // batch_size)  # drop the incomplete batch (BatchNorm needs > 1 row)
    total = epochs * steps_per_epoch
    lr = 0.1 * batch_size / 256 if lr is None else lr
    warm = epochs / 10 if warmup_epochs is None else warmup_epochs
    schedule = WarmupCosine(lr, 0.0, total, min(total, int(round(warm * steps_per_epoch))))
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    x, y = train_features.float(), train_labels.long().to(device)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=epochs, desc="linear probe", dynamic_ncols=True, leave=False)
    step, loss_sum = 0, 0.0
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = schedule(step)
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss_sum) / steps_per_epoch:.4f}", refresh=False)
    if bar is not None:
        bar.close()
    head.eval()
    with torch.no_grad():
        train1, _ = _accuracy(head(x), y)
        val1, val5 = _accuracy(head(val_features.float().to(device)), val_labels.long().to(device))
    m = val_features.shape[0]
    return {"top1": 100.0 * val1 / m, "top5": 100.0 * val5 / m, "train_top1": 100.0 * train1 / n,
            "loss": float(loss_sum) / steps_per_epoch, "epochs": epochs, "n": m}


# ---------------------------------------------------------------------------- labelled images
def eval_transform(input_size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize the shorter side to ``size / 0.875`` (bicubic), centre crop ``input_size``, normalise."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode
    from .utils.misc import to_pair
    size = to_pair(input_size, "input_size")
    return T.Compose([T.Resize(int(round(max(size) / 0.875)), interpolation=InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(list(mean), list(std))])


class LabelledImages(Dataset):
    """Images with integer labels; ``__getitem__`` gives ``(image [3, H, W], label, readable)``.

    ``paths`` are files, or ``<builtin:INDEX>`` for a generated image (``builtin_size`` px). An
    unreadable file gives a zero image with ``readable`` False (left out of the measure, counted).
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str], transform=None,
                 builtin_size: int = 96, source: str = ""):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.classes = list(paths), [int(v) for v in labels], list(classes)
        self.transform, self.builtin_size, self.source = transform, builtin_size, source

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int):
        path = self.paths[i]
        if path.startswith("<builtin:"):
            from PIL import Image
            return Image.fromarray(generate_image(int(path[len("<builtin:"):-1]), self.builtin_size))
        return load_rgb(path)

    def __getitem__(self, i: int):
        try:
            img = self.load(i)
            ok = True
        except Exception:  # corrupt / vanished file: counted, never fatal for a running pre-training
            from PIL import Image
            img, ok = Image.new("RGB", (self.builtin_size, self.builtin_size)), False
        x = self.transform(img) if self.transform is not None else img
        return x, self.labels[i], ok

    def subset(self, index: Sequence[int]) -> "LabelledImages":
        index = [int(i) for i in index]
        return LabelledImages([self.paths[i] for i in index], [self.labels[i] for i in index], self.classes,
                              self.transform, self.builtin_size, self.source)


def builtin_labelled_images(num_images: int, split: str = "train", image_size: int = 96,
                            transform=None) -> LabelledImages:
    """Generated demo images labelled by their kind (``BUILTIN_CLASSES``), none of them a pre-training image."""
    offset = _BUILTIN_TRAIN_OFFSET if split == "train" else _BUILTIN_VAL_OFFSET
    index = range(offset, offset + int(num_images))
    return LabelledImages([f"<builtin:{i}>" for i in index], [i % len(BUILTIN_CLASSES) for i in index],
                          BUILTIN_CLASSES, transform, image_size, source=f"built-in images ({split})")


def _read_label_list(list_file: str) -> tuple[list[str], list[str]]:
    base = os.path.dirname(os.path.abspath(list_file))
    paths, raw = [], []
    with open(list_file) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise DataError(f"{list_file}:{n}: expected 'path label', got {line!r} (a labelled list file has "
                                "the image path and its class, an integer index or a name, on each line)")
            path = parts[0] if os.path.isabs(parts[0]) else os.path.join(base, parts[0])
            paths.append(path)
            raw.append(parts[1])
    return paths, raw


def read_labelled(root: str, what: str = "eval.knn_root") -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) of an ImageFolder tree or a labelled list file."""
    root = os.path.expanduser(root)
    if os.path.isdir(root):
        classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
        paths, labels = [], []
        for c, name in enumerate(classes):
            found = find_images(os.path.join(root, name))
            paths += found
            labels += [c] * len(found)
        if not paths:
            raise DataError(f"{what}={root!r}: no labelled images: expected an ImageFolder tree (one sub-folder per "
                            "class holding its images, e.g. root/dog/1.jpg) or a list file with 'path label' lines")
        return paths, labels, classes
    if os.path.isfile(root):
        paths, raw = _read_label_list(root)
        if not paths:
            raise DataError(f"{what}={root!r}: the list file holds no 'path label' lines")
        if all(r.lstrip("-").isdigit() for r in raw):
            labels = [int(r) for r in raw]
            if min(labels) < 0:
                raise DataError(f"{what}={root!r}: negative class index {min(labels)}; use 0-based indices or names")
            classes = [str(c) for c in range(max(labels) + 1)]
        else:
            classes = sorted(set(raw))
            labels = [classes.index(r) for r in raw]
        return paths, labels, classes
    raise DataError(f"{what}={root!r} does not exist; give an ImageFolder tree (one sub-folder per class), a list "
                    "file with 'path label' lines, or builtin for the labelled demo images")


def labelled_split(labels: Sequence[int], fraction: float) -> tuple[list[int], list[int]]:
    """(train, held-out) positions: every class gives an evenly spread ``fraction`` of its images to the
    held-out part (at least one when it has two or more), deterministically (no random numbers)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(int(c), []).append(i)
    train, held = [], []
    for members in by_class.values():
        n = len(members)
        n_held = min(max(int(round(n * fraction)), 1 if n >= 2 else 0), n - 1)
        picks = {int((j + 0.5) * n / n_held) for j in range(n_held)} if n_held else set()
        for j, i in enumerate(members):
            (held if j in picks else train).append(i)
    return sorted(train), sorted(held)


def subsample(labels: Sequence[int], limit: int) -> list[int]:
    """At most ``limit`` positions (all if ``limit`` <= 0 or not exceeded), evenly spread within every
    class so the class balance is kept; deterministic."""
    n = len(labels)
    if limit <= 0 or n <= limit:
        return list(range(n))
    keep = []
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(int(c), []).append(i)
    for members in by_class.values():
        m = max(1, int(round(len(members) * limit / n)))
        keep += [members[int(j * len(members) / m)] for j in range(min(m, len(members)))]
    return sorted(keep)


def knn_sets(root: str, val_root: str = "", val_fraction: float = 0.2, max_images: int = 0, transform=None,
             builtin_images: int = 512, builtin_size: int = 96) -> tuple[LabelledImages, LabelledImages]:
    """The (train, val) labelled sets of ``eval.knn_root`` / ``eval.knn_val_root``.

    ``root`` ``builtin``: generated images (``builtin_images`` reference images and half as many
    validation images). ``val_root`` empty: a held-out ``val_fraction`` of ``root``.
    ``max_images`` > 0: each set is cut to at most that many images (per class, evenly).
    """
    if root == "builtin":
        train = builtin_labelled_images(builtin_images, "train", builtin_size, transform)
        val = builtin_labelled_images(max(len(BUILTIN_CLASSES), builtin_images // 2), "val", builtin_size,
                                      transform)
    else:
        paths, labels, classes = read_labelled(root, "eval.knn_root")
        everything = LabelledImages(paths, labels, classes, transform, source=root)
        if val_root:
            v_paths, v_labels, v_classes = read_labelled(val_root, "eval.knn_val_root")
            if os.path.isdir(os.path.expanduser(val_root)) and os.path.isdir(os.path.expanduser(root)):
                unknown = sorted(set(v_classes) - set(classes))
                if unknown:
                    raise DataError(f"eval.knn_val_root={val_root!r} has classes the reference set "
                                    f"eval.knn_root={root!r} lacks: {unknown[:5]}")
                v_labels = [classes.index(v_classes[c]) for c in v_labels]
            train, val = everything, LabelledImages(v_paths, v_labels, classes, transform, source=val_root)
        else:
            tr, va = labelled_split(labels, val_fraction)
            if not va:
                raise DataError(f"eval.knn_root={root!r}: too few images per class to hold out a validation part; "
                                "add images or give eval.knn_val_root")
            train, val = everything.subset(tr), everything.subset(va)
    if max_images > 0:
        train, val = train.subset(subsample(train.labels, max_images)), val.subset(subsample(val.labels, max_images))
    return train, val


# ---------------------------------------------------------------------------- features
def pooled_features(encoder: nn.Module, images: Tensor) -> Tensor:
    """Global average of the encoder's last (stride-32) map, float32 [B, C] (not normalised)."""
    maps = encoder(images)
    return maps[-1].float().mean(dim=(2, 3))


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: LabelledImages, batch_size: int = 64,
                     device: torch.device | str = "cpu", num_workers: int = 0, autocast=None,
                     progress: bool = False, desc: str = "features") -> tuple[Tensor, Tensor, Tensor]:
    """Pooled features of every image of ``dataset``: ``(features [N, C] float32, labels [N], readable [N])``
    on ``device``, the same on every process.

    The images are cut into batches of ``batch_size`` (the same batches whatever the number of
    processes); process ``r`` of ``P`` embeds batches ``r, r + P, ...``; the rows are gathered
    and put back in dataset order.
    """
    import contextlib
    device = torch.device(device)
    n = len(dataset)
    world, rank = dist_utils.get_world_size(), dist_utils.get_rank()
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    mine = batches[rank::world]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    if isinstance(dataset, _CachedImages):
        num_workers = 0  # already decoded: nothing for loader workers to do
    width = int(encoder.channels[-1])
    rows = []  # [position, readable, feature...] per image
    was_training = encoder.training
    encoder.eval()
    ctx = autocast if autocast is not None else contextlib.nullcontext
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), desc=desc, dynamic_ncols=True, leave=False)
    for (images, _, ok), index in zip(loader, mine):
        with ctx():
            feats = pooled_features(encoder, images.to(device, non_blocking=True))
        head = torch.stack([torch.tensor(index, dtype=torch.float32), ok.float()], dim=1).to(device)
        rows.append(torch.cat([head, feats.float()], dim=1))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    encoder.train(was_training)
    local = torch.cat(rows) if rows else torch.zeros(0, width + 2, device=device)
    gathered = torch.cat(dist_utils.all_gather_rows(local))
    out = torch.empty(n, width + 2, device=device)
    out[gathered[:, 0].long()] = gathered
    labels = torch.tensor(dataset.labels, dtype=torch.long, device=device)
    return out[:, 2:].contiguous(), labels, out[:, 1] > 0.5


def dense_encoder(name: str, backbone_kwargs: Mapping[str, Any] | None = None,
                  state: Mapping[str, Tensor] | None = None) -> nn.Module:
    """The plain dense twin of a backbone (``create_backbone(name, sparse=None)``: unconverted layers, every
    patch visible), in eval mode, with ``state`` loaded strictly."""
    from .backbones import create_backbone
    kwargs = dict(backbone_kwargs or {})
    kwargs.pop("drop_path_rate", None)
    encoder = create_backbone(name, sparse=None, drop_path_rate=0.0, **kwargs)  # plain dense layers
    if state is not None:
        encoder.load_state_dict(dict(state), strict=True)
    return encoder.eval()


@dataclass
class _Features:
    train: Tensor
    train_labels: Tensor
    val: Tensor
    val_labels: Tensor
    unreadable: int


def _features(encoder, train_set, val_set, batch_size, device, num_workers, autocast, progress) -> _Features:
    tf, tl, tok = extract_features(encoder, train_set, batch_size, device, num_workers, autocast, progress,
                                   "k-NN reference features")
    vf, vl, vok = extract_features(encoder, val_set, batch_size, device, num_workers, autocast, progress,
                                   "k-NN validation features")
    if not bool(tok.any()) or not bool(vok.any()):
        raise DataError(f"no readable image in the k-NN {'reference' if not bool(tok.any()) else 'validation'} set "
                        f"({train_set.source if not bool(tok.any()) else val_set.source})")
    return _Features(tf[tok], tl[tok], vf[vok], vl[vok], int((~tok).sum() + (~vok).sum()))


# ---------------------------------------------------------------------------- monitor inside pre-training
class _CachedImages(Dataset):
    """A labelled set decoded and transformed once (the monitor's sets are evaluated again and again)."""

    def __init__(self, dataset: LabelledImages):
        items = [dataset[i] for i in range(len(dataset))]
        self.images = torch.stack([x for x, _, _ in items])
        self.ok = [bool(ok) for _, _, ok in items]
        self.labels, self.classes, self.source = dataset.labels, dataset.classes, dataset.source

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], self.ok[i]


def _maybe_cached(dataset: LabelledImages, input_size, budget_mb: float) -> Dataset:
    h, w = input_size
    return _CachedImages(dataset) if len(dataset) * 3 * h * w * 4 / 2 ** 20 <= budget_mb else dataset


class KnnMonitor:
    """Weighted k-NN of the pre-training encoder on a labelled set, at chosen steps.

    ``evaluate(backbone)`` copies the (sparse) backbone's weights into a dense twin built once,
    embeds both sets in eval mode with every patch visible, and returns ``{"top1", "top5",
    "seconds", ...}`` on every process (a collective call: every process must make it).
    Sets whose decoded images fit ``cache_mb`` (with ``input_size`` given) are decoded once, on
    the first evaluation, and kept in memory.
    """

    def __init__(self, train_set: LabelledImages, val_set: LabelledImages, backbone_name: str,
                 backbone_kwargs: Mapping[str, Any] | None = None, device: torch.device | str = "cpu",
                 batch_size: int = 64, k: int = 20, temperature: float = 0.07, num_workers: int = 0,
                 autocast=None, input_size=None, cache_mb: float = 256.0):
        self.train_set, self.val_set = train_set, val_set
        self.input_size, self.cache_mb, self._cached = input_size, cache_mb, input_size is None
        self.backbone_name, self.backbone_kwargs = backbone_name, dict(backbone_kwargs or {})
        self.device = torch.device(device)
        self.batch_size, self.k, self.temperature = int(batch_size), int(k), float(temperature)
        self.num_workers, self.autocast = num_workers, autocast
        self.num_classes = len(train_set.classes)
        self._encoder: nn.Module | None = None

    def describe(self) -> str:
        return (f"k-NN monitor: {len(self.train_set)} reference / {len(self.val_set)} validation images, "
                f"{self.num_classes} classes, k={self.k}, T={self.temperature:g}")

    def encoder_like(self, backbone: nn.Module) -> nn.Module:
        if self._encoder is None:
            with torch.random.fork_rng(devices=[]):  # the run's random streams stay as they were
                self._encoder = dense_encoder(self.backbone_name, self.backbone_kwargs).to(self.device)
        self._encoder.load_state_dict(backbone.state_dict(), strict=True)
        return self._encoder.eval()

    def evaluate(self, backbone: nn.Module, progress: bool = False) -> dict[str, float]:
        t0 = time.perf_counter()
        if not self._cached:
            self.train_set = _maybe_cached(self.train_set, self.input_size, self.cache_mb)
            self.val_set = _maybe_cached(self.val_set, self.input_size, self.cache_mb)
            self._cached = True
        encoder = self.encoder_like(backbone)
        with torch.random.fork_rng(devices=[]):  # loader iterators draw a seed: keep the run's stream as it was
            feats = _features(encoder, self.train_set, self.val_set, self.batch_size, self.device, self.num_workers,
                              self.autocast, progress)
        result = weighted_knn(feats.train, feats.train_labels, feats.val, feats.val_labels, self.k,
                              self.temperature, self.num_classes)
        result.update(seconds=time.perf_counter() - t0, unreadable=feats.unreadable)
        return result


def format_result(result: Mapping[str, float], label: str = "k-NN") -> str:
    return f"{label + ' ' if label else ''}top-1 {result['top1']:.1f} %, top-5 {result['top5']:.1f} %"


# ---------------------------------------------------------------------------- the spark-knn command
def _encoder_from_checkpoint(path: str, backbone: str | None = None, random_init: bool = False,
                             seed: int = 0) -> tuple[nn.Module, dict]:
    """A dense encoder with the checkpoint's weights (or a random init of the same architecture)."""
    from .backbones import load_backbone_weights
    from .export import backbone_from_checkpoint
    from .spark import NotASparKCheckpointError
    from .utils.checkpoint import check_state_finite, load_checkpoint
    ck = load_checkpoint(path)
    info: dict[str, Any] = {"input_size": None, "kind": "backbone state dict"}
    name, kwargs = backbone, {}
    if isinstance(ck, Mapping) and isinstance(ck.get("spark"), Mapping):  # ours: the model describes itself
        spark = ck["spark"]
        name = backbone or spark.get("backbone")
        kwargs = dict(spark.get("backbone_kwargs") or {})
        info.update(input_size=spark.get("input_size"), kind="sparse_mim pre-training checkpoint")
    elif isinstance(ck, Mapping) and isinstance(ck.get("module"), Mapping):  # official *_withdecoder_* file
        name = backbone or ck.get("arch")
        config = ck["module"].get("config") if isinstance(ck["module"].get("config"), Mapping) else {}
        info.update(input_size=ck.get("input_size") or config.get("sparse_encoder.input_size"),
                    kind="official SparK *_withdecoder_* file")
    elif isinstance(ck, Mapping) and not backbone:
        try:
            _, name, kwargs = backbone_from_checkpoint(ck, path)
            info["kind"] = "sparse_mim checkpoint"
        except NotASparKCheckpointError:
            name = None
    if not name:
        raise ValueError(f"{path} does not name its architecture (a backbone-only file such as backbone.pth or an "
                         "official *_1kpretrained_timm_style.pth); pass it with --backbone NAME (e.g. resnet50)")
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = dense_encoder(name, kwargs)
        info["kind"] = "random initialisation"
    else:
        encoder = dense_encoder(name, kwargs)
        state = ck["model"] if isinstance(ck, Mapping) and isinstance(ck.get("model"), Mapping) else ck
        load_backbone_weights(encoder, state, strict=True)
        check_state_finite(encoder.state_dict(), f"{path} is not usable")
    info["backbone"] = name
    return encoder.eval(), info


def evaluate_checkpoint(checkpoint: str, train_root: str, val_root: str = "", *, backbone: str | None = None,
                        img_size=None, batch_size: int = 64, k: int = 20, temperature: float = 0.07,
                        val_fraction: float = 0.2, max_images: int = 0, linear_probe_epochs: int = 0,
                        probe_lr: float | None = None, probe_batch_size: int = 256, random_init: bool = False,
                        device: str = "auto", num_workers: int = 0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """k-NN (and optionally the linear probe) of a checkpoint's encoder; the ``spark-knn`` command.

    Reads our pre-training checkpoints and official SparK release files (see the module
    docstring); ``img_size`` defaults to the checkpoint's input size (224 for files that do not
    record one). With several processes (torchrun) the features are shared out and gathered.
    Returns ``{"knn": {...}, "linear_probe": {...} or None, "backbone", "kind", "input_size", ...}``.
    """
    from .utils.misc import to_pair
    info = dist_utils.init_distributed(device)
    encoder, meta = _encoder_from_checkpoint(checkpoint, backbone, random_init, seed)
    size = to_pair(img_size if img_size is not None else (meta["input_size"] or 224), "img_size")
    transform = eval_transform(size, mean, std)
    train_set, val_set = knn_sets(train_root, val_root, val_fraction, max_images, transform)
    encoder.to(info.device)
    t0 = time.perf_counter()
    feats = _features(encoder, train_set, val_set, batch_size, info.device, num_workers, None,
                      progress and info.is_main)
    seconds = time.perf_counter() - t0
    C = len(train_set.classes)
    result = {"backbone": meta["backbone"], "kind": meta["kind"], "input_size": list(size),
              "train_images": int(feats.train.shape[0]), "val_images": int(feats.val.shape[0]), "classes": C,
              "unreadable": feats.unreadable, "feature_seconds": seconds,
              "knn": weighted_knn(feats.train, feats.train_labels, feats.val, feats.val_labels, k, temperature, C),
              "linear_probe": None}
    if linear_probe_epochs:
        result["linear_probe"] = linear_probe(feats.train, feats.train_labels, feats.val, feats.val_labels,
                                              linear_probe_epochs, C, probe_batch_size, probe_lr, seed=seed,
                                              progress=progress and info.is_main)
    return result


# ---------------------------------------------------------------------------- spark-pretrain's eval.* keys
def _config_defaults() -> dict:
    from .utils.config import K
    return {
        "knn_root": K("auto", "labelled images for the k-NN monitor: ImageFolder tree | list file ('path label' "
                      "lines) | builtin (the demo images labelled by kind) | auto (builtin when data.root is the "
                      "built-in set, else off) | '' (off)"),
        "knn_val_root": K("", "k-NN validation images (same forms as knn_root); '' = hold out knn_val_fraction "
                          "of knn_root"),
        "knn_val_fraction": K(0.2, "part of every class of knn_root held out for validation when knn_val_root is "
                              "''", gt=0.0, lt=1.0),
        "knn_every": K(2.0, "k-NN evaluation every N epochs (fractional allowed), and at the start and the end; "
                       "0 = only at the start and the end", min=0.0),
        "knn_k": K(20, "neighbours that vote (DINO: 20)", gt=0),
        "knn_temperature": K(0.07, "vote weight exp(cosine similarity / T) (DINO: 0.07)", gt=0.0),
        "knn_max_images": K(10000, "at most this many reference and this many validation images (evenly per class; "
                            "bounds the cost); 0 = all", min=0),
        "knn_batch_size": K(64, "images per process per forward of the k-NN evaluation", gt=0),
    }


def __getattr__(name):  # CONFIG_DEFAULTS built on first use (the config module stays out of plain imports)
    if name == "CONFIG_DEFAULTS":
        return _config_defaults()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def knn_root_of(cfg) -> str:
    """``eval.knn_root`` resolved: ``auto`` is ``builtin`` for the built-in pre-training images, else off."""
    root = cfg.eval.knn_root or ""
    if root == "auto":
        return "builtin" if cfg.data.root in ("", "builtin") else ""
    return root


def check_config(cfg) -> None:
    """``ConfigError`` for ``eval.*`` values that cannot go together (called when the config is loaded; whether
    the folders exist is checked when the monitor is built, before the first step, as for ``data.root``)."""
    from .utils.config import ConfigError
    if cfg.eval.knn_val_root == "builtin" and knn_root_of(cfg) != "builtin":
        raise ConfigError("eval.knn_val_root=builtin goes with eval.knn_root=builtin only (the labelled demo images)")
    if cfg.eval.knn_val_root and not knn_root_of(cfg):
        raise ConfigError(f"eval.knn_val_root={cfg.eval.knn_val_root!r} needs eval.knn_root (the labelled reference "
                          "images the validation images are compared with)")


class PretrainKnn:
    """The k-NN monitor of ``spark-pretrain``: evaluations at the start, every ``eval.knn_every`` epochs
    and at the end, a random-initialisation baseline, console lines, ``knn/*`` scalars.

    Every method is collective (every process calls it at the same step).
    """

    def __init__(self, cfg, model: nn.Module, device, steps_per_epoch: int, log_fn, say, autocast=None,
                 random_backbone=None):
        from .utils.checkpoint import unwrap_model
        self.cfg, self.say, self.log_fn = cfg, say, log_fn
        self.root = knn_root_of(cfg)
        self.steps_per_epoch = steps_per_epoch
        self.every = max(1, int(round(cfg.eval.knn_every * steps_per_epoch))) if cfg.eval.knn_every > 0 else 0
        spark = unwrap_model(model)
        self.model = spark
        self.random_backbone = random_backbone  # () -> a backbone with the run's initial weights
        transform = eval_transform(spark.input_size, cfg.data.mean, cfg.data.std)
        train, val = knn_sets(self.root, cfg.eval.knn_val_root, cfg.eval.knn_val_fraction, cfg.eval.knn_max_images,
                              transform, builtin_images=min(cfg.data.builtin_images, 256),
                              builtin_size=cfg.data.builtin_size)
        self.monitor = KnnMonitor(train, val, spark.backbone_name, spark.backbone_kwargs, device,
                                  cfg.eval.knn_batch_size, cfg.eval.knn_k, cfg.eval.knn_temperature,
                                  cfg.data.num_workers, autocast, input_size=spark.input_size)
        self.results: dict[str, Any] = {"start": None, "end": None, "random_init": None, "history": []}
        self.last_step = None
        self.spent = 0.0
        self.train_time = [time.perf_counter(), 0]  # (since, steps) for the cost per epoch
        say(f"{self.monitor.describe()} ({self.root}); every {self.every or 'run'} steps"
            + (f" ({cfg.eval.knn_every:g} epochs)" if self.every else " (start and end only)"))

    def _epoch_seconds(self, step: int) -> float | None:
        since, steps0 = self.train_time
        done = step - steps0
        if done <= 0:
            return None
        return (time.perf_counter() - since - self.spent) / done * self.steps_per_epoch

    def evaluate(self, state, when: str = "") -> dict:
        result = self.monitor.evaluate(self.model.backbone)
        self.spent += result["seconds"]
        self.last_step = state.step
        row = {"knn/top1": result["top1"], "knn/top5": result["top5"], "knn/seconds": result["seconds"],
               "train/images_seen": state.images_seen, "train/epoch": state.step / self.steps_per_epoch}
        self.results["history"].append((state.step, result["top1"], result["top5"]))
        base = self.results["random_init"]
        epoch_s = self._epoch_seconds(state.step)
        cost = (f"{result['seconds']:.1f} s" + (f" = {100 * result['seconds'] / epoch_s:.1f} % of an epoch"
                                                 if epoch_s else ""))
        self.say(f"k-NN{' ' + when if when else ''} at step {state.step}: {format_result(result, '')}"
                 + (f" (random init {base['top1']:.1f} %)" if base is not None and when != "random init" else "")
                 + f"; {cost}" + (f"; {result['unreadable']} unreadable images left out" if result["unreadable"]
                                  else ""))
        if self.log_fn is not None:
            self.log_fn(row, state.step)
        return result

    def start(self, state) -> None:
        fresh = state.step == 0 and not self.cfg.model.pretrained
        if not fresh and self.random_backbone is not None:
            t0 = time.perf_counter()
            rand = self.monitor.evaluate(self.random_backbone())
            self.spent += time.perf_counter() - t0
            self.results["random_init"] = rand
            self.say(f"k-NN of the randomly initialised encoder (baseline): {format_result(rand)}")
        self.results["start"] = self.evaluate(state, "random init" if fresh else "at the start")
        if fresh:
            self.results["random_init"] = self.results["start"]
        base = self.results["random_init"]
        if base is not None and self.log_fn is not None:
            self.log_fn({"knn/top1_random_init": base["top1"], "knn/top5_random_init": base["top5"]}, state.step)
        self.train_time = [time.perf_counter(), state.step]
        self.spent = 0.0

    def step(self, state) -> None:
        if self.every and state.step % self.every == 0 and state.step != self.last_step:
            self.evaluate(state)

    def end(self, state) -> None:
        if state.step != self.last_step:
            self.evaluate(state)
        last = self.results["history"][-1]
        self.results["end"] = {"step": last[0], "top1": last[1], "top5": last[2]}

    def summary(self) -> dict:
        """``knn/*`` values for the run's summary (wandb) and the final console lines."""
        out = {}
        for name in ("random_init", "end"):
            r = self.results[name]
            if r is not None:
                suffix = "" if name == "end" else "_" + name
                out[f"knn/top1{suffix}"], out[f"knn/top5{suffix}"] = r["top1"], r["top5"]
        return out
