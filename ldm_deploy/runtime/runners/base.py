"""The runner contract every backend implements (Polygraphy's "runner" noun).

A runner wraps one exported component (text_encoder, unet, vae_decoder, vae_encoder) on one
backend and maps `dict[str, np.ndarray] -> dict[str, np.ndarray]`. Input/output names and dtypes
come from the artifact manifest; a runner casts inputs to the manifest dtype and returns numpy
arrays (float32 unless the caller asks otherwise). The pipeline never knows which runner it holds.
A runner holds a session / engine and device memory until `close()` (or the end of a `with` block):

    with open_runner("ort-cpu", "out/tiny-onnx", "unet") as unet:
        out = unet(feeds)

`open_runner`'s options are the production ones each backend's factory names (threads, device, CUDA graph,
variant...); an unknown one is a UsageError naming the ones it takes. Benchmark levers (IO binding off,
extra provider options, lever graphs) are assembled from the loaders in ldm_deploy/bench/ort_side.py.

Backends register themselves in BACKENDS by name; modules are imported lazily so that a missing
optional dependency (onnxruntime-gpu, tensorrt, cuda-bindings) never breaks the others.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from ldm_deploy.errors import LdmError, UsageError


@runtime_checkable
class Runner(Protocol):
    component: str          # "unet", "text_encoder", "vae_decoder", "vae_encoder"
    input_names: list[str]
    output_names: list[str]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def takes_guidance(runner) -> bool:
    """True when `runner` is a U-Net with classifier-free guidance folded into its graph
    (ldm_deploy/export/cfg_fold.py): it takes B latents, the 2B embeddings, `guidance_scale` and
    `guidance_rescale`, and returns the guided prediction."""
    return "guidance_scale" in (getattr(runner, "input_names", None) or ())


def close_all(runners) -> None:
    """Close each runner of `runners` (a mapping or an iterable); one without `close()` (a stand-in, a
    wrapper of plain callables) holds nothing to free."""
    for runner in (runners.values() if isinstance(runners, Mapping) else runners):
        close = getattr(runner, "close", None)
        if close is not None:
            close()


# backend name -> "module:factory"; factory(artifact, component, **options) -> Runner
BACKENDS: dict[str, str] = {
    "ort-cpu": "ldm_deploy.runtime.runners.ort:OrtCpuRunner",
    "ort-cuda": "ldm_deploy.runtime.runners.ort:OrtCudaRunner",
    "tensorrt": "ldm_deploy.runtime.runners.tensorrt:TensorRTRunner",
    "torch": "training.runner:TorchRunner",
}


def open_runner(backend: str, artifact, component: str, **options) -> Runner:
    """Build the runner for `component` of `artifact` on `backend`."""
    return check_options(backend, options)(artifact, component, **options)


def check_options(backend: str, options) -> type:
    """The runner factory of `backend`, after checking that it takes every option in `options` (a UsageError
    naming the unknown ones and the ones it takes otherwise)."""
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
    factory = getattr(module, attr)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        takes = [n for n, p in list(params.items())[2:] if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        unknown = sorted(set(options) - set(takes))
        if unknown:
            raise UsageError(f"unknown {backend} runner option{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(unknown)}; it takes: {', '.join(takes) or 'none'}")
    return factory


_INSTALL_HINTS = {
    "ort-cuda": "pip install 'ldm-deploy[gpu]'",
    "tensorrt": "pip install 'ldm-deploy[tensorrt]' or 'ldm-deploy[tensorrt-rtx]'",
    "torch": "pip install 'ldm-deploy[train]'",
}
