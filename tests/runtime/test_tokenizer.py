"""ClipTokenizer against transformers' CLIPTokenizer (v5, tokenizers backend) with the real CLIP vocab.

The vocab in tests/data/clip_tokenizer was built from OpenAI's MIT-licensed bpe_simple_vocab_16e6.txt.gz
by scripts/make_clip_vocab.py (see that script for how to fetch the file offline).
"""
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm_deploy.errors import LdmError
from ldm_deploy.runtime.tokenizer import EOS, ClipTokenizer, write_tokenizer_configs

CLIP_DIR = Path(__file__).resolve().parents[1] / "data" / "clip_tokenizer"

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "A cat, 4k!",
    "! !! !!! hello!",
    "Hello, World! It's a dog's life; we'll see -- (maybe) [x] {y} \"quoted\" 'single' @#$%^&*",
    "Café naïve résumé Ångström Straße",
    "東京の夜景, 北京烤鸭 and 서울",
    "emoji 🌃🚀👩‍👩‍👧 ✨ done",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;html&quot; &#39;",
    "<|ENDOFTEXT|> x <|endoftext|> <|startoftext|>",
    "12345 67.8 1e-3 2024/11/28 0xff",
    "  multiple   spaces\n\ttabs and\r\nnewlines  ",
    "a very long prompt " * 30,
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis " * 4,
    "e\u0301 composed vs é precomposed, ＦＵＬＬＷＩＤＴＨ",
]

# SD folders on the hub write the specials as AddedToken dicts (normalized=True); we read both forms.
SD2_STYLE_CONFIG = {
    "add_prefix_space": False,
    "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", "lstrip": False, "normalized": True,
                  "rstrip": False, "single_word": False},
    "do_lower_case": True,
    "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": True,
                  "rstrip": False, "single_word": False},
    "errors": "replace", "model_max_length": 77, "pad_token": "!", "tokenizer_class": "CLIPTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": True,
                  "rstrip": False, "single_word": False},
}
SD2_STYLE_MAP = {
    "bos_token": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
    "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
    "pad_token": "!",
    "unk_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
}


def hf_ids(folder, prompts):
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(str(folder))
    return np.array(hf(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"])


def folder_with(tmp_path, name, pad=None, config=None, stmap=None):
    out = tmp_path / name
    out.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(CLIP_DIR / f, out / f)
    if pad:
        write_tokenizer_configs(out, pad=pad)
    if config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    if stmap is not None:
        (out / "special_tokens_map.json").write_text(json.dumps(stmap))
    return out


@pytest.fixture(scope="module")
def sd1():
    return ClipTokenizer.from_dir(CLIP_DIR)


def test_reference_vectors(sd1):
    ids = sd1(["a photo of an astronaut riding a horse on mars", "", "A cat, 4k!"])
    assert ids.dtype == np.int32 and ids.shape == (3, 77)
    want = [[49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407],
            [49406, 49407],
            [49406, 320, 2368, 267, 275, 330, 256, 49407]]
    for row, w in zip(ids, want):
        assert row[: len(w)].tolist() == w
        assert (row[len(w):] == 49407).all()
    assert sd1.vocab_size == 49408 and sd1.pad_id == 49407


def test_sd2_pad_and_bang_quirk(tmp_path):
    tok = ClipTokenizer.from_dir(folder_with(tmp_path, "sd2", pad="zero"))
    ids = tok(["! !! !!!", ""])
    # transformers registers "!" as a special token: each literal "!" is id 0, never BPE'd (issue #4153)
    assert ids[0, :8].tolist() == [49406, 0, 0, 0, 0, 0, 0, 49407]
    assert ids[1, :2].tolist() == [49406, 49407] and (ids[1, 2:] == 0).all()


@pytest.mark.parametrize("style", ["sd1-ours", "sd2-ours", "sd2-hub-dicts", "sd1-hub-dicts", "vocab-only"])
def test_equals_transformers(tmp_path, style):
    if style == "sd1-ours":
        folder = CLIP_DIR
    elif style == "sd2-ours":
        folder = folder_with(tmp_path, style, pad="zero")
    elif style == "sd2-hub-dicts":
        folder = folder_with(tmp_path, style, config=SD2_STYLE_CONFIG, stmap=SD2_STYLE_MAP)
    elif style == "sd1-hub-dicts":
        folder = folder_with(tmp_path, style, config={**SD2_STYLE_CONFIG, "pad_token": EOS},
                             stmap={**SD2_STYLE_MAP, "pad_token": EOS})
    else:
        folder = folder_with(tmp_path, style, config={"model_max_length": 77})
    ours = ClipTokenizer.from_dir(folder)(PROMPTS)
    theirs = hf_ids(folder, PROMPTS)
    bad = [PROMPTS[i][:40] for i in np.flatnonzero((ours != theirs).any(axis=1))]
    assert not bad, f"{style}: ids differ from transformers for {bad}"
    assert (ours[:, 0] == 49406).all()


def saved_by_transformers(tmp_path, name, pad, form):
    """A tokenizer folder as transformers 5's CLIPTokenizer.save_pretrained writes it (tokenizer.json +
    tokenizer_config.json), optionally with the vocab.json + merges.txt of older saves beside it."""
    from transformers import CLIPTokenizer

    out = tmp_path / name
    CLIPTokenizer.from_pretrained(str(CLIP_DIR), pad_token=pad).save_pretrained(str(out))
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    if form == "both":
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(CLIP_DIR / f, out / f)
    return out


# truncation at 77 (prompts 12, 13 and the 76-word one), padding (every short row), unicode, empty
FORM_PROMPTS = PROMPTS + ["word " * 76, "!", "a ! b"]


@pytest.mark.parametrize("pad", ["sd1", "sd2"])
@pytest.mark.parametrize("form", ["tokenizer.json", "vocab+merges", "both"])
def test_every_folder_form_equals_transformers(tmp_path, form, pad):
    pad_token = EOS if pad == "sd1" else "!"
    if form == "vocab+merges":
        folder = CLIP_DIR if pad == "sd1" else folder_with(tmp_path, "sd2", pad="zero")
    else:
        folder = saved_by_transformers(tmp_path, "saved", pad_token, form)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["pad_token"] == pad_token  # how both libraries record SD 1.x / SD 2.x padding
    tok = ClipTokenizer.from_dir(folder)
    assert tok.source == ("vocab.json+merges.txt" if form == "vocab+merges" else "tokenizer.json")
    ours, theirs = tok(FORM_PROMPTS), hf_ids(folder, FORM_PROMPTS)
    bad = [FORM_PROMPTS[i][:40] for i in np.flatnonzero((ours != theirs).any(axis=1))]
    assert not bad, f"{form}/{pad}: ids differ from transformers for {bad}"
    pad_id = 49407 if pad == "sd1" else 0
    assert tok.pad_id == pad_id
    empty = ours[PROMPTS.index("")]
    assert empty[:2].tolist() == [49406, 49407] and (empty[2:] == pad_id).all()
    long = ours[-3]
    assert long[76] == 49407 and (long[1:76] == long[1]).all()


@pytest.mark.parametrize("form", ["tokenizer.json", "vocab+merges", "both"])
def test_shipped_demo_tokenizer_every_form_equals_transformers(tmp_path, form):
    """models/shapes-demo/tokenizer (a trained 1000-token BPE), as shipped and as transformers 5 re-saves it."""
    from transformers import CLIPTokenizer

    demo = Path(__file__).resolve().parents[2] / "models" / "shapes-demo" / "tokenizer"
    folder = demo
    if form != "vocab+merges":
        folder = tmp_path / "saved"
        CLIPTokenizer.from_pretrained(str(demo)).save_pretrained(str(folder))
        if form == "both":
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(demo / f, folder / f)
    prompts = FORM_PROMPTS + ["a small red triangle at the top left on a white background"]
    ours, theirs = ClipTokenizer.from_dir(folder)(prompts), hf_ids(folder, prompts)
    assert (ours == theirs).all()


def test_tokenizer_json_added_tokens_keep_their_ids(tmp_path):
    """A textual-inversion word saved in tokenizer.json (id 49408) is one token, as in transformers."""
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(str(CLIP_DIR))
    hf.add_tokens(["<cat-toy>"])
    hf.save_pretrained(str(tmp_path / "ti"))
    tok = ClipTokenizer.from_dir(tmp_path / "ti")
    prompts = ["a <cat-toy> on a beach", "<CAT-TOY>", ""]
    ours = tok(prompts)
    assert (ours == hf_ids(tmp_path / "ti", prompts)).all()
    assert 49408 in ours[0].tolist() and tok.vocab_size == 49409


def test_tokenizer_json_errors(tmp_path):
    folder = saved_by_transformers(tmp_path, "bad", EOS, "tokenizer.json")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["type"] = "WordPiece"
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(LdmError, match="WordPiece model, not CLIP's byte-level BPE"):
        ClipTokenizer.from_dir(folder)
    data["model"]["type"] = "BPE"
    data["model"]["merges"][3] = "zzzq qqq"
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(LdmError, match="merge 3: 'zzzq' is not in its vocab"):
        ClipTokenizer.from_dir(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(LdmError, match="neither tokenizer.json nor vocab.json"):
        ClipTokenizer.from_dir(folder)
    both = saved_by_transformers(tmp_path, "both", EOS, "both")
    (both / "merges.txt").write_text("#version: 0.2\n" + "\n".join(
        (CLIP_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:-1]) + "\n", encoding="utf-8")
    with pytest.raises(LdmError, match="tokenizer.json and vocab.json \\+ merges.txt hold different merges"):
        ClipTokenizer.from_dir(both)


def test_truncation_keeps_eos_and_warns(sd1, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm_deploy.runtime.tokenizer"):
        ids = sd1(["word " * 100, "word " * 75, "word " * 76])
    assert ids[0, -1] == 49407 and (ids[0, 1:76] == ids[0, 1]).all()
    assert ids[1, -1] == 49407  # 75 content tokens fit exactly
    assert "25 tokens were dropped" in caplog.text and "1 tokens were dropped" in caplog.text
    assert "prompt 1 " not in caplog.text


def test_max_length_override(sd1):
    tok = ClipTokenizer.from_dir(CLIP_DIR, max_length=8)
    ids = tok(["a photo of an astronaut riding a horse on mars"])
    assert ids.tolist() == [[49406, 320, 1125, 539, 550, 18376, 6765, 49407]]


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(LdmError, match="does not exist"):
        ClipTokenizer.from_dir(tmp_path / "nope")
    bad = folder_with(tmp_path, "bad")
    (bad / "merges.txt").unlink()
    with pytest.raises(LdmError, match="merges.txt is missing"):
        ClipTokenizer.from_dir(bad)
    shutil.copy(CLIP_DIR / "merges.txt", bad / "merges.txt")
    (bad / "vocab.json").write_text("{not json")
    with pytest.raises(LdmError, match="not valid JSON"):
        ClipTokenizer.from_dir(bad)
    (bad / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(LdmError, match="lacks the CLIP special tokens"):
        ClipTokenizer.from_dir(bad)
    (bad / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}))
    with pytest.raises(LdmError, match="not in vocab.json"):
        ClipTokenizer.from_dir(bad)
    shutil.copy(CLIP_DIR / "vocab.json", bad / "vocab.json")
    (bad / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(LdmError, match="pad_token '<pad>' is not in the vocabulary"):
        ClipTokenizer.from_dir(bad)


def test_runtime_tokenizer_is_torch_free():
    import subprocess

    code = ("import sys, ldm_deploy.runtime.tokenizer as t; "
            "t.ClipTokenizer.from_dir(sys.argv[1])(['x']); "
            "assert not {'torch', 'transformers'} & set(sys.modules), 'imported torch / transformers'")
    subprocess.run([sys.executable, "-c", code, str(CLIP_DIR)], check=True)


def test_runtime_tokenizer_json_needs_no_transformers(tmp_path):
    import subprocess

    folder = saved_by_transformers(tmp_path, "saved", "!", "tokenizer.json")
    code = ("import sys, ldm_deploy.runtime.tokenizer as t; "
            "assert t.ClipTokenizer.from_dir(sys.argv[1])(['a !'])[0, :4].tolist() == [49406, 320, 0, 49407]; "
            "assert not {'torch', 'transformers'} & set(sys.modules), 'imported torch / transformers'")
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)


# ---- trained tokenizers (training/tokenizer_train.py) --------------------------------------------

TRAIN_PROMPTS = ["a small red triangle at the top left on a white background",
                 "a large Blue star in the center on a black background", "unseen: Café 東京 🚀 !! 42", ""]


@pytest.mark.parametrize("pad", ["eos", "zero"])
def test_shapes_tokenizer_loads_in_transformers_with_equal_ids(tmp_path, pad):
    from training.tokenizer_train import build_shapes_tokenizer

    folder = build_shapes_tokenizer(tmp_path / "tok", vocab_size=1000, pad=pad)
    tok = ClipTokenizer.from_dir(folder)
    assert 514 < tok.vocab_size <= 1000 and tok.vocab["!"] == 0
    assert tok.pad_id == (tok.eos_id if pad == "eos" else 0)
    ours, theirs = tok(TRAIN_PROMPTS), hf_ids(folder, TRAIN_PROMPTS)
    assert (ours == theirs).all()
    # every one of the 12 caption words is a single token
    assert ours[0, 0] == tok.bos_id and ours[0, 13] == tok.eos_id and (ours[0, 1:13] < tok.bos_id).all()
    assert (folder / "merges.txt").read_text().startswith("#version: 0.2\n")


def test_train_tokenizer_deterministic_and_bounded(tmp_path):
    from training.tokenizer_train import train_tokenizer

    captions = [f"photo number {i} of a {c} {a}" for i in range(50) for c, a in
                (("cat", "sleeping"), ("dog", "running"), ("bird", "singing"))]
    a = train_tokenizer(captions, tmp_path / "a", vocab_size=530)
    b = train_tokenizer(iter(captions), tmp_path / "b", vocab_size=530)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    tok = ClipTokenizer.from_dir(a)
    assert tok.vocab_size == 530  # capped: this corpus has 31 merges at min_frequency 2
    assert (tok(captions[:5]) == hf_ids(a, captions[:5])).all()
    with pytest.raises(LdmError, match="too small"):
        train_tokenizer(captions, tmp_path / "c", vocab_size=100)
    with pytest.raises(LdmError, match="no captions"):
        train_tokenizer(["", "  "], tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_copy_tokenizer(tmp_path):
    from training.tokenizer_train import copy_tokenizer

    out = copy_tokenizer(CLIP_DIR, tmp_path / "copy")
    assert (ClipTokenizer.from_dir(out)(PROMPTS[:3]) == ClipTokenizer.from_dir(CLIP_DIR)(PROMPTS[:3])).all()
    with pytest.raises(LdmError):
        copy_tokenizer(tmp_path / "missing", tmp_path / "copy2")


def test_training_reads_tokenizer_json_folders(tmp_path):
    """Training tokenizes with the runtime's loader, so a transformers 5 folder works there too."""
    from training.stages.text import has_tokenizer, load_tokenizer

    folder = saved_by_transformers(tmp_path, "saved", "!", "tokenizer.json")
    assert has_tokenizer(folder) and not has_tokenizer(tmp_path)
    assert (load_tokenizer(folder)(["a !"]) == hf_ids(folder, ["a !"])).all()
