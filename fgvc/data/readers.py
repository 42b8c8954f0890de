"""Readers for the fine-grained datasets MetaFormer uses, plus a custom CSV layout.

Each reader parses the official annotation files of one split into :class:`FGVCRecords`
(image paths, 0-based labels, class names, encoded meta, per-group "present" flags) and
never opens an image. Problems in the files are handled the same way everywhere:

* a missing annotation file -> ``FileNotFoundError`` naming the file and the layout;
* a malformed line, an out-of-range meta value, a label out of range, an image listed
  but absent on disk -> recorded in ``records.issues`` (file + line number); the sample
  is skipped (bad label / missing image / bad line) or its meta group marked missing
  (bad meta value). ``strict=True`` turns any issue into a ``ValueError``.

Layouts (paths relative to ``root``):

* CUB-200-2011: ``images.txt``, ``image_class_labels.txt`` (1-based), ``train_test_split.txt``,
  ``classes.txt``, ``images/``, ``attributes/image_attribute_labels.txt``; text embeddings
  from ``tools/prepare_text_meta.py`` in ``<text_dir>/<image path without extension>.npy``.
* NABirds: same files; the 555 class ids used in ``image_class_labels.txt`` are sorted and
  remapped to 0..554 (``classes.txt`` also lists the 1011 hierarchy nodes, so it is not
  used for the mapping).
* iNaturalist 2017 / 2018: ``{split}{year}.json`` (COCO-like) + ``{split}{year}_locations.json``
  (``id, lat, lon, date``); 2018 names from ``categories.json`` when present.
* iNaturalist 2021: ``train.json`` / ``train_mini.json`` / ``val.json`` with per-image
  ``date``, ``latitude``, ``longitude``.
* custom: a CSV with a header: an image path column (relative to ``image_root``), a
  label column (int indices or class names) and any meta columns, grouped by the config.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence

import numpy as np

from .meta import (
    CUB_NUM_ATTRIBUTES, SPATIAL_DIM, TEMPORAL_DIM, MetaGroup, MetaIssues, encode_numeric,
    spatial_from_lat_lon, temporal_from_date, temporal_from_month_hour,
)

__all__ = ["FGVCRecords", "read_cub", "read_nabirds", "read_inat", "read_custom_csv", "build_records",
           "DATASETS", "stratified_split"]

DATASETS = ("cub", "nabirds", "inat2017", "inat2018", "inat2021", "custom")

_logger = logging.getLogger(__name__)


@dataclass
class FGVCRecords:
    """All annotations of one split; images are loaded later by ``FGVCDataset``."""
    name: str
    paths: List[str]
    labels: np.ndarray                     # int64 [N], 0-based
    classes: List[str]
    meta_groups: List[MetaGroup]
    meta: np.ndarray                       # float32 [N, D]: the vector meta groups (not text)
    meta_present: np.ndarray               # bool [N, G] over meta_groups
    text_files: Optional[List[Optional[str]]] = None   # per image, [captions, tokens, dim] .npy
    issues: MetaIssues = field(default_factory=MetaIssues)
    notes: List[str] = field(default_factory=list)      # what the reader chose (e.g. a fallback file)

    def __len__(self):
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def meta_dims(self) -> List[int]:
        return [g.dim for g in self.meta_groups]

    def subset(self, index) -> "FGVCRecords":
        index = np.asarray(index, dtype=np.int64)
        return replace(
            self, paths=[self.paths[i] for i in index], labels=self.labels[index], meta=self.meta[index],
            meta_present=self.meta_present[index],
            text_files=None if self.text_files is None else [self.text_files[i] for i in index])


# ----------------------------------------------------------------------------------------- helpers
def _require(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what}: expected file {path!r} does not exist. Check data.root (the dataset layouts are "
            f"described in docs/fgvc_data.md).{_dataset_folder_hint(os.path.dirname(path), os.path.basename(path))}")
    return path


def _dataset_folder_hint(root: str, *names: str) -> str:
    """When ``root`` is the folder above a dataset: " data.root=<the folder inside that holds names[0]>?"."""
    try:
        subs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    except OSError:
        return ""
    for name in names:
        found = [os.path.join(root, d) for d in subs if os.path.isfile(os.path.join(root, d, name))]
        if found:
            return (f" {root} looks like the folder above the dataset: {found[0]} holds {name}; set "
                    f"data.root={found[0]}")
    return ""


def _read_table(path: str, min_fields: int, issues: MetaIssues):
    """Yield (line_number, fields) of a whitespace-separated file; short lines are reported."""
    from sparse_mim.utils.config import read_text_file
    for n, line in enumerate(read_text_file(path, "dataset file", error=ValueError).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < min_fields:
            issues.add(path, n, "bad line", f"expected at least {min_fields} fields, got {line.strip()!r}")
            continue
        yield n, fields


def _finish(records: FGVCRecords, strict: bool) -> FGVCRecords:
    if records.issues and strict:
        raise ValueError(f"{records.name}: data issues (strict mode):\n{records.issues.summary()}")
    if len(records) == 0:
        raise ValueError(f"{records.name}: no usable samples. Issues:\n{records.issues.summary()}")
    return records


def _drop_missing_images(keep: List[int], paths: List[str], issues: MetaIssues, listing: str):
    out = []
    for i in keep:
        if os.path.isfile(paths[i]):
            out.append(i)
        else:
            issues.add(listing, f"image {paths[i]}", "missing image", "listed but not found on disk")
    return out


def _empty_meta(n: int):
    return np.zeros((n, 0), np.float32), np.zeros((n, 0), bool)


# ----------------------------------------------------------------------------------------- CUB / NABirds
def _read_cub_layout(root, split, name, label_mode, num_classes, attributes, text_dir, check_files, strict):
    if split not in ("train", "test", "val"):
        raise ValueError(f"{name}: split must be 'train' or 'test' (got {split!r})")
    issues = MetaIssues()
    images_txt = _require(os.path.join(root, "images.txt"), name)
    labels_txt = _require(os.path.join(root, "image_class_labels.txt"), name)
    split_txt = _require(os.path.join(root, "train_test_split.txt"), name)

    images = {}
    for n, f in _read_table(images_txt, 2, issues):
        images[f[0]] = " ".join(f[1:])
    raw_labels = {}
    for n, f in _read_table(labels_txt, 2, issues):
        try:
            raw_labels[f[0]] = int(f[1])
        except ValueError:
            issues.add(labels_txt, n, "bad line", f"label {f[1]!r} is not an integer")
    is_train = {}
    for n, f in _read_table(split_txt, 2, issues):
        if f[1] not in ("0", "1"):
            issues.add(split_txt, n, "bad line", f"is_training_image must be 0 or 1, got {f[1]!r}")
            continue
        is_train[f[0]] = f[1] == "1"

    if label_mode == "one_based":
        names = {}
        classes_txt = os.path.join(root, "classes.txt")
        if os.path.isfile(classes_txt):
            for n, f in _read_table(classes_txt, 2, issues):
                names[int(f[0])] = " ".join(f[1:])
        n_cls = num_classes or (len(names) if names else 200)
        classes = [names.get(i + 1, str(i + 1)) for i in range(n_cls)]
        label_map = {i + 1: i for i in range(n_cls)}
    else:  # sorted_ids: NABirds
        ids = sorted(set(raw_labels.values()))
        if num_classes and len(ids) != num_classes:
            issues.add(labels_txt, "file", "class count", f"found {len(ids)} class ids, expected {num_classes}")
        names = {}
        classes_txt = os.path.join(root, "classes.txt")
        if os.path.isfile(classes_txt):
            for n, f in _read_table(classes_txt, 2, issues):
                try:
                    names[int(f[0])] = " ".join(f[1:])
                except ValueError:
                    pass
        classes = [names.get(i, str(i)) for i in ids]
        label_map = {cid: i for i, cid in enumerate(ids)}

    want_train = split == "train"
    ids, paths, labels = [], [], []
    for image_id, rel in images.items():
        if image_id not in raw_labels or image_id not in is_train:
            issues.add(images_txt, f"image id {image_id}", "bad line", "no label or no train/test split entry")
            continue
        if is_train[image_id] != want_train:
            continue
        raw = raw_labels[image_id]
        if raw not in label_map:
            issues.add(labels_txt, f"image id {image_id}", "label out of range",
                       f"label {raw} not in 1..{len(classes)}" if label_mode == "one_based" else f"label {raw}")
            continue
        ids.append(image_id)
        paths.append(os.path.join(root, "images", rel))
        labels.append(label_map[raw])

    keep = list(range(len(ids)))
    if check_files:
        keep = _drop_missing_images(keep, paths, issues, images_txt)

    groups: List[MetaGroup] = []
    meta, present = _empty_meta(len(ids))
    if attributes:
        attr_txt = _require(os.path.join(root, "attributes", "image_attribute_labels.txt"), f"{name} attributes")
        row_of = {image_id: i for i, image_id in enumerate(ids)}
        attr = np.zeros((len(ids), CUB_NUM_ATTRIBUTES), np.float32)
        seen = np.zeros(len(ids), bool)
        # "image_id attribute_id is_present certainty_id time"; a few official lines carry an
        # extra field before the time, so only the first four fields are read.
        for n, f in _read_table(attr_txt, 4, issues):
            row = row_of.get(f[0])
            if row is None:
                continue
            try:
                attr_id, is_present = int(f[1]), int(f[2])
            except ValueError:
                issues.add(attr_txt, n, "bad line", f"non-integer attribute id / is_present: {' '.join(f)!r}")
                continue
            if not 1 <= attr_id <= CUB_NUM_ATTRIBUTES:
                issues.add(attr_txt, n, "bad attribute", f"attribute_id {attr_id} out of range 1..{CUB_NUM_ATTRIBUTES}")
                continue
            if is_present not in (0, 1):
                issues.add(attr_txt, n, "bad attribute", f"is_present must be 0 or 1, got {is_present}")
                continue
            attr[row, attr_id - 1] = is_present
            seen[row] = True
        groups.append(MetaGroup("attributes", CUB_NUM_ATTRIBUTES, kind="numeric"))
        meta = attr
        present = seen[:, None].copy()
        missing_attr = int((~seen[keep]).sum()) if keep else 0
        if missing_attr:
            issues.add(attr_txt, "file", "missing attributes", f"{missing_attr} images have no attribute lines (zeros)")

    text_files = None
    if text_dir:
        text_root = text_dir if os.path.isabs(text_dir) else os.path.join(root, text_dir)
        if not os.path.isdir(text_root):
            raise FileNotFoundError(
                f"{name}: text embedding folder {text_root!r} not found; create it with "
                f"`python tools/prepare_text_meta.py --root {root} --bert /path/to/bert-base-uncased`")
        text_files = []
        has_text = np.zeros(len(ids), bool)
        for i, image_id in enumerate(ids):
            p = os.path.join(text_root, os.path.splitext(images[image_id])[0] + ".npy")
            text_files.append(p if os.path.isfile(p) else None)
            has_text[i] = text_files[-1] is not None
        n_missing = int((~has_text[keep]).sum()) if keep else 0
        if n_missing:
            issues.add(text_root, "folder", "missing text", f"{n_missing} images have no caption embedding (zeros)")
        dims = _text_shape(text_files)
        groups.append(MetaGroup("text", dims[1], tokens=dims[0], kind="text"))
        present = np.concatenate([present, has_text[:, None]], 1)

    rec = FGVCRecords(name=f"{name}/{split}", paths=paths, labels=np.asarray(labels, np.int64), classes=classes,
                      meta_groups=groups, meta=meta, meta_present=present, text_files=text_files, issues=issues)
    return _finish(rec.subset(keep) if len(keep) != len(ids) else rec, strict)


def _text_shape(text_files):
    for p in text_files:
        if p is not None:
            arr = np.load(p, mmap_mode="r")
            if arr.ndim != 3:
                raise ValueError(f"text embedding {p!r} has shape {arr.shape}; expected [captions, tokens, dim]")
            return int(arr.shape[1]), int(arr.shape[2])
    raise FileNotFoundError("no caption embedding file found; run tools/prepare_text_meta.py first")


def read_cub(root: str, split: str = "train", attributes: bool = False, text_dir: Optional[str] = None,
             check_files: bool = True, strict: bool = False, num_classes: Optional[int] = None) -> FGVCRecords:
    """CUB-200-2011, optionally with the 312 attributes and/or caption embeddings."""
    return _read_cub_layout(root, split, "cub", "one_based", num_classes, attributes, text_dir, check_files, strict)


def read_nabirds(root: str, split: str = "train", check_files: bool = True, strict: bool = False,
                 num_classes: Optional[int] = 555) -> FGVCRecords:
    """NABirds: CUB layout, sorted class ids remapped to 0..554."""
    return _read_cub_layout(root, split, "nabirds", "sorted_ids", num_classes, False, None, check_files, strict)


# ----------------------------------------------------------------------------------------- iNaturalist
def _load_json(path: str, what: str):
    _require(path, what)
    try:
        from sparse_mim.utils.config import read_text_file
        return json.loads(read_text_file(path, what, error=ValueError))
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested deeper than Python recurses
        raise ValueError(f"{what}: {path!r} is not valid JSON ({str(e)[:200]})") from None


def _inat_files(root: str, year: int, split: str):
    if year in (2017, 2018):
        if split not in ("train", "val"):
            raise ValueError(f"inat{year}: split must be 'train' or 'val' (the test split has no labels), got {split!r}")
        return (os.path.join(root, f"{split}{year}.json"), os.path.join(root, f"{split}{year}_locations.json"))
    if year == 2021:
        if split not in ("train", "train_mini", "val"):
            raise ValueError(f"inat2021: split must be 'train', 'train_mini' or 'val', got {split!r}")
        return os.path.join(root, f"{split}.json"), None
    raise ValueError(f"unknown iNaturalist year {year}; supported: 2017, 2018, 2021")


def read_inat(root: str, year: int, split: str = "train", use_meta: bool = True, use_hour: bool = True,
              ann_file: Optional[str] = None, loc_file: Optional[str] = None, check_files: bool = True,
              strict: bool = False) -> FGVCRecords:
    """iNaturalist 2017 / 2018 / 2021 with the 7-d spatio-temporal meta (groups [4, 3])."""
    name = f"inat{year}"
    default_ann, default_loc = _inat_files(root, year, split)
    notes = []
    if year == 2021 and split == "train" and not ann_file and not os.path.isfile(default_ann):
        mini = os.path.join(root, "train_mini.json")
        if os.path.isfile(mini):  # the "train_mini" download (as the official code falls back)
            notes.append(f"inat2021: {default_ann} not found, using {mini} (the train_mini subset); "
                         f"set data.train_split=train_mini to say so explicitly")
            _logger.warning(notes[-1])
            default_ann, split = mini, "train_mini"
        else:
            raise FileNotFoundError(f"inat2021 annotations: neither {default_ann!r} nor {mini!r} exists. Check "
                                    f"data.root (the dataset layouts are described in docs/fgvc_data.md)."
                                    f"{_dataset_folder_hint(root, 'train.json', 'train_mini.json')}")
    ann_path = ann_file or default_ann
    ann = _load_json(ann_path, f"{name} annotations")
    issues = MetaIssues()
    for key in ("images", "annotations", "categories"):
        if key not in ann:
            raise ValueError(f"{name}: {ann_path!r} has no {key!r} list; is it a COCO-style iNaturalist file?")

    cat_ids = sorted(int(c["id"]) for c in ann["categories"])
    label_map = {cid: i for i, cid in enumerate(cat_ids)}
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in ann["categories"]}
    cats_json = os.path.join(root, "categories.json")
    if year == 2018 and os.path.isfile(cats_json):
        names.update({int(c["id"]): c.get("name", str(c["id"])) for c in _load_json(cats_json, "inat2018 categories")})
    classes = [names[c] for c in cat_ids]

    label_of = {}
    for k, a in enumerate(ann["annotations"]):
        cid = a.get("category_id")
        if cid not in label_map:
            issues.add(ann_path, f"annotation #{k}", "label out of range", f"category_id {cid} not in categories")
            continue
        label_of[a["image_id"]] = label_map[cid]

    locations = {}
    loc_path = None
    if use_meta and year in (2017, 2018):
        loc_path = loc_file or default_loc
        for entry in _load_json(loc_path, f"{name} locations"):
            locations[entry["id"]] = entry

    paths, labels, metas, presents = [], [], [], []
    for k, img in enumerate(ann["images"]):
        if img["id"] not in label_of:
            continue  # unlabelled (e.g. a test file) or a bad category, reported above
        path = os.path.join(root, img["file_name"])
        if check_files and not os.path.isfile(path):
            issues.add(ann_path, f"image #{k}", "missing image", f"{path} not found on disk")
            continue
        paths.append(path)
        labels.append(label_of[img["id"]])
        if not use_meta:
            continue
        if year == 2021:
            src, where, src_file = img, f"image #{k} (id {img['id']})", ann_path
            lat, lon = img.get("latitude"), img.get("longitude")
        else:
            src = locations.get(img["id"], {})
            where, src_file = f"id {img['id']}", loc_path
            lat, lon = src.get("lat"), src.get("lon")
        t, t_ok = temporal_from_date(src.get("date"), issues, src_file, where, use_hour=use_hour)
        s, s_ok = spatial_from_lat_lon(lat, lon, issues, src_file, where)
        metas.append(np.concatenate([t, s]))
        presents.append((t_ok, s_ok))

    if use_meta:
        groups = [MetaGroup("temporal", TEMPORAL_DIM, kind="temporal"), MetaGroup("spatial", SPATIAL_DIM, kind="spatial")]
        meta = np.asarray(metas, np.float32).reshape(-1, TEMPORAL_DIM + SPATIAL_DIM)
        present = np.asarray(presents, bool).reshape(-1, 2)
    else:
        groups = []
        meta, present = _empty_meta(len(paths))
    rec = FGVCRecords(name=f"{name}/{split}", paths=paths, labels=np.asarray(labels, np.int64), classes=classes,
                      meta_groups=groups, meta=meta, meta_present=present, issues=issues, notes=notes)
    return _finish(rec, strict)


# ----------------------------------------------------------------------------------------- custom CSV
_GROUP_TYPES = ("date", "month_hour", "latlon", "numeric")
GROUP_KIND = {"date": "temporal", "month_hour": "temporal", "latlon": "spatial", "numeric": "numeric"}


def _check_group_spec(spec: dict, header: Sequence[str], csv_path: str):
    if not isinstance(spec, dict) or "type" not in spec or "columns" not in spec:
        raise ValueError(f"custom meta group {spec!r}: expected a mapping with 'type' and 'columns' "
                         f"(and optionally 'name'); types: {_GROUP_TYPES}")
    t, cols = spec["type"], list(spec["columns"])
    if t not in _GROUP_TYPES:
        raise ValueError(f"custom meta group type {t!r} unknown; choose from {_GROUP_TYPES}")
    need = {"date": (1, 1), "month_hour": (1, 2), "latlon": (2, 2), "numeric": (1, 10 ** 6)}[t]
    if not need[0] <= len(cols) <= need[1]:
        raise ValueError(f"custom meta group {spec.get('name', t)!r} of type {t!r} takes {need[0]}..{need[1]} "
                         f"columns, got {cols}")
    missing = [c for c in cols if c not in header]
    if missing:
        raise ValueError(f"{csv_path}: meta columns {missing} not in the CSV header {list(header)}")
    return t, cols


def custom_meta_groups(meta_spec: Sequence[dict]) -> List[MetaGroup]:
    """MetaGroups of a custom config without reading any file (for building the model)."""
    groups = []
    for spec in meta_spec or []:
        t = spec["type"]
        dim = {"date": TEMPORAL_DIM, "month_hour": TEMPORAL_DIM, "latlon": SPATIAL_DIM}.get(t, len(spec["columns"]))
        groups.append(MetaGroup(spec.get("name", t), dim, kind=GROUP_KIND[t]))
    return groups


def read_csv_table(csv_path: str, what: str = "CSV", key: Optional[str] = None):
    """``(header, [(line, row dict), ...])`` of a CSV file: UTF-8 with or without a BOM (Excel), header names
    stripped, each row with the line it starts on. Bytes that are not UTF-8 are refused naming the file and
    line; with ``key`` (a column) two rows with the same non-empty value are refused naming both lines."""
    import io
    from sparse_mim.utils.config import read_text_file
    text = read_text_file(csv_path, what, error=ValueError)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise ValueError(f"{csv_path}: empty CSV (a header line with the column names is required)")
    header = [h.strip() for h in reader.fieldnames]
    reader.fieldnames = header
    rows, start = [], reader.line_num + 1
    for row in reader:
        rows.append((start, row))
        start = reader.line_num + 1
    if key is not None:
        check_one_row_per(csv_path, rows, key)
    return header, rows


def check_one_row_per(csv_path: str, rows, key: str) -> None:
    """Refuse two rows with the same non-empty ``key`` value (one image listed twice), naming both lines:
    which one is meant cannot be guessed, and taking the last silently trains or predicts on the wrong one."""
    first: Dict[str, int] = {}
    for n, row in rows:
        value = (row.get(key) or "").strip()
        if value and first.setdefault(value, n) != n:
            raise ValueError(f"{csv_path}: lines {first[value]} and {n} are both for {key} {value[:200]!r}; "
                             f"keep one row per image")


def _read_csv_rows(csv_path: str, key: Optional[str] = None):
    _require(csv_path, "custom dataset CSV")
    return read_csv_table(csv_path, "custom dataset CSV", key)


def custom_classes(csv_path: str, label_column: str = "label", num_classes: Optional[int] = None) -> List[str]:
    """Class list of a custom CSV: integer labels -> '0'..'K-1'; names -> sorted unique names."""
    header, rows = _read_csv_rows(csv_path)
    if label_column not in header:
        raise ValueError(f"{csv_path}: label column {label_column!r} not in header {header}")
    values = [row[label_column].strip() for _, row in rows if row.get(label_column) not in (None, "")]
    if values and all(v.lstrip("-").isdigit() for v in values):
        k = num_classes or (max(int(v) for v in values) + 1)
        return [str(i) for i in range(k)]
    return sorted(set(values))


def read_custom_csv(csv_path: str, image_root: Optional[str] = None, classes: Optional[List[str]] = None,
                    path_column: str = "path", label_column: str = "label", meta: Sequence[dict] = (),
                    check_files: bool = True, strict: bool = False, name: str = "custom") -> FGVCRecords:
    """A folder of images plus a CSV ``path,label,<meta columns>``.

    ``classes`` fixes the label mapping (pass the train CSV's, see :func:`custom_classes`);
    integer labels index it directly, other labels are looked up by name. ``meta`` lists
    groups like ``{name: where, type: latlon, columns: [lat, lon]}``; types: ``date``
    (one column), ``month_hour`` (month[, hour]), ``latlon``, ``numeric`` (any columns).
    """
    header, rows = _read_csv_rows(csv_path, key=path_column)  # one row per image: a duplicate is an error
    for col in (path_column, label_column):
        if col not in header:
            raise ValueError(f"{csv_path}: column {col!r} not in header {header}; set data.path_column / "
                             f"data.label_column to the right names")
    specs = [_check_group_spec(s, header, csv_path) for s in meta or []]
    groups = custom_meta_groups(meta)
    classes = classes if classes is not None else custom_classes(csv_path, label_column)
    index_of = {c: i for i, c in enumerate(classes)}
    int_labels = list(classes) == [str(i) for i in range(len(classes))]
    image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(csv_path))
    issues = MetaIssues()

    paths, labels, metas, presents = [], [], [], []
    for n, row in rows:
        rel, raw = (row.get(path_column) or "").strip(), (row.get(label_column) or "").strip()
        if not rel or not raw:
            issues.add(csv_path, n, "bad line", "empty path or label")
            continue
        if int_labels:
            try:
                label = int(raw)
            except ValueError:
                issues.add(csv_path, n, "label out of range", f"label {raw!r} is not an integer class index")
                continue
            if not 0 <= label < len(classes):
                issues.add(csv_path, n, "label out of range", f"label {label} not in 0..{len(classes) - 1}")
                continue
        elif raw in index_of:
            label = index_of[raw]
        else:
            issues.add(csv_path, n, "label out of range", f"label {raw!r} is not one of the {len(classes)} classes")
            continue
        path = rel if os.path.isabs(rel) else os.path.join(image_root, rel)
        if check_files and not os.path.isfile(path):
            issues.add(csv_path, n, "missing image", f"{path} not found on disk")
            continue
        vecs, pres = [], []
        for (t, cols) in specs:
            vals = [row.get(c) for c in cols]
            if t == "date":
                v, ok = temporal_from_date(vals[0], issues, csv_path, n)
            elif t == "month_hour":
                v, ok = temporal_from_month_hour(vals[0], vals[1] if len(vals) > 1 else None, issues, csv_path, n)
            elif t == "latlon":
                v, ok = spatial_from_lat_lon(vals[0], vals[1], issues, csv_path, n)
            else:
                v, ok = encode_numeric(vals, issues, csv_path, n, cols)
            vecs.append(v)
            pres.append(ok)
        paths.append(path)
        labels.append(label)
        metas.append(np.concatenate(vecs) if vecs else np.zeros(0, np.float32))
        presents.append(pres)

    d = sum(g.dim for g in groups)
    rec = FGVCRecords(name=f"{name}:{os.path.basename(csv_path)}", paths=paths, labels=np.asarray(labels, np.int64),
                      classes=list(classes), meta_groups=groups,
                      meta=np.asarray(metas, np.float32).reshape(len(paths), d),
                      meta_present=np.asarray(presents, bool).reshape(len(paths), len(groups)), issues=issues)
    return _finish(rec, strict)


# ----------------------------------------------------------------------------------------- config entry
def build_records(data_cfg: Dict, split: str, classes: Optional[List[str]] = None) -> FGVCRecords:
    """Read one split from a ``data:`` config mapping (see configs/fgvc/*.yaml).

    ``split`` is 'train' or 'test'; 'test' maps to the official evaluation split ('test'
    for CUB / NABirds, 'val' for iNaturalist, ``test_csv`` for custom data). ``classes``
    (custom layout): the label mapping to use, e.g. a checkpoint's class list, so the
    test CSV is read without the training CSV.
    """
    ds = data_cfg["dataset"]
    root = data_cfg.get("root") or ""
    strict = bool(data_cfg.get("strict", False))
    check = bool(data_cfg.get("check_files", True))
    use_meta = bool(data_cfg.get("use_meta", True))
    if ds not in DATASETS:
        raise ValueError(f"data.dataset={ds!r} unknown; choose from {DATASETS}")
    if ds != "custom" and not root:
        raise ValueError(f"data.root is empty: pass data.root=/path/to/{ds} on the command line")
    if ds == "cub":
        return read_cub(root, "train" if split == "train" else "test",
                        attributes=use_meta and bool(data_cfg.get("attributes", False)),
                        text_dir=(data_cfg.get("text_dir") or None) if use_meta else None,
                        check_files=check, strict=strict)
    if ds == "nabirds":
        return read_nabirds(root, "train" if split == "train" else "test", check_files=check, strict=strict)
    if ds.startswith("inat"):
        year = int(ds[4:])
        if split == "train":
            s = data_cfg.get("train_split") or "train"
        else:
            s = "val"
        return read_inat(root, year, s, use_meta=use_meta, use_hour=bool(data_cfg.get("use_hour", True)),
                         check_files=check, strict=strict)
    # custom
    csv_key = "train_csv" if split == "train" else "test_csv"
    csv_path = data_cfg.get(csv_key)
    if not csv_path:
        raise ValueError(f"data.{csv_key} is empty: the custom layout needs data.train_csv and data.test_csv")
    if root and not os.path.isabs(csv_path):
        csv_path = os.path.join(root, csv_path)
    if classes is None:
        train_csv = data_cfg["train_csv"] if os.path.isabs(data_cfg["train_csv"]) or not root else os.path.join(
            root, data_cfg["train_csv"])
        classes = custom_classes(train_csv, data_cfg.get("label_column", "label"),
                                 data_cfg.get("num_classes") or None)
    image_root = data_cfg.get("image_root") or None
    if image_root and root and not os.path.isabs(image_root):
        image_root = os.path.join(root, image_root)
    return read_custom_csv(csv_path, image_root=image_root, classes=classes,
                           path_column=data_cfg.get("path_column", "path"),
                           label_column=data_cfg.get("label_column", "label"),
                           meta=list(data_cfg.get("meta_groups") or []) if use_meta else [],
                           check_files=check, strict=strict)


def stratified_split(labels: np.ndarray, fraction: float, seed: int = 0):
    """Split indices into (train, held-out) with ``fraction`` of every class held out.

    Seeded and independent of the order classes appear in; every class keeps at least one
    training sample, and a class with >= 2 samples gives at least one held-out sample.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * fraction))
        n_val = min(max(n_val, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        val_idx.extend(idx[:n_val].tolist())
        train_idx.extend(idx[n_val:].tolist())
    return np.sort(np.asarray(train_idx, np.int64)), np.sort(np.asarray(val_idx, np.int64))
