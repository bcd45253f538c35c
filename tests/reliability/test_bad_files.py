"""Damaged inputs through the real CLI, each in a fresh process with a timeout: one line on stderr
(`ldm-deploy: error: ...`), a non-zero exit (never a signal: no segfault), no hang, and nothing
written at --out.

Covers: the artifact's manifest / ONNX / tokenizer files (truncated, random bytes, a hash that no
longer matches), a model folder's safetensors (truncated, random, corrupted header) and missing parts,
and the engine builder fed a damaged artifact. Damaged engine files and sidecars are refused by
the TensorRT runner (tests/engine/test_refusals.py; a CLI run of it here needs a GPU to get past
"no GPU").
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from ldm_deploy.fileio import sha256_file
from tests.reliability.conftest import cli

def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rehash(root: Path) -> None:
    """Make the manifest agree with the (damaged) files, so the loader behind the hash check is tested."""
    m = json.loads((root / "manifest.json").read_text())
    m["files"] = {rel: sha256_file(root / rel) for rel in m["files"] if (root / rel).is_file()}
    (root / "manifest.json").write_text(json.dumps(m))


def _set_file(manifest: dict, component: str, value) -> dict:
    manifest["components"][component]["file"] = value
    return manifest


def generate(artifact: Path, out: Path, *extra):
    return cli("generate", artifact, "--prompt", "a red cube", "--steps", "2", "--seed", "0",
               "--height", "32", "--width", "32", "--out", out, *extra, timeout=120)


# --------------------------------------------------------------------------------------------- artifact

ARTIFACT_DAMAGE = {
    "manifest truncated": (lambda r: truncate(r / "manifest.json"), "cannot read .*manifest.json"),
    "manifest random bytes": (lambda r: (r / "manifest.json").write_bytes(random_bytes(3000)),
                              "cannot read .*manifest.json"),
    "manifest wrong types": (lambda r: (r / "manifest.json").write_text(json.dumps(
        {**json.loads((r / "manifest.json").read_text()), "profiles": [1, 2]})), "malformed: `profiles`"),
    "manifest component without a file": (lambda r: (r / "manifest.json").write_text(json.dumps(_set_file(
        json.loads((r / "manifest.json").read_text()), "vae_decoder", None))), "component 'vae_decoder' is malformed"),
    "manifest missing": (lambda r: (r / "manifest.json").unlink(), "manifest.json is missing"),
    "unet onnx truncated (hash mismatch)": (lambda r: truncate(r / "unet" / "model.onnx"),
                                            "unet/model.onnx .* does not match its sha256"),
    "unet onnx corrupted (hash mismatch)": (
        lambda r: (r / "unet" / "model.onnx").write_bytes(random_bytes(64) + (r / "unet" / "model.onnx").read_bytes()[64:]),
        "does not match its sha256"),
    "unet onnx truncated (rehashed)": (lambda r: (truncate(r / "unet" / "model.onnx"), rehash(r)),
                                       "onnxruntime could not load .*unet"),
    "unet onnx random bytes (rehashed)": (lambda r: ((r / "unet" / "model.onnx").write_bytes(random_bytes(5000)), rehash(r)),
                                          "onnxruntime could not load .*unet"),
    "vae_decoder onnx missing": (lambda r: (r / "vae_decoder" / "model.onnx").unlink(),
                                 "vae_decoder/model.onnx is missing"),
    "tokenizer vocab truncated (rehashed)": (lambda r: (truncate(r / "tokenizer" / "vocab.json"), rehash(r)),
                                             "vocab.json is not valid JSON"),
    "tokenizer merges random (rehashed)": (lambda r: ((r / "tokenizer" / "merges.txt").write_bytes(random_bytes(2000)), rehash(r)),
                                           "merges.txt"),
}


@pytest.mark.parametrize("case", list(ARTIFACT_DAMAGE))
def test_generate_refuses_a_damaged_artifact(artifact_copy, tmp_path, case):
    damage, match = ARTIFACT_DAMAGE[case]
    damage(artifact_copy)
    out = tmp_path / "out" / "x.png"
    generate(artifact_copy, out).assert_clean_failure(1, match)
    assert not out.exists() and not out.parent.exists()


def test_generate_on_an_intact_copy_works(artifact_copy, tmp_path):
    """The control: the same command on the undamaged artifact succeeds."""
    out = tmp_path / "x.png"
    ran = generate(artifact_copy, out)
    assert ran.rc == 0, ran.stderr
    assert out.is_file()


# --------------------------------------------------------------------------------------------- --latents / --image

def _npy(path: Path, kind: str) -> None:
    import numpy as np

    good = path.with_name("good.npy")
    np.save(good, np.zeros((1, 4, 4, 4), np.float32))
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:100])
    elif kind == "random":
        path.write_bytes(random_bytes(500))
    else:  # an object array: loading it would unpickle
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)


INPUT_FILES = {
    "latents truncated": ("--latents", "x.npy", lambda p: _npy(p, "truncated"), "not a plain .npy array"),
    "latents random bytes": ("--latents", "x.npy", lambda p: _npy(p, "random"), "not a plain .npy array"),
    "latents pickled objects": ("--latents", "x.npy", lambda p: _npy(p, "object"), "not a plain .npy array"),
    "init image random bytes": ("--image", "x.png", lambda p: p.write_bytes(random_bytes(300)), "cannot read image"),
    "init image empty": ("--image", "x.png", lambda p: p.write_bytes(b""), "cannot read image"),
}


@pytest.mark.parametrize("case", list(INPUT_FILES))
def test_generate_refuses_damaged_input_files(artifact, tmp_path, case):
    flag, name, make, match = INPUT_FILES[case]
    make(tmp_path / name)
    out = tmp_path / "out.png"
    ran = cli("generate", artifact, "--prompt", "a", "--steps", "2", "--height", "32", "--width", "32",
              flag, tmp_path / name, "--out", out)
    ran.assert_clean_failure(1, match)
    assert not out.exists()


# --------------------------------------------------------------------------------------------- model folder

def _unet_weights(folder: Path) -> Path:
    return folder / "unet" / "diffusion_pytorch_model.safetensors"


FOLDER_DAMAGE = {
    "safetensors truncated": (lambda f: truncate(_unet_weights(f)), "truncated"),
    "safetensors random bytes": (lambda f: _unet_weights(f).write_bytes(random_bytes(4096)),
                                 "not a valid safetensors file"),
    "safetensors header corrupted": (
        lambda f: _unet_weights(f).write_bytes(_unet_weights(f).read_bytes()[:8] + b"#" * 40
                                               + _unet_weights(f).read_bytes()[48:]),
        "header is not JSON"),
    "safetensors empty": (lambda f: _unet_weights(f).write_bytes(b""), "only 0 bytes"),
    "vae folder missing": (lambda f: shutil.rmtree(f / "vae"), "lacks vae/"),
    "unet config missing": (lambda f: (f / "unet" / "config.json").unlink(), "config.json"),
    "unet config not JSON": (lambda f: (f / "unet" / "config.json").write_bytes(random_bytes(100)), "config.json"),
    # not even UTF-8 (random bytes are that only some of the time): still one line naming the file
    "vae config not UTF-8": (lambda f: (f / "vae" / "config.json").write_bytes(b"\xcd\x01garbage"), "config.json"),
    "unet weights missing": (lambda f: _unet_weights(f).unlink(), "no weights in .*unet"),
    "tokenizer missing": (lambda f: shutil.rmtree(f / "tokenizer"), "tokenizer"),
}


@pytest.mark.parametrize("case", list(FOLDER_DAMAGE))
def test_export_refuses_a_damaged_model_folder(folder_copy, tmp_path, case):
    damage, match = FOLDER_DAMAGE[case]
    damage(folder_copy)
    out = tmp_path / "onnx"
    cli("export", folder_copy, "--out", out, timeout=180).assert_clean_failure(1, match)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx")], "temporary export folder left behind"


def test_export_refuses_a_pickle_without_opt_in(folder_copy, tmp_path):
    """A folder whose U-Net weights are a pickle (.bin) is refused: pickles can run code."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(_unet_weights(folder_copy)))
    torch.save(sd, folder_copy / "unet" / "diffusion_pytorch_model.bin")
    _unet_weights(folder_copy).unlink()
    out = tmp_path / "onnx"
    cli("export", folder_copy, "--out", out, timeout=180).assert_clean_failure(1, "pickle file .* refusing it")
    assert not out.exists()


# --------------------------------------------------------------------------------------------- engine builder

@pytest.mark.trt_build
@pytest.mark.parametrize("case", ["hash mismatch", "random bytes (rehashed)", "truncated (rehashed)"])
def test_build_refuses_a_damaged_onnx(artifact_copy, tmp_path, case):
    onnx_file = artifact_copy / "text_encoder" / "model.onnx"
    if case == "hash mismatch":
        data = bytearray(onnx_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        onnx_file.write_bytes(bytes(data))
        match = "does not match its sha256"
    elif case.startswith("random"):
        onnx_file.write_bytes(random_bytes(5000))
        rehash(artifact_copy)
        match = "cannot parse|failed to build the text_encoder engine"
    else:
        truncate(onnx_file)
        rehash(artifact_copy)
        match = "cannot parse"
    out = tmp_path / "engines"
    cli("build", artifact_copy, "--out", out, "--opt-level", "0", timeout=180).assert_clean_failure(1, match)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.trt_build
def test_build_checks_every_onnx_before_building_any(artifact_copy, tmp_path):
    """A damaged vae_decoder (built third) stops the build before the text encoder engine is written."""
    onnx_file = artifact_copy / "vae_decoder" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"x")
    out = tmp_path / "engines"
    cli("build", artifact_copy, "--out", out, "--opt-level", "0", timeout=180).assert_clean_failure(
        1, "vae_decoder/model.onnx .* does not match")
    assert not out.exists() or not any(out.iterdir())


def test_no_stray_temporaries_in_cwd():
    """None of the failures above wrote into the repository (the CLI's working directory)."""
    repo = Path(__file__).resolve().parents[2]
    assert not [p for p in os.listdir(repo) if p.endswith(".tmp")]
