"""Sparse tensor engine: SparK's masked images as real sparse tensors.

`SparseMap` holds the visible sites of a masked batch; `nn` has the sparse
layers (dense twins' parameter names, torch weight layout); `convert` turns a
dense model into its sparse twin (`sparsify`) or into SparK's dense-masked
simulation (`dense_masked` + `active_mask`), the reference for equivalence.
A `SparseMap` takes part in torch dispatch (`dispatch`), so model code written
for dense tensors runs on it unchanged; `functional` has the exact sparse ops,
`kernels` runs them for the dispatch and the layers (counting their MACs) and
has the global reductions; `report` (`mac_report`) tells how many
multiply-adds ran on sparse kernels and which ops used the exact dense fallback.

Layers (`LAYERS`): a module imports only modules of lower layers, at its top
(no import inside a function), so the engine has no import cycle;
tests/sparse/test_import_layers.py keeps it so.

    0  tensor, report, autotune     the map type; MAC counters and module scopes; the conv autotuner
    1  geometry, spconv_backend     site arithmetic (sizes, coarse maps, neighbour tables); spconv calls
    2  functional                   the exact sparse ops (conv paths, pools, norms, reductions)
    3  kernels                     the ops as dispatch and the layers run them, counting MACs
    4  dispatch                     torch calls on a map; connects `SparseMap` and `report` to it
    5  nn                           the sparse layers
    6  convert                      sparsify / dense_masked / active_mask

Lower layers reach upward only through what a higher layer plugs in:
`dispatch` connects the map's torch calls and the report's "a forward pass
starts" signal (``tensor.connect``), and hands `report` the function that turns
a module's off-grid dense outputs back into maps (``dispatch.mark_dense``).
This package module imports the public names of every layer.
"""
from .tensor import SparseMap, check_visible_mask, upsample_mask
from .nn import (SparseAvgPool2d, SparseBatchNorm2d, SparseConv2d, SparseDropPath, SparseGELU, SparseGRN,
                 SparseIdentity, SparseLayerNorm, SparseLayerNorm2d, SparseLinear, SparseMaxPool2d, SparseReLU, SparseReLU6,
                 SparseSiLU, SparseSyncBatchNorm, sparse_global_avg_pool)
from .convert import (UnsupportedLayerError, active_mask, convert_sync_batchnorm, current_mask, dense_masked, mask_at,
                      sparsify)
from .report import MacReport, mac_report
from . import dispatch, functional, geometry, kernels, report

LAYERS = (
    ("tensor", "report", "autotune"),
    ("geometry", "spconv_backend"),
    ("functional",),
    ("kernels",),
    ("dispatch",),
    ("nn",),
    ("convert",),
)

__all__ = [
    "SparseMap", "check_visible_mask", "upsample_mask",
    "SparseConv2d", "SparseBatchNorm2d", "SparseSyncBatchNorm", "SparseLayerNorm", "SparseLayerNorm2d", "SparseGRN",
    "SparseMaxPool2d", "SparseAvgPool2d", "SparseDropPath", "SparseLinear", "SparseIdentity", "SparseReLU",
    "SparseReLU6", "SparseGELU", "SparseSiLU", "sparse_global_avg_pool",
    "sparsify", "dense_masked", "active_mask", "current_mask", "mask_at", "convert_sync_batchnorm",
    "UnsupportedLayerError", "functional", "geometry", "kernels", "dispatch", "report", "mac_report", "MacReport",
    "LAYERS",
]
