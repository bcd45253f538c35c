"""The cuda-python helpers on a real GPU (skipped where there is none): buffers, copies, graphs."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.runtime import cuda

pytestmark = pytest.mark.skipif(cuda.gpu_info() is None, reason="needs a CUDA GPU and cuda-python")


def test_gpu_info():
    gpu = cuda.gpu_info()
    assert gpu.name and gpu.compute_capability[0] >= 5 and gpu.cc == "%d.%d" % gpu.compute_capability
    assert cuda.gpu_info(device=999) is None


def test_round_trip_and_graph_replay():
    stream = cuda.Stream()
    src, dst = cuda.PinnedBuffer(4096), cuda.PinnedBuffer(4096)
    dev = cuda.DeviceBuffer(4096)
    x = np.arange(1000, dtype=np.float32)
    src.view(np.float32, (1000,))[...] = x

    def enqueue():
        cuda.copy_to_device(dev, src, x.nbytes, stream)
        cuda.copy_to_host(dst, dev, x.nbytes, stream)

    enqueue()
    stream.synchronize()
    assert_close(dst.view(np.float32, (1000,)), x, atol=0, rtol=0)
    graph = cuda.Graph(stream, enqueue)
    src.view(np.float32, (1000,))[...] = -x  # the graph reads the same pinned buffer in place
    graph.launch()
    stream.synchronize()
    assert_close(dst.view(np.float32, (1000,)), -x, atol=0, rtol=0)


def test_errors_are_one_line():
    from ldm_deploy.errors import LdmError
    with pytest.raises(LdmError, match="cudaMalloc.*failed: cudaErrorMemoryAllocation"):
        cuda.DeviceBuffer(1 << 60)


def test_close_frees_once():
    """close() releases each resource (a second close, and the __del__ fallback after it, do nothing)."""
    stream, dev, pinned = cuda.Stream(), cuda.DeviceBuffer(256), cuda.PinnedBuffer(256)
    graph = cuda.Graph(stream, lambda: cuda.copy_to_device(dev, pinned, 256, stream))
    for resource in (graph, dev, pinned, stream):
        resource.close()
        resource.close()
    assert dev.ptr == 0 and pinned.ptr == 0 and stream._stream is None and graph._exec is None
