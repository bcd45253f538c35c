"""Convert OpenAI's `bpe_simple_vocab_16e6.txt.gz` into a Hugging Face CLIP tokenizer folder.

The gz file (MIT, OpenAI) ships in the `clip-anytorch`, `openai-clip` and `open-clip-torch` packages;
get it without installing anything:

    pip download --no-deps clip-anytorch==2.6.0 -d /tmp/x
    unzip -o /tmp/x/clip_anytorch-2.6.0-py3-none-any.whl clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/x
    python scripts/make_clip_vocab.py /tmp/x/clip/bpe_simple_vocab_16e6.txt.gz tests/data/clip_tokenizer

Writes vocab.json (49,408 entries), merges.txt (`#version: 0.2` + 48,894 merges) and the SD 1.x
configs (pad `<|endoftext|>`); `--pad zero` writes the SD 2.x configs (pad `!`, id 0) instead.
The vocabulary is built exactly as OpenAI's `simple_tokenizer.py` builds it (reference §5.1/§5.3).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_deploy.errors import LdmError  # noqa: E402
from ldm_deploy.fileio import atomic_dir  # noqa: E402
from ldm_deploy.runtime.tokenizer import BOS, EOS, bytes_to_unicode, write_tokenizer_configs  # noqa: E402

GZ_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
N_MERGES = 49152 - 256 - 2  # 48,894 merges: the vocabulary is 2*256 + merges + 2 specials = 49,408


def clip_vocab_from_gz(gz_path: str | Path) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) from the OpenAI gz file, checked against its known sha256."""
    data = Path(gz_path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GZ_SHA256:
        raise LdmError(f"{gz_path} is not OpenAI's bpe_simple_vocab_16e6.txt.gz (sha256 {digest[:12]}...)",
                       hint=f"expected sha256 {GZ_SHA256}")
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]  # line 0 is the "#version: 0.2" header
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(vocab) != 49408:
        raise LdmError(f"built a CLIP vocabulary of {len(vocab)} unique tokens, expected 49408")
    return vocab, merges


def write_clip_tokenizer(gz_path: str | Path, out_dir: str | Path, pad: str = "eos") -> Path:
    vocab, merges = clip_vocab_from_gz(gz_path)
    with atomic_dir(out_dir) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        write_tokenizer_configs(tmp, pad=pad)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gz", help="path to bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("out", help="output tokenizer folder")
    ap.add_argument("--pad", choices=["eos", "zero"], default="eos",
                    help="eos: SD 1.x pad <|endoftext|> (49407); zero: SD 2.x pad '!' (0)")
    args = ap.parse_args(argv)
    out = write_clip_tokenizer(args.gz, args.out, args.pad)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
