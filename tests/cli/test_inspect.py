"""`ldm-deploy inspect` on each kind of path it knows: artifact, engine folder, .onnx file, model folder."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ldm_deploy.cli import main
from ldm_deploy.errors import LdmError
from ldm_deploy.inspection import format_inspection, inspect_path
from tests.runtime.tiny_model import tiny_artifact, tiny_folder  # noqa: F401 (fixtures)


def test_artifact(tiny_artifact):  # noqa: F811
    info = inspect_path(tiny_artifact)
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    assert info["kind"] == "artifact" and info["precision"] == manifest["precision"]
    assert set(info["components"]) == set(manifest["components"])
    unet = info["components"]["unet"]
    assert unet["inputs"] == manifest["components"]["unet"]["inputs"] and unet["batch_multiplier"] == 2
    assert unet["bytes"] == (tiny_artifact / "unet" / "model.onnx").stat().st_size and not unet["missing_files"]
    assert info["source"]["sha256"] == manifest["source"]["sha256"] and info["profiles"] == manifest["profiles"]
    text = format_inspection(info)
    for needle in ("unet/model.onnx", "sample float32[unet_batch, 4, latent_height, latent_width]", "batch 1..4",
                   "onnxruntime"):
        assert needle in text, needle


def test_artifact_with_a_missing_file_says_so(tiny_artifact, tmp_path):  # noqa: F811
    broken = shutil.copytree(tiny_artifact, tmp_path / "a")
    (broken / "vae_encoder" / "model.onnx").unlink()
    info = inspect_path(broken)
    assert info["components"]["vae_encoder"]["missing_files"] == ["vae_encoder/model.onnx"]
    assert "MISSING vae_encoder/model.onnx" in format_inspection(info)


def test_onnx_file_io_without_weights(tiny_artifact):  # noqa: F811
    import onnx

    path = tiny_artifact / "unet" / "model.onnx"
    info = inspect_path(path)
    model = onnx.load(str(path))
    assert info["kind"] == "onnx" and info["nodes"] == len(model.graph.node)
    assert [i["name"] for i in info["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert info["inputs"][0]["shape"][0] == "unet_batch" and info["inputs"][0]["dtype"] == "float32"
    assert info["parameters"] == sum(int(np.prod(i.dims)) for i in model.graph.initializer)


def test_model_folder_parameter_counts(tiny_folder):  # noqa: F811
    from safetensors.numpy import load_file

    info = inspect_path(tiny_folder)
    assert info["kind"] == "model" and info["pipeline"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder"):
        weights = load_file(next((tiny_folder / part).glob("*.safetensors")))
        assert info["parts"][part]["parameters"] == sum(v.size for v in weights.values()), part
    assert info["parts"]["unet"]["class"] == "UNet2DConditionModel" and info["parts"]["unet"]["gflops_per_call"] > 0
    assert info["parts"]["scheduler"]["class"] == "PNDMScheduler"
    assert "UNet2DConditionModel" in format_inspection(info)


@pytest.mark.trt_build
def test_engine_folder(tiny_artifact, tmp_path):  # noqa: F811
    from ldm_deploy.engine.build import BuildConfig, build_engines

    engines = tmp_path / "engines"
    build_engines(tiny_artifact, engines, BuildConfig(components=("vae_decoder",), opt_level=0))
    info = inspect_path(engines)
    sidecar = json.loads((engines / "vae_decoder.engine.json").read_text())
    e = info["engines"]["vae_decoder"]
    assert e["flavour"] == sidecar["key"]["flavour"] and e["targets"] == sidecar["key"]["compute_capabilities"]
    assert e["onnx"]["sha256"] == sidecar["key"]["onnx"]["sha256"] and e["present"]
    assert e["profile"] == sidecar["key"]["profile"]
    assert "vae_decoder:" in format_inspection(info)
    (engines / "vae_decoder.engine").write_bytes(b"truncated")
    assert inspect_path(engines)["engines"]["vae_decoder"]["present"] is False


def test_cli_json_and_errors(tiny_artifact, tmp_path, capsys):  # noqa: F811
    assert main(["inspect", str(tiny_artifact), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "artifact"
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ldm-deploy: error:") and err.count("\n") == 1
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(LdmError, match="not a readable ONNX"):
        inspect_path(tmp_path / "bad.onnx")
    assert main(["inspect"]) == 2


def test_artifact_variants_are_listed(tiny_artifact, tmp_path):  # noqa: F811
    art = shutil.copytree(tiny_artifact, tmp_path / "a")
    shutil.copy(art / "unet" / "model.onnx", art / "unet" / "model.ort-cuda.onnx")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["components"]["unet"]["variants"] = {"ort-cuda": {"file": "unet/model.ort-cuda.onnx",
                                                               "precision": "fp32", "fused_ops": {}}}
    (art / "manifest.json").write_text(json.dumps(manifest))
    info = inspect_path(art)
    assert info["variants"] == ["ort-cuda"]
    unet = info["components"]["unet"]
    assert unet["bytes"] == 2 * (art / "unet" / "model.onnx").stat().st_size
    assert "variant ort-cuda: unet/model.ort-cuda.onnx (fp32)" in format_inspection(info)
