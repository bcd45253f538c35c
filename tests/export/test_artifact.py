"""ldm_deploy.artifact on hand-made artifact folders: format checks, hashes, shape profiles (no torch, no export)."""
import json
import subprocess
import sys

import pytest

from ldm_deploy.artifact import Artifact
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.fileio import sha256_file


def _make(folder, **overrides):
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "model.onnx").write_bytes(b"graph")
    (folder / "unet" / "model.onnx.data").write_bytes(b"weights" * 10)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")
    files = {p: sha256_file(folder / p) for p in ("unet/model.onnx", "unet/model.onnx.data", "tokenizer/vocab.json")}
    manifest = {
        "format": "ldm-deploy-artifact", "format_version": 1, "precision": "fp16",
        "source": {"path": "x", "sha256": "0" * 64}, "model": {},
        "scaling_factor": 0.18215, "prediction_type": "v_prediction", "latent_channels": 4, "vae_scale_factor": 8,
        "scheduler": {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
        "tokenizer": {"dir": "tokenizer", "model_max_length": 77, "pad_token": "!"},
        "profiles": {"batch": {"min": 1, "opt": 1, "max": 4}, "height": {"min": 512, "opt": 512, "max": 768},
                     "width": {"min": 512, "opt": 512, "max": 512}},
        "components": {"unet": {
            "file": "unet/model.onnx", "external_data": "unet/model.onnx.data", "precision": "fp16",
            "inputs": [{"name": "sample", "dtype": "float16", "shape": ["unet_batch", 4, "latent_height", 64]},
                       {"name": "timestep", "dtype": "float32", "shape": ["unet_batch"]}],
            "outputs": [{"name": "noise_pred", "dtype": "float16", "shape": ["unet_batch", 4, "latent_height", 64]}],
            "batch_multiplier": 2,
            "profile": {"sample": {"min": [2, 4, 64, 64], "opt": [2, 4, 64, 64], "max": [8, 4, 96, 64]}}}},
        "files": files,
        "tools": {},
    }
    manifest.update(overrides)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_open_exposes_everything(tmp_path):
    art = Artifact.open(_make(tmp_path / "a"))
    assert art.precision == "fp16" and art.prediction_type == "v_prediction" and art.scaling_factor == 0.18215
    assert art.tokenizer_dir == tmp_path / "a" / "tokenizer" and art.scheduler_config["_class_name"] == "DDIMScheduler"
    unet = art.components["unet"]
    assert unet.input_names == ["sample", "timestep"] and unet.batch_multiplier == 2
    assert unet.inputs[1].dtype == "float32" and unet.inputs[0].shape == ("unet_batch", 4, "latent_height", 64)
    assert art.file("unet") == tmp_path / "a" / "unet" / "model.onnx"
    assert art.profiles.height.max == 768 and art.profiles.width.static
    with pytest.raises(LdmError, match="no 'vae_decoder' component"):
        art.component("vae_decoder")


@pytest.mark.parametrize("victim", ["unet/model.onnx.data", "tokenizer/vocab.json"])
def test_tampered_file_is_named(tmp_path, victim):
    folder = _make(tmp_path / "a")
    with open(folder / victim, "ab") as f:
        f.write(b"!")
    with pytest.raises(LdmError, match=victim.replace(".", r"\.")):
        Artifact.open(folder)
    Artifact.open(folder, verify=False)          # existence-only check still passes


def test_missing_file_and_bad_format(tmp_path):
    folder = _make(tmp_path / "a")
    (folder / "unet" / "model.onnx.data").unlink()
    with pytest.raises(LdmError, match=r"unet/model\.onnx\.data is missing"):
        Artifact.open(folder, verify=False)
    with pytest.raises(LdmError, match="format_version 2.*upgrade"):
        Artifact.open(_make(tmp_path / "b", format_version=2))
    with pytest.raises(LdmError, match="not an ldm-deploy artifact manifest"):
        Artifact.open(_make(tmp_path / "c", format="something"))
    with pytest.raises(LdmError, match="nothing does not exist"):
        Artifact.open(tmp_path / "nothing")


def test_check_shape_names_the_profile(tmp_path):
    art = Artifact.open(_make(tmp_path / "a"))
    art.check_shape(height=640, width=512, batch=4)
    with pytest.raises(UsageError, match=r"width 640 .* width profile 512 \(static\)"):
        art.check_shape(height=512, width=640)
    with pytest.raises(UsageError, match=r"batch 5 .* batch profile 1\.\.4"):
        art.check_shape(height=512, width=512, batch=5)
    with pytest.raises(UsageError, match="multiple of the VAE scale factor 8"):
        art.check_shape(height=516, width=512)


def test_artifact_module_does_not_import_torch():
    code = "import sys, ldm_deploy.artifact; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
