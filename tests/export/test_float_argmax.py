"""onnx_export.float_argmax: integer ArgMax / ArgMin fed through float64 (ONNX Runtime's CUDA provider has float
kernels only) with the ties broken towards ONNX's index before the reduction, so the index does not depend on
how a kernel breaks ties. The key is checked for uniqueness (what makes it kernel-independent) and the result
against numpy's first / last index on tied rows, on ORT CPU."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ldm_deploy.export.onnx_export import float_argmax

VOCAB, N = 49408, 77


def _graph(path, op: str, axis: int = -1, select_last: int = 0, length=N):
    node = helper.make_node(op, ["ids"], ["index"], axis=axis, keepdims=0, select_last_index=select_last)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", length])],
                              [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _tied_rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (4, N))
    ids[0, 5:] = VOCAB - 1                       # SD's tokenizer: end-of-text id, then padded with it
    ids[1, [3, 40, 76]] = VOCAB - 1              # the maximum three times
    ids[2] = 7                                   # all equal
    ids[3, [0, 76]] = -3                         # a tied minimum at both ends
    return ids


def _run(path, ids, output="index"):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run([output], {"ids": ids})[0]


@pytest.mark.parametrize("op, select_last", [("ArgMax", 0), ("ArgMax", 1), ("ArgMin", 0), ("ArgMin", 1)])
def test_ties_give_onnx_index_through_a_unique_float64_key(tmp_path, op, select_last):
    path = _graph(tmp_path / "g.onnx", op, select_last=select_last)
    ids = _tied_rows()
    reduce = np.argmax if op == "ArgMax" else np.argmin
    want = reduce(ids[:, ::-1], axis=-1) if select_last else reduce(ids, axis=-1)
    want = N - 1 - want if select_last else want
    assert float_argmax(path, VOCAB) == 1
    model = onnx.load(str(path))
    reducer = next(n for n in model.graph.node if n.op_type == op)
    assert reducer.input[0].endswith("/first_index/key")
    np.testing.assert_array_equal(_run(path, ids), want)
    # the key the reduction sees has one extreme per row: any kernel's tie rule gives the same index
    model.graph.output.append(helper.make_tensor_value_info(reducer.input[0], TensorProto.DOUBLE, None))
    onnx.save(model, str(tmp_path / "key.onnx"))
    key = _run(tmp_path / "key.onnx", ids, reducer.input[0])
    assert key.dtype == np.float64
    extreme = key.max(axis=-1, keepdims=True) if op == "ArgMax" else key.min(axis=-1, keepdims=True)
    assert ((key == extreme).sum(axis=-1) == 1).all()


def test_without_a_static_last_axis_only_the_cast_is_added(tmp_path):
    """The key needs n: a dynamic sequence axis, or a reduction over another axis, keeps the plain Cast."""
    for name, kwargs in {"dynamic": dict(length="seq"), "axis0": dict(axis=0)}.items():
        path = _graph(tmp_path / f"{name}.onnx", "ArgMax", **kwargs)
        assert float_argmax(path, VOCAB) == 1
        model = onnx.load(str(path))
        producers = {o: n for n in model.graph.node for o in n.output}
        feeder = producers[next(n for n in model.graph.node if n.op_type == "ArgMax").input[0]]
        assert feeder.op_type == "Cast" and feeder.attribute[0].i == TensorProto.DOUBLE
        ids = _tied_rows()
        np.testing.assert_array_equal(_run(path, ids), np.argmax(ids, axis=kwargs.get("axis", -1)))
