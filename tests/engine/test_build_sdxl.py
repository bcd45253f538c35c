"""TensorRT (for RTX) engines for every SDXL component, built on CPU from the real exporter's tiny SDXL
base artifact (two text encoders, a U-Net with text_embeds / time_ids, the VAE). The refiner has the same
component kinds (text_encoder_2 only, 5 time_ids); ~2 min on 2 CPU cores, hence one layout only."""
from __future__ import annotations

import json

import pytest

from ldm_deploy.engine.build import BuildConfig, build_engines
from tests.engine.conftest import FAST

pytestmark = [pytest.mark.trt_build, pytest.mark.slow]
pytest.importorskip("diffusers")


def test_sdxl_engines_build(tmp_path, layout="base"):
    from ldm_deploy.export.config import ExportConfig, Range
    from ldm_deploy.export.exporter import export_model
    from tests.runtime.tiny_sdxl import make_tiny_sdxl, make_tiny_sdxl_refiner

    folder = (make_tiny_sdxl if layout == "base" else make_tiny_sdxl_refiner)(tmp_path / "model")
    config = ExportConfig(name="tiny-sdxl", precision="fp16", batch=Range(1, 1, 2), height=Range(32, 32, 48),
                          width=Range(32, 32, 32), measure_runtime=False)
    artifact = export_model(folder, tmp_path / "onnx", config).path
    report = build_engines(artifact, tmp_path / "engines", BuildConfig(**FAST))
    want = ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    assert sorted(report.built) == (want if layout == "base" else want[1:])
    key = json.loads((tmp_path / "engines" / "unet.engine.json").read_text())["key"]
    n_ids = 6 if layout == "base" else 5
    assert key["profile"]["time_ids"] == {"min": [1, n_ids], "opt": [2, n_ids], "max": [4, n_ids]}
    assert key["profile"]["text_embeds"]["max"] == [4, 32]
    vae = json.loads((tmp_path / "engines" / "vae_decoder.engine.json").read_text())["key"]
    assert vae["precision"] == "fp32"                                     # SDXL's VAE stays fp32
