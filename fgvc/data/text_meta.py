"""CUB caption embeddings for MetaFormer's text meta tokens.

Reads the 10 captions per image of ``text_c10/<class>/<image>.txt`` (Reed et al., CVPR 2016; put
the ``text_c10`` folder inside the CUB root or pass ``captions_dir``), embeds each with a frozen
BERT (padded / truncated to ``max_len`` 32 tokens, last hidden state: 32 x 768) and writes
``<out>/<class>/<image>.npy`` of shape [captions, 32, 768] (float16), the layout ``data.text_dir``
reads. Training picks a random caption per access; evaluation always uses caption 0, so
evaluation is deterministic (the official code picks a random one).

Nothing is downloaded: the BERT must be a local folder (``config.json``, weights and vocabulary as
saved by ``save_pretrained``); ``transformers`` is an optional dependency (``pip install
'sparse-mim-fgvc[text]'``). Existing outputs are kept, so re-running resumes.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional

import numpy as np

from sparse_mim.utils.checkpoint import atomic_write
from sparse_mim.utils.cli import UsageError

__all__ = ["load_bert", "read_captions", "prepare_text_meta", "INSTALL_HINT"]

INSTALL_HINT = ("pip install transformers (or the package's [text] extra) and pass --bert /path/to/bert-base-uncased "
                "(a local folder written by BertModel.save_pretrained / tokenizer.save_pretrained; nothing is downloaded)")


def load_bert(path: str, device: str = "cpu") -> Callable[[List[str], int], np.ndarray]:
    """A function ``(captions, max_len) -> [n, max_len, hidden]`` float32, from a local BERT folder."""
    try:
        from transformers import AutoModel, AutoTokenizer  # optional dependency, imported only here
    except ImportError as e:
        raise UsageError(f"caption embeddings need the 'transformers' package ({e}). {INSTALL_HINT}") from None
    if not path or not os.path.isdir(path):
        raise UsageError(f"--bert {path!r} is not a folder. {INSTALL_HINT}")
    import torch
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    except Exception as e:  # missing files, wrong folder
        raise UsageError(f"could not load a BERT model from {path!r}: {e}. {INSTALL_HINT}") from None

    @torch.no_grad()
    def embed(captions: List[str], max_len: int = 32) -> np.ndarray:
        enc = tokenizer(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        return model(**enc).last_hidden_state.float().cpu().numpy()

    return embed


def read_captions(path: str, n: int) -> Optional[List[str]]:
    """Up to ``n`` non-empty caption lines (repeating the first ones if a file has fewer); None if none."""
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        caps = [line.strip() for line in f if line.strip()]
    if not caps:
        return None
    while len(caps) < n:
        caps.append(caps[len(caps) % max(len(caps), 1)])
    return caps[:n]


def prepare_text_meta(root: str, embed: Callable, captions_dir: Optional[str] = None, out_dir: Optional[str] = None,
                      num_captions: int = 10, max_len: int = 32, progress: bool = True,
                      log: Callable[[str], None] = print) -> dict:
    """Embed every CUB image's captions; returns counts ``{written, kept, missing_captions}``."""
    captions_dir = captions_dir or os.path.join(root, "text_c10")
    out_dir = out_dir or os.path.join(root, "text_emb")
    images_txt = os.path.join(root, "images.txt")
    if not os.path.isfile(images_txt):
        raise FileNotFoundError(f"{images_txt!r} not found: --root must be the CUB_200_2011 folder")
    if not os.path.isdir(captions_dir):
        raise FileNotFoundError(f"caption folder {captions_dir!r} not found (text_c10 from Reed et al., CVPR 2016); "
                                f"pass --captions")
    with open(images_txt) as f:
        rels = [line.split(maxsplit=1)[1].strip() for line in f if line.strip()]
    counts = {"written": 0, "kept": 0, "missing_captions": 0}
    missing = []
    items = rels
    if progress:
        from tqdm import tqdm
        items = tqdm(rels, desc="captions", dynamic_ncols=True)
    for rel in items:
        stem = os.path.splitext(rel)[0]
        out = os.path.join(out_dir, stem + ".npy")
        if os.path.isfile(out):
            counts["kept"] += 1
            continue
        caps = read_captions(os.path.join(captions_dir, stem + ".txt"), num_captions)
        if caps is None:
            counts["missing_captions"] += 1
            missing.append(rel)
            continue
        emb = np.asarray(embed(caps, max_len), dtype=np.float16)
        if emb.shape[:2] != (num_captions, max_len):
            raise RuntimeError(f"embedding of {rel} has shape {emb.shape}, expected ({num_captions}, {max_len}, D)")
        atomic_write(out, lambda f: np.save(f, emb))
        counts["written"] += 1
    if missing:
        log(f"[text] {len(missing)} images have no caption file (they get a zero text token), e.g. {missing[:3]}")
    log(f"[text] {counts} -> {out_dir}; train with data.text_dir={out_dir}")
    return counts
