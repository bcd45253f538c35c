"""fp32 -> fp16 ONNX conversion that keeps the numerically fragile parts in fp32.

We convert the exported fp32 graph (onnxconverter-common's algorithm, shipped with onnxruntime as
`onnxruntime.transformers.float16`) rather than tracing a half-precision torch model: the fp32 graph
stays available for ONNX Runtime's fusions, ORT CPU runs the result (it inserts casts where it lacks
fp16 kernels), and we choose exactly what stays fp32:

- normalisations and softmax (`ExportConfig.fp16_keep_ops`): casts around them, fp32 inside;
- the timestep path of the U-Net: `timestep` stays a float32 input and everything from it up to the
  time-embedding's first linear layer (sinusoid arguments reach 1000 rad; fp16 would lose the
  fractional part) runs in fp32, as diffusers computes `t_emb` in float32.
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

from ldm_deploy.export import onnx_io

log = logging.getLogger(__name__)

_LINEAR_OPS = {"MatMul", "Gemm"}


def fp32_island(model: onnx.ModelProto, inputs: list[str]) -> list[str]:
    """Names of the nodes fed (transitively) by `inputs`, stopping before the first MatMul/Gemm."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier, seen, names = list(inputs), set(), []
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            key = id(node)
            if key in seen or node.op_type in _LINEAR_OPS:
                continue
            seen.add(key)
            if not node.name:
                node.name = f"fp32_island_{len(seen)}"
            names.append(node.name)
            frontier.extend(node.output)
    return names


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` so every node comes after the producers of its inputs (stable otherwise)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a dangling input near node {rest[0].name}")
        pending = rest
    nodes = [onnx.NodeProto() for _ in ordered]
    for dst, src in zip(nodes, ordered):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(nodes)


def drop_duplicate_nodes(graph: onnx.GraphProto) -> int:
    """Remove nodes that repeat an earlier node exactly (same op, inputs, outputs, attributes).

    onnxruntime's float16 converter inserts one `<name>_cast_to_fp32` Cast per consumer when a tensor
    feeds several fp32-kept nodes, all with the same output name: the graph breaks SSA form (seen on
    the full-size SD 1.5 U-Net when onnxslim could not run). Identical copies are redundant; any other
    clash of output names is a real error and is left for the ONNX checker to report.
    """
    seen: dict[str, bytes] = {}
    keep, dropped = [], 0
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        outs = [o for o in node.output if o]
        if outs and all(seen.get(o) == key for o in outs):
            dropped += 1
            continue
        for o in outs:
            seen.setdefault(o, key)
        keep.append(node)
    if dropped:
        del graph.node[:]
        graph.node.extend(keep)
        log.info("fp16: dropped %d duplicate nodes left by the float16 converter", dropped)
    return dropped


def convert_to_fp16(src: Path, dst: Path, *, keep_ops: tuple[str, ...], fp32_inputs: tuple[str, ...] = ()) -> None:
    """Write an fp16 copy of the fp32 graph at `src` to `dst` (external data when over 2 GB)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    big = onnx_io.model_bytes(src) >= onnx_io.PROTO_LIMIT
    if big:   # shape inference on a >2 GB proto must go through a file
        inferred = src.with_name(src.stem + ".inferred.onnx")
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        model = onnx.load(str(inferred))
    else:
        model = onnx.load(str(src))
    present = [i.name for i in model.graph.input]
    keep_inputs = [n for n in fp32_inputs if n in present]
    island = fp32_island(model, keep_inputs)
    model16 = convert_float_to_float16(
        model, keep_io_types=keep_inputs, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(keep_ops),
        node_block_list=island, disable_shape_infer=big)
    drop_duplicate_nodes(model16.graph)
    topological_sort(model16.graph)    # the converter appends its Cast nodes at the end
    log.info("fp16: %d nodes kept fp32 on the %s path, ops kept fp32: %s", len(island), keep_inputs, keep_ops)
    onnx_io.save_model(model16, dst)
    if big:
        inferred.unlink(missing_ok=True)
