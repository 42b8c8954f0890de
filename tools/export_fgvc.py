#!/usr/bin/env python
"""Export a trained fgvc checkpoint to a torch.export program (.pt2) and/or ONNX (the ``fgvc-export``
console script).

    python tools/export_fgvc.py outputs/fgvc_demo/best.pth --out deploy/model.pt2

``--help`` lists every option; the logic lives in :mod:`fgvc.export`.
"""
from fgvc.cli import export

if __name__ == "__main__":
    raise SystemExit(export())
