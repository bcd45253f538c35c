"""Tokenizer and prompts: the run's tokenizer, captions to token ids, ids to frozen text embeddings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm_deploy.errors import LdmError
from training.config import TrainConfig
from training.stages.run_folder import stage_dir


def tokenizer_path(cfg: TrainConfig) -> Path:
    return Path(cfg.tokenizer.path) if cfg.tokenizer.path else stage_dir(cfg, "tokenizer")


def has_tokenizer(folder: Path) -> bool:
    """A CLIP tokenizer folder: vocab.json (+ merges.txt), or tokenizer.json as transformers 5 saves it."""
    return (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()


def load_tokenizer(folder: Path):
    """The runtime's ClipTokenizer (ldm_deploy.runtime.tokenizer): training tokenizes as deployment does."""
    from ldm_deploy.runtime.tokenizer import ClipTokenizer

    if not has_tokenizer(folder):
        raise LdmError(f"no tokenizer at {folder}", hint="run `ldm-train tokenizer` first, or set tokenizer.path")
    return ClipTokenizer.from_dir(folder)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(N, 77) int64 ids: BOS + BPE + EOS, padded/truncated exactly as the pipeline does."""
    return torch.from_numpy(tokenizer(list(captions)).astype(np.int64))


@torch.no_grad()
def encode_text(text_encoder: nn.Module, ids: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """last_hidden_state (N, 77, D) for token ids, in batches."""
    outs = [text_encoder(input_ids=ids[i:i + batch])[0] for i in range(0, len(ids), batch)]
    return torch.cat(outs)
