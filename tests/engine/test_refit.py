"""Refittable engines from a lora_switchable artifact (engine/refit.py): built with TensorRT for RTX on
CPU (marker trt_build); switching LoRAs by refit runs on a TensorRT-capable GPU only (marker tensorrt)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ldm_deploy.artifact import Artifact
from ldm_deploy.engine.build import BuildConfig, build_engines
from tests.engine.conftest import FAST

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def switchable(tmp_path_factory):
    pytest.importorskip("peft")
    from ldm_deploy.export.exporter import export_model
    from tests.lora_files import make_lora_files
    from tests.runtime.tiny_model import export_config, make_tiny_folder

    root = tmp_path_factory.mktemp("refit")
    folder = make_tiny_folder(root / "model")
    config = export_config("fp16").replace(components=("unet",), measure_runtime=False, lora_switchable="all")
    return export_model(folder, root / "onnx", config).path, make_lora_files(folder, root / "loras")


def test_refittable_onnx_has_the_weights_as_initializers(switchable, tmp_path):
    import onnx

    from ldm_deploy.engine.refit import refittable_onnx

    art, _ = switchable
    entry = Artifact(art).component("unet")
    path = refittable_onnx(art, entry, tmp_path)
    g = onnx.load(str(path)).graph
    names = set(entry.lora_weights["inputs"])
    assert [i.name for i in g.input] == entry.input_names
    assert names <= {i.name for i in g.initializer}


@pytest.mark.trt_build
def test_refittable_build_without_gpu_is_a_clear_error(switchable, tmp_path):
    """TensorRT for RTX 1.7.1 on a GPU-less machine: every REFIT flavour (REFIT, REFIT_INDIVIDUAL,
    REFIT_IDENTICAL) fails in Myelin (multi-target: CHECK(sm_vers_.size() == 1); one target: CUDA JIT),
    while the same graph builds without the flag. The build must say so in one line."""
    from ldm_deploy.engine.trt_api import can_execute
    from ldm_deploy.errors import LdmError

    if can_execute():
        pytest.skip("a TensorRT-capable GPU is here: test_refittable_engine_builds covers it")
    art, _ = switchable
    with pytest.raises(LdmError, match="refittable unet engine.*only on the target GPU"):
        build_engines(art, tmp_path / "engines", BuildConfig(**FAST))
    assert not (tmp_path / "engines" / "unet.engine").exists()


@pytest.mark.tensorrt
def test_refittable_engine_builds(switchable, tmp_path):
    art, _ = switchable
    report = build_engines(art, tmp_path / "engines", BuildConfig())
    assert report.built == ["unet"]
    key = json.loads((tmp_path / "engines" / "unet.engine.json").read_text())["key"]
    entry = json.loads((art / "manifest.json").read_text())["components"]["unet"]
    assert key["refit"]["names"] == sorted(entry["lora_weights"]["inputs"]) and key["refit"]["sha256"]
    assert build_engines(art, tmp_path / "engines", BuildConfig()).built == []


@pytest.mark.tensorrt
def test_refit_switch_equals_ort_and_returns_to_base(switchable, tmp_path):
    from ldm_deploy.compare import assert_close
    from ldm_deploy.runtime import lora_switch
    from ldm_deploy.runtime.runners.base import open_runner

    art, files = switchable
    build_engines(art, art / "engines", BuildConfig())
    trt_unet = open_runner("tensorrt", art, "unet")
    cpu = open_runner("ort-cpu", art, "unet")
    rng = np.random.default_rng(0)
    x = {"sample": rng.standard_normal((2, 4, 4, 4), dtype=np.float32), "timestep": np.array([500, 500], np.float32),
         "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    base = trt_unet(x)["noise_pred"]
    for loras in ([f"{files['peft']}:0.8"], [f"{files['kohya']}:0.8"], []):
        lora_switch.apply({"unet": trt_unet}, loras)
        lora_switch.apply({"unet": cpu}, loras)
        want = cpu(x)["noise_pred"]
        assert_close(trt_unet(x)["noise_pred"], want, atol=3e-2 * float(np.abs(want).max()), name=str(loras))
    assert np.array_equal(trt_unet(x)["noise_pred"], base)
