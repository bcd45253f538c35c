"""Every way loading an engine is refused, each with a clear message and the rebuild command.

The checks run before any CUDA call, so they are tested here on real engines and sidecars:
through `sidecar.check_loadable` / `read_engine` and through `TensorRTRunner` itself (with the
GPU query answered by a stand-in GPU where a GPU is needed to reach the check).
"""
from __future__ import annotations

import json

import pytest

from ldm_deploy.engine import sidecar as sc
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime import cuda
from ldm_deploy.runtime.runners.tensorrt import TensorRTRunner
from tests.engine.tiny_artifact import write_component

pytestmark = pytest.mark.trt_build


def _env(s, **change):
    key = s["key"]
    base = dict(flavour=key["flavour"], tensorrt_version=key["tensorrt_version"],
                gpu_name="NVIDIA GeForce RTX 4090", compute_capability="8.9")
    return sc.Environment(**{**base, **change})


@pytest.fixture
def unet_sidecar(tiny_engines):
    return sc.read_sidecar(tiny_engines[1], "unet")


def test_matching_environment_is_accepted(unet_sidecar):
    sc.check_loadable(unet_sidecar, _env(unet_sidecar), unet_sidecar["key"]["onnx"]["sha256"])
    sc.check_loadable(unet_sidecar, _env(unet_sidecar), None)  # ONNX unknown: not checked


def test_tensorrt_version_mismatch(unet_sidecar):
    with pytest.raises(LdmError) as e:
        sc.check_loadable(unet_sidecar, _env(unet_sidecar, tensorrt_version="1.8.0.1"))
    msg = str(e.value)
    assert f"built with TensorRT for RTX {unet_sidecar['key']['tensorrt_version']} but 1.8.0.1 is installed" in msg
    assert f"rebuild it: {unet_sidecar['rebuild']}" in msg and "\n" not in msg


def test_flavour_mismatch(unet_sidecar):
    with pytest.raises(LdmError, match="built with TensorRT for RTX but TensorRT is loading it"):
        sc.check_loadable(unet_sidecar, _env(unet_sidecar, flavour="tensorrt"))


def test_compute_capability_mismatch(unet_sidecar):
    with pytest.raises(LdmError) as e:
        sc.check_loadable(unet_sidecar, _env(unet_sidecar, gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0"))
    msg = str(e.value)
    assert "built for compute capability 8.0, 8.6, 8.9, 12.0" in msg
    assert "this GPU (NVIDIA H100 80GB HBM3) is 9.0" in msg and "ldm-deploy build" in msg


def test_no_gpu(unet_sidecar):
    with pytest.raises(LdmError, match="needs a CUDA GPU to run and none was found"):
        sc.check_loadable(unet_sidecar, _env(unet_sidecar, gpu_name=None, compute_capability=None))


def test_onnx_hash_mismatch(unet_sidecar):
    with pytest.raises(LdmError, match=r"built from a different ONNX \(unet/model.onnx sha256 .*rebuild it: ldm-deploy build"):
        sc.check_loadable(unet_sidecar, _env(unet_sidecar), "f" * 64)


def test_truncated_corrupted_and_missing_engine_files(engine_copy):
    _, engines = engine_copy
    s = sc.read_sidecar(engines, "unet")
    assert len(sc.read_engine(engines, s)) == s["engine"]["bytes"]
    data = (engines / "unet.engine").read_bytes()
    (engines / "unet.engine").write_bytes(data[: len(data) // 2])
    with pytest.raises(LdmError, match=f"truncated.*{len(data) // 2} bytes, the sidecar says {len(data)}.*rebuild it"):
        sc.read_engine(engines, s)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    (engines / "unet.engine").write_bytes(bytes(flipped))
    with pytest.raises(LdmError, match="corrupted: its sha256 does not match the sidecar.*rebuild it"):
        sc.read_engine(engines, s)
    (engines / "unet.engine").unlink()
    with pytest.raises(LdmError, match="unet.engine is missing"):
        sc.read_engine(engines, s)


def test_missing_or_foreign_sidecar(engine_copy):
    _, engines = engine_copy
    (engines / "vae_encoder.engine.json").unlink()
    with pytest.raises(LdmError, match="no engine for 'vae_encoder'.*ldm-deploy build"):
        sc.read_sidecar(engines, "vae_encoder")
    (engines / "unet.engine.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(LdmError, match="not an ldm-deploy engine sidecar"):
        sc.read_sidecar(engines, "unet")
    (engines / "vae_decoder.engine.json").write_text("{truncated")
    with pytest.raises(LdmError, match="unreadable"):
        sc.read_sidecar(engines, "vae_decoder")


# -- the same refusals through the runner ------------------------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    """Answer the runner's GPU query with an RTX 4090 (8.9) so the checks past "no GPU" are reached."""
    def use(cc=(8, 9), name="NVIDIA GeForce RTX 4090"):
        monkeypatch.setattr(cuda, "gpu_info", lambda device=0: cuda.GpuInfo(device, name, cc))
    use()
    return use


def test_runner_refuses_without_a_gpu(tiny_engines, monkeypatch):
    monkeypatch.setattr(cuda, "gpu_info", lambda device=0: None)
    with pytest.raises(LdmError, match="needs a CUDA GPU"):
        TensorRTRunner(tiny_engines[1], "unet")


def test_runner_refuses_other_compute_capability(tiny_engines, fake_gpu):
    fake_gpu(cc=(9, 0), name="NVIDIA H100 80GB HBM3")
    with pytest.raises(LdmError, match=r"this GPU \(NVIDIA H100 80GB HBM3\) is 9.0.*rebuild it: ldm-deploy build"):
        TensorRTRunner(tiny_engines[1], "unet")


def test_runner_refuses_other_tensorrt_version(engine_copy, fake_gpu):
    _, engines = engine_copy
    path = sc.sidecar_path(engines, "vae_decoder")
    s = json.loads(path.read_text())
    s["key"]["tensorrt_version"] = "1.0.0.0"
    path.write_text(json.dumps(s))
    with pytest.raises(LdmError, match="built with TensorRT for RTX 1.0.0.0 but .* is installed"):
        TensorRTRunner(engines, "vae_decoder")


def test_runner_refuses_engine_of_a_changed_onnx(engine_copy, fake_gpu):
    artifact, engines = engine_copy
    write_component(artifact, "unet", "fp16", seed=7)
    with pytest.raises(LdmError, match="built from a different ONNX"):
        TensorRTRunner(artifact, "unet", engine_dir=engines)
    with pytest.raises(LdmError) as e:  # the other components pass the ONNX check (and stop later: no CUDA here)
        TensorRTRunner(artifact, "vae_decoder", engine_dir=engines)
    assert "different ONNX" not in str(e.value)


def test_runner_refuses_truncated_engine(engine_copy, fake_gpu):
    _, engines = engine_copy
    data = (engines / "text_encoder.engine").read_bytes()
    (engines / "text_encoder.engine").write_bytes(data[:1000])
    with pytest.raises(LdmError, match="truncated"):
        TensorRTRunner(engines, "text_encoder")


def test_runner_needs_engines_not_onnx(tiny_artifact):
    with pytest.raises(UsageError, match="needs its engines.*ldm-deploy build"):
        TensorRTRunner(tiny_artifact, "unet")


def test_runner_finds_engines_inside_the_artifact(engine_copy, monkeypatch):
    """validate()/open_runner(backend, artifact, component) with no options: ARTIFACT/engines."""
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.runtime.runners.base import open_runner
    artifact, engines = engine_copy
    engines.rename(artifact / "engines")
    monkeypatch.setattr(cuda, "gpu_info", lambda device=0: None)
    with pytest.raises(LdmError, match="unet engine .* needs a CUDA GPU"):  # located, checked, refused here
        open_runner("tensorrt", Artifact(artifact), "unet")
