#!/usr/bin/env python
"""Classify photos with a trained fgvc checkpoint (the ``fgvc-predict`` console script).

    python tools/predict_fgvc.py outputs/fgvc_demo/best.pth photo.jpg --date 2021-06-14T09:30 --lat 48.85 --lon 2.35

``--help`` lists every option; the logic lives in :mod:`fgvc.predict`.
"""
from fgvc.cli import predict

if __name__ == "__main__":
    raise SystemExit(predict())
