"""Graphs over protobuf's 2 GB limit are copied and converted to fp16 tensor by tensor (onnx_io.save_streamed).

The streamed files must be the ones the in-memory path writes: byte for byte for a copy, and for fp16 the
same nodes and bit-identical weights as converting the whole model in memory. The 2 GB limit is lowered
(monkeypatched PROTO_LIMIT) so tiny graphs take the over-the-limit path that the SDXL U-Net takes.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ldm_deploy.export import onnx_io
from ldm_deploy.export.fp16 import convert_to_fp16


def _graph(path, big_weights=True):
    """x (1, 64) -> MatMul W1 -> Add b -> LayerNormalization (kept fp32) -> MatMul W2 -> y; weights over 1 KiB
    go external, the bias and LayerNorm scale stay inline (under onnx's 1024-byte threshold)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32) * 1e-9, "b"),   # fp16-subnormal range
             numpy_helper.from_array(np.ones(64, np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32) * 1e5, "W2"),   # over fp16 max
             numpy_helper.from_array(np.arange(300, dtype=np.int64), "idx")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
             helper.make_node("LayerNormalization", ["hb", "g"], ["n"], name="ln", axis=-1),
             helper.make_node("MatMul", ["n", "W2"], ["m"], name="mm2"),
             helper.make_node("Gather", ["m", "idx"], ["y"], name="gather", axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 300])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True)
    onnx.save_model(model, str(path), save_as_external_data=big_weights, all_tensors_to_one_file=False,
                    size_threshold=1024)
    return path


@pytest.fixture
def limit(monkeypatch):
    monkeypatch.setattr(onnx_io, "PROTO_LIMIT", 4096)    # W1 alone (16 KiB) is over it


def test_copy_over_the_limit_is_byte_identical_to_save_model(tmp_path, limit):
    src = _graph(tmp_path / "src" / "model.onnx")
    assert len(list((tmp_path / "src").iterdir())) > 2          # one file per external tensor, as torch writes
    onnx_io.save_model(onnx.load(str(src)), tmp_path / "ref" / "model.onnx")
    data = onnx_io.copy_model(src, tmp_path / "new" / "model.onnx")
    assert data == tmp_path / "new" / "model.onnx.data"
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_copy_under_the_limit_is_inline_and_identical(tmp_path):
    src = _graph(tmp_path / "src" / "model.onnx")
    onnx_io.save_model(onnx.load(str(src)), tmp_path / "ref.onnx")
    assert onnx_io.copy_model(src, tmp_path / "new.onnx") is None
    assert (tmp_path / "new.onnx").read_bytes() == (tmp_path / "ref.onnx").read_bytes()


def test_streamed_fp16_matches_the_in_memory_conversion(tmp_path, monkeypatch):
    src = _graph(tmp_path / "src" / "model.onnx")
    convert_to_fp16(src, tmp_path / "mem" / "model.onnx", keep_ops=("LayerNormalization",))   # in memory
    monkeypatch.setattr(onnx_io, "PROTO_LIMIT", 4096)
    convert_to_fp16(src, tmp_path / "big" / "model.onnx", keep_ops=("LayerNormalization",))   # streamed
    assert (tmp_path / "big" / "model.onnx.data").is_file()
    assert not list((tmp_path / "src").glob("*.inferred.onnx"))
    mem, big = onnx.load(str(tmp_path / "mem" / "model.onnx")), onnx.load(str(tmp_path / "big" / "model.onnx"))
    assert [n.SerializeToString() for n in big.graph.node] == [n.SerializeToString() for n in mem.graph.node]
    got = {t.name: (t.data_type, numpy_helper.to_array(t)) for t in big.graph.initializer}
    want = {t.name: (t.data_type, numpy_helper.to_array(t)) for t in mem.graph.initializer}
    assert got.keys() == want.keys()
    for name, (dtype, array) in want.items():
        assert got[name][0] == dtype, name
        assert got[name][1].tobytes() == array.tobytes(), name
    assert got["W1"][0] == TensorProto.FLOAT16 and got["g"][0] == TensorProto.FLOAT   # g feeds only the kept op
    assert np.isfinite(got["W2"][1]).all()       # clipped to fp16's max, as the converter does
    onnx.checker.check_model(str(tmp_path / "big" / "model.onnx"), full_check=True)
