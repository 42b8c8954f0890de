"""Sparse tensor engine: SparK's masked images as real sparse tensors (spconv + torch)."""
from .tensor import SparseMap, check_visible_mask, upsample_mask

__all__ = ["SparseMap", "check_visible_mask", "upsample_mask"]
