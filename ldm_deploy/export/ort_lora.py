"""Switchable LoRA weights in the ONNX Runtime CUDA fused variant (`export --lora-switchable --ort-cuda`).

ORT's fusions need the weights as constants (NhwcConv transposes its kernel; CLIP's optimizer folds a Linear's
Transpose into the weight), so the fused graph of a switchable component is built from the switchable graph with
its weights put back as initializers (the base values), and then the fused graph's constants that come from them
are made graph inputs again:

1. `weights_as_initializers`: the weight inputs become initializers, and a Transpose of one is folded into an
   initializer (named after the Transpose's output), as the exporter's constant folding does on a plain export:
   the optimizer then sees the plain export's MatMul(x, W^T) and fuses exactly as there (and the fused graph does
   no per-step transpose).
2. A probe build: the same fusion with random weights (`probe_weights`). Every constant of the probe's fused graph
   that equals one probe weight under an axis permutation (+ reshape), cast as ORT's float16 converter casts, is
   one of theirs (random values: no other tensor can match), giving a recipe {fused constant: weight, perm,
   shape, dtype}; every other constant is kept as a digest.
3. `check`, on the real build (base weights): the same constant names as the probe's; every recipe constant
   equal to the recipe applied to its base weight bit for bit, every other one equal to the probe build's of that
   name (so it depends on no switchable weight). A constant that differs and matches no recipe (a weight folded
   into another constant) fails the export with one line: nothing is baked in silently.
4. `expose`: the recipe constants become graph inputs named after their weight (`<weight>` when unchanged,
   `<weight>.T` / `<weight>.p0231` otherwise). ONNX Runtime's CUDA EP runs an NhwcConv only with a constant
   kernel, so each NhwcConv whose kernel is switchable becomes Transpose -> Conv -> Transpose first, its kernel
   entering OIHW as stored (`_nchw_convs`).

The variant's manifest entry keeps the component's `lora_weights` and adds `fused`: {input: {weight, perm, shape,
dtype}}; the runtime (runtime/lora_switch.py, `fused_tensor`) computes each input from the merged weight. What the
optimizers do on SD's graphs (tiny presets, an SD 1.5-width slice, tiny SDXL; onnxruntime 1.32): NhwcConv kernels
(1x1 proj_in/out and conv shortcuts; 3x3 with `all`) perm (0, 2, 3, 1), which the NCHW Conv that replaces each
takes back to OIHW (perm identity); the U-Net's Linear weights our Transpose fold (1, 0); CLIP's Linear
weights (1, 0) by its optimizer's own fold; Gemm (time embedding) and Gather (token / position embeddings) as is.
Costs a second fusion of the component at export (the probe).
"""
from __future__ import annotations

import hashlib
import itertools
import zlib
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ldm_deploy.errors import LdmError
from ldm_deploy.runtime.lora_switch import fused_tensor

PROBE_SEED = 20261206
_SUFFIX = {(1, 0): "T", (0, 2, 3, 1): "nhwc"}


def weights_as_initializers(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> list[str]:
    """Turn the graph inputs named in `weights` into float32 initializers of those values and fold each Transpose
    that reads one into an initializer of its own (named after its output). Returns the weight names the graph
    takes (a weight the graph dropped is not among its inputs)."""
    graph = model.graph
    taken = {i.name for i in graph.input if i.name in weights}
    kept = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(kept)
    for name in sorted(taken):
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weights[name], np.float32), name))
    readers: dict[str, int] = {}
    for node in graph.node:
        for x in node.input:
            readers[x] = readers.get(x, 0) + 1
    nodes, folded = [], set()
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in taken:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            w = np.asarray(weights[node.input[0]], np.float32)
            t = w.transpose(perm) if perm else w.T
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(t), node.output[0]))
            readers[node.input[0]] -= 1
            folded.add(node.input[0])
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    unread = {n for n in folded if readers[n] == 0}   # read only by the folded Transposes: drop the original
    if unread:
        inits = [t for t in graph.initializer if t.name not in unread]
        del graph.initializer[:]
        graph.initializer.extend(inits)
    return sorted(taken)


class ProbeWeights(Mapping):
    """Random float32 weights of the given shapes, N(0, 0.05^2) (inside float16's normal range, all distinct),
    drawn again on each access from a seed per name: nothing held (the SDXL U-Net's weights are 10 GB in fp32)."""

    def __init__(self, shapes: Mapping[str, tuple], seed: int = PROBE_SEED):
        self.shapes, self.seed = {n: tuple(s) for n, s in shapes.items()}, seed

    def __getitem__(self, name: str) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        return (rng.standard_normal(self.shapes[name], dtype=np.float32) * np.float32(0.05))

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def probe_weights(weights: Mapping[str, np.ndarray], seed: int = PROBE_SEED) -> ProbeWeights:
    """The probe build's weights: random, of `weights`' shapes (ProbeWeights)."""
    return ProbeWeights({n: np.shape(w) for n, w in weights.items()}, seed)


def constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """name -> tensor of the graph's initializers and Constant nodes' values."""
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                out[node.output[0]] = value
    return out


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes() + str(array.dtype).encode()
                          + str(array.shape).encode()).hexdigest()


def _moments(array: np.ndarray) -> tuple[float, float]:
    a = np.asarray(array, np.float64)
    return float(a.sum()), float(np.square(a).sum())


def derive(model: onnx.ModelProto, probe: ProbeWeights) -> tuple[dict, dict]:
    """(recipe, reference) from the probe's fused graph: recipe {constant: {weight, perm, shape, dtype}} for each
    constant equal to `fused_tensor` of one probe weight; reference {constant: digest} for all the others."""
    by_size: dict[int, list[str]] = {}
    for name, shape in probe.shapes.items():
        by_size.setdefault(int(np.prod(shape)), []).append(name)
    moments: dict[tuple[str, str], tuple[float, float]] = {}
    recipe, reference = {}, {}
    for cname, tensor in constants(model.graph).items():
        array = numpy_helper.to_array(tensor)
        found = None
        candidates = by_size.get(int(array.size), ()) if array.dtype.kind == "f" and array.size > 1 else ()
        got = _moments(array) if candidates else None
        for wname in candidates:
            key = (wname, str(array.dtype))
            if key not in moments:   # (each probe weight is drawn again on access: once per dtype here)
                moments[key] = _moments(fused_tensor(probe[wname], {"shape": probe.shapes[wname],
                                                                    "dtype": array.dtype.name}))
            if not all(np.isclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(got, moments[key])):
                continue   # a permutation keeps the sum and the sum of squares (up to float64 rounding)
            w = probe[wname]
            # the permutations giving the constant's shape first, then those that need a reshape too
            perms = sorted(itertools.permutations(range(w.ndim)),
                           key=lambda p: tuple(w.shape[i] for i in p) != array.shape)
            for perm in perms:
                entry = {"weight": wname, "perm": list(perm), "shape": list(array.shape),
                         "dtype": array.dtype.name}
                if np.array_equal(fused_tensor(w, entry).view(np.uint8), np.ascontiguousarray(array).view(np.uint8)):
                    found = entry
                    break
            if found:
                break
        if found:
            recipe[cname] = found
        else:
            reference[cname] = _digest(array)
    return recipe, reference


def check(model: onnx.ModelProto, recipe: Mapping, reference: Mapping, weights: Mapping[str, np.ndarray],
          component: str) -> None:
    """The real build against the probe's: the same constants, each recipe one equal bit for bit to the recipe
    applied to its base weight, every other one unchanged. LdmError (one line) otherwise."""
    have = constants(model.graph)
    if set(have) != set(recipe) | set(reference):
        diff = sorted(set(have) ^ (set(recipe) | set(reference)))
        raise LdmError(f"the fused {component} graph's constants depend on the switchable weights' values "
                       f"({len(diff)} differ from a build with other values, e.g. {diff[0]!r}), so they cannot be "
                       "made inputs", hint="export without --ort-cuda (the plain switchable graph) and report this")
    for cname, entry in recipe.items():
        got = numpy_helper.to_array(have[cname])
        want = fused_tensor(weights[entry["weight"]], entry)
        if got.shape != want.shape or not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
            raise LdmError(f"the fused {component} graph's {cname!r} is not {entry['weight']} permuted "
                           f"{entry['perm']} bit for bit", hint="export without --ort-cuda and report this")
    for cname, digest in reference.items():
        if _digest(numpy_helper.to_array(have[cname])) != digest:
            raise LdmError(f"the fused {component} graph folds a switchable weight into {cname!r} (with other "
                           "weight values it changes, but it is no weight's permutation): it cannot be switched",
                           hint="export without --ort-cuda (the plain switchable graph runs on ort-cuda) and "
                                "report this")


def expose(model: onnx.ModelProto, recipe: Mapping) -> dict:
    """Make the recipe's constants graph inputs (static shape, their dtype), renamed after their weight;
    returns the manifest's `fused` map {input name: {weight, perm, shape, dtype}}. An NhwcConv whose kernel is one
    of them becomes an NCHW Conv first (`_nchw_convs`): ONNX Runtime's CUDA EP runs NhwcConv only on a constant
    kernel."""
    graph = model.graph
    recipe = _nchw_convs(graph, recipe)
    names, fused = {}, {}
    for cname in sorted(recipe):
        entry = recipe[cname]
        perm = tuple(entry["perm"])
        suffix = "" if perm == tuple(range(len(perm))) else _SUFFIX.get(perm, "p" + "".join(map(str, perm)))
        base = entry["weight"] + (f".{suffix}" if suffix else "")
        name, k = base, 1
        while name in fused:
            k += 1
            name = f"{base}.{k}"
        names[cname] = name
        fused[name] = dict(entry)
    taken = set(names)
    inits = [t for t in graph.initializer if t.name not in taken]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in taken)]
    del graph.node[:]
    graph.node.extend(nodes)
    infos = [v for v in graph.value_info if v.name not in taken]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x in names:
                node.input[i] = names[x]
    for output in graph.output:
        if output.name in names:
            raise LdmError(f"the fused graph outputs the weight {output.name!r}", hint="report this")
    elem = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}
    for cname, name in names.items():
        entry = fused[name]
        graph.input.append(onnx.helper.make_tensor_value_info(name, elem[entry["dtype"]], entry["shape"]))
    return fused


_TO_NCHW, _TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)


def _nchw_convs(graph: onnx.GraphProto, recipe: Mapping) -> dict:
    """Rewrite each NhwcConv whose kernel is a recipe constant as Transpose -> Conv -> Transpose, the Conv reading
    the kernel OIHW (a recipe entry of its own: the NhwcConv's perm composed with OHWI -> OIHW, so an SD kernel
    enters as is). ONNX Runtime's CUDA EP places an NhwcConv only when its kernel is an initializer
    (`NhwcConvNeedFallbackToCPU`: "the Cuda EP requires W as initializer for NHWC operation"); with the kernel a
    graph input the node has no provider and the session fails to load. The Conv computes the same sum of products,
    in cuDNN's NCHW path, with two transposes of its activations around it. Returns the recipe the graph now
    uses (a constant no node reads any more is dropped)."""
    recipe = {name: dict(entry) for name, entry in recipe.items()}
    nodes, rewritten = [], False
    for node in graph.node:
        if not (node.op_type == "NhwcConv" and node.domain == "com.microsoft" and len(node.input) > 1
                and node.input[1] in recipe):
            nodes.append(node)
            continue
        entry = recipe[node.input[1]]
        perm, shape = tuple(entry["perm"]), tuple(entry["shape"])
        if len(perm) != 4 or len(shape) != 4:
            raise LdmError(f"the fused graph's NhwcConv {node.name!r} reads a {len(shape)}-d kernel from "
                           f"{entry['weight']} (permuted {list(perm)}): not a 4-d convolution kernel",
                           hint="export without --ort-cuda (the plain switchable graph runs on ort-cuda) and report this")
        kernel = f"{node.input[1]}/oihw"
        recipe[kernel] = {**entry, "perm": [perm[i] for i in _TO_NCHW], "shape": [shape[i] for i in _TO_NCHW]}
        x, y, tag = node.input[0], node.output[0], node.name or node.output[0]
        nodes += [onnx.helper.make_node("Transpose", [x], [f"{tag}/x_nchw"], name=f"{tag}/to_nchw", perm=_TO_NCHW),
                  onnx.helper.make_node("Conv", [f"{tag}/x_nchw", kernel, *node.input[2:]], [f"{tag}/y_nchw"],
                                        name=f"{tag}/nchw"),
                  onnx.helper.make_node("Transpose", [f"{tag}/y_nchw"], [y], name=f"{tag}/to_nhwc", perm=_TO_NHWC)]
        nodes[-2].attribute.extend(node.attribute)   # NhwcConv's attributes are Conv's
        rewritten = True
    if not rewritten:
        return recipe
    read = {x for n in nodes for x in n.input}
    dropped = {name for name in recipe if name not in read}   # the OHWI kernels only the NhwcConvs read
    del graph.node[:]
    graph.node.extend(n for n in nodes if not (n.op_type == "Constant" and n.output[0] in dropped))
    for field in (graph.initializer, graph.value_info):
        kept = [t for t in field if t.name not in dropped]
        del field[:]
        field.extend(kept)
    return {name: entry for name, entry in recipe.items() if name not in dropped}


def unused(fused: Mapping, weights: Mapping) -> list[str]:
    """The switchable weights no input of the fused graph comes from (the fused graph depends on none of them:
    `check` proved the other constants unchanged)."""
    used = {e["weight"] for e in fused.values()}
    return sorted(n for n in weights if n not in used)
