"""Export a trained fgvc model to deployable formats: a ``torch.export`` program (.pt2) and ONNX.

    from fgvc.export import export_checkpoint
    paths = export_checkpoint("outputs/fgvc_demo/best.pth", "outputs/fgvc_demo/model.pt2")

    module, info = load_program("outputs/fgvc_demo/model.pt2")   # checked: nothing pickled runs
    logits = module(images, meta, meta_present)       # [B, 3, H, W], [B, D] float, [B, G] bool

The exported graph takes the same three tensors the training loop feeds (an image-only model
takes ``images`` alone): ``meta`` is the meta groups' encodings concatenated (see
:class:`fgvc.Predictor` ``encode_meta``) and ``meta_present`` marks each group present / absent,
so a deployment can leave any group out exactly as the eager model does. The batch size is
dynamic. Next to the program, ``<name>.json`` records what a deployment needs to prepare
inputs: class names, meta groups (name, encoder, width), input size, mean / std and the crop
ratio; the .pt2 carries the same JSON inside (``extra_files["fgvc.json"]``).

``torch.jit.trace`` / ``torch.jit.script`` are not supported (the model branches on the
number of extra tokens and on optional meta); ``torch.export`` captures those branches for
the given input layout. ONNX goes through ``torch.onnx.export(..., dynamo=True)``, which needs
the ``onnx`` and ``onnxscript`` packages (``pip install onnx onnxscript``); without them the
ONNX format raises an ImportError saying so, and the .pt2 export still works.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["MetaFormerExportWrapper", "export_program", "export_onnx", "export_checkpoint", "export_metadata",
           "check_export", "load_program"]


class MetaFormerExportWrapper(torch.nn.Module):
    """``forward(images, meta, meta_present) -> logits`` with plain tensors only (``forward(images)``
    for an image-only model): the signature the exported graph gets."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.has_meta = len(getattr(model, "meta_dims", ())) > 0

    def forward(self, images: torch.Tensor, meta: Optional[torch.Tensor] = None,
                meta_present: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.has_meta:
            return self.model(images)
        return self.model(images, meta, meta_present)


def _example_inputs(predictor, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = predictor.model.img_size
    images = torch.randn(batch, 3, h, w, generator=g)
    if not predictor.meta_groups:
        return (images,)
    meta = torch.randn(batch, predictor.meta_dim, generator=g)
    present = torch.ones(batch, len(predictor.meta_groups), dtype=torch.bool)
    present[-1] = False  # the missing-meta path is traced too (it is the same graph: a multiply by 0)
    return images, meta, present


def export_metadata(predictor) -> Dict:
    """What a deployment needs to prepare inputs and read outputs (stored next to / inside the export)."""
    cfg = predictor.model.pretrained_cfg
    return {
        "format": "fgvc-export", "version": 1, "model": predictor.name,
        "classes": list(predictor.classes),
        "inputs": (["images", "meta", "meta_present"] if predictor.meta_groups else ["images"]),
        "meta_groups": [{"name": g.name, "encoder": g.encoder, "dim": g.dim, "tokens": g.tokens}
                        for g in predictor.meta_groups],
        "meta_dim": predictor.meta_dim, "use_hour": predictor.use_hour,
        "img_size": list(predictor.model.img_size), "mean": list(cfg["mean"]), "std": list(cfg["std"]),
        "crop_pct": cfg["crop_pct"], "interpolation": cfg["interpolation"], "tta": cfg.get("tta", "none"),
        "output": "logits" if cfg.get("tta", "none") == "none" else "log of the averaged class probabilities",
    }


def export_program(predictor, path: str, batch: int = 2) -> torch.export.ExportedProgram:
    """``torch.export`` the predictor's model (dynamic batch) and save it as a .pt2 file at ``path``."""
    from sparse_mim.utils.checkpoint import atomic_write
    model = predictor.model.float().eval().to("cpu")
    wrapper = MetaFormerExportWrapper(model).eval()
    example = _example_inputs(predictor, batch)
    bdim = torch.export.Dim("batch", min=1, max=4096)
    shapes = tuple({0: bdim} for _ in example)
    with torch.no_grad():
        program = torch.export.export(wrapper, example, dynamic_shapes=shapes)
    meta = json.dumps(export_metadata(predictor), indent=2)
    atomic_write(path, lambda f: torch.export.save(program, f, extra_files={"fgvc.json": meta}))
    return program


def _require_onnx() -> None:
    missing = []
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ImportError(f"ONNX export needs the {' and '.join(missing)} package(s), which are not installed: "
                          f"pip install {' '.join(missing)} (the .pt2 export works without them)")


def export_onnx(predictor, path: str, batch: int = 2, opset: int = 18) -> str:
    """ONNX file of the predictor's model (dynamic batch; inputs named images / meta / meta_present).

    Needs ``onnx`` and ``onnxscript`` (``torch.onnx.export(dynamo=True)``); raises ImportError otherwise.
    """
    _require_onnx()
    model = predictor.model.float().eval().to("cpu")
    wrapper = MetaFormerExportWrapper(model).eval()
    example = _example_inputs(predictor, batch)
    names = export_metadata(predictor)["inputs"]
    bdim = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        onnx_program = torch.onnx.export(wrapper, example, dynamo=True, input_names=names, output_names=["logits"],
                                         dynamic_shapes=tuple({0: bdim} for _ in example), opset_version=opset)
    tmp = path + ".tmp"
    try:
        onnx_program.save(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk or a kill leaves no partial file
        if os.path.exists(tmp):
            os.remove(tmp)
        from sparse_mim.utils.checkpoint import disk_full_error, is_disk_full
        if is_disk_full(e):
            raise disk_full_error(path) from e
        raise
    return path


def load_program(path: str):
    """(callable module, metadata dict) of a .pt2 written by :func:`export_program`.

    Safe on files from elsewhere: the archive is checked first and nothing pickled in it is
    loaded (:func:`sparse_mim.utils.checkpoint.read_pt2_checked`); the checked bytes are loaded."""
    import io
    from sparse_mim.utils.checkpoint import read_pt2_checked
    data = read_pt2_checked(path)
    extra = {"fgvc.json": ""}
    program = torch.export.load(io.BytesIO(data), extra_files=extra)
    meta = json.loads(extra["fgvc.json"]) if extra["fgvc.json"] else {}
    return program.module(), meta


@torch.no_grad()
def check_export(predictor, program_module, batch: int = 3, seed: int = 1) -> float:
    """Max |logit difference| between the exported and the eager model on random inputs with a batch
    size other than the traced one and mixed present / absent meta."""
    example = _example_inputs(predictor, batch, seed)
    if len(example) == 3:
        example[2][0, 0] = False
    eager = MetaFormerExportWrapper(predictor.model.float().eval().to("cpu")).eval()(*example)
    exported = program_module(*example)
    return float((eager - exported).abs().max())


def export_checkpoint(checkpoint: str, out: str = "", formats: Sequence[str] = ("pt2",), batch: int = 2,
                      log=print, tta: str = "none") -> List[str]:
    """Export a training checkpoint (``best.pth``) to ``out`` (.pt2, default: next to the checkpoint with
    its name; the ONNX file takes the same stem with .onnx) plus ``<stem>.json`` metadata; returns the
    written paths (what ``fgvc-export`` runs; its arguments are parsed in :mod:`fgvc.cli`). Each export is
    checked against the eager model (logits compared on a fresh batch). ``tta`` (hflip / multicrop) exports
    the model with its test-time augmentation inside (:class:`fgvc.tta.TTAModel`: the output is the log of
    the averaged probabilities; multicrop takes the larger ``R x R`` input the metadata names)."""
    from sparse_mim.utils.checkpoint import atomic_write_text
    from .predict import Predictor
    bad = [f for f in formats if f not in ("pt2", "onnx")]
    if bad:
        raise ValueError(f"unknown export format(s) {bad}; choose pt2 and/or onnx")
    if "onnx" in formats:
        _require_onnx()  # before any work
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", amp="off", tta=tta)
    out = out or os.path.splitext(checkpoint)[0] + ".pt2"
    stem = out[:-4] if out.endswith(".pt2") else (out[:-5] if out.endswith(".onnx") else out)
    os.makedirs(os.path.dirname(os.path.abspath(stem)) or ".", exist_ok=True)
    written = []
    if "pt2" in formats:
        path = stem + ".pt2"
        export_program(predictor, path, batch)
        module, _ = load_program(path)
        diff = check_export(predictor, module)
        log(f"[export] wrote {path} (torch.export program, dynamic batch); max |logit diff| vs eager {diff:.2e}")
        if not diff < 1e-3:
            raise RuntimeError(f"the exported program's logits differ from the eager model's by {diff:.3g}")
        written.append(path)
    if "onnx" in formats:
        path = export_onnx(predictor, stem + ".onnx", batch)
        msg = f"[export] wrote {path} (ONNX)"
        try:
            import onnxruntime as ort  # optional: check the file when a runtime is installed
            import numpy as np
            example = _example_inputs(predictor, 3, 1)
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), example)}
            got = sess.run(None, feeds)[0]
            with torch.no_grad():
                ref = MetaFormerExportWrapper(predictor.model).eval()(*example).numpy()
            diff = float(np.abs(got - ref).max())
            msg += f"; max |logit diff| vs eager {diff:.2e} (onnxruntime)"
            if not diff < 1e-3:
                raise RuntimeError(f"the ONNX model's logits differ from the eager model's by {diff:.3g}")
        except ImportError:
            msg += " (onnxruntime not installed: not run here)"
        log(msg)
        written.append(path)
    meta_path = stem + ".json"
    atomic_write_text(meta_path, json.dumps(export_metadata(predictor), indent=2) + "\n")
    log(f"[export] wrote {meta_path} (classes, meta groups, input size, normalisation)")
    written.append(meta_path)
    return written
