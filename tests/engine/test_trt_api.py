"""Which TensorRT: flavour choice, version info, compute-capability support, can_execute."""
from __future__ import annotations

import importlib.util

import pytest

from ldm_deploy.engine import trt_api
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime import cuda

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_importing_the_engine_package_needs_no_tensorrt():
    import subprocess
    import sys
    code = ("import sys, ldm_deploy.engine.trt_api, ldm_deploy.engine.sidecar, ldm_deploy.engine.build, "
            "ldm_deploy.runtime.runners.tensorrt, ldm_deploy.runtime.cuda, ldm_deploy.commands.build; "
            "bad = [m for m in ('tensorrt', 'tensorrt_rtx_bindings', 'torch', 'cuda.bindings') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_unknown_flavour_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown TensorRT backend 'tensorrt-lean'"):
        trt_api.resolve_flavour("tensorrt-lean")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_missing_flavour_names_the_install_command():
    with pytest.raises(LdmError, match=r"'tensorrt' is not installed.*pip install 'ldm-deploy\[tensorrt\]'"):
        trt_api.resolve_flavour("tensorrt")


def test_default_flavour_follows_what_is_installed(monkeypatch):
    monkeypatch.setattr(trt_api, "installed_flavours", lambda: ["tensorrt", "tensorrt-rtx"])
    monkeypatch.setattr(trt_api, "_gpu", lambda: None)
    assert trt_api.resolve_flavour() == "tensorrt-rtx"      # no GPU: only RTX can build
    monkeypatch.setattr(trt_api, "_gpu", lambda: cuda.GpuInfo(0, "NVIDIA H100", (9, 0)))
    assert trt_api.resolve_flavour() == "tensorrt"
    monkeypatch.setattr(trt_api, "installed_flavours", lambda: ["tensorrt-rtx"])
    assert trt_api.resolve_flavour() == "tensorrt-rtx"
    monkeypatch.setattr(trt_api, "installed_flavours", lambda: [])
    with pytest.raises(LdmError, match="no TensorRT module is installed"):
        trt_api.resolve_flavour()


@pytest.mark.trt_build
def test_rtx_module_and_targets():
    trt = trt_api.load_trt("tensorrt-rtx")
    assert trt_api.flavour_of(trt) == "tensorrt-rtx"
    info = trt_api.version_info("tensorrt-rtx")
    assert info["version"] == trt.__version__ and info["module"] == "tensorrt_rtx_bindings"
    targets = trt_api.rtx_targets(trt)
    assert {"7.5", "8.6", "8.9", "12.0"} <= set(targets) and "9.0" not in targets and "10.0" not in targets
    assert targets["8.6"] == trt.ComputeCapability.SM86
    assert "7.5" not in trt_api.rtx_default_targets(trt)  # Turing only when asked for


@pytest.mark.trt_build
def test_supported_compute_capabilities():
    assert trt_api.supports_cc("tensorrt-rtx", (8, 9))
    assert not trt_api.supports_cc("tensorrt-rtx", (9, 0))   # Hopper: data-centre TensorRT only
    assert trt_api.supports_cc("tensorrt", (9, 0)) and trt_api.supports_cc("tensorrt", (7, 5))
    assert not trt_api.supports_cc("tensorrt", (7, 0))


@pytest.mark.trt_build
def test_can_execute(monkeypatch):
    monkeypatch.setattr(trt_api, "_gpu", lambda: None)
    assert trt_api.can_execute("tensorrt-rtx") is False
    monkeypatch.setattr(trt_api, "_gpu", lambda: cuda.GpuInfo(0, "NVIDIA H100 80GB HBM3", (9, 0)))
    assert trt_api.can_execute("tensorrt-rtx") is False
    monkeypatch.setattr(trt_api, "_gpu", lambda: cuda.GpuInfo(0, "NVIDIA GeForce RTX 4090", (8, 9)))
    assert trt_api.can_execute("tensorrt-rtx") is True
    assert trt_api.can_execute("tensorrt-lean") is False


def test_can_execute_matches_this_machine():
    gpu = cuda.gpu_info()
    flavours = trt_api.installed_flavours()
    expected = gpu is not None and bool(flavours) and trt_api.supports_cc(trt_api.resolve_flavour(), gpu.compute_capability)
    assert trt_api.can_execute() is expected
