"""Where a benchmark ran: CPU, cores, memory, GPU and library versions."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    dists = ["ldm-deploy", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch",
             "tensorrt", "tensorrt-rtx-cu13-bindings", "diffusers", "transformers"]
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpus": _gpus(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: v for d in dists if (v := _version(d))},
    }


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: VmHWM from /proc/self/status. Not getrusage's ru_maxrss, which Linux carries over exec from the
    parent that forked us (a benchmark worker would report its parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def gpu_used_mib(device: int = 0) -> tuple[float, str] | None:
    """(used MiB on the device, how it was read): cuda-bindings `cudaMemGetInfo` (total - free, the
    whole device) or, without cuda-bindings, nvidia-smi's figure for THIS process. None without a GPU."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        rt = None
    if rt is not None:
        try:
            rt.cudaSetDevice(device)
            err, free, total = rt.cudaMemGetInfo()
            if err == rt.cudaError_t.cudaSuccess:
                return (total - free) / 2**20, "cudaMemGetInfo used (total - free)"
        except Exception:  # noqa: BLE001 - a broken driver must not fail a benchmark
            pass
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(used.strip()), "nvidia-smi used_memory of this PID"
    return 0.0, "nvidia-smi used_memory of this PID"


def gpu_peak_tflops(gpu_name: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of a known card: fp16 tensor cores, or TF32 tensor cores for "fp32" (cuDNN
    convolutions in PyTorch and ONNX Runtime's CUDA EP run fp32 on TF32 by default). None if unknown.

    Data-sheet numbers without sparsity. The FLOP floor of a run is its FLOPs over this.
    """
    name = gpu_name.upper()
    table = [  # (substring, fp16 tensor dense, tf32 tensor dense)
        ("H200", 989.4, 494.7), ("H100 NVL", 835.0, 417.5), ("H100 PCIE", 756.0, 378.0), ("H100", 989.4, 494.7),
        ("A100", 312.0, 156.0), ("L40S", 362.1, 181.0), ("L4", 121.0, 60.0), ("A10", 125.0, 62.5),
    ]
    for key, fp16, tf32 in table:
        if key in name:
            return fp16 if dtype == "fp16" else tf32
    return None
