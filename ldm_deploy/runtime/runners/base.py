"""The runner contract every backend implements (Polygraphy's "runner" noun).

A runner wraps one exported component (text_encoder, unet, vae_decoder, vae_encoder) on one
backend and maps `dict[str, np.ndarray] -> dict[str, np.ndarray]`. Input/output names and dtypes
come from the artifact manifest; a runner casts inputs to the manifest dtype and returns numpy
arrays (float32 unless the caller asks otherwise). The pipeline never knows which runner it holds.

Backends register themselves in BACKENDS by name; modules are imported lazily so that a missing
optional dependency (onnxruntime-gpu, tensorrt, cuda-bindings) never breaks the others.
"""
from __future__ import annotations

import importlib
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from ldm_deploy.errors import LdmError, UsageError


@runtime_checkable
class Runner(Protocol):
    component: str          # "unet", "text_encoder", "vae_decoder", "vae_encoder"
    input_names: list[str]
    output_names: list[str]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def takes_guidance(runner) -> bool:
    """True when `runner` is a U-Net with classifier-free guidance folded into its graph
    (ldm_deploy/export/cfg_fold.py): it takes B latents, the 2B embeddings, `guidance_scale` and
    `guidance_rescale`, and returns the guided prediction."""
    return "guidance_scale" in (getattr(runner, "input_names", None) or ())


# backend name -> "module:factory"; factory(artifact, component, **options) -> Runner
BACKENDS: dict[str, str] = {
    "ort-cpu": "ldm_deploy.runtime.runners.ort:OrtCpuRunner",
    "ort-cuda": "ldm_deploy.runtime.runners.ort:OrtCudaRunner",
    "tensorrt": "ldm_deploy.runtime.runners.tensorrt:TensorRTRunner",
    "torch": "training.runner:TorchRunner",
}


def open_runner(backend: str, artifact, component: str, **options) -> Runner:
    """Build the runner for `component` of `artifact` on `backend`."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    module_name, attr = BACKENDS[backend].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise LdmError(
            f"backend {backend!r} is not available: {e}",
            hint=_INSTALL_HINTS.get(backend, "install its optional dependencies"),
        ) from None
    return getattr(module, attr)(artifact, component, **options)


_INSTALL_HINTS = {
    "ort-cuda": "pip install 'ldm-deploy[gpu]'",
    "tensorrt": "pip install 'ldm-deploy[tensorrt]' or 'ldm-deploy[tensorrt-rtx]'",
    "torch": "pip install 'ldm-deploy[train]'",
}
