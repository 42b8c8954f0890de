"""spconv 2.x path for the stride-1 k x k sparse conv (submanifold), with every spconv pitfall handled
(docs/sparse_engine.md, "spconv pitfalls"; numbers below refer to that list).

* algorithm from the tensor's device at call time: Native on CPU, implicit
  GEMM (MaskImplicitGemm) on CUDA (pitfall 1), so one module runs on both;
* indices from ``SparseMap.indices``: contiguous int32 (b, y, x) (pitfall 2);
* never used for 1x1 (pitfall 3: pointwise convs are ``F.linear``);
* weight converted from torch [out, in, kh, kw] to spconv KRSC
  [out, kh, kw, in] inside the op (pitfall 4); gradients flow back through the
  permute into the torch-layout parameter;
* index pairs built once per scale and kept in ``SparseMap.cache`` under the
  kernel geometry and algorithm (reused by every layer at that scale);
* kernels over 32 taps use ``large_kernel_fast_algo`` on CUDA (pitfall 8).

spconv is imported lazily: ``import sparse_mim`` stays light, and machines
without spconv fall back to the torch gather-GEMM path.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from .tensor import SparseMap

__all__ = ["spconv_available", "spconv_supports", "subm_conv2d"]


@functools.lru_cache(maxsize=None)
def _spconv():
    with warnings.catch_warnings():  # spconv's import-time FutureWarnings about torch.cuda.amp (pitfall 12)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"spconv\.")
        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.custom_(fwd|bwd).*")
        import spconv.pytorch as spconv
        from spconv.core import ConvAlgo
    return spconv, ConvAlgo


@functools.lru_cache(maxsize=None)
def spconv_available() -> bool:
    try:
        _spconv()
        return True
    except Exception:  # noqa: BLE001 - any import failure means "use the torch path"
        return False


def spconv_supports(features: Tensor) -> bool:
    """Whether the spconv path can run on these features: spconv imports, CPU or CUDA, a dtype it takes.

    float32 (and float64 on the CPU) everywhere, float16 on CUDA; no bfloat16 (spconv's kernels refuse bf16
    tensors outside its own autocast handling).
    """
    dev, dtype = features.device.type, features.dtype
    if dev not in ("cpu", "cuda") or not spconv_available():
        return False
    return dtype == torch.float32 or (dtype == torch.float64 and dev == "cpu") or (dtype == torch.float16
                                                                                   and dev == "cuda")


@functools.lru_cache(maxsize=64)
def _template(in_channels: int, out_channels: int, kernel: tuple[int, int], dilation: tuple[int, int],
              padding: tuple[int, int], cuda: bool):
    """A parameter-free SubMConv2d used only for its ``_conv_forward`` machinery (weights are passed in)."""
    spconv, ConvAlgo = _spconv()
    algo = ConvAlgo.MaskImplicitGemm if cuda else ConvAlgo.Native
    with torch.random.fork_rng(devices=[]):  # its weight init draws random numbers: keep the caller's stream
        conv = spconv.SubMConv2d(in_channels, out_channels, kernel, stride=1, padding=padding, dilation=dilation,
                                 bias=False, indice_key=f"subm_{kernel}_{dilation}_{algo.name}", algo=algo,
                                 large_kernel_fast_algo=kernel[0] * kernel[1] > 32)
    conv.weight = None  # never used: we pass the layer's weight
    return conv


def subm_conv2d(x: SparseMap, weight: Tensor, dilation: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """Features of the stride-1 conv of ``x`` with torch-layout ``weight`` (no bias), via spconv."""
    spconv, _ = _spconv()
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    if kernel == (1, 1):
        raise ValueError("use F.linear for 1x1 convs (docs/sparse_engine.md, spconv pitfall 3)")
    cuda = x.features.is_cuda
    conv = _template(int(weight.shape[1]), int(weight.shape[0]), kernel, dilation, padding, cuda)
    key = ("spconv_indice_dict", conv.indice_key)
    indice_dict = x.cache.get(key, {})
    indices = x.indices  # contiguous int32 (pitfall 2)
    assert indices.dtype == torch.int32 and indices.is_contiguous()
    features = x.features.contiguous()
    tensor = spconv.SparseConvTensor(features, indices, list(x.spatial_shape), x.batch_size,
                                     indice_dict=indice_dict)
    weight_krsc = weight.permute(0, 2, 3, 1).contiguous()  # torch [O, I, kh, kw] -> spconv [O, kh, kw, I] (pitfall 4)
    out = conv._conv_forward(True, tensor, weight_krsc, None)
    if key not in x.cache:
        x.cache[key] = out.indice_dict
    return out.features
