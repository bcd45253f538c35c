"""Classifier-free guidance folded into the U-Net graph: B latents in, the guided noise prediction out.

The numpy loop otherwise does, every step, on the host: two copies of the latents into a 2B input, the
cast to the graph's dtype, and `uncond + g (cond - uncond)` on the 2B output (plus the rescale of Lin et
al. when asked). `fold_cfg` moves all of it into the graph, where it costs a few small GPU kernels:

    inputs   sample           float32 (batch, C, h, w)          the B latents, as the sampler holds them
             timestep         as the U-Net's  (batch,)
             encoder_hidden_states            (2 batch, 77, D)  [uncond; cond]
             guidance_scale   float32 (1,)
             guidance_rescale float32 (1,)                      0 = off (diffusers' guidance_rescale)
             text_embeds, time_ids            (2 batch, ...)    SDXL only: as the plain graph takes them
    output   noise_pred       float32 (batch, C_out, h, w)      guided

Any other input of the plain graph (SDXL's pooled `text_embeds` and micro-conditioning `time_ids`) is
per-row conditioning like the context: it keeps its name, dtype and shape and takes the 2B rows
[uncond; cond] (each half its own: the negative prompt's pooled embedding, the negative size / aesthetic
score time_ids), so the fold never needs to know what it conditions.

Inside: the sample and timestep are concatenated with themselves and cast to the U-Net's dtype; its output
is cast to float32 and split into uncond / cond; `guided = (cond - uncond) * g + uncond`, as the numpy
loop computes it. The rescale (std over C, h, w with ddof = 1, as diffusers' `rescale_noise_cfg`) is
applied where guidance_rescale > 0 (`Where`, so a zero std never leaks NaN into the unrescaled path).

The graph holds no shape arithmetic (no Shape / Gather / Div on int64): ONNX Runtime places such nodes on
the CPU, and a session with any CPU node cannot be captured as a CUDA graph (an H200 refused the first
version of this fold, which tiled by rows / batch). So the batch is always CFG's two halves: without
guidance the pipeline passes the embeddings twice and g = 1 (cond - cond = 0 exactly), at twice the
U-Net work; fold_guidance=False at export keeps the plain B-row graph for such serving.

Standard ONNX ops only (opset >= 13), so the folded graph runs on every ONNX Runtime provider; the
pipeline uses it whenever the U-Net runner takes a `guidance_scale` input (ldm_deploy/runtime/pipeline.py).
The IO names, the feeds and the reference maths are ldm_deploy/runtime/guidance.py's, as the pipeline's.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ldm_deploy.errors import LdmError
from ldm_deploy.runtime import guidance as g

PREFIX = "cfg/"


def is_folded(graph: onnx.GraphProto) -> bool:
    return any(i.name == g.SCALE for i in graph.input)


def _io(graph: onnx.GraphProto, items, name: str):
    for item in items:
        if item.name == name:
            return item
    raise LdmError(f"the U-Net graph has no {name!r} input/output; CFG cannot be folded into it",
                   hint="fold only graphs exported by ldm-deploy (inputs sample / timestep / encoder_hidden_states)")


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def extra_inputs(graph: onnx.GraphProto) -> list:
    """Copies of the U-Net graph's inputs beyond sample / timestep / context: per-row conditioning (SDXL's
    text_embeds and time_ids) that the folded graph takes as the plain one does."""
    return [onnx.ValueInfoProto.FromString(i.SerializeToString()) for i in graph.input
            if i.name not in (g.SAMPLE, g.TIMESTEP, g.CONTEXT)]


def fold_cfg(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite `model` (a U-Net graph, any precision) in place to take B latents and return the guided
    prediction (module docstring). Returns the model. Refuses a graph already folded."""
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise LdmError(f"CFG folding needs ONNX opset >= 13, the U-Net graph has {opset}",
                       hint="re-export with opset 17 (the default)")
    if is_folded(graph):
        raise LdmError(f"the U-Net graph already has CFG folded in (it takes {g.SCALE})")
    sample, timestep = _io(graph, graph.input, g.SAMPLE), _io(graph, graph.input, g.TIMESTEP)
    ehs, out = _io(graph, graph.input, g.CONTEXT), _io(graph, graph.output, g.OUTPUT)
    extra = extra_inputs(graph)   # SDXL's text_embeds, time_ids: 2B rows in, as they are
    if len(_dims(timestep)) != 1 or len(_dims(sample)) != 4:
        raise LdmError(f"CFG folding expects sample (N, C, h, w) and timestep (N,); got {_dims(sample)} "
                       f"and {_dims(timestep)}", hint="fold only graphs exported by ldm-deploy")
    sample_type = sample.type.tensor_type.elem_type
    out_type, t_type = out.type.tensor_type.elem_type, timestep.type.tensor_type.elem_type
    sample_dims, out_dims, ehs_dims = _dims(sample), _dims(out), _dims(ehs)

    # the U-Net's own tensors keep their names under the prefix; the graph IO names are the new ones
    inner = {g.SAMPLE: PREFIX + "sample_rows", g.TIMESTEP: PREFIX + "timestep_rows"}
    inner_out = PREFIX + "noise_pred_rows"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in inner:
                node.input[i] = inner[name]
            elif name == g.OUTPUT:
                node.input[i] = inner_out
        for i, name in enumerate(node.output):
            if name == g.OUTPUT:
                node.output[i] = inner_out
    for vi in graph.value_info:
        vi.name = inner.get(vi.name, inner_out if vi.name == g.OUTPUT else vi.name)

    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), PREFIX + name))
        return PREFIX + name

    def op(op_type: str, inputs: list, name: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [PREFIX + name], name=PREFIX + name, **attrs))
        return PREFIX + name

    # No shape arithmetic anywhere: ORT places Shape/Gather/Div on int64 on the CPU, and a graph with any
    # CPU node cannot be captured as a CUDA graph. So the batch is always two halves (CFG's [uncond; cond]).
    x = g.SAMPLE if sample_type == TensorProto.FLOAT else op("Cast", [g.SAMPLE], "sample_cast", to=sample_type)
    nodes.append(helper.make_node("Concat", [x, x], [inner[g.SAMPLE]], name=PREFIX + "sample_pair", axis=0))
    nodes.append(helper.make_node("Concat", [g.TIMESTEP, g.TIMESTEP], [inner[g.TIMESTEP]],
                                  name=PREFIX + "timestep_pair", axis=0))
    head, nodes = nodes, []     # the head feeds the U-Net, the tail reads it: keep the node list topological
    pred = inner_out if out_type == TensorProto.FLOAT else op("Cast", [inner_out], "pred_fp32", to=TensorProto.FLOAT)
    halves = [PREFIX + "uncond", PREFIX + "cond"]
    split_attrs = {"num_outputs": 2} if opset >= 18 else {}     # opset 13-17: no `split` input = equal parts
    nodes.append(helper.make_node("Split", [pred], halves, name=PREFIX + "split", axis=0, **split_attrs))
    first, last = halves
    # guidance.guide: (cond - uncond) * g + uncond, then the rescale (diffusers' rescale_noise_cfg):
    # phi * guided * std(cond) / std(guided) + (1 - phi) * guided
    guided = op("Add", [op("Mul", [op("Sub", [last, first], "diff"), g.SCALE], "scaled"), first], "guided")
    axes = const("axes_chw", np.array([1, 2, 3], np.int64))
    one = const("one_f", np.array([1.0], np.float32))

    def std(x: str, tag: str) -> str:   # unbiased (ddof = 1) over C, h, w; the count without a Shape op
        n = op("ReduceSum", [op("Add", [op("Mul", [x, const(f"{tag}_0f", np.array([0.0], np.float32))], f"{tag}_zeros"),
                                        one], f"{tag}_ones"), axes], f"{tag}_n", keepdims=1)
        mean = op("Div", [op("ReduceSum", [x, axes], f"{tag}_sum", keepdims=1), n], f"{tag}_mean")
        centred = op("Sub", [x, mean], f"{tag}_centred")
        ss = op("ReduceSum", [op("Mul", [centred, centred], f"{tag}_sq"), axes], f"{tag}_ss", keepdims=1)
        return op("Sqrt", [op("Div", [ss, op("Sub", [n, one], f"{tag}_n1")], f"{tag}_var")], f"{tag}_std")

    rescaled = op("Mul", [guided, op("Div", [std(last, "cond"), std(guided, "guided")], "factor")], "rescaled")
    phi = g.RESCALE
    blended = op("Add", [op("Mul", [phi, rescaled], "phi_rescaled"),
                         op("Mul", [op("Sub", [one, phi], "one_minus_phi"), guided], "keep")], "blended")
    on = op("Greater", [phi, const("zero_f", np.array([0.0], np.float32))], "rescale_on")
    nodes.append(helper.make_node("Where", [on, blended, guided], [g.OUTPUT], name=PREFIX + "select"))

    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(head + body + nodes)
    graph.initializer.extend(inits)
    # graph IO: B-row float32 sample, B-row timestep, the embeddings as they were, two guidance scalars
    batch = "batch"
    del graph.input[:]
    graph.input.extend([
        helper.make_tensor_value_info(g.SAMPLE, TensorProto.FLOAT, [batch, *sample_dims[1:]]),
        helper.make_tensor_value_info(g.TIMESTEP, t_type, [batch]),
        helper.make_tensor_value_info(g.CONTEXT, ehs.type.tensor_type.elem_type, ehs_dims), *extra,
        helper.make_tensor_value_info(g.SCALE, TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info(g.RESCALE, TensorProto.FLOAT, [1]),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(g.OUTPUT, TensorProto.FLOAT, [batch, *out_dims[1:]]))
    return model


def symmetric_unet_inputs(inputs: dict) -> dict:
    """2B-row U-Net inputs whose latents and timesteps repeat over the two CFG halves (as the pipeline
    feeds them), so that the plain graph's output on them is what a folded graph guides."""
    rows = len(inputs[g.SAMPLE])
    half = max(rows // 2, 1)
    return {**inputs, g.SAMPLE: np.concatenate([inputs[g.SAMPLE][:half]] * 2),
            g.TIMESTEP: np.concatenate([np.asarray(inputs[g.TIMESTEP])[:half]] * 2),
            g.CONTEXT: np.concatenate([inputs[g.CONTEXT][:half], inputs[g.CONTEXT][-half:]])}


def folded_inputs(inputs: dict, guidance: float, rescale: float = 0.0) -> dict:
    """The folded graph's feeds for symmetric 2B-row U-Net inputs: the first half's latents and timesteps,
    all 2B embeddings (and SDXL's 2B text_embeds / time_ids rows), the guidance (> 1: CFG)."""
    half = len(inputs[g.SAMPLE]) // 2
    extra = {k: v for k, v in inputs.items() if k not in (g.SAMPLE, g.TIMESTEP, g.CONTEXT)}   # SDXL: 2B rows
    return g.folded_feeds(inputs[g.SAMPLE][:half], np.asarray(inputs[g.TIMESTEP])[:half], inputs[g.CONTEXT],
                          g.folded_scalars(guidance, rescale), extra)


def reference_cfg(pred_rows: np.ndarray, batch: int, guidance: float, rescale: float = 0.0) -> np.ndarray:
    """What the folded graph computes, from the plain U-Net's output on the tiled rows (numpy, float32):
    the check for a folded graph against its plain one. `guidance.guide`, as the pipeline runs it."""
    pred = np.asarray(pred_rows, dtype=np.float32)
    return g.guide(pred[:batch], pred[-batch:], guidance, rescale)


__all__ = ["fold_cfg", "is_folded", "reference_cfg", "symmetric_unet_inputs", "folded_inputs"]
