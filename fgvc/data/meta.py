"""Meta-information encoders for MetaFormer (spatio-temporal, attributes, text, numeric).

Every encoder turns raw values into a fixed-size float vector plus a "present" flag.
A truly missing value (empty field, ``None``) becomes zeros, which the MetaFormer meta
heads turn into a learned "unknown" token. A value that is present but impossible
(latitude 95, month 13, is_present 7) is never used silently: it is recorded in a
:class:`MetaIssues` report with the file and line number, and the field is treated as
missing. Readers print that report, or raise when ``strict`` is set.

The spatio-temporal encoding follows the official MetaFormer iNaturalist code:
``[sin(2pi m/12), cos(2pi m/12), sin(2pi h/24), cos(2pi h/24)]`` for month/hour and
``[cos(lat)cos(lon), cos(lat)sin(lon), sin(lat)]`` (radians) for the location, groups
``meta_dims = [4, 3]`` in that order. Unlike the official code, a 0.0 latitude or
longitude is a real coordinate (the equator / Greenwich), not "missing".
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "MetaGroup", "MetaIssues", "META_KINDS", "guess_kind", "TEMPORAL_DIM", "SPATIAL_DIM", "CUB_NUM_ATTRIBUTES",
    "parse_date", "encode_month_hour", "encode_lat_lon", "parse_float", "encode_numeric", "describe_meta",
]

TEMPORAL_DIM = 4
SPATIAL_DIM = 3
CUB_NUM_ATTRIBUTES = 312

# "2014-06-08", "2014-06-08 17:35:00+00:00", "2011-06-16T09:32:49", "2010/06/13 17:35"
_DATE_RE = re.compile(r"^\s*(\d{1,4})[-/](\d{1,2})[-/](\d{1,2})(?:[ T]+(\d{1,2}):(\d{1,2})(?::(\d{1,2}))?)?")


@dataclass(frozen=True)
class MetaGroup:
    """One meta group = one (or ``tokens``) MetaFormer meta token(s).

    ``dim`` is the width of the group's input vector (the ``meta_dims`` entry);
    ``tokens`` > 1 only for text embeddings (one token per word position). ``kind`` is
    the encoder that made the vector: ``temporal`` (month / hour, 4-d), ``spatial``
    (latitude / longitude, 3-d), ``numeric`` (plain values, e.g. CUB attributes) or
    ``text`` (caption embeddings); "" = unknown (then guessed from name and width).
    """
    name: str
    dim: int
    tokens: int = 1
    kind: str = ""

    @property
    def encoder(self) -> str:
        """``kind``, or a guess from the name / width for groups made without one."""
        return self.kind or guess_kind(self.name, self.dim, self.tokens)


META_KINDS = ("temporal", "spatial", "numeric", "text")


def guess_kind(name: str, dim: int, tokens: int = 1) -> str:
    """The encoder of a group known only by name and width (older checkpoints)."""
    if tokens > 1 or name == "text":
        return "text"
    if dim == TEMPORAL_DIM and name in ("temporal", "date", "month_hour", "time", "when"):
        return "temporal"
    if dim == SPATIAL_DIM and name in ("spatial", "latlon", "location", "where", "place"):
        return "spatial"
    return "numeric"


@dataclass
class MetaIssues:
    """Collects bad meta values / bad lines per file with line numbers.

    ``counts`` tallies issues per (file, kind); ``examples`` keeps the first few
    messages per file so the report stays short on a 500k-image dataset.
    """
    max_examples: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, file: str, line, kind: str, message: str):
        self.counts[(str(file), kind)] += 1
        ex = self.examples.setdefault(str(file), [])
        if len(ex) < self.max_examples:
            where = f"line {line}" if isinstance(line, int) else str(line)
            ex.append(f"{where}: {message}")

    def __len__(self):
        return sum(self.counts.values())

    def __bool__(self):
        return len(self) > 0

    def total(self, kind: Optional[str] = None) -> int:
        return sum(n for (f, k), n in self.counts.items() if kind is None or k == kind)

    def summary(self) -> str:
        if not self:
            return "no data issues"
        lines = []
        files = sorted({f for f, _ in self.counts})
        for f in files:
            kinds = ", ".join(f"{n} {k}" for (ff, k), n in sorted(self.counts.items()) if ff == f)
            lines.append(f"{f}: {kinds}")
            for ex in self.examples.get(f, []):
                lines.append(f"    {ex}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {f"{f}|{k}": n for (f, k), n in self.counts.items()}


def parse_date(text) -> Tuple[int, int, int, Optional[int]]:
    """Parse a date string into (year, month, day, hour or None).

    Raises ValueError when the string is not a date or the month / day / hour is out of
    range (month 13 is an error, not month 1 of next year).
    """
    m = _DATE_RE.match(str(text))
    if m is None:
        raise ValueError(f"not a date: {text!r} (expected YYYY-MM-DD[ HH:MM[:SS]])")
    year, month, day = int(m.group(1)), int(m.group(2)), int(m.group(3))
    hour = int(m.group(4)) if m.group(4) is not None else None
    if not 1 <= month <= 12:
        raise ValueError(f"month {month} out of range 1..12 in {text!r}")
    if not 1 <= day <= 31:
        raise ValueError(f"day {day} out of range 1..31 in {text!r}")
    if hour is not None and not 0 <= hour <= 23:
        raise ValueError(f"hour {hour} out of range 0..23 in {text!r}")
    return year, month, day, hour


def is_missing(value) -> bool:
    """True for None and empty / 'none' / 'null' / 'na' strings: a value that was never recorded.

    NaN (a float NaN or the text 'nan') is NOT missing: it is a broken value, reported and
    counted like inf by the encoders (and then treated as missing).
    """
    if value is None:
        return True
    if isinstance(value, str) and value.strip().lower() in ("", "none", "null", "na"):
        return True
    return False


def encode_month_hour(month: Optional[int], hour: Optional[int]) -> np.ndarray:
    """[sin, cos] of 2pi*month/12 then of 2pi*hour/24; a missing part stays zeros."""
    out = np.zeros(TEMPORAL_DIM, dtype=np.float32)
    if month is not None:
        out[0] = math.sin(2 * math.pi * month / 12)
        out[1] = math.cos(2 * math.pi * month / 12)
    if hour is not None:
        out[2] = math.sin(2 * math.pi * hour / 24)
        out[3] = math.cos(2 * math.pi * hour / 24)
    return out


def encode_lat_lon(lat: float, lon: float) -> np.ndarray:
    """3-d unit vector of a (latitude, longitude) in degrees; 0.0 is a real coordinate."""
    la, lo = math.radians(lat), math.radians(lon)
    return np.array([math.cos(la) * math.cos(lo), math.cos(la) * math.sin(lo), math.sin(la)], dtype=np.float32)


def parse_float(value) -> Optional[float]:
    """float(value), None when missing; ValueError when present but not a finite number (NaN, inf)."""
    if is_missing(value):
        return None
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"not a finite number: {value!r}")
    return v


def temporal_from_date(date, issues: MetaIssues, file: str, line, use_hour: bool = True):
    """Encode a date string -> (4-d vector, present). Bad dates are reported, not used."""
    if is_missing(date):
        return np.zeros(TEMPORAL_DIM, np.float32), False
    if isinstance(date, float):  # NaN / inf where a date string belongs (e.g. a pandas-written file)
        issues.add(file, line, "bad date", f"not a date: {date!r}")
        return np.zeros(TEMPORAL_DIM, np.float32), False
    try:
        _, month, _, hour = parse_date(date)
    except ValueError as e:
        issues.add(file, line, "bad date", str(e))
        return np.zeros(TEMPORAL_DIM, np.float32), False
    return encode_month_hour(month, hour if use_hour else None), True


def temporal_from_month_hour(month, hour, issues: MetaIssues, file: str, line):
    """Encode separate month (1..12) / hour (0..23) fields -> (4-d vector, present)."""
    try:
        m = parse_float(month)
        h = parse_float(hour) if hour is not None else None
    except ValueError as e:
        issues.add(file, line, "bad month/hour", str(e))
        return np.zeros(TEMPORAL_DIM, np.float32), False
    if m is not None and not (1 <= m <= 12 and m == int(m)):
        issues.add(file, line, "bad month/hour", f"month {month!r} out of range 1..12")
        m = None
    if h is not None and not (0 <= h < 24):
        issues.add(file, line, "bad month/hour", f"hour {hour!r} out of range 0..23")
        h = None
    if m is None and h is None:
        return np.zeros(TEMPORAL_DIM, np.float32), False
    return encode_month_hour(m, h), True


def spatial_from_lat_lon(lat, lon, issues: MetaIssues, file: str, line):
    """Encode latitude / longitude in degrees -> (3-d vector, present).

    Missing when either is missing; out of range (|lat| > 90, |lon| > 180) is reported.
    """
    try:
        la, lo = parse_float(lat), parse_float(lon)
    except ValueError as e:
        issues.add(file, line, "bad coordinate", str(e))
        return np.zeros(SPATIAL_DIM, np.float32), False
    if la is None or lo is None:
        return np.zeros(SPATIAL_DIM, np.float32), False
    if not -90.0 <= la <= 90.0:
        issues.add(file, line, "bad coordinate", f"latitude {la} out of range -90..90")
        return np.zeros(SPATIAL_DIM, np.float32), False
    if not -180.0 <= lo <= 180.0:
        issues.add(file, line, "bad coordinate", f"longitude {lo} out of range -180..180")
        return np.zeros(SPATIAL_DIM, np.float32), False
    return encode_lat_lon(la, lo), True


def encode_numeric(values: Sequence, issues: MetaIssues, file: str, line, columns: Sequence[str]):
    """Plain numeric columns -> (vector, present). Missing cells are zeros; the group is
    present when at least one cell is present. Non-numbers are reported and zeroed."""
    out = np.zeros(len(values), np.float32)
    present = False
    for i, (v, col) in enumerate(zip(values, columns)):
        try:
            f = parse_float(v)
        except ValueError:
            issues.add(file, line, "bad number", f"column {col!r}: {v!r} is not a number")
            continue
        if f is not None:
            out[i] = f
            present = True
    return out, present


def concat_groups(vectors: List[np.ndarray]) -> np.ndarray:
    return np.concatenate(vectors).astype(np.float32) if vectors else np.zeros(0, np.float32)


def decode_temporal(v) -> str:
    """'month M[, hour H]' of a 4-d month / hour encoding."""
    v = np.asarray(v, dtype=np.float64)
    text = ""
    if abs(v[0]) + abs(v[1]) > 0:
        month = round(math.degrees(math.atan2(v[0], v[1])) / 30.0) % 12 or 12
        text = f"month {month:.0f}"
    if abs(v[2]) + abs(v[3]) > 0:
        text += (", " if text else "") + f"hour {round(math.degrees(math.atan2(v[2], v[3])) / 15.0) % 24:.0f}"
    return text or "missing"


def decode_spatial(v) -> str:
    """'lat A, lon B' of a 3-d location encoding."""
    v = np.asarray(v, dtype=np.float64)
    lat = math.degrees(math.asin(max(-1.0, min(1.0, v[2]))))
    lon = math.degrees(math.atan2(v[1], v[0]))
    return f"lat {lat:.2f}, lon {lon:.2f}"


def describe_meta(groups: Sequence[MetaGroup], meta: np.ndarray, present: Sequence[bool]) -> dict:
    """Human-readable meta values of one sample (for prediction tables).

    Decoded by each group's encoder (``MetaGroup.encoder``), whatever the group is
    called: month / hour and latitude / longitude come back from their encodings.
    """
    out, start = {}, 0
    for g, ok in zip(groups, present):
        v = np.asarray(meta[start:start + g.dim * g.tokens], dtype=np.float64)
        start += g.dim * g.tokens
        kind = g.encoder
        if not ok:
            out[g.name] = "missing"
        elif kind == "temporal" and g.dim == TEMPORAL_DIM:
            out[g.name] = decode_temporal(v)
        elif kind == "spatial" and g.dim == SPATIAL_DIM:
            out[g.name] = decode_spatial(v)
        elif g.tokens > 1 or kind == "text":
            out[g.name] = f"{g.tokens} x {g.dim} embedding"
        elif g.dim <= 8:
            out[g.name] = ", ".join(f"{x:.3g}" for x in v)
        else:
            out[g.name] = f"{int((v != 0).sum())} of {g.dim} non-zero"
    return out
