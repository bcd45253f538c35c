"""TensorRT for RTX on a host whose GPU it cannot run on (9.0 H100/H200): the build goes to a child
process with the GPU hidden, for explicit targets recorded in the sidecar; and a graph whose weights
sit in an external-data file (the > 2 GB SD 1.5 U-Net layout) parses by path."""
from __future__ import annotations

import json
import subprocess

import onnx
import pytest

from ldm_deploy.engine import sidecar as sc
from ldm_deploy.engine import trt_api
from ldm_deploy.engine.build import BuildConfig, build_engines
from ldm_deploy.fileio import sha256_file, write_json
from ldm_deploy.runtime.cuda import GpuInfo
from tests.engine.conftest import FAST
from tests.engine.tiny_artifact import make_tiny_artifact

pytestmark = pytest.mark.trt_build


@pytest.fixture
def hopper_host(monkeypatch):
    """gpu_info() reports an H100 (compute capability 9.0); subprocess.run calls are recorded."""
    import ldm_deploy.runtime.cuda as cuda

    monkeypatch.setattr(cuda, "gpu_info", lambda device=0: GpuInfo(0, "NVIDIA H100 80GB HBM3", (9, 0)))
    calls = []
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        calls.append((cmd, kwargs.get("env", {}).get("CUDA_VISIBLE_DEVICES")))
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_unsupported_local_gpu_builds_isolated_for_explicit_targets(tmp_path, hopper_host):
    trt = trt_api.load_trt("tensorrt-rtx")
    assert not trt_api.supports_cc("tensorrt-rtx", (9, 0), trt)
    art = make_tiny_artifact(tmp_path / "onnx")
    report = build_engines(art, tmp_path / "engines",
                           BuildConfig(backend="tensorrt-rtx", components=("unet",), **FAST))
    assert report.built == ["unet"]
    assert [env for _, env in hopper_host] == [""], "one child build, with no visible GPU"
    side = json.loads(sc.sidecar_path(tmp_path / "engines", "unet").read_text())
    assert side["key"]["compute_capabilities"] == trt_api.rtx_default_targets(trt)
    assert "9.0" not in side["key"]["compute_capabilities"]
    assert side["key"]["gpu"] == "NVIDIA H100 80GB HBM3"
    engine = sc.engine_path(tmp_path / "engines", "unet")
    assert engine.stat().st_size == side["engine"]["bytes"] > 0
    # explicit targets go through the child too, and are recorded
    build_engines(art, tmp_path / "engines", BuildConfig(backend="tensorrt-rtx", components=("unet",),
                                                         targets=("8.6", "12.0"), **FAST))
    side = json.loads(sc.sidecar_path(tmp_path / "engines", "unet").read_text())
    assert side["key"]["compute_capabilities"] == ["8.6", "12.0"]


def test_external_data_graph_parses_by_path(tmp_path):
    """The U-Net's weights moved to unet/model.onnx.data (as the exporter writes > 2 GB graphs)."""
    art = make_tiny_artifact(tmp_path / "onnx")
    graph = art / "unet" / "model.onnx"
    model = onnx.load(str(graph))
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert (art / "unet" / "model.onnx.data").stat().st_size > 0
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["components"]["unet"]["external_data"] = "unet/model.onnx.data"
    for rel in ("unet/model.onnx", "unet/model.onnx.data"):
        manifest["files"][rel] = sha256_file(art / rel)
    write_json(art / "manifest.json", manifest)
    build_engines(art, tmp_path / "engines", BuildConfig(backend="tensorrt-rtx", components=("unet",), **FAST))
    key = json.loads(sc.sidecar_path(tmp_path / "engines", "unet").read_text())["key"]
    assert key["onnx"]["external_data"] == {"file": "unet/model.onnx.data",
                                            "sha256": sha256_file(art / "unet" / "model.onnx.data")}
