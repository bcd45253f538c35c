"""The runner's planning at the binding boundary: a fake engine and context speak TensorRT's API
(with the real module's enums) so descriptions, shape checks and buffer sizes are tested on CPU."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime.runners.tensorrt import (TensorIO, describe_engine, max_input_shapes, plan_buffers,
                                                 profile_text, resolve_output_shapes, select_shapes)

pytestmark = pytest.mark.trt_build


@pytest.fixture(scope="module")
def trt():
    from ldm_deploy.engine.trt_api import load_trt
    return load_trt("tensorrt-rtx")


class FakeEngine:
    """The U-Net engine's I/O as TensorRT reports it: dynamic batch and width, static height."""

    def __init__(self, trt, out_dtype="HALF"):
        D = trt.DataType
        self.io = [
            ("sample", trt.TensorIOMode.INPUT, D.HALF, (-1, 4, 8, -1), [(1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 8, 16)]),
            ("timestep", trt.TensorIOMode.INPUT, D.FLOAT, (-1,), [(1,), (2,), (4,)]),
            ("encoder_hidden_states", trt.TensorIOMode.INPUT, D.HALF, (-1, 77, 32),
             [(1, 77, 32), (2, 77, 32), (4, 77, 32)]),
            ("noise_pred", trt.TensorIOMode.OUTPUT, getattr(D, out_dtype), (-1, 4, 8, -1), None),
        ]
        self.num_io_tensors = len(self.io)

    def _row(self, name):
        return next(r for r in self.io if r[0] == name)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return self._row(name)[1]

    def get_tensor_dtype(self, name):
        return self._row(name)[2]

    def get_tensor_shape(self, name):
        return self._row(name)[3]

    def get_tensor_profile_shape(self, name, profile_index):
        assert profile_index == 0
        return self._row(name)[4]


class FakeContext:
    """Infers the output shape from `sample` the way the U-Net engine would."""

    def __init__(self):
        self.shapes = {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        assert name == "noise_pred"
        return self.shapes["sample"]


@pytest.fixture
def tensors(trt):
    return describe_engine(FakeEngine(trt), trt)


def _inputs(b=2, w=8, dtype=np.float32):
    return {"sample": np.zeros((b, 4, 8, w), dtype), "timestep": np.zeros((b,), np.float32),
            "encoder_hidden_states": np.zeros((b, 77, 32), dtype)}


def test_describe_engine(tensors):
    names = [(t.name, t.is_input, t.dtype.name) for t in tensors]
    assert names == [("sample", True, "float16"), ("timestep", True, "float32"),
                     ("encoder_hidden_states", True, "float16"), ("noise_pred", False, "float16")]
    assert tensors[0].shape == (-1, 4, 8, -1) and tensors[0].profile[2] == (4, 4, 8, 16)
    assert tensors[3].profile is None


def test_describe_engine_refuses_types_numpy_cannot_hold(trt):
    with pytest.raises(LdmError, match="noise_pred.*BF16"):
        describe_engine(FakeEngine(trt, out_dtype="BF16"), trt)


def test_buffers_are_planned_for_the_profile_max(tensors):
    shapes = resolve_output_shapes(FakeContext(), tensors, max_input_shapes(tensors))
    sizes = plan_buffers(tensors, shapes)
    assert sizes == {"sample": 4 * 4 * 8 * 16 * 2, "timestep": 4 * 4,
                     "encoder_hidden_states": 4 * 77 * 32 * 2, "noise_pred": 4 * 4 * 8 * 16 * 2}


def test_data_dependent_output_shapes_are_refused(tensors):
    with pytest.raises(LdmError, match="no concrete shape"):
        plan_buffers(tensors, {"sample": (4, 4, 8, 16), "timestep": (4,), "encoder_hidden_states": (4, 77, 32),
                               "noise_pred": (-1, 4, 8, 16)})


def test_shapes_inside_the_profile(tensors):
    assert select_shapes(tensors, _inputs(b=3, w=12), "unet") == {
        "sample": (3, 4, 8, 12), "timestep": (3,), "encoder_hidden_states": (3, 77, 32)}
    shapes = resolve_output_shapes(FakeContext(), tensors, select_shapes(tensors, _inputs(b=1), "unet"))
    assert shapes["noise_pred"] == (1, 4, 8, 8)


@pytest.mark.parametrize("b,w,bad", [(5, 8, "dim 0 = 5 not in 1..4"), (2, 24, "dim 3 = 24 not in 8..16"),
                                     (2, 4, "dim 3 = 4 not in 8..16")])
def test_shapes_outside_the_profile_name_it(tensors, b, w, bad):
    with pytest.raises(UsageError) as e:
        select_shapes(tensors, _inputs(b=b, w=w), "unet")
    msg = str(e.value)
    assert "unet input 'sample'" in msg and bad in msg
    assert "profile: sample (1,4,8,8)..(4,4,8,16); timestep (1)..(4)" in msg and "rebuild" in msg


def test_static_dims_are_checked_too(tensors):
    x = _inputs()
    x["encoder_hidden_states"] = np.zeros((2, 76, 32), np.float16)
    with pytest.raises(UsageError, match="dim 1 = 76 not in 77..77"):
        select_shapes(tensors, x, "unet")


def test_wrong_names_and_ranks(tensors):
    x = _inputs()
    del x["timestep"]
    x["t"] = np.zeros(2)
    with pytest.raises(UsageError, match=r"missing \['timestep'\], unexpected \['t'\]"):
        select_shapes(tensors, x, "unet")
    x = _inputs()
    x["timestep"] = np.zeros((2, 1), np.float32)
    with pytest.raises(UsageError, match="rank 2 .* expects rank 1"):
        select_shapes(tensors, x, "unet")


def test_profile_text(tensors):
    assert profile_text(tensors) == ("sample (1,4,8,8)..(4,4,8,16); timestep (1)..(4); "
                                     "encoder_hidden_states (1,77,32)..(4,77,32)")


def test_tensor_io_is_plain_data():
    t = TensorIO("x", True, np.dtype(np.float16), (-1, 3), ((1, 3), (1, 3), (2, 3)))
    assert plan_buffers([t], {"x": (2, 3)}) == {"x": 12}


# -- the call path over host memory ------------------------------------------------------------
# A stand-in for ldm_deploy.runtime.cuda whose "device" is host memory, and an execution context
# that computes noise_pred = 2 * sample + timestep from the bound addresses, like an engine would.
# It checks the runner's bookkeeping (one allocation, in-place writes, per-call byte counts, output
# copies, casts); the real CUDA path is covered by test_cuda.py and test_tensorrt_exec.py on a GPU.

class HostCuda:
    allocations = 0
    freed = 0

    class DeviceBuffer:
        def __init__(self, nbytes):
            HostCuda.allocations += 1
            self.mem = np.zeros(nbytes, np.uint8)
            self.ptr = self.mem.ctypes.data

        def close(self):
            HostCuda.freed += 1
            self.ptr = 0

    class PinnedBuffer(DeviceBuffer):
        def view(self, dtype, shape):
            return self.mem[: int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    @staticmethod
    def copy_to_device(dst, src, nbytes, stream):
        stream.log.append(("h2d", nbytes))
        dst.mem[:nbytes] = src.mem[:nbytes]

    @staticmethod
    def copy_to_host(dst, src, nbytes, stream):
        stream.log.append(("d2h", nbytes))
        dst.mem[:nbytes] = src.mem[:nbytes]


class HostStream:
    handle = 1234

    def __init__(self):
        self.log = []

    def synchronize(self):
        self.log.append(("sync",))

    def close(self):
        self.log.append(("close",))


class HostContext(FakeContext):
    def __init__(self):
        super().__init__()
        self.address = {}

    def set_optimization_profile_async(self, index, stream):
        assert (index, stream) == (0, HostStream.handle)

    def set_tensor_address(self, name, ptr):
        self.address[name] = ptr

    def _array(self, name, dtype):
        import ctypes
        shape = self.shapes["sample"] if name in ("sample", "noise_pred") else self.shapes[name]
        count = int(np.prod(shape))
        raw = (ctypes.c_uint8 * (count * np.dtype(dtype).itemsize)).from_address(self.address[name])
        return np.frombuffer(raw, dtype).reshape(shape)

    def execute_async_v3(self, stream):
        sample, t = self._array("sample", np.float16), self._array("timestep", np.float32)
        self._array("noise_pred", np.float16)[...] = 2 * sample + t[:, None, None, None]
        return True


@pytest.fixture
def host_runner(tensors):
    from ldm_deploy.runtime.runners.tensorrt import TensorRTRunner
    r = object.__new__(TensorRTRunner)
    r.component, r._cuda, r.tensors, r.context, r.stream = "unet", HostCuda, tensors, HostContext(), HostStream()
    r.input_names = [t.name for t in tensors if t.is_input]
    r.output_names = ["noise_pred"]
    r.output_dtype, r._graphs = np.float32, None
    HostCuda.allocations = 0
    r._allocate()
    return r


def test_call_writes_in_place_and_copies_only_this_calls_bytes(host_runner):
    rng = np.random.default_rng(0)
    for b, w in [(1, 8), (4, 16), (2, 12)]:
        x = {"sample": rng.standard_normal((b, 4, 8, w)).astype(np.float32),
             "timestep": rng.uniform(0, 10, b).astype(np.float32),
             "encoder_hidden_states": np.zeros((b, 77, 32), np.float32)}
        host_runner.stream.log.clear()
        out = host_runner(x)["noise_pred"]
        want = 2 * x["sample"].astype(np.float16) + x["timestep"].astype(np.float16)[:, None, None, None]
        assert out.dtype == np.float32 and out.shape == (b, 4, 8, w)
        assert_close(out, want.astype(np.float32), atol=1e-2, rtol=1e-3)
        sample_bytes = b * 4 * 8 * w * 2
        assert host_runner.stream.log == [("h2d", sample_bytes), ("h2d", b * 4), ("h2d", b * 77 * 32 * 2),
                                          ("d2h", sample_bytes), ("sync",)]
    assert HostCuda.allocations == 8  # 4 device + 4 pinned buffers, once, for the profile's max


def test_returned_outputs_do_not_alias_the_buffers(host_runner):
    x = {"sample": np.ones((1, 4, 8, 8), np.float32), "timestep": np.zeros(1, np.float32),
         "encoder_hidden_states": np.zeros((1, 77, 32), np.float32)}
    first = host_runner(x)["noise_pred"]
    host_runner({**x, "sample": np.full((1, 4, 8, 8), 5, np.float32)})
    assert_close(first, np.full((1, 4, 8, 8), 2, np.float32), atol=0, rtol=0)


def test_call_refuses_shapes_outside_the_profile_before_touching_buffers(host_runner):
    x = {"sample": np.ones((5, 4, 8, 8), np.float32), "timestep": np.zeros(5, np.float32),
         "encoder_hidden_states": np.zeros((5, 77, 32), np.float32)}
    with pytest.raises(UsageError, match="dim 0 = 5 not in 1..4"):
        host_runner(x)
    assert host_runner.stream.log == []


def test_close_frees_every_buffer_and_the_stream_once(host_runner):
    """close() (or the end of a `with` block) syncs the stream, frees the 8 buffers and the stream, drops the
    context and engine; a call afterwards is a one-line error, a second close a no-op."""
    from ldm_deploy.errors import LdmError

    x = {"sample": np.ones((1, 4, 8, 8), np.float32), "timestep": np.zeros(1, np.float32),
         "encoder_hidden_states": np.zeros((1, 77, 32), np.float32)}
    HostCuda.freed = 0
    stream = host_runner.stream
    with host_runner as r:
        r(x)
    assert HostCuda.freed == 8 and stream.log[-2:] == [("sync",), ("close",)]
    assert r.context is None and r.stream is None and not r._device and not r._host
    with pytest.raises(LdmError, match="unet runner is closed"):
        r(x)
    r.close()
    assert HostCuda.freed == 8
