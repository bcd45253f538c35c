"""Graph passes on the fused fp16 U-Net (`unet/model.ort-cuda.onnx`, ort_optimize.py): GroupNorm kept in fp16,
no-op Casts dropped, and the NHWC <-> NCHW Transposes around the transformer blocks folded into Reshapes.

    stats = norm_layout_passes(model, fp16_norm=True, fold_transposes=True)      # in place, returns what changed
    write_norm_layout_graph(src, dst, fp16_norm=False, fold_transposes=True)     # file to file (weights carried)

What the fused fp16 graph holds (ORT 1.32's transformer optimizer and float16 converter, tiny SD-like U-Net):

- GroupNorm / SkipGroupNorm (com.microsoft) already take fp16 X and return fp16 Y: the schema's `T` covers X,
  skip, bias, Y and S; gamma / beta are `M` (float or float16 in the schema) and stay float here, because the
  CUDA kernel (contrib_ops/cuda/diffusion/group_norm.cc) reads them as float (its SD 1.5 H100 kernels:
  `GroupNormNHWCScaleKernel<__half, 2>(..., float const* gamma, float const* beta, ...)`). The converter,
  unable to type the contrib ops (symbolic shape inference fails on NhwcConv), puts a `Cast(to=fp16)` after
  each of them: fp16 -> fp16, a no-op (21 on the tiny preset) -- as are 11 after Transposes. ONNX Runtime's
  own CastElimination drops such Casts when it loads the graph (the SD 1.5 profile runs 3 Cast nodes a step),
  so `drop_noop_casts` tidies the file rather than the step. `fp16_group_norm` is for the case the casts are
  real: a GroupNorm fed through `Cast(fp16 -> fp32)` (a graph converted with GroupNorm kept fp32) gets the
  fp16 tensor itself, and its fp32 readers a Cast after it.
- Each transformer block leaves four Transposes that ORT's transpose optimizer cannot remove (a Reshape sits
  between them): entering, `NhwcConv(proj_in) -> Transpose(0,3,1,2) -> Reshape([B, C, -1]) ->
  Transpose(0,2,1)` is `Reshape(x_nhwc, [B, -1, C])`; leaving, `Transpose(0,2,1) -> Reshape([B, C, H, W]) ->
  Transpose(0,2,3,1) -> NhwcConv(proj_out)` is `Reshape(y, [B, H, W, C])`. Same bytes in the same order: the
  fold is exact (tests check it bit for bit on ORT CPU). SD 1.5 has 16 blocks: 64 of the 72 Transposes its
  profiled step runs.

The passes write no weights of their own (gamma / beta untouched); the benchmark prepares the result as a
tuning lever in its own folder (ldm_deploy/bench/prepare.py `add_tuning_variants`), never in an artifact.
Needs onnx only.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
NORM_OPS = ("GroupNorm", "SkipGroupNorm")
# ops whose every output has the element type of their first input (enough for the fused U-Net's graph)
_SAME_AS_FIRST = frozenset(
    "NhwcConv Conv GroupNorm SkipGroupNorm Transpose Reshape Concat Add Mul Sub Div Resize Slice Split Sigmoid "
    "Gelu FastGelu BiasGelu QuickGelu BiasSplitGelu BiasAdd MultiHeadAttention Attention MatMul Gemm Softmax "
    "Expand Unsqueeze Squeeze Identity Flatten Sqrt Sin Cos Neg Exp Erf Tanh Relu Pow ReduceSum ReduceMean "
    "Gather Tile Pad Abs Max Min Clip".split())
# ops whose first output (only) has the first input's type: the others are float statistics
_FIRST_OUTPUT_ONLY = {"LayerNormalization": (0,), "SkipLayerNormalization": (0, 3),
                      "SkipSimplifiedLayerNormalization": (0, 3), "SimplifiedLayerNormalization": (0,)}


def elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type (TensorProto enum) of every tensor the graph's inputs, initializers and the known ops
    determine, propagated in node order (the graph is topologically sorted). Tensors of ops it does not know
    are left out: the passes leave what they cannot type alone."""
    types: dict[str, int] = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        op, first = node.op_type, (types.get(node.input[0]) if node.input else None)
        if op == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                types[node.output[0]] = value.data_type
        elif op == "Cast":
            types[node.output[0]] = next(a.i for a in node.attribute if a.name == "to")
        elif op == "Shape":
            types[node.output[0]] = TensorProto.INT64
        elif op in ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or"):
            types[node.output[0]] = TensorProto.BOOL
        elif op == "ConstantOfShape":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            types[node.output[0]] = value.data_type if value is not None else TensorProto.FLOAT
        elif op == "Where" and len(node.input) > 1 and node.input[1] in types:
            types[node.output[0]] = types[node.input[1]]
        elif first is not None and op in _FIRST_OUTPUT_ONLY:
            for i in _FIRST_OUTPUT_ONLY[op]:
                if i < len(node.output) and node.output[i]:
                    types[node.output[i]] = first
        elif first is not None and op in _SAME_AS_FIRST:
            for o in node.output:
                if o:
                    types[o] = first
    return types


class _Graph:
    """Producer / consumer maps over a GraphProto, and the edits the passes make (rewire, add, drop)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.dropped: set[int] = set()
        self.added: list[onnx.NodeProto] = []
        self.outputs = {o.name for o in graph.output}
        self.initializers = {t.name: t for t in graph.initializer}
        self.refresh()

    def refresh(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for name in n.input:
                if name:
                    self.consumers.setdefault(name, []).append(n)

    def readers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.consumers.get(name, []) if id(n) not in self.dropped]

    def const(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return numpy_helper.to_array(value) if value is not None else None
        return None

    def unique(self, base: str) -> str:
        taken = set(self.producer) | {i.name for i in self.graph.input} | set(self.initializers)
        taken |= {o for n in self.added for o in n.output}
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        return name

    def int64(self, base: str, values) -> str:
        name = self.unique(base)
        self.added.append(helper.make_node("Constant", [], [name], name=name,
                                           value=numpy_helper.from_array(np.asarray(values, np.int64), name)))
        return name

    def replace_uses(self, old: str, new: str) -> None:
        for n in self.readers(old):
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new

    def commit(self) -> None:
        """Drop the dropped nodes, add the added ones, sort (each pass ends with it)."""
        from ldm_deploy.export.fp16 import topological_sort

        keep = [n for n in self.graph.node if id(n) not in self.dropped] + self.added
        del self.graph.node[:]
        self.graph.node.extend(keep)
        self.dropped, self.added = set(), []
        topological_sort(self.graph)
        self.refresh()


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _is_cast(node: onnx.NodeProto | None, to: int) -> bool:
    return node is not None and node.op_type == "Cast" and _attr(node, "to") == to


def drop_noop_casts(model: onnx.ModelProto) -> int:
    """Remove every Cast whose input already has the target type (its readers read the input). A Cast that
    writes a graph output stays. Returns the number removed."""
    g = _Graph(model.graph)
    types = elem_types(model.graph)
    removed = 0
    for node in list(model.graph.node):
        if node.op_type != "Cast" or node.output[0] in g.outputs:
            continue
        if types.get(node.input[0]) is not None and types[node.input[0]] == _attr(node, "to"):
            g.replace_uses(node.output[0], node.input[0])
            g.dropped.add(id(node))
            removed += 1
    g.commit()
    return removed


def fp16_group_norm(model: onnx.ModelProto) -> dict:
    """Run GroupNorm / SkipGroupNorm in fp16 where they are fed fp32 through `Cast(fp16 -> fp32)`: they read the
    fp16 tensors, and their outputs' readers get fp16 directly when they were `Cast(to=fp16)` (removed), else
    through one `Cast(to=fp32)`. gamma / beta stay as they are (float: what the CUDA kernel reads). Returns
    {"rewired": nodes now fed fp16, "already_fp16": nodes that were, "kept": nodes left (an input of another
    type or of unknown type), "casts_removed": Casts dropped, "casts_added": Casts added}."""
    g = _Graph(model.graph)
    types = elem_types(model.graph)
    stats = Counter(rewired=0, already_fp16=0, kept=0, casts_removed=0, casts_added=0)
    bypassed: set[str] = set()      # outputs of the input Casts the norms no longer read
    for node in list(model.graph.node):
        if node.domain != MS_DOMAIN or node.op_type not in NORM_OPS:
            continue
        sources = _fp16_sources(g, types, node)
        if not sources:
            stats["kept"] += 1
            continue
        if all(node.input[i] == s for i, s in sources.items()):
            stats["already_fp16"] += 1
            continue
        for i, s in sources.items():
            bypassed.add(node.input[i])
            node.input[i] = s
        _outputs_to_fp16(g, node, stats)
        stats["rewired"] += 1
    g.commit()
    for name in bypassed:           # an input Cast nothing reads any more goes
        cast = g.producer.get(name)
        if cast is not None and not g.readers(name) and name not in g.outputs:
            g.dropped.add(id(cast))
            stats["casts_removed"] += 1
    g.commit()
    return dict(stats)


def _fp16_sources(g: _Graph, types: dict, node: onnx.NodeProto) -> dict[int, str]:
    """{input index: fp16 tensor} for each data input (X, and skip / bias of SkipGroupNorm): the input itself when
    fp16, the source of its `Cast(fp16 -> fp32)` when fp32; {} when any data input is neither."""
    sources: dict[int, str] = {}
    for i in [0] + ([3, 4] if node.op_type == "SkipGroupNorm" else []):
        if i >= len(node.input) or not node.input[i]:
            continue
        name, src = node.input[i], g.producer.get(node.input[i])
        if types.get(name) == TensorProto.FLOAT16:
            sources[i] = name
        elif (types.get(name) == TensorProto.FLOAT and _is_cast(src, TensorProto.FLOAT)
              and types.get(src.input[0]) == TensorProto.FLOAT16):
            sources[i] = src.input[0]
        else:
            return {}
    return sources


def _outputs_to_fp16(g: _Graph, node: onnx.NodeProto, stats: Counter) -> None:
    """`node`'s outputs are fp16 now: renamed `<out>_fp16`; readers that were `Cast(to=fp16)` read them directly
    (the Cast goes, unless it writes a graph output: then it stays as a no-op for the name), fp32 readers read the
    original name, now a `Cast(to=fp32)` of the fp16 tensor."""
    for k, out in enumerate(node.output):
        if not out:
            continue
        readers = g.readers(out)
        half = [r for r in readers if _is_cast(r, TensorProto.FLOAT16)]
        rest = [r for r in readers if r not in half]
        fp16 = g.unique(f"{out}_fp16")
        node.output[k] = fp16
        for r in half:
            if r.output[0] in g.outputs:
                r.input[0] = fp16
                continue
            g.replace_uses(r.output[0], fp16)
            g.dropped.add(id(r))
            stats["casts_removed"] += 1
        if rest or out in g.outputs:
            g.added.append(helper.make_node("Cast", [fp16], [out], name=g.unique(f"{out}_to_fp32"),
                                            to=TensorProto.FLOAT))
            stats["casts_added"] += 1


def _shape_of_transposed(g: _Graph, shape_node: onnx.NodeProto, source: str, perm) -> None:
    """Shape(Transpose(source, perm)) -> Gather(Shape(source), perm), writing the same output name."""
    raw = g.unique(f"{shape_node.output[0]}_of_{source}")
    g.added.append(helper.make_node("Shape", [source], [raw], name=raw))
    g.added.append(helper.make_node("Gather", [raw, g.int64(f"{raw}_perm", list(perm))], [shape_node.output[0]],
                                    name=g.unique(f"{raw}_gather"), axis=0))
    g.dropped.add(id(shape_node))


def _slice_of_shape(g: _Graph, name: str, of: str, start: int, end: int) -> bool:
    """`name` is Slice(Shape(of), [start], [end]) along axis 0, step 1."""
    s = g.producer.get(name)
    if s is None or s.op_type != "Slice" or len(s.input) < 3:
        return False
    shape = g.producer.get(s.input[0])
    if shape is None or shape.op_type != "Shape" or shape.input[0] != of or shape.attribute:
        return False
    consts = [g.const(i) if i else None for i in list(s.input[1:]) + [""] * (5 - len(s.input))]
    starts, ends, axes, steps = consts
    return (starts is not None and ends is not None and starts.tolist() == [start] and ends.tolist() == [end]
            and (axes is None or axes.tolist() == [0]) and (steps is None or steps.tolist() == [1]))


def fold_nhwc_transposes(model: onnx.ModelProto) -> dict:
    """Fold the Transpose -> Reshape -> Transpose chains at the transformer blocks' ends into one Reshape of the
    NHWC tensor (exact: the same elements in the same order). Returns {"entries": chains folded entering a
    block, "exits": leaving one, "transposes_removed": ..., "shapes_rewritten": Shape(Transpose(x)) nodes
    now Gather(Shape(x))}."""
    g = _Graph(model.graph)
    stats = Counter(entries=0, exits=0, transposes_removed=0, shapes_rewritten=0)
    for t1 in list(model.graph.node):
        if id(t1) in g.dropped or t1.op_type != "Transpose":
            continue
        perm = list(_attr(t1, "perm") or [])
        if perm == [0, 3, 1, 2]:
            _fold_entry(g, t1, stats)
        elif perm == [0, 2, 1]:
            _fold_exit(g, t1, stats)
    g.commit()
    # Shape(Transpose(x)) whose Transpose has no other reader any more: read the shape of x
    for t in list(model.graph.node):
        if t.op_type != "Transpose" or t.output[0] in g.outputs:
            continue
        readers = g.readers(t.output[0])
        if readers and all(r.op_type == "Shape" and not r.attribute for r in readers):
            for r in readers:
                _shape_of_transposed(g, r, t.input[0], _attr(t, "perm"))
                stats["shapes_rewritten"] += 1
            g.dropped.add(id(t))
            stats["transposes_removed"] += 1
    g.commit()
    return dict(stats)


def _fold_entry(g: _Graph, t1: onnx.NodeProto, stats: Counter) -> None:
    """x (B,H,W,C) -> Transpose(0,3,1,2) -> Reshape(Concat(Slice(Shape(.), 0, 2), [-1])) -> Transpose(0,2,1)
    == Reshape(x, [B, -1, C]). Other readers of the first Transpose keep it (Shape readers are rewritten
    afterwards)."""
    nchw = t1.output[0]
    reshapes = [r for r in g.readers(nchw) if r.op_type == "Reshape" and r.input[0] == nchw]
    for r in reshapes:
        shape = g.producer.get(r.input[1])
        if (shape is None or shape.op_type != "Concat" or _attr(shape, "axis") != 0 or len(shape.input) != 2
                or not _slice_of_shape(g, shape.input[0], nchw, 0, 2)):
            continue
        tail = g.const(shape.input[1])
        if tail is None or tail.tolist() != [-1] or _attr(r, "allowzero", 0):
            continue
        after = g.readers(r.output[0])
        if len(after) != 1 or after[0].op_type != "Transpose" or list(_attr(after[0], "perm") or []) != [0, 2, 1] \
                or r.output[0] in g.outputs:
            continue
        t2 = after[0]
        # [B, C, -1] -> [B, -1, C]: the same Concat's values, gathered
        new_shape = g.unique(f"{r.output[0]}_nhwc_shape")
        g.added.append(helper.make_node("Gather", [r.input[1], g.int64(f"{new_shape}_idx", [0, 2, 1])],
                                        [new_shape], name=new_shape, axis=0))
        g.added.append(helper.make_node("Reshape", [t1.input[0], new_shape], [t2.output[0]],
                                        name=g.unique(f"{r.name or 'Reshape'}_nhwc")))
        g.dropped.update({id(r), id(t2)})
        stats["entries"] += 1
        stats["transposes_removed"] += 1
    if not g.readers(nchw) and nchw not in g.outputs:
        g.dropped.add(id(t1))
        stats["transposes_removed"] += 1


def _fold_exit(g: _Graph, t2: onnx.NodeProto, stats: Counter) -> None:
    """y (B,N,C) -> Transpose(0,2,1) -> Reshape(s = [B, C, H, W]) -> Transpose(0,2,3,1) == Reshape(y, [B, H, W, C]),
    with B and C taken from y itself (Shape(y)[0], Shape(y)[2]) and H, W from s: the same elements in the same
    order whenever the original Reshape keeps batch and channels, as a transformer block's `reshape(b, c, h, w)`
    does (one that moved elements across them would now change the output's shape, not its values silently)."""
    mid = t2.output[0]
    readers = g.readers(mid)
    if len(readers) != 1 or readers[0].op_type != "Reshape" or readers[0].input[0] != mid or mid in g.outputs:
        return
    r = readers[0]
    after = g.readers(r.output[0])
    if (len(after) != 1 or after[0].op_type != "Transpose" or list(_attr(after[0], "perm") or []) != [0, 2, 3, 1]
            or r.output[0] in g.outputs or _attr(r, "allowzero", 0)):
        return
    shape = g.producer.get(r.input[1])
    if shape is None or shape.op_type != "Shape" or shape.attribute:
        return     # H and W must come from a 4-D tensor's shape (a constant shape is left alone)
    t3, y = after[0], t2.input[0]
    base = g.unique(f"{r.output[0]}_nhwc_shape")
    y_shape = g.unique(f"{base}_of_input")
    g.added.append(helper.make_node("Shape", [y], [y_shape], name=y_shape))
    # [B, N, C] of y and [B', C', H, W] of s -> [B, H, W, C]
    both = g.unique(f"{base}_both")
    g.added.append(helper.make_node("Concat", [y_shape, r.input[1]], [both], name=both, axis=0))
    g.added.append(helper.make_node("Gather", [both, g.int64(f"{base}_idx", [0, 5, 6, 2])], [base], name=base,
                                    axis=0))
    g.added.append(helper.make_node("Reshape", [y, base], [t3.output[0]], name=g.unique(f"{r.name or 'Reshape'}_nhwc")))
    g.dropped.update({id(t2), id(r), id(t3)})
    stats["exits"] += 1
    stats["transposes_removed"] += 2


def conv_bias_into_norm(model: onnx.ModelProto) -> dict:
    """Move each NhwcConv's bias into the SkipGroupNorm that is its output's only reader (as X or as skip), when
    that norm has no bias yet: SkipGroupNorm adds its optional `bias` input (shape (C), contrib_ops/cuda/diffusion/
    group_norm.cc) while it reads X and skip, and its sum output S is X + skip + bias, so both outputs keep their
    meaning (exact in real arithmetic; on a GPU the sum is rounded once instead of twice). cuDNN adds a
    convolution's bias in a separate kernel (`op_generic_tensor_kernel`, 98 launches a step in the SD 1.5
    profile): each bias moved removes one launch and one pass over the convolution's output. A norm both of
    whose inputs come from biased convolutions takes the first one's bias. Returns {"moved": ..., "as_x": ...,
    "as_skip": ..., "kept": biased NhwcConvs left as they were}."""
    g = _Graph(model.graph)
    stats = Counter(moved=0, as_x=0, as_skip=0, kept=0)
    for conv in model.graph.node:
        if conv.op_type != "NhwcConv" or len(conv.input) < 3 or not conv.input[2]:
            continue
        y = conv.output[0]
        readers = g.readers(y)
        norm = readers[0] if len(readers) == 1 and y not in g.outputs else None
        slots = [i for i, name in enumerate(norm.input) if name == y] if norm is not None else []
        if (norm is None or norm.op_type != "SkipGroupNorm" or norm.domain != MS_DOMAIN or slots not in ([0], [3])
                or (len(norm.input) > 4 and norm.input[4])):
            stats["kept"] += 1
            continue
        while len(norm.input) < 5:
            norm.input.append("")
        norm.input[4] = conv.input[2]
        del conv.input[2:]
        stats["moved"] += 1
        stats["as_x" if slots == [0] else "as_skip"] += 1
    return dict(stats)


def norm_layout_passes(model: onnx.ModelProto, *, fp16_norm: bool = True, fold_transposes: bool = True,
                       conv_bias: bool = False, nhwc_residual: bool = False) -> dict:
    """The passes on one fused U-Net, in place: `fp16_norm` (fp16_group_norm, then drop_noop_casts), `fold_transposes`
    (fold_nhwc_transposes), `nhwc_residual` (export/ort_nhwc_residual.py: residual adds and skip-connection
    Concats in NHWC) and / or `conv_bias` (conv_bias_into_norm, last: it also fills the SkipGroupNorms
    `nhwc_residual` makes). Returns node counts before / after and each pass's stats."""
    before = Counter(n.op_type for n in model.graph.node)
    stats: dict = {}
    if fp16_norm:
        stats["fp16_group_norm"] = fp16_group_norm(model)
        stats["noop_casts_removed"] = drop_noop_casts(model)
    if fold_transposes:
        stats["fold_nhwc_transposes"] = fold_nhwc_transposes(model)
    if nhwc_residual:
        from ldm_deploy.export.ort_nhwc_residual import nhwc_residuals

        stats["nhwc_residuals"] = nhwc_residuals(model)
    if conv_bias:
        stats["conv_bias_into_norm"] = conv_bias_into_norm(model)
    after = Counter(n.op_type for n in model.graph.node)
    stats.update(nodes_before=sum(before.values()), nodes_after=sum(after.values()),
                 casts=[before["Cast"], after["Cast"]], transposes=[before["Transpose"], after["Transpose"]])
    log.info("norm/layout passes: %d -> %d nodes, Casts %d -> %d, Transposes %d -> %d", stats["nodes_before"],
             stats["nodes_after"], *stats["casts"], *stats["transposes"])
    return stats


def write_norm_layout_graph(src: str | Path, dst: str | Path, *, device_loop: bool = False, **passes) -> dict:
    """Load `src` (a fused ort-cuda graph, weights included), run `norm_layout_passes(**passes)` and, with
    `device_loop`, wrap the result into the loop step graph (export/step_graph.py); write `dst` through a temporary
    name (onnx_io.rewrite_model), so a failure leaves no half-written graph."""
    from ldm_deploy.export import onnx_io
    from ldm_deploy.export.step_graph import add_loop_step

    def transform(model: onnx.ModelProto) -> dict:
        stats = norm_layout_passes(model, **passes)
        if device_loop:
            add_loop_step(model)
            stats["device_loop"] = True
        return stats

    return onnx_io.rewrite_model(src, dst, transform)


__all__ = ["elem_types", "conv_bias_into_norm", "drop_noop_casts", "fp16_group_norm", "fold_nhwc_transposes",
           "norm_layout_passes", "write_norm_layout_graph"]
