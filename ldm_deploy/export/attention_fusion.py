"""Fuse our exported attention (plain matmul-softmax) into com.microsoft MultiHeadAttention.

ONNX Runtime's own U-Net attention matcher expects the graph diffusers' processors trace to (its
"torch1"/"torch2" patterns: a Reshape before each LayerNorm, the SDPA scale split over q and k with
a Shape/Sqrt chain); our models' "math" attention traces to

    q, k, v = MatMul(x, Wq), MatMul(ctx, Wk), MatMul(ctx, Wv)                  # (B, N|M, H*d)
    qh = Transpose[0,2,1,3](Reshape(q))  kT = Transpose[0,2,3,1](Reshape(k))   # heads split
    p  = [Cast] Softmax(Mul(MatMul([Cast] qh, [Cast] kT), scale))               # optional fp32 upcast
    o  = Reshape(Transpose[0,2,1,3](MatMul(p, Transpose[0,2,1,3](Reshape(v))))) # (B, N, H*d)

which this pass rewrites to `MultiHeadAttention(q, k, v, num_heads=H, scale=scale)` (3-D q/k/v, no
bias: the CUDA kernel picks flash / memory-efficient attention; a CPU kernel exists for fp32, which
the tests use). Anything that does not match exactly is left alone.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

_ELEMENTWISE = {"Pow": np.power, "Div": np.divide, "Mul": np.multiply, "Sqrt": np.sqrt, "Reciprocal": np.reciprocal,
                "Add": np.add, "Sub": np.subtract}


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.g = model.graph
        self.init = {t.name: t for t in self.g.initializer}
        self.prod = {o: n for n in self.g.node for o in n.output}
        self.cons: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.cons.setdefault(i, []).append(n)

    def producer(self, name: str, op: str | None = None):
        n = self.prod.get(name)
        return n if n is not None and (op is None or n.op_type == op) else None

    def skip_casts(self, name: str):
        n = self.prod.get(name)
        while n is not None and n.op_type == "Cast":
            n = self.prod.get(n.input[0])
        return n

    def only_consumer(self, name: str, op: str):
        found = [n for n in self.cons.get(name, []) if n.op_type == op]
        return found[0] if len(found) == 1 else None

    def const(self, name: str, depth: int = 0):
        """The value of `name` when it is an initializer or computable from constants; else None."""
        if name in self.init:
            return numpy_helper.to_array(self.init[name])
        n = self.prod.get(name)
        if n is None or depth > 6:
            return None
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_float", "value_int"):
                    return np.array(helper.get_attribute_value(a))
            return None
        if n.op_type == "Cast":
            v = self.const(n.input[0], depth + 1)
            return None if v is None else v.astype(np.float64)
        if n.op_type in _ELEMENTWISE:
            args = [self.const(i, depth + 1) for i in n.input]
            if any(a is None for a in args):
                return None
            return _ELEMENTWISE[n.op_type](*[np.asarray(a, np.float64) for a in args])
        return None


def _perm(node) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(helper.get_attribute_value(a))
    return None


def _heads_split(gr: _Graph, name: str, perm: list[int]):
    """`name` = [Cast] Transpose[perm](Reshape(x)): return (x, the Reshape node) or None."""
    t = gr.skip_casts(name)
    if t is None or t.op_type != "Transpose" or _perm(t) != perm:
        return None
    r = gr.producer(t.input[0], "Reshape")
    return (r.input[0], r) if r is not None else None


def _num_heads(gr: _Graph, reshape, q_name: str, scale: float) -> int | None:
    """Heads from the Reshape's target shape [.., .., H, -1|d] when constant in it, else from the
    scale (d = scale^-2) and the projection width."""
    width = None
    mm = gr.producer(q_name, "MatMul")
    if mm is not None and mm.input[1] in gr.init:
        width = int(gr.init[mm.input[1]].dims[-1])
    target = gr.const(reshape.input[1])
    if target is None:
        concat = gr.producer(reshape.input[1], "Concat")
        parts = [gr.const(i) for i in concat.input] if concat is not None else []
        if parts and all(p is not None for p in parts[-1:]):
            tail = np.ravel(parts[-1])
            if tail.size == 2:
                target = np.concatenate([[0, 0], tail])
    if target is not None and np.size(target) == 4:
        h, d = int(np.ravel(target)[2]), int(np.ravel(target)[3])
        if h > 0 and (width is None or d in (-1, 0) or h * d == width):
            return h
    if width is not None and scale > 0:
        d = int(round(scale ** -2))
        if d > 0 and width % d == 0:
            return width // d
    return None


def fuse_attention(model: onnx.ModelProto) -> int:
    """Rewrite every matching attention block of `model` (in place). Returns how many were fused."""
    gr = _Graph(model)
    fused = []
    for sm in [n for n in gr.g.node if n.op_type == "Softmax"]:
        mul = gr.producer(sm.input[0], "Mul")
        if mul is None:
            continue
        qk = next((gr.producer(i, "MatMul") for i in mul.input if gr.producer(i, "MatMul") is not None), None)
        if qk is None:
            continue
        scale = gr.const(next(i for i in mul.input if i != qk.output[0]))
        if scale is None or np.size(scale) != 1:
            continue
        scale = float(np.ravel(scale)[0])
        q = _heads_split(gr, qk.input[0], [0, 2, 1, 3])
        k = _heads_split(gr, qk.input[1], [0, 2, 3, 1])
        # softmax -> [Cast] -> MatMul(p, v_heads)
        after = sm
        while True:
            cast = gr.only_consumer(after.output[0], "Cast")
            if cast is None or len(gr.cons.get(after.output[0], [])) != 1:
                break
            after = cast
        pv = gr.only_consumer(after.output[0], "MatMul")
        if q is None or k is None or pv is None or pv.input[0] != after.output[0]:
            continue
        v = _heads_split(gr, pv.input[1], [0, 2, 1, 3])
        out_t = gr.only_consumer(pv.output[0], "Transpose")
        out_r = None
        if out_t is not None and _perm(out_t) == [0, 2, 1, 3]:
            out_r = gr.only_consumer(out_t.output[0], "Reshape")
        if v is None or out_r is None or len(gr.cons.get(pv.output[0], [])) != 1:
            continue
        heads = _num_heads(gr, q[1], q[0], scale)
        if heads is None:
            continue
        node = helper.make_node("MultiHeadAttention", [q[0], k[0], v[0]], [out_r.output[0]],
                                name=f"{out_r.name}_MultiHeadAttention", domain="com.microsoft",
                                num_heads=heads, scale=scale)
        fused.append((out_r, node))
    for out_r, node in fused:
        nodes = list(gr.g.node)
        idx = next(i for i, n in enumerate(nodes) if n is out_r)
        gr.g.node.remove(out_r)
        gr.g.node.insert(idx, node)
    if fused:
        _remove_dead_nodes(model)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        log.info("fused %d attention blocks into MultiHeadAttention", len(fused))
    return len(fused)


def _remove_dead_nodes(model: onnx.ModelProto) -> None:
    g = model.graph
    outputs = {o.name for o in g.output}
    while True:
        used = outputs | {i for n in g.node for i in n.input}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
