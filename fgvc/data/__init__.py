"""fgvc data: dataset readers, meta encoders, transforms (no images are read at import)."""
from .meta import MetaGroup, MetaIssues, encode_lat_lon, encode_month_hour, parse_date
from .readers import (FGVCRecords, build_records, custom_classes, read_cub, read_custom_csv, read_inat, read_nabirds,
                      stratified_split, DATASETS)
from .dataset import FGVCDataset, ShardSampler, collate_skip_bad
from .transforms import build_transform

__all__ = [
    "MetaGroup", "MetaIssues", "encode_lat_lon", "encode_month_hour", "parse_date", "FGVCRecords", "build_records",
    "custom_classes", "read_cub", "read_custom_csv", "read_inat", "read_nabirds", "stratified_split", "DATASETS",
    "FGVCDataset", "ShardSampler", "collate_skip_bad", "build_transform",
]
