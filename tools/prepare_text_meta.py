#!/usr/bin/env python
"""Precompute CUB caption embeddings for MetaFormer's text meta tokens.

    pip install transformers
    python tools/prepare_text_meta.py --root /data/CUB_200_2011 --bert /models/bert-base-uncased

Reads the 10 captions per image of ``text_c10/<class>/<image>.txt`` (Reed et al.; put the
``text_c10`` folder inside the CUB root or pass ``--captions``), embeds each with a frozen
BERT (padded / truncated to ``--max-len`` 32 tokens, last hidden state: 32 x 768) and writes
``<out>/<class>/<image>.npy`` of shape [captions, 32, 768] (float16), the layout
``data.text_dir`` reads. Training picks a random caption per access; evaluation always
uses caption 0, so evaluation is deterministic (the official code picks a random one).

Nothing is downloaded: ``--bert`` must be a local folder (``config.json``, weights and
vocabulary as saved by ``save_pretrained``). Existing outputs are kept (re-running resumes).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
from typing import Callable, List, Optional  # noqa: E402

import numpy as np  # noqa: E402

INSTALL_HINT = ("pip install transformers and pass --bert /path/to/bert-base-uncased (a local folder written by "
                "BertModel.save_pretrained / tokenizer.save_pretrained; nothing is downloaded)")


def load_bert(path: str, device: str = "cpu") -> Callable[[List[str]], np.ndarray]:
    """A function captions -> [n, max_len, hidden] float32, from a local BERT folder."""
    try:
        import transformers  # noqa: F401  (optional dependency, imported only here)
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise SystemExit(f"tools/prepare_text_meta.py needs the 'transformers' package ({e}). {INSTALL_HINT}")
    if not path or not os.path.isdir(path):
        raise SystemExit(f"--bert {path!r} is not a folder. {INSTALL_HINT}")
    import torch
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    except Exception as e:  # missing files, wrong folder
        raise SystemExit(f"could not load a BERT model from {path!r}: {e}. {INSTALL_HINT}")

    @torch.no_grad()
    def embed(captions: List[str], max_len: int = 32) -> np.ndarray:
        enc = tokenizer(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        return model(**enc).last_hidden_state.float().cpu().numpy()

    return embed


def read_captions(path: str, n: int) -> Optional[List[str]]:
    """Up to ``n`` non-empty caption lines (repeating the last ones if a file has fewer)."""
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        caps = [line.strip() for line in f if line.strip()]
    if not caps:
        return None
    while len(caps) < n:
        caps.append(caps[len(caps) % max(len(caps), 1)])
    return caps[:n]


def prepare(root: str, embed: Callable, captions_dir: Optional[str] = None, out_dir: Optional[str] = None,
            num_captions: int = 10, max_len: int = 32, progress: bool = True) -> dict:
    """Embed every image's captions; returns counts (written, kept, missing captions)."""
    captions_dir = captions_dir or os.path.join(root, "text_c10")
    out_dir = out_dir or os.path.join(root, "text_emb")
    images_txt = os.path.join(root, "images.txt")
    if not os.path.isfile(images_txt):
        raise SystemExit(f"{images_txt!r} not found: --root must be the CUB_200_2011 folder")
    if not os.path.isdir(captions_dir):
        raise SystemExit(f"caption folder {captions_dir!r} not found (text_c10 from Reed et al., CVPR 2016); "
                         f"pass --captions")
    with open(images_txt) as f:
        rels = [line.split(maxsplit=1)[1].strip() for line in f if line.strip()]
    counts = {"written": 0, "kept": 0, "missing_captions": 0}
    missing = []
    it = rels
    if progress:
        from tqdm import tqdm
        it = tqdm(rels, desc="captions", dynamic_ncols=True)
    for rel in it:
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
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = out + ".tmp.npy"
        np.save(tmp, emb)
        os.replace(tmp, out)
        counts["written"] += 1
    if missing:
        print(f"[text] {len(missing)} images have no caption file (they get a zero text token), e.g. {missing[:3]}")
    print(f"[text] {counts} -> {out_dir}; train with data.text_dir={out_dir}")
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="CUB_200_2011 folder (with images.txt)")
    p.add_argument("--bert", default="", help="local bert-base-uncased folder")
    p.add_argument("--captions", default=None, help="text_c10 folder (default <root>/text_c10)")
    p.add_argument("--out", default=None, help="output folder (default <root>/text_emb)")
    p.add_argument("--num-captions", type=int, default=10)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = p.parse_args(argv)
    embed = load_bert(args.bert, args.device)
    return prepare(args.root, embed, args.captions, args.out, args.num_captions, args.max_len)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
