"""CLIP BPE tokenizer for the runtime: prompts -> int32 ids [N, 77], equal to transformers' CLIPTokenizer.

The `tokenizers` pipeline is built exactly as transformers v5 builds CLIPTokenizer (reference §5.3):

    normalizer     NFC -> collapse whitespace to " " -> lowercase
    pre-tokenizer  CLIP split regex (isolated pre-tokens, digits one by one) -> ByteLevel (no prefix space)
    model          BPE over the byte symbols, `</w>` marks the end of a word, unk = <|endoftext|>
    post-process   RobertaProcessing: <|startoftext|> ids <|endoftext|>

Framing: BOS + ids + EOS, truncated to `model_max_length` (77) keeping EOS, padded with the pad token of
the tokenizer folder's config. SD 1.x pads with `<|endoftext|>` (49407); SD 2.x pads with `!` (id 0).
Because transformers registers the pad token as a special (added) token, a literal `!` in an SD 2.x
prompt becomes id 0 without going through BPE (diffusers issue #4153); we register the same special
tokens with the same flags, so we reproduce that quirk exactly (the model was trained on it).

Files: a folder saved by transformers 5 (tokenizer.json + tokenizer_config.json), an older one
(vocab.json + merges.txt + configs), or both; like transformers, the vocabulary and merges come from
tokenizer.json when it is there, and the rest of the pipeline is always the one above.

No ftfy and no HTML unescaping, like transformers' fast/v5 tokenizer (and unlike OpenAI's, §5.1).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.paths import check_tree

log = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# OpenAI CLIP's pre-tokenizer pattern (`simple_tokenizer.py`), as transformers writes it.
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
PAD_TOKENS = {"eos": EOS, "zero": "!"}  # SD 1.x / SD 2.x conventions
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character map (printable bytes map to themselves, the rest to 256+n)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_normalizer():
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


def clip_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])


def build_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: list) -> "Tokenizer":
    """The `tokenizers` pipeline of §5.3; `special_tokens` are `tokenizers.AddedToken`s (bos, eos, unk, pad)."""
    from tokenizers import Tokenizer, decoders, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
    tok.normalizer = clip_normalizer()
    tok.pre_tokenizer = clip_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_tokens)
    tok.post_processor = processors.RobertaProcessing(
        (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False, add_prefix_space=False)
    return tok


def read_vocab(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json + merges.txt of a Hugging Face BPE tokenizer folder, with clear errors."""
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    for f in (vocab_file, merges_file):
        if not f.is_file():
            raise LdmError(f"tokenizer file {f} is missing",
                           hint="a CLIP tokenizer folder needs tokenizer.json, or vocab.json and merges.txt")
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or bad UTF-8
        raise LdmError(f"tokenizer file {vocab_file} is not valid JSON: {e}") from None
    _check_vocab(vocab, vocab_file)
    try:
        merges_text = merges_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LdmError(f"tokenizer file {merges_file} is not UTF-8 text: {e}") from None
    merges = []
    for lineno, line in enumerate(merges_text.split("\n"), start=1):
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        merges.append(_merge_pair(line.split(" "), vocab, merges_file, f"line {lineno}", "vocab.json"))
    return vocab, merges


def _check_vocab(vocab, where: Path) -> None:
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise LdmError(f"tokenizer file {where} is not a token -> id mapping")
    missing = [t for t in (BOS, EOS) if t not in vocab]
    if missing:
        raise LdmError(f"tokenizer vocabulary {where} lacks the CLIP special tokens {missing}")


def _merge_pair(pair, vocab: dict, where: Path, at: str, vocab_name: str) -> tuple[str, str]:
    text = " ".join(map(str, pair)) if isinstance(pair, (list, tuple)) else str(pair)
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, str) and t for t in pair):
        raise LdmError(f"tokenizer file {where} {at} is not a merge pair: {text[:40]!r}")
    missing = [t for t in pair if t not in vocab]
    if missing:
        raise LdmError(f"tokenizer file {where} {at}: {missing[0][:40]!r} is not in {vocab_name}",
                       hint="the vocabulary and the merges come from different tokenizers")
    if pair[0] + pair[1] not in vocab:
        raise LdmError(f"tokenizer file {where} {at}: merge {text!r} is not in {vocab_name}",
                       hint="the vocabulary and the merges come from different tokenizers")
    return pair[0], pair[1]


def read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
    """(vocab, merges, added_tokens) of a `tokenizers` serialization (what transformers 5 saves).

    transformers' CLIPTokenizer takes only the BPE vocabulary and merges (and the added tokens) from
    tokenizer.json and rebuilds the rest of the CLIP pipeline itself; we do the same, so a folder with
    tokenizer.json, vocab.json + merges.txt, or both gives the ids transformers gives (tokenizer.json
    wins when both are there, as in transformers).
    """
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or bad UTF-8
        raise LdmError(f"tokenizer file {path} is not valid JSON: {e}") from None
    model = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise LdmError(f"tokenizer file {path} holds a {kind or 'non-BPE'} model, not CLIP's byte-level BPE",
                       hint="Stable Diffusion 1.x / 2.x text encoders use a CLIP tokenizer")
    if model.get("end_of_word_suffix", "</w>") != "</w>":
        raise LdmError(f"tokenizer file {path} is a BPE without CLIP's `</w>` end-of-word suffix "
                       f"({model.get('end_of_word_suffix')!r})", hint="point at the SD model's CLIP tokenizer/")
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # older serializations list [token, score] / tokens in id order
        vocab = {t[0] if isinstance(t, list) and t else t: i for i, t in enumerate(vocab)}
    _check_vocab(vocab, path)
    raw = model.get("merges")
    if not isinstance(raw, list):
        raise LdmError(f"tokenizer file {path} has no BPE merges list")
    merges = [_merge_pair(m.split(" ") if isinstance(m, str) else m, vocab, path, f"merge {i}", "its vocab")
              for i, m in enumerate(raw)]
    added = obj.get("added_tokens") or []
    if not isinstance(added, list) or not all(
            isinstance(a, dict) and isinstance(a.get("content"), str) and isinstance(a.get("id"), int)
            for a in added):
        raise LdmError(f"tokenizer file {path}: added_tokens is not a list of {{id, content, ...}} entries")
    return vocab, merges, added


def read_tokenizer_files(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[dict], str]:
    """(vocab, merges, added_tokens, source) from tokenizer.json, else vocab.json + merges.txt.

    When both forms are there they must agree (transformers would silently use tokenizer.json; a stale
    or corrupt pair beside it is more likely a mistake than intended)."""
    if (folder / "tokenizer.json").is_file():
        vocab, merges, added = read_tokenizer_json(folder / "tokenizer.json")
        if (folder / "vocab.json").is_file() or (folder / "merges.txt").is_file():
            vocab2, merges2 = read_vocab(folder)
            if vocab2 != vocab or merges2 != merges:
                what = "vocabularies" if vocab2 != vocab else "merges"
                raise LdmError(f"tokenizer folder {folder}: tokenizer.json and vocab.json + merges.txt hold "
                               f"different {what}", hint="keep one form (transformers reads tokenizer.json)")
        return vocab, merges, added, "tokenizer.json"
    if not (folder / "vocab.json").is_file() and not (folder / "merges.txt").is_file():
        raise LdmError(f"tokenizer folder {folder} has neither tokenizer.json nor vocab.json + merges.txt",
                       hint="point at the tokenizer/ folder of a diffusers Stable Diffusion model")
    return (*read_vocab(folder), [], "vocab.json+merges.txt")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or bad UTF-8
        raise LdmError(f"tokenizer config {path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise LdmError(f"tokenizer config {path} is not a JSON object")
    return obj


def read_special_tokens(folder: Path, added_tokens: list[dict] | None = None) -> tuple[dict, int]:
    """({key: str | AddedToken-dict}, model_max_length) with transformers' precedence.

    transformers reads tokenizer_config.json; when it has no `added_tokens_decoder` (the legacy SD
    folders and what transformers 5 saves), special_tokens_map.json overrides it, and then the flags of
    tokenizer.json's `added_tokens` (`added_tokens`) win for the same content. Values are a string or
    an AddedToken dict.
    """
    config = _read_json(folder / "tokenizer_config.json")
    specials = {k: config[k] for k in SPECIAL_KEYS if config.get(k) is not None}
    decoder = config.get("added_tokens_decoder")
    if decoder is not None and not isinstance(decoder, dict):
        raise LdmError(f"tokenizer config {folder / 'tokenizer_config.json'}: added_tokens_decoder is not a mapping")
    if decoder is None:
        stmap = _read_json(folder / "special_tokens_map.json")
        specials.update({k: stmap[k] for k in SPECIAL_KEYS if stmap.get(k) is not None})
        if added_tokens:
            by_content = {d["content"]: d for d in added_tokens}
            specials = {k: by_content.get(_content(v), v) for k, v in specials.items()}
    else:  # flags of each special come from the decoder entry with the same content
        by_content = {d["content"]: d for d in decoder.values() if isinstance(d, dict) and "content" in d}
        specials = {k: by_content.get(_content(v), v) for k, v in specials.items()}
    defaults = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    specials = {k: specials.get(k, defaults[k]) for k in SPECIAL_KEYS}
    for k, v in specials.items():
        ok = isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str) and all(
            isinstance(v.get(f, False), bool) for f in ("single_word", "lstrip", "rstrip", "normalized")))
        if not ok:
            raise LdmError(f"tokenizer config in {folder}: {k} {str(v)[:60]} is not a token string or "
                           "{content, ...} entry", hint="fix tokenizer_config.json / special_tokens_map.json")
    max_len = config.get("model_max_length", MODEL_MAX_LENGTH)
    if not isinstance(max_len, int) or not 2 < max_len <= 4096:
        max_len = MODEL_MAX_LENGTH  # transformers writes 1e30 for "unset"
    return specials, max_len


def _content(value) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


def _added_token(value):
    """A special token as transformers adds it: a string gets normalized=False, a dict keeps its flags."""
    from tokenizers import AddedToken

    if isinstance(value, dict):
        flags = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=bool(value.get("special", True)), **flags)
    return AddedToken(str(value), special=True, normalized=False)


def write_tokenizer_configs(folder: str | os.PathLike, pad: str = "eos", model_max_length: int = MODEL_MAX_LENGTH):
    """tokenizer_config.json + special_tokens_map.json that transformers' CLIPTokenizer and we both read.

    `pad`: "eos" (SD 1.x, pad <|endoftext|>) or "zero" (SD 2.x, pad "!", id 0 in CLIP's vocabulary).
    """
    if pad not in PAD_TOKENS:
        raise LdmError(f"unknown pad convention {pad!r}", hint=f"use one of {sorted(PAD_TOKENS)}")
    folder = Path(folder)
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD_TOKENS[pad]}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
              "do_lower_case": True, "add_prefix_space": False, "errors": "replace", **specials}
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class ClipTokenizer:
    """prompts -> int32 [N, max_length] ids: BOS + BPE ids + EOS, truncated keeping EOS, padded with pad id."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                 specials: dict | None = None, max_length: int = MODEL_MAX_LENGTH,
                 added_tokens: list[dict] | None = None, source: str = "vocab.json+merges.txt"):
        specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, **(specials or {})}
        # tokenizer.json's added tokens (specials and e.g. textual-inversion words), added in id order
        # before the specials, as transformers does; each must land on the id it was saved with
        added = sorted(added_tokens or [], key=lambda d: d["id"])
        extra = {d["content"]: d["id"] for d in added if d["content"] not in vocab}
        for key, value in specials.items():
            if _content(value) not in vocab and _content(value) not in extra:
                raise LdmError(f"tokenizer {key} {_content(value)!r} is not in the vocabulary",
                               hint="fix tokenizer_config.json / special_tokens_map.json")
        self.vocab = {**vocab, **extra}
        self.source = source
        self.max_length = int(max_length)
        self.pad_token = _content(specials["pad_token"])
        self.pad_id = self.vocab[self.pad_token]
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        # transformers adds its specials in this order, and a later one with the same content replaces
        # the flags of an earlier one (so SD 1.x's string pad <|endoftext|> makes EOS normalized=False)
        by_content = {_content(specials[k]): specials[k] for k in SPECIAL_KEYS}
        tokens = [_added_token(d) for d in added]
        tokens += [_added_token(v) for c, v in by_content.items() if c not in {d["content"] for d in added}]
        try:
            self._tok = build_clip_tokenizer(vocab, merges, tokens)
        except Exception as e:  # tokenizers raises plain Exception for an inconsistent vocabulary
            raise LdmError(f"cannot build the CLIP tokenizer: {' '.join(str(e).split())[:200]}",
                           hint=f"{source} is corrupt or from different tokenizers") from None
        for d in added:
            got = self._tok.token_to_id(d["content"])
            if got != d["id"]:
                raise LdmError(f"tokenizer.json added token {d['content'][:40]!r} has id {d['id']} but lands on "
                               f"id {got} with this vocabulary", hint="tokenizer.json is corrupt or edited by hand")

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, max_length: int | None = None) -> "ClipTokenizer":
        """Load a tokenizer folder: tokenizer.json (transformers 5), vocab.json + merges.txt, or both."""
        folder = Path(folder)
        if not folder.is_dir():
            raise LdmError(f"tokenizer folder {folder} does not exist",
                           hint="point at a folder with tokenizer.json or vocab.json + merges.txt, "
                                "and tokenizer_config.json")
        check_tree(folder)   # no file of it is a link out of the folder
        vocab, merges, added, source = read_tokenizer_files(folder)
        specials, model_max_length = read_special_tokens(folder, added)
        return cls(vocab, merges, specials=specials, max_length=max_length or model_max_length,
                   added_tokens=added, source=source)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, prompt: str) -> list[int]:
        """BPE ids of one prompt, without BOS/EOS and without truncation."""
        return self._tok.encode(prompt, add_special_tokens=False).ids

    def __call__(self, prompts: list[str] | str) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise UsageError("prompts must be strings")
        for i, p in enumerate(prompts):
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates, e.g. undecodable bytes in argv
                raise UsageError(f"prompt {i} is not valid Unicode text ({e.reason} at position {e.start})",
                                 hint="pass the prompt as UTF-8") from None
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)  # (N, 77)
        for row, enc in enumerate(self._tok.encode_batch(prompts, add_special_tokens=True)):
            ids = enc.ids  # BOS + content + EOS
            if len(ids) > self.max_length:
                dropped = len(ids) - self.max_length
                lost = self._tok.decode(ids[self.max_length - 1 : -1]).replace("</w>", " ").strip()
                log.warning("prompt %d is too long for the text encoder (%d tokens with BOS/EOS, max %d): "
                            "%d tokens were dropped: %r", row, len(ids), self.max_length, dropped,
                            lost if len(lost) <= 80 else lost[:77] + "...")
                ids = ids[: self.max_length - 1] + [self.eos_id]
            out[row, : len(ids)] = ids
        return out
