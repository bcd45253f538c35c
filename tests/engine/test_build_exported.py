"""Engines from the real exporter's tiny artifact (ldm_deploy.export): export + build take ~1 min on
2 busy CPU cores, hence `slow`. The fast tests use tests/engine/tiny_artifact.py instead."""
from __future__ import annotations

import json

import pytest

from ldm_deploy.engine.build import BuildConfig, build_engines
from tests.engine.conftest import FAST

pytestmark = [pytest.mark.trt_build, pytest.mark.slow]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from ldm_deploy.export.exporter import export_model
    from tests.runtime.tiny_model import export_config, make_tiny_folder
    root = tmp_path_factory.mktemp("exported")
    folder = make_tiny_folder(root / "model")
    config = export_config("fp16").replace(components=("unet", "vae_decoder"), measure_runtime=False)
    return export_model(folder, root / "onnx", config).path


def test_engines_from_the_exporter(exported, tmp_path):
    report = build_engines(exported, tmp_path / "engines", BuildConfig(**FAST))
    assert report.built == ["unet", "vae_decoder"]
    manifest = json.loads((exported / "manifest.json").read_text())
    for component in ("unet", "vae_decoder"):
        sidecar = json.loads((tmp_path / "engines" / f"{component}.engine.json").read_text())
        key, exported_profile = sidecar["key"], manifest["components"][component]["profile"]
        assert key["precision"] == manifest["components"][component]["precision"]
        for name, shapes in key["profile"].items():
            # same opt/max as the export's profile; the min batch is B, so guidance-free calls run too
            assert shapes["max"] == exported_profile[name]["max"] and shapes["opt"] == exported_profile[name]["opt"]
            assert shapes["min"][1:] == exported_profile[name]["min"][1:]
            assert shapes["min"][0] == manifest["profiles"]["batch"]["min"]
    assert json.loads((tmp_path / "engines" / "unet.engine.json").read_text())["key"]["profile"]["sample"]["max"][0] \
        == 2 * manifest["profiles"]["batch"]["max"]
    assert build_engines(exported, tmp_path / "engines", BuildConfig(**FAST)).built == []
