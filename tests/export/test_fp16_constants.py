"""Constant nodes read by fp32-kept nodes stay fp32 in the fp16 conversion (export/fp16.constant_feeders).

A graph onnxslim did not clean up (over the 2 GB proto limit, `optimize: false`) holds constants as `Constant`
nodes, which the float16 converter converts like any other node: the timestep sinusoid's frequency table
reached the fp32 Mul rounded to fp16 (issue 22: /unet/Cos 0.15 off at t = 901 on SD 1.5).
"""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ldm_deploy.export.fp16 import convert_to_fp16
from ldm_deploy.export.precision import fp32_node_count

K = 160            # SD 1.5's half_dim: block_out_channels[0] = 320
TABLE = np.exp(-np.log(10000.0) * np.arange(K) / K).astype(np.float32)[None]


def _model() -> onnx.ModelProto:
    """t -> Unsqueeze -> Mul(table) -> Cos, Sin -> Concat -> MatMul (the time embedding's first linear layer), as
    diffusers' get_timestep_embedding exports (without the flip); the table comes
    from a Constant through an Identity (torchscript shares tensors so) and is also read by an fp16 Add."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Constant", [], ["table_c"], name="table", value=numpy_helper.from_array(TABLE)),
        helper.make_node("Identity", ["table_c"], ["table_i"], name="share"),
        helper.make_node("Unsqueeze", ["t", "axes"], ["t1"], name="unsq"),
        helper.make_node("Mul", ["t1", "table_i"], ["arg"], name="mul"),
        helper.make_node("Cos", ["arg"], ["cos"], name="cos"),
        helper.make_node("Sin", ["arg"], ["sin"], name="sin"),
        helper.make_node("Concat", ["cos", "sin"], ["sinusoid"], name="concat", axis=-1),
        helper.make_node("MatMul", ["sinusoid", "w"], ["emb"], name="linear"),
        helper.make_node("Add", ["x", "table_i"], ["y"], name="add"),     # an fp16 reader of the same constant
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["n", 8]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", K])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes"),
         numpy_helper.from_array(rng.standard_normal((2 * K, 8)).astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_constant_read_by_kept_nodes_stays_fp32(tmp_path):
    src, dst = tmp_path / "fp32.onnx", tmp_path / "fp16.onnx"
    onnx.save(_model(), str(src))
    convert_to_fp16(src, dst, keep_ops=(), fp32_inputs=("t",))
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    nodes = {n.name: n for n in model.graph.node}
    assert numpy_helper.to_array(nodes["table"].attribute[0].t).dtype == np.float32
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer[nodes["mul"].input[1]].name == "share"          # read as is, no Cast pair in between
    cast = producer[nodes["add"].input[1]]                          # the fp16 reader gets it through a Cast
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT16
    # debug-precision's "computing in fp32" count: the island (Unsqueeze, Mul, Cos, Sin, Concat), not the kept
    # Constant and Identity, which compute nothing
    assert fp32_node_count(dst) == 5

    model.graph.output.append(helper.make_empty_tensor_value_info("arg"))
    model.graph.output.append(helper.make_empty_tensor_value_info("cos"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    t = np.array([901.0, 643.7], np.float32)                       # an SD trajectory's first step, a fractional t
    x = np.ones((2, K), np.float16)
    emb, y, arg, cos = session.run(["emb", "y", "arg", "cos"], {"t": t, "x": x})
    assert arg.dtype == cos.dtype == np.float32 and emb.dtype == y.dtype == np.float16
    # one float32 product of the same float32 operands: exactly numpy's; cos of it within a few float32 ulps
    # of numpy's (before the fix the table was fp16-rounded: t * freq off by up to 0.44 rad, cos by 0.15)
    assert np.array_equal(arg, t[:, None] * TABLE)
    assert np.abs(cos - np.cos(arg)).max() <= 8 * np.finfo(np.float32).eps
    assert np.array_equal(y, (x.astype(np.float32) + TABLE.astype(np.float16)).astype(np.float16))
