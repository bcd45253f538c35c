"""Engine building on this machine (TensorRT for RTX builds on a CPU): profiles, sidecars, cache."""
from __future__ import annotations

import json
import logging

import pytest

from ldm_deploy.artifact import Artifact
from ldm_deploy.engine import sidecar as sc
from ldm_deploy.engine import trt_api
from ldm_deploy.engine.build import BuildConfig, build_engines, component_profile
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.fileio import sha256_file
from tests.engine.conftest import FAST
from tests.engine.tiny_artifact import write_component

pytestmark = pytest.mark.trt_build
COMPONENTS = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]


def _sidecar(engines, component):
    return json.loads(sc.sidecar_path(engines, component).read_text())


def test_every_component_gets_an_engine_and_sidecar(tiny_engines):
    artifact, engines, report = tiny_engines
    assert report.built == COMPONENTS
    for r in report.results:
        assert r.engine.is_file() and r.engine.stat().st_size == r.engine_bytes > 10_000
        assert r.seconds > 0
    leftovers = [p.name for p in engines.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # atomic writes leave no temporaries


def test_sidecar_records_what_the_engine_was_built_from_and_for(tiny_engines):
    artifact, engines, _ = tiny_engines
    trt = trt_api.load_trt("tensorrt-rtx")
    s = _sidecar(engines, "unet")
    key = s["key"]
    assert (s["format"], s["format_version"], s["component"]) == (sc.FORMAT, sc.FORMAT_VERSION, "unet")
    assert key["flavour"] == "tensorrt-rtx" and key["tensorrt_version"] == trt.__version__
    assert key["compute_capabilities"] == trt_api.rtx_default_targets(trt)
    assert "9.0" not in key["compute_capabilities"] and "8.6" in key["compute_capabilities"]
    assert key["gpu"] == sc.NO_GPU
    assert key["precision"] == "fp16" and key["strongly_typed"] is True
    assert key["onnx"] == {"file": "unet/model.onnx", "sha256": sha256_file(artifact / "unet/model.onnx"),
                           "external_data": None}
    assert key["build_options"] == {"opt_level": 0, "workspace_mb": 64}
    engine = engines / "unet.engine"
    assert s["engine"] == {"file": "unet.engine", "bytes": engine.stat().st_size, "sha256": sha256_file(engine)}
    assert s["build"]["seconds"] > 0
    assert [t["name"] for t in s["io"]["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert s["rebuild"].startswith(f"ldm-deploy build {artifact} --out {engines} --backend tensorrt-rtx")
    assert "--opt-level 0" in s["rebuild"] and "--workspace-mb 64" in s["rebuild"]
    assert _sidecar(engines, "text_encoder")["key"]["precision"] == "fp32"


def test_unet_profile_covers_the_cfg_batch_vae_the_plain_batch(tiny_engines):
    _, engines, _ = tiny_engines
    unet = _sidecar(engines, "unet")["key"]["profile"]
    # batch 1..2 images -> U-Net 1..4 rows (2B under CFG, B without); height 64 static, width 64..128
    assert unet["sample"] == {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 8, 16]}
    assert unet["timestep"] == {"min": [1], "opt": [2], "max": [4]}
    assert unet["encoder_hidden_states"]["max"] == [4, 77, 32]
    dec = _sidecar(engines, "vae_decoder")["key"]["profile"]
    assert dec["latent"] == {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [2, 4, 8, 16]}
    enc = _sidecar(engines, "vae_encoder")["key"]["profile"]
    assert enc["image"] == {"min": [1, 3, 64, 64], "opt": [1, 3, 64, 64], "max": [2, 3, 64, 128]}
    te = _sidecar(engines, "text_encoder")["key"]["profile"]
    assert te["input_ids"] == {"min": [1, 77], "opt": [1, 77], "max": [2, 77]}


def test_batch_caps_and_narrowed_profiles(tiny_artifact):
    manifest = Artifact(tiny_artifact, verify=False)
    capped = component_profile(manifest, "unet", BuildConfig(unet_max_batch=3))
    assert capped["sample"]["max"][0] == 3 and capped["sample"]["opt"][0] == 2
    vae = component_profile(manifest, "vae_decoder", BuildConfig(vae_max_batch=1))
    assert vae["latent"]["max"][0] == 1 and vae["latent"]["opt"][0] == 1
    assert component_profile(manifest, "unet", BuildConfig(vae_max_batch=1))["sample"]["max"][0] == 4
    narrow = component_profile(manifest, "unet", BuildConfig(width={"min": 64, "opt": 64, "max": 64}))
    assert narrow["sample"]["max"] == [4, 4, 8, 8]
    with pytest.raises(UsageError, match="below the profile's min batch"):
        component_profile(manifest, "unet", BuildConfig(unet_max_batch=0))
    with pytest.raises(UsageError, match="outside the exported range 64..128"):
        component_profile(manifest, "unet", BuildConfig(width={"min": 64, "opt": 64, "max": 256}))


def test_nothing_changed_nothing_rebuilt(engine_copy, caplog):
    artifact, engines = engine_copy
    mtimes = {p.name: p.stat().st_mtime_ns for p in engines.iterdir()}
    with caplog.at_level(logging.INFO, logger="ldm_deploy"):
        report = build_engines(artifact, engines, BuildConfig(**FAST))
    assert report.built == []
    assert [r.reason for r in report.results] == ["up to date"] * 4
    assert {p.name: p.stat().st_mtime_ns for p in engines.iterdir()} == mtimes
    assert "unet: up to date" in caplog.text


def test_changed_onnx_rebuilds_only_that_component(engine_copy, caplog):
    artifact, engines = engine_copy
    old = _sidecar(engines, "unet")["engine"]["sha256"]
    write_component(artifact, "unet", "fp16", seed=1)  # new weights, new hash in the manifest
    with caplog.at_level(logging.INFO, logger="ldm_deploy"):
        report = build_engines(artifact, engines, BuildConfig(**FAST))
    assert report.built == ["unet"]
    assert report.results[1].reason == "changed: onnx"
    s = _sidecar(engines, "unet")
    assert s["key"]["onnx"]["sha256"] == sha256_file(artifact / "unet/model.onnx")
    assert s["engine"]["sha256"] != old
    assert "unet: built in" in caplog.text and "Building engine" in caplog.text  # progress monitor lines


def test_changed_options_and_damaged_engines_are_rebuilt(engine_copy):
    artifact, engines = engine_copy
    report = build_engines(artifact, engines, BuildConfig(opt_level=1, workspace_mb=64, components=("vae_decoder",)))
    assert report.built == ["vae_decoder"] and report.results[0].reason == "changed: build_options"
    (engines / "text_encoder.engine").write_bytes(b"not an engine")
    report = build_engines(artifact, engines, BuildConfig(**FAST, components=("text_encoder", "unet")))
    assert report.built == ["text_encoder"]
    assert "existing engine unusable" in report.results[0].reason and "truncated" in report.results[0].reason
    report = build_engines(artifact, engines, BuildConfig(**FAST, components=("unet",), force=True))
    assert report.built == ["unet"] and report.results[0].reason == "forced"


def test_explicit_rtx_targets(engine_copy):
    artifact, engines = engine_copy
    report = build_engines(artifact, engines, BuildConfig(**FAST, targets=("8.9", "8.6"), components=("vae_decoder",)))
    assert report.built == ["vae_decoder"]
    s = _sidecar(engines, "vae_decoder")
    assert s["key"]["compute_capabilities"] == ["8.6", "8.9"] and "--targets 8.9,8.6" in s["rebuild"]
    with pytest.raises(UsageError, match=r"cannot target compute capability 9\.0"):
        build_engines(artifact, engines, BuildConfig(**FAST, targets=("9.0",)))


def test_refusals_before_building(tiny_artifact, tmp_path):
    with pytest.raises(UsageError, match="strongly typed networks only"):
        build_engines(tiny_artifact, tmp_path / "e", BuildConfig(**FAST, precision="fp32", components=("unet",)))
    with pytest.raises(LdmError, match="manifest.json is missing"):
        build_engines(tmp_path, tmp_path / "e", BuildConfig(**FAST))
    with pytest.raises(UsageError, match="unknown build config key"):
        BuildConfig.from_dict({"opt_levle": 0})
    with pytest.raises(UsageError, match="unknown component"):
        BuildConfig(components=("vae",))
    assert not (tmp_path / "e").exists()


def test_missing_component_and_modified_onnx_are_refused(engine_copy):
    artifact, engines = engine_copy
    manifest = json.loads((artifact / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"], manifest["files"]["vae_encoder/model.onnx"]
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="the artifact has no component vae_encoder"):
        build_engines(artifact, engines, BuildConfig(**FAST, components=("vae_encoder",)))
    (artifact / "vae_decoder/model.onnx").write_bytes((artifact / "vae_encoder/model.onnx").read_bytes())
    with pytest.raises(LdmError, match="does not match its sha256"):
        build_engines(artifact, engines, BuildConfig(**FAST))


def test_data_centre_tensorrt_needs_a_gpu_to_build():
    from ldm_deploy.engine.build import _targets
    with pytest.raises(LdmError, match="need a CUDA GPU.*tensorrt-rtx"):
        _targets(None, "tensorrt", BuildConfig(), gpu=None)


def test_cli_build_then_nothing_to_do(tiny_artifact, tmp_path, capsys, caplog):
    from ldm_deploy.cli import main
    out = tmp_path / "engines"
    args = ["build", str(tiny_artifact), "--out", str(out), "--opt-level", "0", "--workspace-mb", "64",
            "--components", "vae_decoder,unet", "--timing-cache", str(tmp_path / "tc.bin")]
    with caplog.at_level(logging.INFO, logger="ldm_deploy"):
        assert main(args) == 0
        assert "2 built, 0 up to date" in caplog.text
        assert "--timing-cache is ignored" in caplog.text  # no timing cache in TensorRT for RTX
        caplog.clear()
        assert main(args) == 0
        assert "0 built, 2 up to date" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["unet.engine", "unet.engine.json",
                                                     "vae_decoder.engine", "vae_decoder.engine.json"]
    assert main(["build", str(tiny_artifact), "--out", str(out), "--precision", "bf16"]) == 2
    assert "strongly typed networks only" in capsys.readouterr().err


def test_cli_config_file_and_flags(tiny_artifact, tmp_path, caplog):
    from ldm_deploy.cli import main
    cfg = tmp_path / "build.yaml"
    cfg.write_text("opt_level: 1\nworkspace_mb: 64\ncomponents: [vae_decoder]\nvae_max_batch: 1\n")
    out = tmp_path / "engines"
    assert main(["build", str(tiny_artifact), "--out", str(out), "--config", str(cfg), "--opt-level", "0"]) == 0
    s = _sidecar(out, "vae_decoder")
    assert s["key"]["build_options"] == {"opt_level": 0, "workspace_mb": 64}  # the flag wins over the file
    assert s["key"]["profile"]["latent"]["max"][0] == 1
    assert f"--config {cfg}" in s["rebuild"] and "--vae-max-batch 1" in s["rebuild"]
    cfg.write_text("opt_levle: 1\n")
    assert main(["build", str(tiny_artifact), "--out", str(out), "--config", str(cfg)]) == 2
