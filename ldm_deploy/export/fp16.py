"""fp32 -> fp16 ONNX conversion that keeps the numerically fragile parts in fp32.

We convert the exported fp32 graph (onnxconverter-common's algorithm, shipped with onnxruntime as
`onnxruntime.transformers.float16`) rather than tracing a half-precision torch model: the fp32 graph
stays available for ONNX Runtime's fusions, ORT CPU runs the result (it inserts casts where it lacks
fp16 kernels), and we choose exactly what stays fp32:

- normalisations and softmax (`ExportConfig.fp16_keep_ops`): casts around them, fp32 inside;
- the timestep path of the U-Net: `timestep` stays a float32 input and everything from it up to the
  time-embedding's first linear layer (sinusoid arguments reach 1000 rad; fp16 would lose the
  fractional part) runs in fp32, as diffusers computes `t_emb` in float32;
- named nodes (`ExportConfig.fp16_keep_nodes`, written by `ldm-deploy debug-precision --write-config`):
  the activations found to overflow fp16, and the nodes that consume them;
- the constants those fp32 nodes read (`constant_feeders`): `Constant` nodes, and nodes computed from
  constants only, which a graph onnxslim did not clean up (over 2 GB, `optimize: false`) still holds,
  among them the sinusoid's frequency table; converted, they would reach the fp32 nodes rounded to fp16.

The converter casts every fp32-kept node's output to fp16 and back before the next fp32-kept node;
`drop_cast_round_trips` removes those round trips, so a chain of kept nodes really stays in fp32
(without it the timestep island's 1000-rad arguments, and any overflowing activation, still pass
through fp16).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx

from ldm_deploy.errors import LdmError
from ldm_deploy.export import onnx_io

log = logging.getLogger(__name__)

_LINEAR_OPS = {"MatMul", "Gemm"}
# float32 inputs kept fp32 in fp16 graphs, with the sinusoid paths behind them (`fp32_island`): the U-Net's
# timestep (t * freq up to ~1000 rad) and SDXL's micro-conditioning time_ids (the sinusoid's arguments reach the
# sizes themselves: 1024 rad at SDXL's native size, where fp16's spacing is 1). The exporter and debug-precision
# both convert with it.
FP32_INPUTS = ("timestep", "time_ids")


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


def constant_feeders(model: onnx.ModelProto, kept_ops: set[str], kept_nodes: set[str]) -> list[str]:
    """Names of the constant nodes whose values an fp32-kept node reads: `Constant` nodes, and nodes computed
    from constants and initializers only, up the chain from each kept node (ops in `kept_ops`, names in
    `kept_nodes`).

    The converter keeps an fp32 *initializer* read only by kept nodes in fp32, but it converts every node it
    is not told to keep, and a `Constant` node is a node: its value becomes fp16 and is cast back to fp32 in
    front of the kept reader. A graph onnxslim did not clean up (over the 2 GB proto limit, `optimize: false`,
    a failed cleanup) holds the timestep sinusoid's frequency table as such a Constant: rounded to fp16
    (relative 2^-11), it moved t * freq by up to 0.44 rad at t = 901 (0.19 measured), and cos by 0.15, on the
    SD 1.5 U-Net. Kept fp32, a Constant read by kept and by fp16 nodes alike reaches the fp16 ones through the
    converter's Cast, as an initializer would."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output if o}
    known = {i.name for i in graph.initializer} | {""}
    constant: set[str] = set()      # tensors computable without a graph input
    changed = True
    while changed:                  # the graph is topologically sorted after export; the loop does not assume it
        changed = False
        for node in graph.node:
            outs = [o for o in node.output if o]
            if outs and outs[0] not in constant and all(i in known or i in constant for i in node.input):
                constant.update(outs)
                changed = True
    names, seen = [], set()
    frontier = [i for n in graph.node if n.op_type in kept_ops or n.name in kept_nodes for i in n.input]
    while frontier:
        tensor = frontier.pop()
        node = producers.get(tensor)
        if node is None or tensor not in constant or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in kept_ops or node.name in kept_nodes:
            continue                # kept already (its own constant inputs are reached from it)
        if not node.name:
            node.name = f"fp32_constant_{len(seen)}"
        names.append(node.name)
        frontier.extend(node.input)
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


def drop_cast_round_trips(graph: onnx.GraphProto) -> int:
    """Remove the converter's fp32 -> fp16 -> fp32 Cast pairs between two fp32-kept nodes.

    The converter renames a kept node's output `X` to `X_cast_to_fp16`, adds `Cast(to=fp16) -> X`, and
    a kept consumer reads it back through `Cast(to=fp32) -> X_cast_to_fp32`; an fp32 graph input
    (keep_io_types, e.g. `timestep`) is likewise cast to fp16 and back before a kept node reads it. Those consumers are
    rewired to the fp32 tensor; when nothing else reads the fp16 `X`, its Cast goes too and the kept
    node's output gets its original name `X` back (in fp32), so reports name the same tensors as the
    fp32 graph. Returns the number of Cast nodes removed.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    fp32_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    removed: set[int] = set()
    inputs_to: dict[str, str] = {}      # tensor read by a consumer -> the tensor it reads instead
    outputs_to: dict[str, str] = {}     # a kept node's output -> its restored original name
    for cast16 in graph.node:
        if cast16.op_type != "Cast" or not cast16.output:
            continue
        kept_output = cast16.input[0] == cast16.output[0] + "_cast_to_fp16"
        if not kept_output and cast16.input[0] not in fp32_inputs:   # keep_io_types: an fp32 input cast to fp16
            continue
        fp32, fp16 = cast16.input[0], cast16.output[0]
        readers = consumers.get(fp16, [])
        trips = [c for c in readers if c.op_type == "Cast" and c.output[0] == fp16 + "_cast_to_fp32"
                 and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in c.attribute)]
        if not trips:
            continue
        whole = len(trips) == len(readers) and fp16 not in graph_outputs
        target = fp16 if whole and kept_output else fp32
        for c in trips:
            inputs_to[c.output[0]] = target
            removed.add(id(c))
        if whole:
            removed.add(id(cast16))
            if kept_output:
                outputs_to[fp32] = fp16
    if not removed:
        return 0
    _rewire(graph, removed, inputs_to, outputs_to)
    log.info("fp16: removed %d fp32 -> fp16 -> fp32 Cast round trips between fp32-kept nodes", len(removed))
    return len(removed)


def _rewire(graph: onnx.GraphProto, removed: set[int], inputs_to: dict[str, str], outputs_to: dict[str, str]) -> None:
    """Drop the nodes whose id() is in `removed`, rename the inputs and outputs the maps name, and forget the
    value_info of every renamed tensor (shape inference redoes them)."""
    keep = []
    for node in graph.node:
        if id(node) in removed:
            continue
        for i, name in enumerate(node.input):
            if name in inputs_to:
                node.input[i] = inputs_to[name]
            elif name in outputs_to:
                node.input[i] = outputs_to[name]
        for i, name in enumerate(node.output):
            if name in outputs_to:
                node.output[i] = outputs_to[name]
        keep.append(node)
    retyped = set(inputs_to) | set(outputs_to) | set(outputs_to.values())
    value_info = [v for v in graph.value_info if v.name not in retyped]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    del graph.node[:]
    graph.node.extend(keep)


def convert_to_fp16(src: Path, dst: Path, *, keep_ops: tuple[str, ...], fp32_inputs: tuple[str, ...] = (),
                    keep_nodes: tuple[str, ...] = ()) -> None:
    """Write an fp16 copy of the fp32 graph at `src` to `dst` (external data when over 2 GB).

    `keep_nodes` names nodes of the fp32 graph to keep in fp32 (an unknown name is an error: the
    config was written for another graph). A graph over 2 GB is converted without its weights in memory:
    the converter retypes the initializers, and `onnx_io.save_streamed` converts and writes them one by one."""
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    big = onnx_io.is_big(src)
    if big:   # shape inference on a >2 GB proto must go through a file
        inferred = src.with_name(src.stem + ".inferred.onnx")
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        model = onnx_io.load_lazy(inferred)
    else:
        model = onnx.load(str(src))
    present = [i.name for i in model.graph.input]
    keep_inputs = [n for n in fp32_inputs if n in present]
    island = fp32_island(model, keep_inputs)
    if keep_nodes:
        names = {n.name for n in model.graph.node}
        missing = [n for n in keep_nodes if n not in names]
        if missing:
            raise LdmError(f"fp16_keep_nodes names {len(missing)} nodes this graph lacks, e.g. {missing[0]!r}",
                           hint="the export config was written for another model or export settings; "
                                "rerun `ldm-deploy debug-precision --write-config` on this model")
    op_block = [*DEFAULT_OP_BLOCK_LIST, *keep_ops]
    node_block = island + [n for n in keep_nodes if n not in island]
    constants = constant_feeders(model, set(op_block), set(node_block))
    with _shapes_from_dims(float16) if big else contextlib.nullcontext():
        model16 = convert_float_to_float16(
            model, keep_io_types=keep_inputs, op_block_list=op_block, node_block_list=node_block + constants,
            disable_shape_infer=big)
    drop_duplicate_nodes(model16.graph)
    drop_cast_round_trips(model16.graph)
    topological_sort(model16.graph)    # the converter appends its Cast nodes at the end
    log.info("fp16: %d nodes kept fp32 on the %s path, %d named nodes kept fp32, %d constant nodes they read kept "
             "fp32, ops kept fp32: %s", len(island), keep_inputs, len(keep_nodes), len(constants), keep_ops)
    if big:   # the weights: read as fp32 from src's data, converted as the converter would, written, dropped
        onnx_io.save_streamed(model16, dst, src.parent, to_fp16=float16.convert_np_to_float16)
        inferred.unlink(missing_ok=True)
    else:
        onnx_io.save_model(model16, dst)


@contextlib.contextmanager
def _shapes_from_dims(float16_module):
    """The converter reads each retyped initializer's shape through `numpy_helper.to_array`, which would load
    (and, typed float16 over float32 bytes, reject) an external tensor's data; its dims are the same shape."""
    from onnx import helper

    original = float16_module.make_value_info_from_tensor
    float16_module.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type,
                                                                                         list(t.dims))
    try:
        yield
    finally:
        float16_module.make_value_info_from_tensor = original
