"""Train a CLIP-style byte-level BPE tokenizer on captions, saved as a Hugging Face CLIP tokenizer folder.

The pipeline is CLIP's (ldm_deploy.runtime.tokenizer: NFC + whitespace collapse + lowercase, the CLIP
split regex, ByteLevel, `</w>` end-of-word suffix), so the folder loads in transformers'
CLIPTokenizer and in our runtime ClipTokenizer with equal ids. The vocabulary is laid out like
OpenAI's: the 256 byte symbols, the same with `</w>`, one token per merge in merge order, then
`<|startoftext|>`, `<|endoftext|>`. So `!` is id 0, as SD 2.x's pad convention expects.

    train_tokenizer(captions, "out/tokenizer", vocab_size=1000, pad="eos")
    build_shapes_tokenizer("out/tokenizer")        # the shapes dataset's whole caption vocabulary
    copy_tokenizer("sd15/tokenizer", "out/tokenizer")  # reuse an existing one instead

Training is deterministic: the same captions give byte-identical files.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ldm_deploy.errors import LdmError
from ldm_deploy.fileio import atomic_dir
from ldm_deploy.runtime.tokenizer import (BOS, EOS, MODEL_MAX_LENGTH, PAD_TOKENS, ClipTokenizer, bytes_to_unicode,
                                          clip_normalizer, clip_pre_tokenizer, write_tokenizer_configs)

N_BASE = 2 * 256 + 2  # byte symbols, byte symbols + </w>, BOS, EOS
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json")


def _train_merges(captions: Iterable[str], vocab_size: int, min_frequency: int) -> list[tuple[str, str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = clip_normalizer()
    tok.pre_tokenizer = clip_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
        continuing_subword_prefix="")
    tok.train_from_iterator(captions, trainer)
    state = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state]


def clip_layout(merges: list[tuple[str, str]]) -> dict[str, int]:
    """OpenAI's vocabulary layout: bytes, bytes + </w>, merged tokens in merge order, BOS, EOS."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    seen = set(tokens)
    for a, b in merges:
        if a + b in seen:
            raise LdmError(f"BPE merge {a!r} + {b!r} repeats the token {a + b!r}")
        seen.add(a + b)
        tokens.append(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def train_tokenizer(captions: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000,
                    pad: str = "eos", min_frequency: int = 2,
                    model_max_length: int = MODEL_MAX_LENGTH) -> Path:
    """Train on `captions` and write vocab.json / merges.txt / configs atomically to `out_dir`.

    `vocab_size` is an upper bound (a small corpus runs out of merges first; at least 514 = bytes,
    bytes + </w>, BOS, EOS). `pad`: "eos" (SD 1.x) or "zero" (SD 2.x, pad "!" = id 0).
    """
    if vocab_size < N_BASE + 1:
        raise LdmError(f"tokenizer vocab_size {vocab_size} is too small", hint=f"use at least {N_BASE + 1}")
    if pad not in PAD_TOKENS:
        raise LdmError(f"unknown pad convention {pad!r}", hint=f"use one of {sorted(PAD_TOKENS)}")
    captions = [c for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise LdmError("no captions to train the tokenizer on", hint="check the dataset's captions")
    # the trainer's own vocab also holds the alphabet seen and the specials; ask for enough, then cut
    merges = _train_merges(captions, vocab_size + N_BASE, min_frequency)[: vocab_size - N_BASE]
    vocab = clip_layout(merges)
    with atomic_dir(out_dir) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        write_tokenizer_configs(tmp, pad=pad, model_max_length=model_max_length)
        ClipTokenizer.from_dir(tmp)  # refuse to publish a folder we cannot load
    return Path(out_dir)


def copy_tokenizer(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Reuse an existing CLIP tokenizer folder (e.g. SD 1.5's): check that it loads, copy its files."""
    src = Path(src_dir)
    ClipTokenizer.from_dir(src)  # clear LdmError if missing/corrupt
    with atomic_dir(out_dir) as tmp:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if not (tmp / "tokenizer_config.json").exists():
            write_tokenizer_configs(tmp, pad="eos")
    return Path(out_dir)


def build_shapes_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 1000, pad: str = "eos") -> Path:
    """A tokenizer trained on every caption the shapes dataset can produce (each word ends up one token)."""
    from training.data.shapes import all_captions

    return train_tokenizer(all_captions(), out_dir, vocab_size=vocab_size, pad=pad, min_frequency=1)
