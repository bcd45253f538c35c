"""Thin cuda-python helpers (`cuda.bindings.runtime`): device query, buffers, one stream, graphs.

What the TensorRT runner and the device-loop runner (runners/ort_loop.py) need. cuda-python is imported
lazily, so importing this module never fails on a machine without it; every call turns a CUDA error into one LdmError line. Each resource
is released by `close()` (the TensorRT runner's own `close()` calls them in order); `__del__` only calls
`close()` as a last resort for an object nobody closed, and never raises.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from ldm_deploy.errors import LdmError

_INSTALL_HINT = "pip install 'ldm-deploy[gpu]' or 'ldm-deploy[tensorrt]' (both bring cuda-bindings)"


def _rt():
    try:
        from cuda.bindings import runtime  # noqa: PLC0415
    except ImportError as e:
        raise LdmError(f"cuda-python is not installed: {e}", hint=_INSTALL_HINT) from None
    return runtime


def check(result, what: str = "CUDA call"):
    """Unpack a cuda-python `(err, *values)` tuple; raise LdmError on any error."""
    rt = _rt()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, msg = rt.cudaGetErrorString(err)
        raise LdmError(f"{what} failed: {err.name}: {msg.decode(errors='replace')}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]  # (major, minor)

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def gpu_info(device: int = 0) -> GpuInfo | None:
    """Name and compute capability of `device`, or None when there is no usable GPU/driver."""
    try:
        rt = _rt()
    except LdmError:
        return None
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or count <= device:
        return None
    err, prop = rt.cudaGetDeviceProperties(device)
    if err != rt.cudaError_t.cudaSuccess:
        return None
    name = prop.name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuInfo(device, name, (int(prop.major), int(prop.minor)))


def set_device(device: int) -> None:
    check(_rt().cudaSetDevice(device), f"cudaSetDevice({device})")


class Stream:
    """One CUDA stream; `handle` is the int TensorRT's execute_async_v3 (and ORT's user_compute_stream) takes.
    `non_blocking`: no implicit ordering with the legacy default stream (cudaStreamNonBlocking), so another
    library's synchronous copy on stream 0 never touches a capture running on this stream."""

    def __init__(self, non_blocking: bool = False):
        rt = _rt()
        if non_blocking:
            self._stream = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        else:
            self._stream = check(rt.cudaStreamCreate(), "cudaStreamCreate")
        self.handle = int(self._stream)

    def synchronize(self) -> None:
        check(_rt().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        stream, self._stream = getattr(self, "_stream", None), None
        if stream is not None:
            _quietly(lambda rt: rt.cudaStreamDestroy(stream))

    __del__ = close


class DeviceBuffer:
    """`nbytes` of device memory, allocated once, freed with the object."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(_rt().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes} bytes)"))

    def close(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if ptr:
            _quietly(lambda rt: rt.cudaFree(ptr))

    __del__ = close


class PinnedBuffer:
    """Page-locked host memory with a numpy view, so async copies really are async."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(_rt().cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes} bytes)"))
        self._raw = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)

    def view(self, dtype, shape) -> np.ndarray:
        """A numpy array over the first bytes of this buffer (no copy)."""
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self._raw, dtype=dtype, count=count).reshape(shape)

    def close(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        self._raw = None
        if ptr:
            _quietly(lambda rt: rt.cudaFreeHost(ptr))

    __del__ = close


def copy_to_device(dst: DeviceBuffer, src: PinnedBuffer, nbytes: int, stream: Stream) -> None:
    copy_async(dst.ptr, src.ptr, nbytes, stream, "h2d")


def copy_to_host(dst: PinnedBuffer, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    copy_async(dst.ptr, src.ptr, nbytes, stream, "d2h")


def copy_async(dst_ptr: int, src_ptr: int, nbytes: int, stream: Stream, kind: str = "d2d") -> None:
    """cudaMemcpyAsync of raw addresses on `stream`; `kind` "h2d", "d2h" or "d2d". From pageable host memory
    the source may be reused once this returns (CUDA stages it); inside a stream capture a d2d copy is
    recorded as a graph node."""
    rt = _rt()
    kinds = {"h2d": rt.cudaMemcpyKind.cudaMemcpyHostToDevice, "d2h": rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
             "d2d": rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice}
    check(rt.cudaMemcpyAsync(int(dst_ptr), int(src_ptr), int(nbytes), kinds[kind], stream._stream),
          f"cudaMemcpyAsync ({kind})")


class Graph:
    """A CUDA graph captured from whatever `enqueue()` puts on `stream`; `launch()` replays it."""

    def __init__(self, stream: Stream, enqueue):
        rt = _rt()
        check(rt.cudaStreamBeginCapture(stream._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
              "cudaStreamBeginCapture")
        try:
            enqueue()
        finally:
            graph = check(rt.cudaStreamEndCapture(stream._stream), "cudaStreamEndCapture")
        self._graph = graph
        self._exec = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        self._stream = stream

    def launch(self) -> None:
        check(_rt().cudaGraphLaunch(self._exec, self._stream._stream), "cudaGraphLaunch")

    def close(self) -> None:
        exec_, self._exec = getattr(self, "_exec", None), None
        graph, self._graph = getattr(self, "_graph", None), None
        if exec_ is not None:
            _quietly(lambda rt: rt.cudaGraphExecDestroy(exec_))
        if graph is not None:
            _quietly(lambda rt: rt.cudaGraphDestroy(graph))

    __del__ = close


def _quietly(free) -> None:
    """Release a CUDA resource: never raise (from __del__ the interpreter may be shutting down)."""
    try:
        free(_rt())
    except Exception:  # noqa: BLE001
        pass
