"""The loop step graph: a CFG-folded U-Net with the sampler's linear update around it (runtime/device_loop.py).

    inputs   latents         float32 (batch, C, h, w)    the sampler's x
             step            int64 (1,)                  the step index i
             timesteps       the U-Net's timestep dtype (n,)
             input_scales, x_coeffs, out_coeffs  float32 (n,)
             encoder_hidden_states, guidance_scale, guidance_rescale (+ SDXL's text_embeds, time_ids)
                                                         as the folded graph takes them
    outputs  latents_next    float32 (batch, C, h, w)    x_coeffs[i] x + out_coeffs[i] unet(input_scales[i] x, t_i)
             step_next       int64 (1,)                  i + 1

With `latents_next` copied back into `latents` and `step_next` into `step` on the device, the same bindings run
step after step: runtime/runners/ort_loop.py captures one run (+ the two copies) as a CUDA graph and replays
it n times without the host waiting in between.

As in cfg_fold.py, no shape arithmetic: ONNX Runtime places Shape / int64 shape maths on the CPU, and a CPU
node breaks the capture. The per-row timestep is `ReduceSum(latents * 0, C h w) + timesteps[step]` (B rows
without a Shape op); the Gathers index float tables by the int64 step, which stays on the device like the
Add that advances it. Standard ONNX ops only (opset >= 13).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ldm_deploy.errors import LdmError
from ldm_deploy.export.cfg_fold import _dims, _io, is_folded
from ldm_deploy.runtime import device_loop as dl
from ldm_deploy.runtime import guidance as g

PREFIX = "loop/"
LOOP_FILE = "model.ort-cuda-loop.onnx"   # beside the ort-cuda variant: the manifest's ORT_CUDA_LOOP_VARIANT


def is_step_graph(graph: onnx.GraphProto) -> bool:
    return any(i.name == dl.STEP for i in graph.input)


def add_loop_step(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite `model` (a CFG-folded U-Net graph, export/cfg_fold.py) in place into the loop step graph (module
    docstring). Returns the model. Refuses a graph that is not folded, or already a step graph."""
    graph = model.graph
    if is_step_graph(graph):
        raise LdmError("the U-Net graph is already a loop step graph (it takes `step`)")
    if not is_folded(graph):
        raise LdmError("the loop step graph wraps a CFG-folded U-Net; this graph takes no guidance_scale",
                       hint="export with CFG folded (the default of `export --ort-cuda`)")
    sample, timestep = _io(graph, graph.input, g.SAMPLE), _io(graph, graph.input, g.TIMESTEP)
    t_type, sample_dims = timestep.type.tensor_type.elem_type, _dims(sample)
    # the folded U-Net's sample / timestep / noise_pred become inner tensors; its other inputs stay graph inputs
    inner = {g.SAMPLE: PREFIX + "x_in", g.TIMESTEP: PREFIX + "t_rows", g.OUTPUT: PREFIX + "out"}
    _rename(graph, inner)
    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), PREFIX + name))
        return PREFIX + name

    def op(op_type: str, inputs: list, name: str, out: str | None = None, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [out or PREFIX + name], name=PREFIX + name, **attrs))
        return out or PREFIX + name

    def at_step(table: str) -> str:   # table[step]: (1,)
        return op("Gather", [table, dl.STEP], f"{table}_i", axis=0)

    x = dl.LATENTS
    op("Mul", [x, at_step(dl.INPUT_SCALES)], "x_in", out=inner[g.SAMPLE])
    zeros = op("ReduceSum", [op("Mul", [x, const("zero_f", np.array([0.0], np.float32))], "x_zero"),
                             const("axes_chw", np.array([1, 2, 3], np.int64))], "row_zeros", keepdims=0)
    t = at_step(dl.TIMESTEPS)
    t = t if t_type == TensorProto.FLOAT else op("Cast", [t], "t_f32", to=TensorProto.FLOAT)
    op("Cast", [op("Add", [zeros, t], "t_rows_f32")], "t_rows", out=inner[g.TIMESTEP], to=t_type)
    head, nodes = nodes, []   # before the U-Net, then after it: the node list stays topological
    op("Add", [op("Mul", [x, at_step(dl.X_COEFFS)], "x_part"),
               op("Mul", [inner[g.OUTPUT], at_step(dl.OUT_COEFFS)], "out_part")], "next", out=dl.LATENTS_NEXT)
    op("Add", [dl.STEP, const("one_i64", np.array([1], np.int64))], "step_add", out=dl.STEP_NEXT)
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(head + body + nodes)
    graph.initializer.extend(inits)
    _loop_io(graph, sample_dims, t_type)
    return model


def _rename(graph: onnx.GraphProto, names: dict) -> None:
    """Rename tensors `names` (old -> new) wherever nodes and value_info use them."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = names.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = names.get(name, name)
    for vi in graph.value_info:
        vi.name = names.get(vi.name, vi.name)


def _loop_io(graph: onnx.GraphProto, sample_dims: list, t_type: int) -> None:
    """The step graph's IO: latents, step, the four tables, then the folded graph's conditioning as it was."""
    others = [onnx.ValueInfoProto.FromString(i.SerializeToString()) for i in graph.input
              if i.name not in (g.SAMPLE, g.TIMESTEP)]
    latent = helper.make_tensor_value_info(dl.LATENTS, TensorProto.FLOAT, sample_dims)
    del graph.input[:]
    graph.input.extend([latent, helper.make_tensor_value_info(dl.STEP, TensorProto.INT64, [1]),
                        helper.make_tensor_value_info(dl.TIMESTEPS, t_type, ["steps"]),
                        *(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["steps"])
                          for n in (dl.INPUT_SCALES, dl.X_COEFFS, dl.OUT_COEFFS)), *others])
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(dl.LATENTS_NEXT, TensorProto.FLOAT, sample_dims),
                         helper.make_tensor_value_info(dl.STEP_NEXT, TensorProto.INT64, [1])])


# The U-Net passes the device-loop variant is written with (norm_layout_passes keywords): the bench's best measured
# configuration, `ort-cuda-device-loop-nhwc` (H100, 2026-12-07: 0.372 s at B=1, 1.044 s at B=4; docs/performance.md)
LOOP_PASSES = {"fp16_norm": True, "fold_transposes": True, "conv_bias": True, "nhwc_residual": True}


def write_loop_variant(root: Path, fused: Path, fused_stats: dict) -> dict:
    """Write the device-loop U-Net `unet/model.ort-cuda-loop.onnx` of the artifact being exported at `root` from
    its ort-cuda U-Net `fused` (written by export/ort_optimize.py with `fused_stats`); returns its manifest
    variant entry (ORT_CUDA_LOOP_VARIANT). The U-Net is first given the graph passes of LOOP_PASSES
    (export/ort_fp16_norm.py `norm_layout_passes`), then wrapped: the graph the bench measures as
    `ort-cuda-device-loop-nhwc` (bench/prepare.py builds it with the same two calls). Written through a temporary
    name, as every export file."""
    from ldm_deploy.export import onnx_io
    from ldm_deploy.export.ort_fp16_norm import norm_layout_passes
    from ldm_deploy.export.ort_optimize import FUSED_OPS, op_counts, variant_entry

    def wrap(model: onnx.ModelProto) -> dict:
        before = len(model.graph.node)
        passes = norm_layout_passes(model, **LOOP_PASSES)
        ops = op_counts(model)
        add_loop_step(model)
        return {"nodes_before": before, "nodes_after": len(model.graph.node), "graph_passes": passes,
                "fused_ops": {op: n for op, n in sorted(ops.items()) if op in FUSED_OPS}}

    dst = fused.with_name(LOOP_FILE)
    stats = onnx_io.rewrite_model(fused, dst, wrap)
    return {**variant_entry(root, dst, {**fused_stats, "cfg_folded": True, "nodes_before": stats["nodes_before"],
                                        "nodes_after": stats["nodes_after"], "seconds": stats["seconds"],
                                        "fused_ops": stats["fused_ops"]}),
            "device_loop": True, "graph_passes": {k: v for k, v in LOOP_PASSES.items() if v}}


__all__ = ["LOOP_FILE", "LOOP_PASSES", "add_loop_step", "is_step_graph", "write_loop_variant"]
