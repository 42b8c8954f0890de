"""Development tooling of this repository: benchmarks, the GPU check, fault injection, the timm survey and
the long-tail demo. Not part of the installed package.

The wheel ships what a user imports and runs (``sparse_mim``, ``fgvc``, the recipes, the console
scripts). What measures or attacks that code lives here, next to it in the clone, the way timm keeps
``benchmark.py`` and torchvision its ``references/`` scripts beside (not inside) their packages. Run it
from a clone: ``python tools/<name>.py`` (each tool is a thin shim over a ``main`` here), or import it
with the clone's root on ``sys.path`` (the test suite does). ``sparse_mim`` and ``fgvc`` never import
this package (``tests/test_packaging.py`` checks it).

    benchmark_sparse     sparse ops and the full SparK step vs dense-masked   tools/benchmark_sparse_ops.py,
                                                                              tools/benchmark_pretrain.py
    benchmark_backbone   each convnet family vs its dense-masked twin         tools/benchmark_backbone.py
    benchmark_fgvc       MetaFormer precisions and attention paths            tools/benchmark_fgvc.py
    sparse_survey        timm models: MAC shares, distance to the twin        tools/sparse_survey.py
    gpu_check            the CUDA paths against the dense-masked reference    tools/gpu_check.py (.sh)
    fault_injection      faults injected into both trainers                   tools/fault_injection.py
    longtail_fgvc        samplers / logit adjustment on long-tailed data      tools/longtail_fgvc.py
"""
