#!/usr/bin/env python
"""Export the pre-trained backbone from a SparK pre-training checkpoint.

    python tools/export_backbone.py outputs/pretrain_demo/last.pth resnet18_spark.pth

Writes the encoder alone as a plain state_dict in the dense model's names and
torch layout (the official SparK "timm style" file): it loads with
``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)`` into
``torchvision.models.resnet50()`` with ``fc`` removed / timm
``convnext_small(num_classes=0)`` (and into ``sparse_mim.create_backbone``).
The export is checked by loading it, strict, into the dense twin before it is written.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=r"`torch.cuda.amp.custom_(fwd|bwd)", category=FutureWarning)


def backbone_from_checkpoint(checkpoint: dict) -> tuple[dict, str | None, dict]:
    """(backbone state_dict, backbone name, its create_backbone kwargs) from a tools/pretrain.py checkpoint (or a SparK state_dict)."""
    model_state = checkpoint.get("model", checkpoint.get("module", checkpoint))
    prefix = checkpoint.get("backbone_prefix", "sparse_encoder.sp_cnn.")
    state = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"no backbone weights (keys starting with {prefix!r}) in the checkpoint; is it a "
                         "checkpoint written by tools/pretrain.py (e.g. <output_dir>/last.pth)?")
    model_cfg = (checkpoint.get("config") or {}).get("model", {})
    return state, model_cfg.get("backbone"), dict(model_cfg.get("backbone_kwargs") or {})


def export(checkpoint_path: str, out_path: str, verify: bool = True) -> str:
    from sparse_mim.engine_pretrain import export_backbone
    from sparse_mim.utils.checkpoint import load_checkpoint
    ck = load_checkpoint(checkpoint_path)
    state, name, kwargs = backbone_from_checkpoint(ck)
    if verify and name:
        from sparse_mim.backbones import create_backbone
        dense = create_backbone(name, sparse=False, **kwargs)
        dense.load_state_dict(state, strict=True)  # raises with the mismatching keys if the names are wrong
    export_backbone(state, out_path)
    return out_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint written by tools/pretrain.py (last.pth or checkpoint-*.pth)")
    p.add_argument("out", help="output .pth file (backbone state_dict)")
    p.add_argument("--no-verify", action="store_true", help="skip the strict load into the dense twin")
    args = p.parse_args(argv)
    path = export(args.checkpoint, args.out, verify=not args.no_verify)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
