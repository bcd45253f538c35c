"""Tokenizer stage: a CLIP-style byte-level BPE trained on the training captions, or a given folder.

The folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) is what the
runtime's ClipTokenizer and transformers' CLIPTokenizer both read, so training, export and serving
tokenize identically.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ldm_deploy.errors import LdmError
from ldm_deploy.fileio import atomic_dir
from ldm_deploy.paths import check_tree
from training.config import TrainConfig
from training.stages.images import load_captions
from training.stages.run_folder import stage_dir
from training.stages.text import has_tokenizer, load_tokenizer


def train_tokenizer_stage(cfg: TrainConfig, resume: bool = False) -> dict:
    """Write <out>/stages/tokenizer (trained BPE, or a copy of cfg.tokenizer.path). Returns the report."""
    out = stage_dir(cfg, "tokenizer")
    if cfg.tokenizer.path:
        src = Path(cfg.tokenizer.path)
        src = src / "tokenizer" if has_tokenizer(src / "tokenizer") else src
        if not has_tokenizer(src):
            raise LdmError(f"tokenizer.path {src} has no tokenizer.json or vocab.json",
                           hint="point at a CLIP tokenizer folder")
        check_tree(src)   # copied below: no link out of it is followed
        with atomic_dir(out) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        report = {"source": str(src)}
    else:
        if resume and has_tokenizer(out):
            return {"reused": str(out)}
        from training.tokenizer_train import train_tokenizer

        captions = load_captions(cfg, "train")
        train_tokenizer(captions, out, vocab_size=cfg.tokenizer.vocab_size, pad=cfg.tokenizer.pad,
                        model_max_length=cfg.tokenizer.model_max_length)   # writes `out` atomically
        report = {"captions": len(captions)}
    tok = load_tokenizer(out)
    report["vocab_size"] = tok.vocab_size
    print(f"[tokenizer] {tok.vocab_size} tokens -> {out}")
    return report
