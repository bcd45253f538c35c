"""Adapt a foreign ONNX Stable Diffusion graph to our artifact contract by adding nodes around it.

Nothing inside the graph changes and nothing is re-traced: inputs and outputs are renamed, and where a
contract differs a few nodes are added at the graph's edge (all named `ldm_import/...`):

    text_encoder  input_ids int64 [b, seq]  <- Cast from our int32 [batch, 77]
                  outputs other than last_hidden_state / pooler_output (hidden_states.N) dropped
    unet          timestep scalar / [1]     <- Gather / Slice of row 0 of our float32 [unet_batch]
                  timestep int64 / float16  <- (Round +) Cast from float32
                  out_sample                -> noise_pred (rename)
    vae_decoder   latent_sample -> latent, sample -> image (renames)
    vae_encoder   sample -> image; latent_parameters [B, 2C, h, w] -> Split -> mean, and
                  Clip(-30, 20) -> logvar (diffusers' DiagonalGaussianDistribution clamps logvar so)

A scalar-timestep U-Net gives every row the same timestep (diffusers broadcasts it); our pipeline always
passes one timestep for all rows, so this loses nothing it uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ldm_deploy.errors import LdmError

TEXT_LENGTH = 77
PREFIX = "ldm_import/"


@dataclass
class Adapted:
    model: onnx.ModelProto
    added: list[str] = field(default_factory=list)     # one line per change, recorded in the manifest


# --- small graph edits ----------------------------------------------------------------------------------
def _names(graph: onnx.GraphProto) -> set[str]:
    out = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    out |= {i.name for i in graph.initializer}
    for n in graph.node:
        out |= set(n.input) | set(n.output)
    return out


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename value `old` to `new` everywhere in `graph` and its subgraphs."""
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        if v.name == old:
            v.name = new
    for n in graph.node:
        n.input[:] = [new if x == old else x for x in n.input]
        n.output[:] = [new if x == old else x for x in n.output]
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _rename(g, old, new)


def _free(graph: onnx.GraphProto, name: str) -> None:
    """Make `name` available: an inner value of that name (not a graph input/output) is renamed aside."""
    if name not in _names(graph):
        return
    if _io(graph.input, name) is not None or _io(graph.output, name) is not None:
        raise LdmError(f"the graph already has an input or output named {name}")
    _rename(graph, name, PREFIX + "inner/" + name)


def _rename_io(graph: onnx.GraphProto, old: str, new: str, adapted: Adapted) -> None:
    if old == new:
        return
    _free(graph, new)
    _rename(graph, old, new)
    adapted.added.append(f"rename {old} -> {new}")


def _io(values, name: str):
    for v in values:
        if v.name == name:
            return v
    return None


def _set_shape(value: onnx.ValueInfoProto, shape: list) -> None:
    """Declare `shape` (ints static, strings named axes); a static axis of the graph stays static."""
    dims = value.type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise LdmError(f"{value.name} has rank {len(dims)}, expected {len(shape)}")
    for d, want in zip(dims, shape):
        if d.HasField("dim_value") and d.dim_value > 0:
            continue
        if isinstance(want, int):
            d.dim_value = want
        else:
            d.dim_param = want


def _elem(value: onnx.ValueInfoProto) -> int:
    return value.type.tensor_type.elem_type


def _rank(value: onnx.ValueInfoProto) -> int:
    return len(value.type.tensor_type.shape.dim)


def _feed(graph: onnx.GraphProto, name: str, elem: int, shape: list, make_nodes, adapted: Adapted, what: str) -> None:
    """Replace graph input `name` by a new input `name` (elem, shape) feeding `make_nodes(new, internal)`."""
    internal = PREFIX + name
    old = _io(graph.input, name)
    position = list(graph.input).index(old)
    _rename(graph, name, internal)              # the graph now reads `internal`
    graph.input.remove(old)
    nodes = make_nodes(name, internal)
    graph.input.insert(position, helper.make_tensor_value_info(name, elem, shape))
    for n in reversed(nodes):
        graph.node.insert(0, n)
    adapted.added.append(what)


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, PREFIX + name))
    return PREFIX + name


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


# --- per component ------------------------------------------------------------------------------------
def adapt(component: str, model: onnx.ModelProto) -> Adapted:
    """The graph of `component` meeting our contract (docs/DESIGN.md "The artifact")."""
    if _opset(model) < 13:
        raise LdmError(f"the {component} graph uses opset {_opset(model)}; import needs opset >= 13",
                       hint="re-export the folder with a newer opset (optimum-cli export onnx --opset 17)")
    return {"text_encoder": _text_encoder, "unet": _unet, "vae_decoder": _vae_decoder,
            "vae_encoder": _vae_encoder}[component](model)


def _need(graph, values, name: str, component: str, side: str):
    v = _io(values, name)
    if v is None:
        have = ", ".join(x.name for x in values)
        raise LdmError(f"the {component} graph has no {side} named {name} (it has: {have})",
                       hint="import expects Optimum's or diffusers' OnnxStableDiffusionPipeline graphs")
    return v


def _text_encoder(model: onnx.ModelProto) -> Adapted:
    a, g = Adapted(model), model.graph
    ids = _need(g, g.input, "input_ids", "text_encoder", "input")
    if _elem(ids) != TensorProto.INT32:
        to = _elem(ids)
        _feed(g, "input_ids", TensorProto.INT32, ["batch", TEXT_LENGTH],
              lambda new, internal: [helper.make_node("Cast", [new], [internal], name=PREFIX + "cast_input_ids", to=to)],
              a, f"input_ids int32 -> Cast to {TensorProto.DataType.Name(to).lower()}")
    else:
        _set_shape(ids, ["batch", TEXT_LENGTH])
    hidden = _need(g, g.output, "last_hidden_state", "text_encoder", "output")
    _set_shape(hidden, ["batch", TEXT_LENGTH, hidden.type.tensor_type.shape.dim[2].dim_value or "hidden"])
    pooled = _io(g.output, "pooler_output")
    if pooled is not None and _rank(pooled) == 2:
        _set_shape(pooled, ["batch", pooled.type.tensor_type.shape.dim[1].dim_value or "hidden"])
    for out in [o for o in g.output if o.name not in ("last_hidden_state", "pooler_output")]:
        g.output.remove(out)
        a.added.append(f"drop output {out.name}")
    return a


def _unet(model: onnx.ModelProto) -> Adapted:
    a, g = Adapted(model), model.graph
    sample = _need(g, g.input, "sample", "unet", "input")
    ehs = _need(g, g.input, "encoder_hidden_states", "unet", "input")
    t = _need(g, g.input, "timestep", "unet", "input")
    extra = [v.name for v in g.input if v.name not in ("sample", "timestep", "encoder_hidden_states")
             and v.name not in {i.name for i in g.initializer}]
    if extra:
        raise LdmError(f"the unet graph takes {', '.join(extra)} besides sample/timestep/encoder_hidden_states "
                       "(SDXL / LCM-style conditioning), which ldm-deploy's pipeline does not feed",
                       hint="import supports SD 1.x / 2.x text-to-image folders")
    _set_shape(sample, ["unet_batch", sample.type.tensor_type.shape.dim[1].dim_value or "channels",
                        "latent_height", "latent_width"])
    _set_shape(ehs, ["unet_batch", TEXT_LENGTH, ehs.type.tensor_type.shape.dim[2].dim_value or "hidden"])
    rank, elem = _rank(t), _elem(t)
    static_one = rank == 1 and t.type.tensor_type.shape.dim[0].dim_value == 1
    if rank > 1:
        raise LdmError(f"the unet timestep input has rank {rank}; import handles a scalar, [1] or [batch]")
    if rank == 1 and not static_one and elem == TensorProto.FLOAT:
        _set_shape(t, ["unet_batch"])
    else:
        def nodes(new, internal):
            out, cur = [], new
            if rank == 0 or static_one:
                idx = _const(g, "timestep_row0", np.array(0 if rank == 0 else [0], np.int64))
                out.append(helper.make_node("Gather", [cur, idx], [PREFIX + "timestep_row0_value"],
                                            name=PREFIX + "timestep_row0", axis=0))
                cur = PREFIX + "timestep_row0_value"
            if elem in (TensorProto.INT64, TensorProto.INT32):
                out.append(helper.make_node("Round", [cur], [PREFIX + "timestep_round"], name=PREFIX + "timestep_round"))
                cur = PREFIX + "timestep_round"
            if elem != TensorProto.FLOAT:
                out.append(helper.make_node("Cast", [cur], [internal], name=PREFIX + "timestep_cast", to=elem))
            else:
                out.append(helper.make_node("Identity", [cur], [internal], name=PREFIX + "timestep_identity"))
            return out
        shape = "scalar" if rank == 0 else "[1]" if static_one else "[unet_batch]"
        _feed(g, "timestep", TensorProto.FLOAT, ["unet_batch"], nodes, a,
              f"timestep float32 [unet_batch] -> {shape} {TensorProto.DataType.Name(elem).lower()}")
    out_name = "out_sample" if _io(g.output, "out_sample") is not None else None
    if out_name is None:
        raise LdmError(f"the unet graph has no output out_sample (it has: {', '.join(o.name for o in g.output)})")
    _rename_io(g, out_name, "noise_pred", a)
    _set_shape(_io(g.output, "noise_pred"), ["unet_batch", sample.type.tensor_type.shape.dim[1].dim_value or "channels",
                                             "latent_height", "latent_width"])
    return a


def _vae_decoder(model: onnx.ModelProto) -> Adapted:
    a, g = Adapted(model), model.graph
    z = _need(g, g.input, "latent_sample", "vae_decoder", "input")
    out = g.output[0]
    _rename_io(g, "latent_sample", "latent", a)
    _rename_io(g, out.name, "image", a)
    _set_shape(z, ["batch", z.type.tensor_type.shape.dim[1].dim_value or "channels", "latent_height", "latent_width"])
    _set_shape(_io(g.output, "image"), ["batch", 3, "image_height", "image_width"])
    return a


def _vae_encoder(model: onnx.ModelProto) -> Adapted:
    a, g = Adapted(model), model.graph
    x = _need(g, g.input, "sample", "vae_encoder", "input")
    params = _io(g.output, "latent_parameters")
    if params is None:
        raise LdmError("the vae_encoder graph returns a sampled latent "
                       f"({', '.join(o.name for o in g.output)}), not the distribution's parameters; "
                       "img2img needs mean and logvar", hint="import without it: --components text_encoder,unet,vae_decoder")
    if _elem(params) != TensorProto.FLOAT:
        raise LdmError("the vae_encoder graph returns float16 moments; import needs an fp32 VAE encoder",
                       hint="import without it: --components text_encoder,unet,vae_decoder")
    _rename_io(g, "sample", "image", a)
    _set_shape(x, ["batch", 3, "image_height", "image_width"])
    channels = params.type.tensor_type.shape.dim[1].dim_value
    if not channels or channels % 2:
        raise LdmError(f"vae_encoder latent_parameters has {channels or 'a dynamic number of'} channels; "
                       "expected 2 x latent channels")
    c = channels // 2
    _free(g, "mean")
    _free(g, "logvar")
    split = _const(g, "moments_split", np.array([c, c], np.int64))
    lo, hi = _const(g, "logvar_min", np.array(-30.0, np.float32)), _const(g, "logvar_max", np.array(20.0, np.float32))
    g.node.extend([
        helper.make_node("Split", ["latent_parameters", split], ["mean", PREFIX + "logvar_raw"],
                         name=PREFIX + "split_moments", axis=1),
        helper.make_node("Clip", [PREFIX + "logvar_raw", lo, hi], ["logvar"], name=PREFIX + "clamp_logvar"),
    ])
    g.output.remove(params)
    shape = ["batch", c, "latent_height", "latent_width"]
    g.output.extend([helper.make_tensor_value_info("mean", TensorProto.FLOAT, shape),
                     helper.make_tensor_value_info("logvar", TensorProto.FLOAT, shape)])
    a.added.append("latent_parameters -> Split -> mean, logvar (Clip -30..20)")
    return a
