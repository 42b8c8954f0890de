"""Classify new photos with a trained fgvc checkpoint, with whatever meta-information is known.

    from fgvc import Predictor
    predictor = Predictor.from_checkpoint("outputs/fgvc_demo/best.pth")
    pred = predictor("photo.jpg", date="2021-06-14T09:30", lat=48.85, lon=2.35)
    print(pred)                      # top-5 class names with probabilities, and the meta it used
    pred.topk[0]                     # ("Parus major", 0.91)

The predictor rebuilds the model from what the training checkpoint stores (the model name,
input size and extra arguments of its config, the class list and the meta layout), applies
the evaluation transform (resize, centre crop, ImageNet normalisation) and encodes the meta
exactly as the dataset readers do (:func:`fgvc.data.meta.parse_date` ->
:func:`encode_month_hour`, :func:`encode_lat_lon`, attributes as a numeric vector). Any meta
group may be left out: it is then fed as absent (zeros and ``meta_present=False``), the
same input the model sees under training-time meta dropout. Every prediction says which
meta it used.

``predict_batch`` classifies many images at once, each with its own meta; :func:`predict_files`
classifies files and folders and writes a CSV, what ``fgvc-predict`` (``tools/predict_fgvc.py``;
its arguments are parsed in :mod:`fgvc.cli`) runs.
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .data.meta import (SPATIAL_DIM, TEMPORAL_DIM, MetaGroup, decode_spatial, decode_temporal, encode_lat_lon,
                        encode_month_hour, guess_kind, parse_date)

__all__ = ["Predictor", "Prediction", "predict_files", "read_fgvc_checkpoint", "check_same_classes", "dataset_label",
           "image_files", "read_meta_csv", "write_predictions_csv", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_CUSTOM_KIND = {"date": "temporal", "month_hour": "temporal", "latlon": "spatial", "numeric": "numeric"}


# ----------------------------------------------------------------------------------------- checkpoint
def read_fgvc_checkpoint(path: str) -> Dict[str, Any]:
    """A training checkpoint of ``fgvc.train`` (``best.pth`` / ``last.pth``), read weights-only.

    Clear one-line errors for a missing file, a folder (naming the checkpoint files in it),
    a damaged or foreign file, a weights file without the training config and class list,
    and non-finite weights.
    """
    from sparse_mim.utils.checkpoint import check_state_finite, load_checkpoint, unwrap_state_dict
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [n for n in ("best.pth", "last.pth") if os.path.isfile(os.path.join(path, n))]
        hint = (f"pass the checkpoint file in it: {os.path.join(path, found[0])}" if found else
                "it holds no best.pth / last.pth; pass the path of a .pth file")
        raise IsADirectoryError(f"checkpoint {path!r} is a folder; {hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; check the path (a training run writes "
                                f"<output_dir>/best.pth and last.pth)")
    ckpt = load_checkpoint(path)
    from sparse_mim.utils.checkpoint import require_checkpoint_kind
    require_checkpoint_kind(ckpt, path, ["fgvc"], "prediction / export")  # names a SparK or MetaFormer file as such
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and ckpt.get("classes")):
        keys = list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not an fgvc training checkpoint (it has no training config and class list; "
                         f"found {keys}): an official MetaFormer or plain weights file must be fine-tuned "
                         f"with fgvc-train first (model.pretrained=...), which writes best.pth")
    weights = unwrap_state_dict(ckpt)
    check_state_finite(weights, f"checkpoint {path!r} is not usable")
    ckpt["model"] = weights
    return ckpt


def dataset_label(cfg: Mapping) -> str:
    data = cfg.get("data", {}) if isinstance(cfg, Mapping) else {}
    if data.get("demo"):
        return "demo"
    name = {"cub": "CUB", "nabirds": "NABirds", "inat2017": "iNat 2017", "inat2018": "iNat 2018",
            "inat2021": "iNat 2021"}.get(str(data.get("dataset", "")), "")
    if name:
        return name
    csv_name = os.path.basename(str(data.get("train_csv") or ""))
    return f"custom {csv_name}" if csv_name else "custom"


def check_same_classes(ckpt_classes: Sequence[str], data_classes: Sequence[str], ckpt_label: str = "",
                       data_label: str = "") -> None:
    """Raise one line when a checkpoint's classes are not the data's:
    "checkpoint has 200 classes (CUB), data has 555 (NABirds)" or, for equal counts, the first difference."""
    a, b = list(ckpt_classes), list(data_classes)
    if a == b:
        return
    ca = f" ({ckpt_label})" if ckpt_label else ""
    cb = f" ({data_label})" if data_label else ""
    if len(a) != len(b):
        raise ValueError(f"checkpoint has {len(a)} classes{ca}, data has {len(b)}{cb}: evaluate on the dataset the "
                         f"model was trained on (or fine-tune it on this one)")
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    i = diff[0]
    raise ValueError(f"checkpoint and data both have {len(a)} classes but {len(diff)} names differ{ca or cb}: "
                     f"class {i} is {a[i]!r} in the checkpoint, {b[i]!r} in the data (another class list or order)")


# ----------------------------------------------------------------------------------------- results
@dataclass
class Prediction:
    """The top-k classes of one image and the meta-information the model was given."""
    source: str
    topk: List[Tuple[str, float]] = field(default_factory=list)   # (class name, probability), best first
    meta_used: Dict[str, str] = field(default_factory=dict)        # group -> decoded value or "missing"
    error: str = ""                                                # unreadable image: why (no topk)

    @property
    def label(self) -> Optional[str]:
        return self.topk[0][0] if self.topk else None

    @property
    def probability(self) -> Optional[float]:
        return self.topk[0][1] if self.topk else None

    def meta_text(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in self.meta_used.items()) if self.meta_used else "none (image only)"

    def __str__(self) -> str:
        if self.error:
            return f"{self.source}: skipped ({self.error})"
        lines = [f"{self.source}  [meta {self.meta_text()}]"]
        width = max(len(n) for n, _ in self.topk)
        lines += [f"  {i + 1}. {n:<{width}s}  {p:.4f}" for i, (n, p) in enumerate(self.topk)]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- meta
def _parse_when(date) -> Tuple[int, Optional[int]]:
    """(month, hour or None) of a date string, ``datetime.date`` / ``datetime.datetime``."""
    if isinstance(date, _dt.datetime):
        return date.month, date.hour
    if isinstance(date, _dt.date):
        return date.month, None
    _, month, _, hour = parse_date(str(date))
    return month, hour


def _read_vector(value, dim: int, what: str) -> np.ndarray:
    """A numeric meta vector from a sequence / array, or a file (``.npy``, or text: ``dim`` numbers,
    or CUB-style lines ``attribute_id is_present [...]`` with 1-based ids)."""
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: file {path!r} does not exist")
        if path.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            from sparse_mim.utils.config import read_text_file
            rows = [ln.replace(",", " ").split() for ln in read_text_file(path, what, error=ValueError).splitlines()
                    if ln.strip() and not ln.lstrip().startswith("#")]
            flat = [x for r in rows for x in r]
            try:
                numbers = [float(x) for x in flat]
            except ValueError:
                raise ValueError(f"{what}: {path!r} holds non-numeric values") from None
            if len(numbers) == dim:
                arr = np.asarray(numbers, np.float32)
            elif rows and all(len(r) >= 2 for r in rows):  # "attribute_id is_present ..." lines
                arr = np.zeros(dim, np.float32)
                for r in rows:
                    k = int(float(r[0]))
                    if not 1 <= k <= dim:
                        raise ValueError(f"{what}: id {k} in {path!r} out of range 1..{dim}")
                    arr[k - 1] = float(r[1])
            else:
                raise ValueError(f"{what}: {path!r} has {len(numbers)} numbers; the model expects {dim} "
                                 f"(or lines 'id value' with ids 1..{dim})")
    else:
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    arr = np.asarray(arr, np.float32).reshape(-1)
    if arr.size != dim:
        raise ValueError(f"{what}: got {arr.size} values, the model expects {dim}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: holds NaN / inf values")
    return arr


class Predictor:
    """A trained fgvc model ready to classify photos (see the module docstring).

    Build it with :meth:`from_checkpoint`; call it on one image (a path, a PIL image or an
    HxWx3 uint8 array) with optional ``date``, ``lat`` / ``lon``, ``attributes`` (the numeric
    group, e.g. CUB's 312 attributes), ``text`` (caption embeddings ``.npy``) or ``meta``
    (``{group name: value}`` for any group); use :meth:`predict_batch` for many images.
    """

    def __init__(self, model: torch.nn.Module, classes: Sequence[str], meta_groups: Sequence[MetaGroup],
                 img_size, device: Optional[torch.device] = None, amp: str = "auto", use_hour: bool = True,
                 name: str = "", custom_columns: Optional[Dict[str, List[str]]] = None, tta: str = "none"):
        from sparse_mim.utils.amp import resolve_amp
        from .data.transforms import build_transform
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.classes = list(classes)
        self.meta_groups = list(meta_groups)
        self.img_size = img_size
        self.transform = build_transform(False, img_size)
        self.tta = tta
        if tta != "none":  # test-time augmentation (fgvc.tta): the wrapped model averages its views' probabilities
            from .tta import TTAModel, tta_transform
            self.model, self.transform = TTAModel(self.model, tta).to(self.device).eval(), tta_transform(img_size, tta)
        self.amp = resolve_amp(amp, self.device)
        self.use_hour = use_hour
        self.name = name
        self.custom_columns = dict(custom_columns or {})
        self.meta_dim = sum(g.dim * g.tokens for g in self.meta_groups)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, device=None, amp: str = "auto", tta: str = "none") -> "Predictor":
        """Rebuild the model of a training checkpoint (``best.pth``) with its classes and meta layout.

        ``device``: None = CUDA when available, else CPU. ``amp``: auto | bf16 | fp16 | off
        (``auto`` = bf16 where the hardware computes it natively, else fp32). ``tta``: none | hflip |
        multicrop (:mod:`fgvc.tta`: class probabilities averaged over flipped / cropped views).
        """
        from .builders import build_model
        from .models import load_state_dict_exact
        ckpt = read_fgvc_checkpoint(path)
        cfg = ckpt["config"]
        m = cfg.get("model", {})
        data = cfg.get("data", {}) or {}
        specs = {s.get("name", s.get("type")): s for s in (data.get("meta_groups") or []) if isinstance(s, Mapping)}
        groups = []
        for g in ckpt.get("meta_groups") or []:
            kind = g.get("kind") or ""
            if not kind and g["name"] in specs:
                kind = _CUSTOM_KIND.get(specs[g["name"]].get("type"), "")
            groups.append(MetaGroup(g["name"], int(g["dim"]), int(g.get("tokens", 1)),
                                    kind or guess_kind(g["name"], int(g["dim"]), int(g.get("tokens", 1)))))
        kwargs = dict(m.get("kwargs") or {})
        kwargs.pop("init_backbone", None)
        kwargs.pop("pretrained", None)
        name = m.get("name", "metaformer_0")
        model = build_model({"name": name, "img_size": m.get("img_size", 224), "drop_path_rate": 0.0,
                             "kwargs": kwargs}, len(ckpt["classes"]), groups, init_weights=False)
        try:
            load_state_dict_exact(model, ckpt["model"])
        except ValueError as e:
            raise ValueError(f"{path}: {e} (the stored config says model.name={name!r})") from None
        columns = {n: list(s.get("columns") or []) for n, s in specs.items()}
        return cls(model, ckpt["classes"], groups, m.get("img_size", 224), device=device, amp=amp,
                   use_hour=bool(data.get("use_hour", True)), name=name, custom_columns=columns, tta=tta)

    # -- meta --------------------------------------------------------------------------------
    def describe(self) -> str:
        """One line: model, classes, device / precision and the meta it can take."""
        kinds = {"temporal": "date", "spatial": "lat/lon", "numeric": "attributes / numbers", "text": "text"}
        meta = ", ".join(f"{g.name} ({kinds.get(g.encoder, g.encoder)}, {g.dim}-d)" for g in self.meta_groups)
        return (f"{self.name or type(self.model).__name__}: {len(self.classes)} classes, {self.img_size} px, "
                f"{self.device.type} {self.amp.name}; meta groups: {meta or 'none (image-only model)'}")

    def encode_meta(self, date=None, lat=None, lon=None, attributes=None, text=None,
                    meta: Optional[Mapping[str, Any]] = None) -> Tuple[np.ndarray, np.ndarray, Dict[str, str],
                                                                       List[str]]:
        """(meta vector [D], present [G] bool, the meta used per group, notes on ignored inputs).

        Values are validated (a month 13, a latitude 95, a NaN is an error, not silently dropped);
        anything not given leaves its group absent.
        """
        meta = dict(meta or {})
        unknown = [k for k in meta if k not in {g.name for g in self.meta_groups}]
        if unknown:
            raise ValueError(f"meta groups {unknown} are not in the model; it has "
                             f"{[g.name for g in self.meta_groups] or 'none'}")
        if (lat is None) != (lon is None):
            raise ValueError("give both lat and lon (or neither)")
        vecs, present, used, notes = [], [], {}, []
        taken = set()
        numeric = [g for g in self.meta_groups if g.encoder == "numeric"]
        for g in self.meta_groups:
            size = g.dim * g.tokens
            v, ok = np.zeros(size, np.float32), False
            value = meta.get(g.name)
            kind = g.encoder
            if kind == "temporal" and g.dim == TEMPORAL_DIM:
                when = value if value is not None else date
                if when is not None and when != "":
                    month, hour = _parse_when(when)
                    hour = hour if self.use_hour else None
                    v, ok = encode_month_hour(month, hour), True
                    used[g.name] = decode_temporal(v)
                    taken.add("date")
            elif kind == "spatial" and g.dim == SPATIAL_DIM:
                where = value if value is not None else ((lat, lon) if lat is not None else None)
                if where is not None:
                    la, lo = (float(where[0]), float(where[1]))
                    if not (math.isfinite(la) and math.isfinite(lo)):
                        raise ValueError(f"latitude / longitude must be finite numbers, got {la}, {lo}")
                    if not -90.0 <= la <= 90.0:
                        raise ValueError(f"latitude {la} out of range -90..90")
                    if not -180.0 <= lo <= 180.0:
                        raise ValueError(f"longitude {lo} out of range -180..180")
                    v, ok = encode_lat_lon(la, lo), True
                    used[g.name] = decode_spatial(v)
                    taken.add("latlon")
            elif kind == "text":
                src = value if value is not None else text
                if src is not None:
                    arr = np.load(os.fspath(src), allow_pickle=False) if isinstance(src, (str, os.PathLike)) \
                        else np.asarray(src)
                    arr = arr[0] if arr.ndim == 3 else arr  # [captions, tokens, dim]: the first caption
                    v = _read_vector(arr, size, f"meta group {g.name!r} (text embedding)")
                    ok = True
                    used[g.name] = f"{g.tokens} x {g.dim} embedding"
                    taken.add("text")
            else:  # numeric: by name, or `attributes` for the (only / 'attributes') numeric group
                src = value
                if src is None and attributes is not None and (g.name == "attributes" or len(numeric) == 1):
                    src = attributes
                    taken.add("attributes")
                if src is not None:
                    v, ok = _read_vector(src, size, f"meta group {g.name!r}"), True
                    used[g.name] = (f"{int((v != 0).sum())} of {size} non-zero" if size > 8
                                    else ", ".join(f"{x:.3g}" for x in v))
            if not ok:
                used[g.name] = "missing"
            vecs.append(v)
            present.append(ok)
        for key, given in (("date", date is not None and date != ""), ("latlon", lat is not None),
                           ("attributes", attributes is not None), ("text", text is not None)):
            if given and key not in taken:
                label = {"latlon": "lat/lon"}.get(key, key)
                notes.append(f"{label} given but the model has no group that takes it: ignored")
        vec = np.concatenate(vecs).astype(np.float32) if vecs else np.zeros(0, np.float32)
        return vec, np.asarray(present, bool), used, notes

    # -- prediction --------------------------------------------------------------------------
    def preprocess(self, image) -> torch.Tensor:
        """The evaluation transform of one image (a path, a PIL image or an HxWx3 uint8 array) -> [3, H, W]."""
        from PIL import Image
        if isinstance(image, (str, os.PathLike)):
            from .data.dataset import load_image
            image = load_image(os.fspath(image))
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a path, a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")
        from sparse_mim.data import upright
        return self.transform(upright(image).convert("RGB"))  # a PIL image opened by the caller keeps its EXIF

    @torch.no_grad()
    def logits(self, images: torch.Tensor, meta: Optional[torch.Tensor] = None,
               meta_present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw logits [B, classes] (float32) of transformed images and encoded meta."""
        images = images.to(self.device)
        with self.amp.autocast():
            if not self.meta_groups:
                out = self.model(images)
            else:
                out = self.model(images, meta.to(self.device), meta_present.to(self.device))
        return out.float()

    def __call__(self, image, date=None, lat=None, lon=None, attributes=None, text=None,
                 meta: Optional[Mapping[str, Any]] = None, topk: int = 5) -> Prediction:
        """Top-k classes of one image with the given meta (any of it may be left out)."""
        return self.predict_batch([image], [dict(date=date, lat=lat, lon=lon, attributes=attributes, text=text,
                                                 meta=meta)], topk=topk, skip_unreadable=False)[0]

    def predict_batch(self, images: Sequence, metas: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
                      topk: int = 5, batch_size: int = 32, skip_unreadable: bool = True,
                      progress: bool = False) -> List[Prediction]:
        """Classify ``images`` (paths / PIL images / arrays), each with its own meta.

        ``metas[i]`` holds the keyword arguments of :meth:`__call__` for image i (``date``,
        ``lat``, ``lon``, ``attributes``, ``text``, ``meta``); None = no meta. Unreadable
        images give a Prediction with ``error`` set (``skip_unreadable=False`` raises instead).
        """
        if metas is not None and len(metas) != len(images):
            raise ValueError(f"got {len(images)} images but {len(metas)} meta entries")
        k = max(1, min(int(topk), len(self.classes)))
        results: List[Optional[Prediction]] = [None] * len(images)
        order = range(0, len(images), batch_size)
        if progress:
            from tqdm import tqdm
            order = tqdm(order, desc="predict", unit="batch", leave=False, dynamic_ncols=True)
        for start in order:
            idx, tensors, vecs, pres = [], [], [], []
            for i in range(start, min(start + batch_size, len(images))):
                src = images[i]
                label = os.fspath(src) if isinstance(src, (str, os.PathLike)) else f"image {i}"
                vec, present, used, _ = self.encode_meta(**dict((metas[i] if metas is not None else None) or {}))
                try:
                    tensors.append(self.preprocess(src))
                except (OSError, ValueError) as e:
                    if not skip_unreadable:
                        raise ValueError(f"cannot read image {label}: {e}") from e
                    results[i] = Prediction(label, [], used, error=f"{type(e).__name__}: {e}")
                    continue
                idx.append(i)
                vecs.append(vec)
                pres.append(present)
                results[i] = Prediction(label, [], used)
            if not idx:
                continue
            logits = self.logits(torch.stack(tensors), torch.from_numpy(np.stack(vecs)),
                                 torch.from_numpy(np.stack(pres)))
            probs, top = logits.softmax(-1).topk(k, dim=-1)
            for row, i in enumerate(idx):
                results[i].topk = [(self.classes[c], float(p)) for c, p in zip(top[row].tolist(),
                                                                              probs[row].tolist())]
        return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- files
def image_files(inputs: Iterable[str]) -> List[str]:
    """The image files named by ``inputs``: files as given, folders searched recursively (sorted,
    symlinked folders not followed, so a link loop cannot repeat images)."""
    out = []
    for src in inputs:
        src = os.fspath(src)
        if os.path.isdir(src):
            found = []
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                raise FileNotFoundError(f"folder {src!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            out += found
        elif os.path.isfile(src):
            out.append(src)
        else:
            raise FileNotFoundError(f"image {src!r} does not exist")
    return out


_PATH_COLUMNS = ("path", "image", "file", "filename", "file_name")


def read_meta_csv(path: str, predictor: Optional[Predictor] = None) -> Dict[str, Dict[str, Any]]:
    """Per-image meta from a CSV: ``{image path or file name: keyword arguments of Predictor.__call__}``.

    Columns: an image column (``path`` / ``image`` / ``file`` / ``filename``), then any of ``date``,
    ``lat`` / ``latitude``, ``lon`` / ``longitude``, ``attributes`` (a file), and for a custom
    dataset the columns its meta groups were trained from (the recipe's ``data.meta_groups``).
    Empty cells are missing meta.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"meta CSV {path!r} does not exist")
    from .data.readers import check_one_row_per, read_csv_table
    header, numbered = read_csv_table(path, "meta CSV")
    key = next((c for c in _PATH_COLUMNS if c in header), None)
    if key is None:
        raise ValueError(f"{path}: no image column; name one of {_PATH_COLUMNS} (found {header})")
    check_one_row_per(path, numbered, key)  # two rows for one image: an error naming both lines

    def cell(row, *names):
        for n in names:
            v = (row.get(n) or "").strip()
            if v:
                return v
        return None

    out = {}
    groups = predictor.meta_groups if predictor is not None else []
    columns = predictor.custom_columns if predictor is not None else {}
    for n, row in numbered:
        img = cell(row, key)
        if not img:
            continue
        kw: Dict[str, Any] = {}
        try:
            kw["date"] = cell(row, "date", "datetime", "observed_on")
            lat, lon = cell(row, "lat", "latitude"), cell(row, "lon", "longitude")
            kw["lat"] = float(lat) if lat is not None else None
            kw["lon"] = float(lon) if lon is not None else None
            kw["attributes"] = cell(row, "attributes")
            kw["text"] = cell(row, "text")
            meta = {}
            for g in groups:  # custom datasets: the training columns of each group
                cols = columns.get(g.name) or []
                vals = [cell(row, c) for c in cols]
                if not cols or all(v is None for v in vals):
                    continue
                if g.encoder == "temporal" and len(cols) == 1:
                    meta[g.name] = vals[0]
                elif g.encoder == "temporal":  # month[, hour] columns
                    month = int(float(vals[0])) if vals[0] is not None else None
                    hour = int(float(vals[1])) if len(vals) > 1 and vals[1] is not None else 0
                    meta[g.name] = _dt.datetime(2000, month, 1, hour) if month else None
                elif g.encoder == "spatial" and None not in vals:
                    meta[g.name] = (float(vals[0]), float(vals[1]))
                elif g.encoder == "numeric":
                    meta[g.name] = [float(v) if v is not None else 0.0 for v in vals]
            kw["meta"] = {k: v for k, v in meta.items() if v is not None} or None
        except ValueError as e:
            raise ValueError(f"{path} line {n}: {e}") from None
        out[img] = {k: v for k, v in kw.items() if v is not None}
    # also found by absolute path (relative paths are relative to the CSV's folder) and, where it is
    # unique, by file name alone
    base = os.path.dirname(os.path.abspath(path))
    extra, names = {}, {}
    for img, kw in out.items():
        extra[os.path.abspath(img if os.path.isabs(img) else os.path.join(base, img))] = kw
        names.setdefault(os.path.basename(img), []).append(kw)
    for name, kws in names.items():
        if len(kws) == 1:
            extra.setdefault(name, kws[0])
    return {**extra, **out}


def meta_for(image: str, table: Mapping[str, Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
    """The meta-CSV row of ``image``: by its path as given, its absolute path, or (if unique) its file name."""
    for key in (os.path.abspath(image), image, os.path.basename(image)):
        if key in table:
            return table[key]
    return None


def write_predictions_csv(path: str, predictions: Sequence[Prediction], topk: int) -> str:
    """``path`` with one row per image: path, top-1..k classes and probabilities, meta used, error."""
    from sparse_mim.utils.checkpoint import atomic_write
    cols = ["path"] + [c for i in range(1, topk + 1) for c in (f"top{i}", f"top{i}_prob")] + ["meta_used", "error"]

    def write(f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(cols)
        for p in predictions:
            row = [p.source]
            for i in range(topk):
                row += [p.topk[i][0], f"{p.topk[i][1]:.6f}"] if i < len(p.topk) else ["", ""]
            w.writerow(row + [p.meta_text(), p.error])

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, write, binary=False)
    return path


# ----------------------------------------------------------------------------------------- many files
def predict_files(checkpoint: str, images: Sequence[str], *, date=None, lat: Optional[float] = None,
                  lon: Optional[float] = None, attributes=None, text=None, meta_csv: Optional[str] = None,
                  topk: int = 5, out: str = "predictions.csv", device=None, amp: str = "auto", batch_size: int = 32,
                  tta: str = "none", quiet: bool = False, log=print) -> List[Prediction]:
    """Classify image files and folders (searched recursively) with a training checkpoint: what
    ``fgvc-predict`` does. ``date`` / ``lat`` / ``lon`` / ``attributes`` / ``text`` apply to every image;
    ``meta_csv`` (:func:`read_meta_csv`) gives per-image values and wins over them. Logs each prediction
    (unless ``quiet``) and a summary line, writes ``out`` (:func:`write_predictions_csv`; ``''`` = no file)
    and returns the predictions (an unreadable image has ``error`` set)."""
    files = image_files(images)
    predictor = Predictor.from_checkpoint(checkpoint, device=device, amp=amp, tta=tta)
    log(f"[predict] {predictor.describe()}")
    table = read_meta_csv(meta_csv, predictor) if meta_csv else {}
    common = dict(date=date, lat=lat, lon=lon, attributes=attributes, text=text)
    common = {k: v for k, v in common.items() if v is not None}
    metas, unmatched = [], 0
    for f in files:
        row = meta_for(f, table) if table else None
        if table and row is None:
            unmatched += 1
        metas.append({**common, **(row or {})})
    if table and unmatched:
        log(f"[predict] {unmatched} of {len(files)} images have no row in {meta_csv} (their meta: "
            f"{'the command-line values' if common else 'none'})")
    _, _, _, notes = predictor.encode_meta(**{k: v for k, v in common.items()})
    for n in notes:
        log(f"[predict] note: {n}")
    preds = predictor.predict_batch(files, metas, topk=topk, batch_size=batch_size,
                                    progress=len(files) > batch_size)
    k = max(1, min(topk, len(predictor.classes)))
    if not quiet:
        for p in preds:
            log(str(p))
    bad = [p for p in preds if p.error]
    if out:
        write_predictions_csv(out, preds, k)
    log(f"[predict] {len(preds) - len(bad)} image(s) classified" + (f", {len(bad)} unreadable (skipped)" if bad else "")
        + (f"; wrote {out}" if out else ""))
    return preds
