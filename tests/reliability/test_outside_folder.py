"""Reading outside the folder the user named: every path read from a manifest, sidecar, weight index or
tokenizer folder resolves inside its folder, and links out of it are refused.

Through the real CLI, each in a fresh process (the timeout is only a safety net against a hang, never
the assertion): `generate` on an artifact, `export` on a model folder (whose hashing must not follow a
link or open a FIFO) and `inspect` on an artifact or engines folder. Each case must end in one line
naming the file (and, for a link, its target) with exit 1, and nothing written. One helper
(ldm_deploy.paths.inside) does the check everywhere.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ldm_deploy.fileio import sha256_file
from tests.reliability.conftest import cli


def link_out(path: Path, outside: Path) -> Path:
    """Move `path` (file or folder) to `outside` and leave a symbolic link to it in its place:
    the same bytes, but outside the folder."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(outside))
    path.symlink_to(outside.resolve(), target_is_directory=outside.is_dir())
    return outside


def link_to(path: Path, target: str) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target)


# -------------------------------------------------------------------------------------------- artifact

def _rel_out(root: Path) -> None:
    m = json.loads((root / "manifest.json").read_text())
    m["files"]["../outside.bin"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(m))


ARTIFACT_CASES = {
    "unet model.onnx links out": (lambda r, o: link_out(r / "unet" / "model.onnx", o / "model.onnx"),
                                  r"unet/model.onnx is a symbolic link to .*outside"),
    "tokenizer/ links out": (lambda r, o: link_out(r / "tokenizer", o / "tokenizer"),
                             r"tokenizer is a symbolic link to .*outside"),
    "tokenizer vocab.json links out": (lambda r, o: link_out(r / "tokenizer" / "vocab.json", o / "vocab.json"),
                                       r"vocab.json is a symbolic link to .*outside"),
    "vae_decoder model.onnx links to /dev/zero": (lambda r, o: link_to(r / "vae_decoder" / "model.onnx", "/dev/zero"),
                                                  r"model.onnx is a symbolic link to /dev/zero"),
    "manifest names ../outside.bin": (lambda r, o: _rel_out(r), r"names the path '\.\./outside.bin'"),
}


@pytest.mark.parametrize("case", list(ARTIFACT_CASES))
def test_generate_refuses_an_artifact_reaching_outside(artifact_copy, tmp_path, case):
    damage, match = ARTIFACT_CASES[case]
    damage(artifact_copy, tmp_path / "outside")
    out = tmp_path / "x.png"
    ran = cli("generate", artifact_copy, "--prompt", "a red cube", "--steps", "2", "--height", "32", "--width", "32",
              "--out", out, timeout=300)
    ran.assert_clean_failure(1, match)
    assert not out.exists()


@pytest.mark.parametrize("case", [c for c in ARTIFACT_CASES if "/dev/zero" not in c])
def test_inspect_refuses_an_artifact_reaching_outside(artifact_copy, tmp_path, case):
    damage, match = ARTIFACT_CASES[case]
    damage(artifact_copy, tmp_path / "outside")
    cli("inspect", artifact_copy, timeout=120).assert_clean_failure(1, match)


# -------------------------------------------------------------------------------------------- engines (inspect)

def _engines(tmp: Path, file: str, size: int) -> Path:
    folder = tmp / "engines"
    folder.mkdir()
    (folder / "unet.engine.json").write_text(json.dumps({
        "format": "ldm-deploy-engine", "format_version": 1, "component": "unet",
        "engine": {"file": file, "bytes": size, "sha256": "0" * 64},
        "key": {"flavour": "tensorrt", "tensorrt_version": "10", "gpu": "x", "compute_capabilities": ["8.9"],
                "onnx": {"file": "unet/model.onnx", "sha256": "0" * 64}},
        "rebuild": "ldm-deploy build A --out B"}))
    return folder


def _engine_names_etc_passwd(tmp: Path) -> Path:
    return _engines(tmp, "../../etc/passwd", os.path.getsize("/etc/passwd"))


def _engine_links_out(tmp: Path) -> Path:
    (tmp / "elsewhere.engine").write_bytes(b"\0" * 1000)
    folder = _engines(tmp, "unet.engine", 1000)
    (folder / "unet.engine").symlink_to(tmp / "elsewhere.engine")
    return folder


ENGINE_CASES = {
    "sidecar engine.file ../../etc/passwd": (_engine_names_etc_passwd, r"names the path '\.\./\.\./etc/passwd'"),
    "engine file links out": (_engine_links_out, r"unet.engine is a symbolic link to .*elsewhere.engine"),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_inspect_refuses_an_engine_outside_its_folder(tmp_path, case):
    make, match = ENGINE_CASES[case]
    folder = make(tmp_path)
    cli("inspect", folder, timeout=120).assert_clean_failure(1, match)


def test_the_runtime_refuses_an_engine_outside_its_folder(tmp_path):
    """What the TensorRT runner reads (engine.sidecar.read_engine): the same check, in process."""
    from ldm_deploy.engine import sidecar as sc
    from ldm_deploy.errors import LdmError

    folder = _engine_links_out(tmp_path)
    with pytest.raises(LdmError, match="is a symbolic link to"):
        sc.read_engine(folder, json.loads((folder / "unet.engine.json").read_text()))


# -------------------------------------------------------------------------------------------- model folder (export)

def _unet_weights(model: Path) -> Path:
    return model / "unet" / "diffusion_pytorch_model.safetensors"


def _sharded(model: Path, outside: Path, absolute: bool) -> None:
    """unet weights as a one-shard index whose shard lies outside the model folder."""
    from safetensors import safe_open

    with safe_open(str(_unet_weights(model)), framework="np") as f:
        keys = list(f.keys())
    shard = outside / "shard.safetensors"
    outside.mkdir(parents=True, exist_ok=True)
    shutil.move(str(_unet_weights(model)), str(shard))
    name = str(shard.resolve()) if absolute else os.path.relpath(shard, model / "unet")
    (model / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: name for k in keys}}))


MODEL_CASES = {
    "weight index names a ../ shard": (lambda m, o: _sharded(m, o, absolute=False), "unet", r"names the path '\.\./"),
    "weight index names an absolute shard": (lambda m, o: _sharded(m, o, absolute=True), "unet", r"names the path '/"),
    "unet weights link out": (lambda m, o: link_out(_unet_weights(m), o / "w.safetensors"), "unet",
                              r"diffusion_pytorch_model.safetensors is a symbolic link to .*outside"),
    "unet/ links out": (lambda m, o: link_out(m / "unet", o / "unet"), "unet", r"unet is a symbolic link to .*outside"),
    "tokenizer/ links out": (lambda m, o: link_out(m / "tokenizer", o / "tokenizer"), "vae_decoder",
                             r"tokenizer is a symbolic link to .*outside"),
    "a file links to /dev/zero": (lambda m, o: (m / "notes.txt").symlink_to("/dev/zero"), "vae_decoder",
                                  r"notes.txt is a symbolic link to /dev/zero"),
    "a FIFO in the folder": (lambda m, o: os.mkfifo(m / "pipe"), "vae_decoder", r"pipe is not a regular file"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_export_refuses_a_model_folder_reaching_outside(folder_copy, tmp_path, case):
    damage, component, match = MODEL_CASES[case]
    damage(folder_copy, tmp_path / "outside")
    out = tmp_path / "onnx"
    ran = cli("export", folder_copy, "--out", out, "--config", "tiny", "--components", component, timeout=300)
    ran.assert_clean_failure(1, match)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx")], "temporary left behind"


def test_links_inside_the_folder_are_fine(folder_copy, tmp_path):
    """The control: a link that stays inside its folder is hashed (as a link, not followed) and loaded."""
    from training.checkpoint import folder_hash, load_components

    before = folder_hash(folder_copy)
    weights = _unet_weights(folder_copy)
    shutil.move(str(weights), str(folder_copy / "unet" / "real.safetensors"))
    weights.symlink_to("real.safetensors")
    assert folder_hash(folder_copy) != before
    assert sha256_file(weights) == sha256_file(folder_copy / "unet" / "real.safetensors")
    assert load_components(folder_copy, parts=("unet",)).unet is not None
