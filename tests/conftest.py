"""Shared test setup: markers that skip (never fake) what this machine cannot run."""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.gpu_report import pytest_addoption, pytest_runtest_logreport, pytest_sessionfinish  # noqa: E402,F401


def _has_cuda_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import onnxruntime as ort
        return "CUDAExecutionProvider" in ort.get_available_providers()
    except Exception:
        return False


def _has_trt_builder() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx_bindings"))


def _trt_can_run() -> bool:
    try:
        from ldm_deploy.engine.trt_api import can_execute  # noqa: PLC0415
        return can_execute()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    skips = {
        "gpu": (_has_cuda_gpu, "needs a CUDA GPU with onnxruntime-gpu"),
        "trt_build": (_has_trt_builder, "needs tensorrt or tensorrt_rtx_bindings"),
        "tensorrt": (_trt_can_run, "needs a GPU that TensorRT can execute on"),
    }
    cache: dict[str, bool] = {}
    for item in items:
        for mark, (probe, why) in skips.items():
            if mark in item.keywords:
                if mark not in cache:
                    cache[mark] = probe()
                if not cache[mark]:
                    item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.manual_seed(0)
    yield
