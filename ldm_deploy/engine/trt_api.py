"""Which TensorRT: `tensorrt` (data-centre GPUs) or `tensorrt_rtx_bindings` (TensorRT for RTX).

Both share the builder/runtime API (Builder, OnnxParser, IBuilderConfig, Runtime, ICudaEngine,
IExecutionContext). Where they differ, this module says so in one place:

- `tensorrt` needs a GPU to build and builds for that GPU's compute capability only; it has a
  timing cache and weakly typed networks with FP16/BF16 builder flags.
- TensorRT for RTX builds on a CPU (ahead of time) for a set of target compute capabilities
  (`ComputeCapability.SM86`, ...; by default a portable set), compiles kernels just in time on
  the GPU (its runtime cache keeps them), is always strongly typed, and treats timing caches
  as no-ops. It runs on GeForce/RTX/workstation parts only: no 9.0 (Hopper) or 10.0 parts.

Modules are imported lazily: importing this file never needs TensorRT.
"""
from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache

from ldm_deploy.errors import LdmError, UsageError

FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}  # flavour -> module
INSTALL = {
    "tensorrt": "pip install 'ldm-deploy[tensorrt]' (the tensorrt wheel, CUDA 12/13, Linux/Windows)",
    "tensorrt-rtx": "pip install 'ldm-deploy[tensorrt-rtx]' (tensorrt-rtx-cu13-bindings + -libs)",
}
# Data-centre TensorRT 10 runs on Turing and later.
_TENSORRT_MIN_CC = (7, 5)


def installed_flavours() -> list[str]:
    """Flavours whose Python module can be found (without importing it)."""
    return [f for f, mod in FLAVOURS.items() if importlib.util.find_spec(mod) is not None]


def resolve_flavour(flavour: str | None = None) -> str:
    """The flavour to use: the one asked for, else `tensorrt` when installed and a GPU is present,
    else TensorRT for RTX (which builds without a GPU), else whatever is installed."""
    if flavour is not None:
        if flavour not in FLAVOURS:
            raise UsageError(f"unknown TensorRT backend {flavour!r}; choose one of: {', '.join(FLAVOURS)}")
        if importlib.util.find_spec(FLAVOURS[flavour]) is None:
            raise LdmError(f"TensorRT backend {flavour!r} is not installed", hint=INSTALL[flavour])
        return flavour
    found = installed_flavours()
    if not found:
        raise LdmError("no TensorRT module is installed",
                       hint=f"{INSTALL['tensorrt']}, or {INSTALL['tensorrt-rtx']}")
    if "tensorrt" in found and ("tensorrt-rtx" not in found or _gpu() is not None):
        return "tensorrt"
    return "tensorrt-rtx" if "tensorrt-rtx" in found else found[0]


@lru_cache(maxsize=None)
def _import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        flavour = next(f for f, m in FLAVOURS.items() if m == module_name)
        raise LdmError(f"cannot import {module_name}: {e}", hint=INSTALL[flavour]) from None


def load_trt(flavour: str | None = None):
    """The TensorRT module for `flavour` (None: see resolve_flavour)."""
    return _import(FLAVOURS[resolve_flavour(flavour)])


def flavour_of(trt) -> str:
    """"tensorrt" or "tensorrt-rtx" for a loaded module."""
    name = trt.__name__.split(".")[0]
    return next(f for f, m in FLAVOURS.items() if m == name)


def version(trt) -> str:
    return str(trt.__version__)


def version_info(flavour: str | None = None) -> dict:
    """{"flavour", "module", "version", "onnx_parser"} of the TensorRT that would be used."""
    trt = load_trt(flavour)
    parser = getattr(trt, "get_nv_onnx_parser_version", None)
    return {"flavour": flavour_of(trt), "module": trt.__name__, "version": version(trt),
            "onnx_parser": parser() if parser else None}


def rtx_targets(trt) -> dict[str, object]:
    """TensorRT for RTX's target compute capabilities, "8.6" -> trt.ComputeCapability.SM86."""
    out = {}
    for name, member in trt.ComputeCapability.__members__.items():
        if name.startswith("SM") and name[2:].isdigit():
            digits = name[2:]
            out[f"{digits[:-1]}.{digits[-1]}"] = member
    return out


# TensorRT for RTX's default, portable target set (docs: "8.0, 8.6, 8.9, 12.0 and later"; Turing
# only when asked). Recorded in the sidecar when no targets are given.
def rtx_default_targets(trt) -> list[str]:
    return [cc for cc in rtx_targets(trt) if _cc_tuple(cc) >= (8, 0)]


def supports_cc(flavour: str, cc: tuple[int, int], trt=None) -> bool:
    """Can engines of `flavour` run on a GPU of compute capability `cc` at all?"""
    if flavour == "tensorrt":
        return cc >= _TENSORRT_MIN_CC
    trt = trt or _import(FLAVOURS[flavour])
    return f"{cc[0]}.{cc[1]}" in rtx_targets(trt)


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")
    return int(major), int(minor)


def _gpu():
    from ldm_deploy.runtime.cuda import gpu_info  # noqa: PLC0415
    return gpu_info()


def can_execute(flavour: str | None = None) -> bool:
    """True only when a GPU is present that this TensorRT (flag or installed) can run engines on."""
    try:
        flavour = resolve_flavour(flavour)
    except LdmError:
        return False
    gpu = _gpu()
    if gpu is None:
        return False
    try:
        return supports_cc(flavour, gpu.compute_capability)
    except LdmError:
        return False


def make_logger(trt, verbose: bool = False):
    severity = trt.Logger.VERBOSE if verbose else trt.Logger.WARNING
    return trt.Logger(severity)
