"""Sparse tensor engine: SparK's masked images as real sparse tensors.

`SparseMap` holds the visible sites of a masked batch; `nn` has the sparse
layers (dense twins' parameter names, torch weight layout); `convert` turns a
dense model into its sparse twin (`sparsify`) or into SparK's dense-masked
simulation (`dense_masked` + `active_mask`), the reference for equivalence.
A `SparseMap` takes part in torch dispatch (`dispatch`), so model code written
for dense tensors runs on it unchanged; `kernels` has the grouped conv, average
pooling and global reductions; `report` (`mac_report`) tells how many
multiply-adds ran on sparse kernels and which ops used the exact dense fallback.
"""
from .tensor import SparseMap, check_visible_mask, upsample_mask
from .nn import (SparseAvgPool2d, SparseBatchNorm2d, SparseConv2d, SparseDropPath, SparseGELU, SparseGRN,
                 SparseIdentity, SparseLayerNorm, SparseLayerNorm2d, SparseLinear, SparseMaxPool2d, SparseReLU, SparseReLU6,
                 SparseSiLU, SparseSyncBatchNorm, sparse_global_avg_pool)
from .convert import (UnsupportedLayerError, active_mask, convert_sync_batchnorm, current_mask, dense_masked, mask_at,
                      sparsify)
from .report import MacReport, mac_report
from . import dispatch, functional, kernels, report

__all__ = [
    "SparseMap", "check_visible_mask", "upsample_mask",
    "SparseConv2d", "SparseBatchNorm2d", "SparseSyncBatchNorm", "SparseLayerNorm", "SparseLayerNorm2d", "SparseGRN",
    "SparseMaxPool2d", "SparseAvgPool2d", "SparseDropPath", "SparseLinear", "SparseIdentity", "SparseReLU",
    "SparseReLU6", "SparseGELU", "SparseSiLU", "sparse_global_avg_pool",
    "sparsify", "dense_masked", "active_mask", "current_mask", "mask_at", "convert_sync_batchnorm",
    "UnsupportedLayerError", "functional", "kernels", "dispatch", "report", "mac_report", "MacReport",
]
