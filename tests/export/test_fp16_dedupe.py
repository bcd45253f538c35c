"""The float16 converter's duplicate Cast nodes are removed; real output-name clashes are kept."""
import onnx
from onnx import TensorProto, helper

from ldm_deploy.export.fp16 import drop_duplicate_nodes


def _graph(nodes):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    return helper.make_graph(nodes, "g", [x], [y])


def test_identical_casts_are_dropped_and_graph_checks():
    cast = lambda: helper.make_node("Cast", ["x"], ["x_cast_to_fp32"], name="c", to=TensorProto.FLOAT)  # noqa: E731
    g = _graph([cast(), cast(), helper.make_node("Relu", ["x_cast_to_fp32"], ["y"], name="r")])
    assert drop_duplicate_nodes(g) == 1
    assert [n.op_type for n in g.node] == ["Cast", "Relu"]
    onnx.checker.check_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_different_nodes_with_one_output_name_are_kept():
    a = helper.make_node("Cast", ["x"], ["t"], name="a", to=TensorProto.FLOAT)
    b = helper.make_node("Cast", ["x"], ["t"], name="b", to=TensorProto.DOUBLE)
    g = _graph([a, b, helper.make_node("Relu", ["t"], ["y"], name="r")])
    assert drop_duplicate_nodes(g) == 0
    assert len(g.node) == 3
