"""The residual stream of a fused ort-cuda graph kept in NHWC, and its adds fused into SkipGroupNorm (the VAE's).

ONNX Runtime's transformer optimizer (ort_optimize.py) makes the convolutions NhwcConv and the norms NHWC GroupNorm,
but leaves the tensors between them in NCHW: in the fused VAE decoder each ResNet block ends
`NhwcConv(conv2) -> Transpose(to NCHW) -> Add(residual) -> Transpose(to NHWC) -> GroupNorm`, and each upsampler is
`Resize(NCHW) -> Transpose(to NHWC) -> NhwcConv`. At 512x512 each of those passes moves the largest tensors of the
decode, and cuDNN adds each convolution's bias in a pass of its own (the U-Net profile's `op_generic_tensor_kernel`).

`nhwc_residuals` gives every NCHW tensor that is a Transpose of an NHWC one an NHWC twin, and carries the twins
through the ops that do not care about layout: an Add of two twinned tensors becomes an Add of the twins, a channel
Concat a Concat of the twins on their last axis, a nearest Resize a Resize of the twin (its scales or sizes
permuted). A `Transpose(to NHWC)` of a twinned tensor is its twin; NCHW tensors nothing reads any more go. Then an NHWC Add read by a GroupNorm becomes a
SkipGroupNorm (X and skip are the two addends, its second output the sum for the Add's other readers), and
`conv_bias_into_norm` (ort_fp16_norm.py) moves the convolution bias into it:

    conv2 -> SkipGroupNorm(X=conv2 out, skip=residual, bias=conv2 bias) -> (normed + SiLU, sum = next residual)

Same elements in the same order everywhere; only the sum is rounded once where it was rounded twice (conv + bias,
then + residual). The NCHW tensors read by something else (the graph's NCHW output, the attention's reshapes) keep
a Transpose. Needs onnx only; `vae_passes` is what `export --ort-cuda` runs on the VAE variants.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ldm_deploy.export.ort_fp16_norm import (MS_DOMAIN, _attr, _Graph, conv_bias_into_norm, drop_noop_casts)

log = logging.getLogger(__name__)

TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _is_transpose(node: onnx.NodeProto, perm: list[int]) -> bool:
    return node.op_type == "Transpose" and list(_attr(node, "perm") or []) == perm


def _as_transpose_of(node: onnx.NodeProto, source: str) -> None:
    """Turn `node` (an Add, a Concat or a Resize) into `Transpose(source, to NCHW)`, keeping its name and output."""
    node.op_type, node.domain = "Transpose", ""
    del node.input[:]
    node.input.append(source)
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("perm", TO_NCHW))


def _nhwc_resize(g: _Graph, node: onnx.NodeProto, source: str) -> str | None:
    """The NHWC form of a nearest `Resize` (its roi empty, scales or sizes a 4-value constant): a new Resize of
    `source` with them permuted. None where it does not apply."""
    if (_attr(node, "mode", b"nearest") not in (b"nearest", "nearest") or (len(node.input) > 1 and node.input[1])
            or _attr(node, "axes") is not None):   # (opset 18 `axes`: the values would not be per NCHW axis)
        return None
    slot = 3 if len(node.input) > 3 and node.input[3] else 2
    values = g.const(node.input[slot]) if len(node.input) > slot else None
    if values is None or values.shape != (4,):
        return None
    permuted = g.unique(f"{node.input[slot]}_nhwc")
    g.graph.initializer.append(numpy_helper.from_array(values[TO_NHWC].astype(values.dtype), permuted))
    g.initializers[permuted] = g.graph.initializer[-1]
    inputs = [source, "", *([""] if slot == 3 else []), permuted]
    out = g.unique(f"{node.output[0]}_nhwc")
    g.added.append(helper.make_node("Resize", inputs, [out], name=g.unique(f"{node.name or 'Resize'}_nhwc"),
                                    **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
    return out


def _is_4d(g: _Graph, name: str) -> bool:
    """Whether `name` is known to be a 4-D tensor from its producer alone: a 4-D Transpose, a convolution, or a
    Reshape to a 4-value shape (a constant, or a Concat of four parts)."""
    node = g.producer.get(name)
    if node is None:
        return False
    if node.op_type in ("NhwcConv", "Conv") or (node.op_type == "Transpose" and len(_attr(node, "perm") or []) == 4):
        return True
    if node.op_type != "Reshape":
        return False
    shape = g.const(node.input[1])
    if shape is not None:
        return shape.shape == (4,)
    parts = g.producer.get(node.input[1])
    return parts is not None and parts.op_type == "Concat" and len(parts.input) == 4 and all(
        (g.producer.get(x) is not None and g.producer[x].op_type == "Unsqueeze") or
        (g.const(x) is not None and g.const(x).size == 1) for x in parts.input)


def _twin_all(g: _Graph, twin: dict[str, str], names) -> bool:
    """Whether every tensor of `names` has an NHWC twin, giving one (a `Transpose(to NHWC)`) to a 4-D tensor
    without, when at least one has one already (the transpose then replaces two: the one back to NCHW after
    the add, and the one to NHWC before the next NHWC reader)."""
    missing = [x for x in names if x not in twin]
    if len(missing) == len(names) or not all(_is_4d(g, x) for x in missing):
        return False
    for x in missing:
        out = g.unique(f"{x}_nhwc")
        g.added.append(helper.make_node("Transpose", [x], [out], name=g.unique(f"{x}_to_nhwc"), perm=TO_NHWC))
        twin[x] = out
    return True


def nhwc_residuals(model: onnx.ModelProto) -> dict:
    """Carry the NHWC twins of NCHW tensors through Add, channel Concat (the U-Net's skip connections) and nearest
    Resize, drop the Transposes that become identities, then fuse each NHWC Add a GroupNorm reads into a
    SkipGroupNorm. In place; returns {"adds", "concats", "resizes", "transposes" [before, after],
    "skip_group_norms"}."""
    before = sum(n.op_type == "Transpose" for n in model.graph.node)
    g = _Graph(model.graph)
    twin: dict[str, str] = {}          # NCHW tensor -> its NHWC twin
    made: set[str] = set()             # NHWC twins written by an Add this pass made
    scales: set[str] = set()           # the scales / sizes inputs of the Resizes
    stats = Counter(adds=0, concats=0, resizes=0, skip_group_norms=0)
    for node in list(model.graph.node):   # topological order: a tensor's twin exists before its readers
        if _is_transpose(node, TO_NCHW):
            twin[node.output[0]] = node.input[0]
        elif node.op_type == "Add" and len(node.input) == 2 and _twin_all(g, twin, node.input):
            out = g.unique(f"{node.output[0]}_nhwc")
            add = helper.make_node("Add", [twin[x] for x in node.input], [out],
                                   name=g.unique(f"{node.name or 'Add'}_nhwc"))
            g.added.append(add)
            made.add(out)
            twin[node.output[0]] = out
            _as_transpose_of(node, out)
            stats["adds"] += 1
        elif (node.op_type == "Concat" and _attr(node, "axis") in (1, -3) and len(node.input) > 1
              and _twin_all(g, twin, node.input)):
            out = g.unique(f"{node.output[0]}_nhwc")
            g.added.append(helper.make_node("Concat", [twin[x] for x in node.input], [out], axis=3,
                                            name=g.unique(f"{node.name or 'Concat'}_nhwc")))
            twin[node.output[0]] = out
            _as_transpose_of(node, out)
            stats["concats"] += 1
        elif node.op_type == "Resize" and node.input[0] in twin:
            scales.update(node.input[2:])
            out = _nhwc_resize(g, node, twin[node.input[0]])
            if out is not None:
                twin[node.output[0]] = out
                _as_transpose_of(node, out)
                stats["resizes"] += 1
    g.commit()
    for node in list(model.graph.node):   # Transpose(to NHWC) of a twinned tensor is the twin
        if (_is_transpose(node, TO_NHWC) and twin.get(node.input[0], node.output[0]) != node.output[0]
                and node.output[0] not in g.outputs):   # (not a twin's own Transpose, which _twin_all made)
            g.replace_uses(node.output[0], twin[node.input[0]])
            g.dropped.add(id(node))
    g.commit()
    _drop_unread_transposes(g)
    stats["skip_group_norms"] = _skip_group_norms(g, made)
    read = {x for n in model.graph.node for x in n.input}   # the NCHW scales / sizes of the Resizes made NHWC go
    unread = [t for t in model.graph.initializer if t.name not in read and t.name in scales]
    for t in unread:
        model.graph.initializer.remove(t)
    for node in [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] in scales - read]:
        model.graph.node.remove(node)
    after = sum(n.op_type == "Transpose" for n in model.graph.node)
    return {**stats, "transposes": [before, after]}


def _drop_unread_transposes(g: _Graph) -> None:
    """Drop Transposes whose output nothing reads (repeated: dropping one can leave its source unread)."""
    while True:
        dead = [n for n in g.graph.node if n.op_type == "Transpose" and not g.readers(n.output[0])
                and n.output[0] not in g.outputs]
        if not dead:
            return
        g.dropped.update(id(n) for n in dead)
        g.commit()


def _skip_group_norms(g: _Graph, made: set[str]) -> int:
    """Each GroupNorm (NHWC) reading an Add this pass made becomes a SkipGroupNorm of the Add's two inputs, its
    sum output taking the Add's place for the Add's other readers. The addend a convolution wrote is X, so
    conv_bias_into_norm can move that convolution's bias in."""
    fused = 0
    for norm in list(g.graph.node):
        if norm.op_type != "GroupNorm" or norm.domain != MS_DOMAIN or norm.input[0] not in made:
            continue
        add = g.producer[norm.input[0]]
        if id(add) in g.dropped or not _attr(norm, "channels_last", 1):
            continue
        a, b = add.input
        if g.producer.get(b) is not None and g.producer[b].op_type == "NhwcConv":
            a, b = b, a
        total = add.output[0]
        others = [n for n in g.readers(total) if n is not norm] or total in g.outputs
        fused_node = helper.make_node(
            "SkipGroupNorm", [a, norm.input[1], norm.input[2], b], [norm.output[0], total if others else ""],
            name=g.unique(f"{norm.name or 'GroupNorm'}_skip"), domain=MS_DOMAIN,
            **{x.name: helper.get_attribute_value(x) for x in norm.attribute})
        g.dropped.update((id(add), id(norm)))
        g.added.append(fused_node)
        fused += 1
    g.commit()
    return fused


def vae_passes(model: onnx.ModelProto) -> dict:
    """What `export --ort-cuda` runs on a fused VAE graph, in place: nhwc_residuals, then the convolution biases
    into the SkipGroupNorms, then the fp16 -> fp16 Casts the float16 converter left. Returns each one's stats."""
    nodes = len(model.graph.node)
    stats = {"nhwc_residuals": nhwc_residuals(model), "conv_bias_into_norm": conv_bias_into_norm(model),
             "noop_casts_removed": drop_noop_casts(model)}
    stats.update(nodes_before=nodes, nodes_after=len(model.graph.node))
    log.info("VAE NHWC passes: %d -> %d nodes, Transposes %d -> %d, %d SkipGroupNorms, %d biases moved", nodes,
             len(model.graph.node), *stats["nhwc_residuals"]["transposes"],
             stats["nhwc_residuals"]["skip_group_norms"], stats["conv_bias_into_norm"]["moved"])
    return stats


__all__ = ["nhwc_residuals", "vae_passes"]
