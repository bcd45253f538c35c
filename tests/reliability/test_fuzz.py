"""Property-based fuzzing of every loader that reads a user's file: whatever the bytes, the only
exception that escapes is LdmError (UsageError is its subclass), which the CLI prints as one line.

Each loader gets FUZZ examples (hypothesis, derandomized: the same inputs on every run), drawn
half from mutations of a valid file (truncation, flipped bytes, a JSON value replaced or deleted)
and half from arbitrary bytes / JSON. The counts are printed at the end of the pytest run.
"""
from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldm_deploy.errors import LdmError
from tests.reliability.conftest import FUZZ_COUNTS

FUZZ = 300
SETTINGS = settings(max_examples=FUZZ, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                          max_leaves=12)


def _count(name: str) -> None:
    FUZZ_COUNTS[name] = FUZZ_COUNTS.get(name, 0) + 1


def _paths(obj, prefix=()):
    """Every key path of a JSON tree (dict keys and list indices)."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


@st.composite
def mutated_json(draw, valid: dict):
    """`valid` with one to three values replaced by arbitrary JSON or deleted."""
    obj = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_value)
    return obj


@st.composite
def mutated_bytes(draw, valid: bytes):
    """`valid` truncated, with flipped bytes, or with a random slice inserted."""
    data = bytearray(valid)
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "random"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, max(len(data) - 1, 0)))])
    if kind == "random":
        return draw(st.binary(max_size=2048))
    for _ in range(draw(st.integers(1, 8))):
        # flips land in the first 4 KiB most of the time: that is where the headers and structure live
        hi = min(len(data) - 1, 4096) if draw(st.booleans()) else len(data) - 1
        i = draw(st.integers(0, max(hi, 0)))
        if kind == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def _only_ldm_errors(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except LdmError as e:
        assert "\n" not in str(e), f"multi-line error: {e!r}"


# ---------------------------------------------------------------------------------------------- safetensors

def _valid_safetensors(tmp: Path) -> bytes:
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)},
              str(tmp / "v.safetensors"))
    return (tmp / "v.safetensors").read_bytes()


@st.composite
def safetensors_bytes(draw, valid: bytes):
    """Mutated files, plus well-framed files whose JSON header is mutated (offsets, dtypes, shapes)."""
    if draw(st.booleans()):
        return draw(mutated_bytes(valid))
    (n,) = struct.unpack("<Q", valid[:8])
    header = json.loads(valid[8:8 + n])
    header = draw(mutated_json(header))
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + valid[8 + n:]


def test_fuzz_safetensors_loader(tmp_path_factory):
    from training.checkpoint import load_state_dict_file

    tmp = tmp_path_factory.mktemp("fuzz_st")
    valid = _valid_safetensors(tmp)
    target = tmp / "w.safetensors"

    @SETTINGS
    @given(safetensors_bytes(valid))
    def check(data):
        _count("safetensors")
        target.write_bytes(data)
        _only_ldm_errors(load_state_dict_file, target)

    check()


# ---------------------------------------------------------------------------------------------- manifest

def test_fuzz_artifact_manifest(artifact, tmp_path_factory):
    """Artifact.open on mutated manifests (every other file intact)."""
    import shutil

    from ldm_deploy.artifact import Artifact

    root = tmp_path_factory.mktemp("fuzz_manifest") / "onnx"
    shutil.copytree(artifact, root)
    raw = (root / "manifest.json").read_bytes()
    valid = json.loads(raw)

    @SETTINGS
    @given(st.one_of(mutated_json(valid).map(lambda m: json.dumps(m).encode()), mutated_bytes(raw),
                     json_value.map(lambda v: json.dumps(v).encode())))
    def check(data):
        _count("manifest")
        (root / "manifest.json").write_bytes(data)

        def open_and_use():
            art = Artifact.open(root)
            art.check_shape(height=32, width=32, batch=1)
            for name in art.components:
                art.file(name)

        _only_ldm_errors(open_and_use)

    check()


# ---------------------------------------------------------------------------------------------- sidecar

VALID_SIDECAR = {
    "format": "ldm-deploy-engine", "format_version": 1, "component": "unet",
    "engine": {"file": "unet.engine", "bytes": 4, "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"},
    "key": {"flavour": "tensorrt-rtx", "tensorrt_version": "1.7.1.116", "compute_capabilities": ["8.9"],
            "gpu": "none (built on CPU)", "profile": {"sample": {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8],
                                                               "max": [4, 4, 8, 8]}},
            "precision": "fp16", "strongly_typed": True,
            "onnx": {"file": "unet/model.onnx", "sha256": "0" * 64, "external_data": None},
            "build_options": {"opt_level": 0, "workspace_mb": None}},
    "io": {"inputs": [], "outputs": [], "batch_multiplier": 2},
    "artifact": "/x", "build": {"seconds": 1.0, "created": "2026-11-28T00:00:00Z"},
    "rebuild": "ldm-deploy build /x --out /y",
}


def test_fuzz_engine_sidecar(tmp_path_factory):
    """read_sidecar + check_loadable + read_engine, as the TensorRT runner calls them."""
    from ldm_deploy.engine import sidecar as sc

    root = tmp_path_factory.mktemp("fuzz_sidecar")
    (root / "unet.engine").write_bytes(b"test")
    env = sc.Environment("tensorrt-rtx", "1.7.1.116", "NVIDIA GeForce RTX 4090", "8.9")
    raw = json.dumps(VALID_SIDECAR).encode()

    def load():
        s = sc.read_sidecar(root, "unet")
        sc.check_loadable(s, env, "0" * 64)
        sc.read_engine(root, s)

    sc.sidecar_path(root, "unet").write_bytes(raw)
    load()  # the valid sidecar loads

    @SETTINGS
    @given(st.one_of(mutated_json(VALID_SIDECAR).map(lambda m: json.dumps(m).encode()), mutated_bytes(raw),
                     json_value.map(lambda v: json.dumps(v).encode())))
    def check(data):
        _count("sidecar")
        sc.sidecar_path(root, "unet").write_bytes(data)
        _only_ldm_errors(load)

    check()


# ---------------------------------------------------------------------------------------------- ONNX

def test_fuzz_onnx_loading(tmp_path_factory):
    """The ORT runner on mutated graphs (hash check off, as after a verified-but-bad export), then one run."""
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.runtime.runners.ort import OrtCpuRunner
    from tests.engine.tiny_artifact import make_tiny_artifact

    root = make_tiny_artifact(tmp_path_factory.mktemp("fuzz_onnx") / "onnx", precision="fp32")
    art = Artifact.open(root, verify=False)
    path = root / art.components["vae_decoder"].file
    valid = path.read_bytes()
    latent = np.zeros((1, 4, 8, 8), np.float32)

    def load_and_run():
        OrtCpuRunner(art, "vae_decoder")({"latent": latent})

    load_and_run()

    @settings(SETTINGS, max_examples=FUZZ)
    @given(mutated_bytes(valid))
    def check(data):
        _count("onnx")
        path.write_bytes(data)
        _only_ldm_errors(load_and_run)

    check()


# ---------------------------------------------------------------------------------------------- tokenizer

def _small_vocab() -> tuple[dict, str]:
    from ldm_deploy.runtime.tokenizer import BOS, EOS, bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = [("a", "b</w>"), ("c", "a</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return vocab, "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"


def test_fuzz_tokenizer_files(tmp_path_factory):
    """ClipTokenizer.from_dir on mutated vocab.json / merges.txt / tokenizer_config.json, then one prompt."""
    from ldm_deploy.runtime.tokenizer import ClipTokenizer

    root = tmp_path_factory.mktemp("fuzz_tok")
    vocab, merges = _small_vocab()
    config = {"model_max_length": 77, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>"}
    files = {"vocab.json": json.dumps(vocab).encode(), "merges.txt": merges.encode(),
             "tokenizer_config.json": json.dumps(config).encode()}

    def write(which=None, data=None):
        for name, valid in files.items():
            (root / name).write_bytes(data if name == which else valid)

    def load():
        ClipTokenizer.from_dir(root)(["the cab", "ab\u200f\U0001f600"])

    write()
    load()

    vocab_json = st.one_of(mutated_json(vocab).map(lambda v: json.dumps(v).encode()),
                           mutated_bytes(files["vocab.json"]))
    merges_txt = st.one_of(mutated_bytes(files["merges.txt"]),
                           st.lists(st.text(max_size=10), max_size=6).map(lambda ls: "\n".join(ls).encode()))
    config_json = st.one_of(mutated_json(config).map(lambda v: json.dumps(v).encode()),
                            mutated_bytes(files["tokenizer_config.json"]))

    @SETTINGS
    @given(st.one_of(st.tuples(st.just("vocab.json"), vocab_json), st.tuples(st.just("merges.txt"), merges_txt),
                     st.tuples(st.just("tokenizer_config.json"), config_json)))
    def check(case):
        _count("tokenizer")
        write(*case)
        _only_ldm_errors(load)

    check()
