"""Classifier-free guidance folded into the U-Net graph: B latents in, the guided noise prediction out.

The numpy loop otherwise does, every step, on the host: two copies of the latents into a 2B input, the
cast to the graph's dtype, and `uncond + g (cond - uncond)` on the 2B output (plus the rescale of Lin et
al. when asked). `fold_cfg` moves all of it into the graph, where it costs a few small GPU kernels:

    inputs   sample           float32 (batch, C, h, w)          the B latents, as the sampler holds them
             timestep         as the U-Net's  (batch,)
             encoder_hidden_states            (rows, 77, D)     rows = 2B [uncond; cond], or B without CFG
             guidance_scale   float32 (1,)
             guidance_rescale float32 (1,)                      0 = off (diffusers' guidance_rescale)
    output   noise_pred       float32 (batch, C_out, h, w)      guided

Inside: k = rows / batch (2 under CFG, 1 without); the sample and timestep are tiled k times and cast to
the U-Net's dtype; its output is cast to float32, `first` = rows [0, B), `last` = rows [rows - B, rows);
`guided = (last - first) * g + first` -- with k = 1 first is last, so guided is the plain prediction for
any g. The rescale (std over C, h, w with ddof = 1, as diffusers' `rescale_noise_cfg`) is applied where
guidance_rescale > 0 (`Where`, so a zero std never leaks NaN into the unrescaled path). No control flow
and no shape-dependent branches: the graph stays capturable by CUDA graphs.

Standard ONNX ops only (opset >= 13), so the folded graph runs on every ONNX Runtime provider; the
pipeline uses it whenever the U-Net runner takes a `guidance_scale` input (ldm_deploy/runtime/pipeline.py).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ldm_deploy.errors import LdmError

GUIDANCE_INPUTS = ("guidance_scale", "guidance_rescale")
PREFIX = "cfg/"


def is_folded(graph: onnx.GraphProto) -> bool:
    return any(i.name == "guidance_scale" for i in graph.input)


def _io(graph: onnx.GraphProto, items, name: str):
    for item in items:
        if item.name == name:
            return item
    raise LdmError(f"the U-Net graph has no {name!r} input/output; CFG cannot be folded into it",
                   hint="fold only graphs exported by ldm-deploy (inputs sample / timestep / encoder_hidden_states)")


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def fold_cfg(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite `model` (a U-Net graph, any precision) in place to take B latents and return the guided
    prediction (module docstring). Returns the model. Refuses a graph already folded."""
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise LdmError(f"CFG folding needs ONNX opset >= 13, the U-Net graph has {opset}",
                       hint="re-export with opset 17 (the default)")
    if is_folded(graph):
        raise LdmError("the U-Net graph already has CFG folded in (it takes guidance_scale)")
    sample, timestep = _io(graph, graph.input, "sample"), _io(graph, graph.input, "timestep")
    ehs, out = _io(graph, graph.input, "encoder_hidden_states"), _io(graph, graph.output, "noise_pred")
    if len(_dims(timestep)) != 1 or len(_dims(sample)) != 4:
        raise LdmError(f"CFG folding expects sample (N, C, h, w) and timestep (N,); got {_dims(sample)} "
                       f"and {_dims(timestep)}", hint="fold only graphs exported by ldm-deploy")
    sample_type = sample.type.tensor_type.elem_type
    out_type = out.type.tensor_type.elem_type
    t_type = timestep.type.tensor_type.elem_type
    sample_dims, out_dims, ehs_dims = _dims(sample), _dims(out), _dims(ehs)

    # the U-Net's own tensors keep their names under the prefix; the graph IO names are the new ones
    inner = {"sample": PREFIX + "sample_rows", "timestep": PREFIX + "timestep_rows"}
    inner_out = PREFIX + "noise_pred_rows"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in inner:
                node.input[i] = inner[name]
            elif name == "noise_pred":
                node.input[i] = inner_out
        for i, name in enumerate(node.output):
            if name == "noise_pred":
                node.output[i] = inner_out
    for vi in graph.value_info:
        vi.name = inner.get(vi.name, inner_out if vi.name == "noise_pred" else vi.name)

    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), PREFIX + name))
        return PREFIX + name

    def op(op_type: str, inputs: list, name: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [PREFIX + name], name=PREFIX + name, **attrs))
        return PREFIX + name

    zero, axis0 = const("zero", np.array([0], np.int64)), const("axis0", np.array([0], np.int64))
    axis1 = const("axis1", np.array([1], np.int64))
    b = op("Gather", [op("Shape", ["sample"], "sample_shape"), zero], "b", axis=0)          # (1,) = B
    rows = op("Gather", [op("Shape", ["encoder_hidden_states"], "ehs_shape"), zero], "rows", axis=0)
    k = op("Div", [rows, b], "k")                                                            # 2 (CFG) or 1
    reps = op("Concat", [k, const("ones3", np.array([1, 1, 1], np.int64))], "reps", axis=0)
    x = "sample" if sample_type == TensorProto.FLOAT else op("Cast", ["sample"], "sample_cast", to=sample_type)
    nodes.append(helper.make_node("Tile", [x, reps], [inner["sample"]], name=PREFIX + "tile_sample"))
    nodes.append(helper.make_node("Tile", ["timestep", k], [inner["timestep"]], name=PREFIX + "tile_timestep"))
    head, nodes = nodes, []     # the head feeds the U-Net, the tail reads it: keep the node list topological
    pred = inner_out if out_type == TensorProto.FLOAT else op("Cast", [inner_out], "pred_fp32", to=TensorProto.FLOAT)
    first = op("Slice", [pred, zero, b, axis0], "first")                                    # uncond (or the only)
    last = op("Slice", [pred, op("Sub", [rows, b], "rows_minus_b"), rows, axis0], "last")   # cond
    guided = op("Add", [op("Mul", [op("Sub", [last, first], "diff"), "guidance_scale"], "scaled"), first], "guided")

    # rescale (diffusers' rescale_noise_cfg): phi * guided * std(cond) / std(guided) + (1 - phi) * guided
    flat_shape = const("flat_shape", np.array([0, -1], np.int64))

    def std(x: str, tag: str) -> str:
        flat = op("Reshape", [x, flat_shape], f"{tag}_flat")
        n = op("Cast", [op("Gather", [op("Shape", [flat], f"{tag}_flat_shape"), const(f"{tag}_one", np.array([1], np.int64))],
                            f"{tag}_n", axis=0)], f"{tag}_n_f", to=TensorProto.FLOAT)
        mean = op("Div", [op("ReduceSum", [flat, axis1], f"{tag}_sum", keepdims=1), n], f"{tag}_mean")
        centred = op("Sub", [flat, mean], f"{tag}_centred")
        ss = op("ReduceSum", [op("Mul", [centred, centred], f"{tag}_sq"), axis1], f"{tag}_ss", keepdims=1)
        one = const(f"{tag}_1f", np.array([1.0], np.float32))
        return op("Sqrt", [op("Div", [ss, op("Sub", [n, one], f"{tag}_n1")], f"{tag}_var")], f"{tag}_std")  # (B, 1)

    factor = op("Div", [std(last, "cond"), std(guided, "guided")], "factor")
    guided_flat = op("Reshape", [guided, flat_shape], "guided_flat_r")
    rescaled = op("Reshape", [op("Mul", [guided_flat, factor], "rescaled_flat"), op("Shape", [guided], "guided_shape")],
                  "rescaled")
    phi = "guidance_rescale"
    blended = op("Add", [op("Mul", [phi, rescaled], "phi_rescaled"),
                         op("Mul", [op("Sub", [const("one_f", np.array([1.0], np.float32)), phi], "one_minus_phi"),
                                    guided], "keep")], "blended")
    on = op("Greater", [phi, const("zero_f", np.array([0.0], np.float32))], "rescale_on")
    nodes.append(helper.make_node("Where", [on, blended, guided], ["noise_pred"], name=PREFIX + "select"))

    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(head + body + nodes)
    graph.initializer.extend(inits)
    # graph IO: B-row float32 sample, B-row timestep, the embeddings as they were, two guidance scalars
    batch = "batch"
    del graph.input[:]
    graph.input.extend([
        helper.make_tensor_value_info("sample", TensorProto.FLOAT, [batch, *sample_dims[1:]]),
        helper.make_tensor_value_info("timestep", t_type, [batch]),
        helper.make_tensor_value_info("encoder_hidden_states", ehs.type.tensor_type.elem_type, ehs_dims),
        helper.make_tensor_value_info("guidance_scale", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("guidance_rescale", TensorProto.FLOAT, [1]),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, [batch, *out_dims[1:]]))
    return model


def reference_cfg(pred_rows: np.ndarray, batch: int, guidance: float, rescale: float = 0.0) -> np.ndarray:
    """What the folded graph computes, from the plain U-Net's output on the tiled rows (numpy, float32):
    the check for a folded graph against its plain one."""
    pred = np.asarray(pred_rows, dtype=np.float32)
    first, last = pred[:batch], pred[-batch:]
    guided = (last - first) * np.float32(guidance) + first
    if rescale > 0:
        from ldm_deploy.runtime.pipeline import rescale_noise_cfg
        guided = rescale_noise_cfg(guided, last, rescale)
    return guided


__all__ = ["fold_cfg", "is_folded", "reference_cfg", "GUIDANCE_INPUTS"]
