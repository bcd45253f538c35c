"""Trace each component to ONNX: the graph wrappers, their IO contracts and shape profiles.

One `GraphSpec` per component fixes the input/output names, dtypes and symbolic shapes (every
dynamic axis has its own name), the min/opt/max shapes for each input and example inputs. The
exporter is TorchScript-based by default (see docs/export.md for the measurements behind that).

    text_encoder  input_ids int32 (B, 77)                       -> last_hidden_state (B, 77, D)
    unet          sample (2B, C, h, w), timestep f32 (2B,),
                  encoder_hidden_states (2B, 77, D)             -> noise_pred (2B, C, h, w)
    vae_decoder   latent (B, 4, h, w)  [already / scaling]       -> image (B, 3, 8h, 8w)
    vae_encoder   image (B, 3, H, W)   in [-1, 1]                -> mean, logvar (B, 4, H/8, W/8)

SDXL (export/sdxl.py): penultimate hidden states from both text encoders (+ text_embeds from
text_encoder_2), and a U-Net that also takes text_embeds (2B, 1280) and time_ids (2B, 6 | 5).
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm_deploy.errors import LdmError
from ldm_deploy.export import lora as lora_export
from ldm_deploy.export.config import ExportConfig
from ldm_deploy.export.source import Source, math_attention
from ldm_deploy.feeds import example_feeds

log = logging.getLogger(__name__)

TEXT_LENGTH = 77


# --- the modules that get traced ----------------------------------------------------------------
class TextEncoderGraph(torch.nn.Module):
    def __init__(self, text_encoder, pooled: bool):
        super().__init__()
        self.text_encoder, self.pooled = text_encoder, pooled

    def forward(self, input_ids):                                       # (B, 77) int32
        out = self.text_encoder(input_ids=input_ids.long(), return_dict=True)
        if self.pooled:
            return out.last_hidden_state, out.pooler_output
        return out.last_hidden_state                                    # (B, 77, D)


class UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):         # (2B, C, h, w), (2B,), (2B, 77, D)
        return self.unet(sample, timestep, encoder_hidden_states)


class VaeDecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):                                          # (B, 4, h, w)
        return self.vae.decode(latent)                                  # (B, 3, 8h, 8w)


class VaeEncoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):                                           # (B, 3, H, W)
        return self.vae.encode_moments(image)                           # mean, logvar (B, 4, H/8, W/8)


# --- IO contracts ----------------------------------------------------------------------------------
@dataclass
class IOSpec:
    name: str
    dtype: str                      # numpy dtype name in the fp32 graph ("float32", "int32")
    shape: list                     # ints and axis names
    shapes: dict = field(default_factory=dict)   # min/opt/max concrete shapes (inputs only)


@dataclass
class GraphSpec:
    component: str
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    batch_multiplier: int = 1
    vocab_size: int = 1000          # input_ids are drawn below it
    weight_inputs: dict = field(default_factory=dict)   # lora_switchable: input name -> base tensor (export/lora.py)

    @property
    def axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx dynamic_axes: name -> {axis index: axis name} for the symbolic axes."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in self.inputs + self.outputs}

    def profile(self) -> dict:
        return {t.name: dict(t.shapes) for t in self.inputs}


def graph_spec(component: str, source: Source, config: ExportConfig) -> GraphSpec:
    """The IO contract of `component` under `config`'s profiles (static axes are ints)."""
    b, hp, wp = config.batch, config.height, config.width
    f = source.vae_scale_factor
    for what, r in (("height", hp), ("width", wp)):
        bad = [v for v in (r.min, r.opt, r.max) if v % f]
        if bad:
            raise LdmError(f"profile {what} values {bad} are not multiples of the VAE scale factor {f}",
                           hint="fix profiles in the export config")
    static = config.static_size
    lh, lw = ("latent_height", "latent_width") if not static else (hp.opt // f, wp.opt // f)
    ih, iw = ("image_height", "image_width") if not static else (hp.opt, wp.opt)

    def sizes(mult, scale):        # min/opt/max (batch, h, w) in the given space
        return {k: (getattr(b, k) * mult, getattr(hp, k) // scale, getattr(wp, k) // scale)
                for k in ("min", "opt", "max")}

    c = source.latent_channels
    sdxl = source.sdxl
    if component in ("text_encoder", "text_encoder_2") and sdxl:
        from ldm_deploy.export import sdxl as xl

        shapes = {k: (n, TEXT_LENGTH) for k, (n, _, _) in sizes(1, 1).items()}
        vocab = int(source.configs[component].get("vocab_size", 49408))
        return GraphSpec(component, [IOSpec("input_ids", "int32", ["batch", TEXT_LENGTH], shapes)],
                         xl.text_encoder_outputs(component, source), vocab_size=vocab)
    if component == "text_encoder":
        d = int(source.configs["text_encoder"]["hidden_size"])
        shapes = {k: (n, TEXT_LENGTH) for k, (n, _, _) in sizes(1, 1).items()}
        outs = [IOSpec("last_hidden_state", "float32", ["batch", TEXT_LENGTH, d])]
        if config.pooled_output:
            outs.append(IOSpec("pooler_output", "float32", ["batch", d]))
        vocab = int(source.configs["text_encoder"].get("vocab_size", 49408))
        return GraphSpec(component, [IOSpec("input_ids", "int32", ["batch", TEXT_LENGTH], shapes)], outs,
                         vocab_size=vocab)
    if component == "unet":
        d = int(source.configs["unet"]["cross_attention_dim"])
        s = sizes(2, f)
        c_out = int(source.configs["unet"].get("out_channels", c))
        extra = []
        if sdxl:
            from ldm_deploy.export import sdxl as xl

            extra = xl.unet_extra_inputs(source, {k: n for k, (n, _, _) in s.items()})
        return GraphSpec(component, [
            IOSpec("sample", "float32", ["unet_batch", c, lh, lw], {k: (n, c, h, w) for k, (n, h, w) in s.items()}),
            IOSpec("timestep", "float32", ["unet_batch"], {k: (n,) for k, (n, _, _) in s.items()}),
            IOSpec("encoder_hidden_states", "float32", ["unet_batch", TEXT_LENGTH, d],
                   {k: (n, TEXT_LENGTH, d) for k, (n, _, _) in s.items()}),
            *extra,
        ], [IOSpec("noise_pred", "float32", ["unet_batch", c_out, lh, lw])], batch_multiplier=2)
    vae_c = int(source.configs["vae"].get("latent_channels", 4))
    if component == "vae_decoder":
        s = sizes(1, f)
        return GraphSpec(component, [
            IOSpec("latent", "float32", ["batch", vae_c, lh, lw], {k: (n, vae_c, h, w) for k, (n, h, w) in s.items()}),
        ], [IOSpec("image", "float32", ["batch", 3, ih, iw])])
    if component == "vae_encoder":
        s = sizes(1, 1)
        return GraphSpec(component, [
            IOSpec("image", "float32", ["batch", 3, ih, iw], {k: (n, 3, h, w) for k, (n, h, w) in s.items()}),
        ], [IOSpec("mean", "float32", ["batch", vae_c, lh, lw]), IOSpec("logvar", "float32", ["batch", vae_c, lh, lw])])
    raise LdmError(f"unknown component {component!r}")


def graph_module(component: str, source: Source, config: ExportConfig) -> torch.nn.Module:
    if source.sdxl and component in ("text_encoder", "text_encoder_2", "unet"):
        from ldm_deploy.export import sdxl as xl

        return xl.graph_module(component, source)
    if component == "text_encoder":
        return TextEncoderGraph(source.text_encoder, config.pooled_output).eval()
    if component == "unet":
        return UNetGraph(source.unet).eval()
    if component == "vae_decoder":
        return VaeDecoderGraph(source.vae).eval()
    return VaeEncoderGraph(source.vae).eval()


# --- the export ------------------------------------------------------------------------------------
def export_onnx(component: str, source: Source, config: ExportConfig, path: Path) -> tuple[GraphSpec, float]:
    """Trace `component` in fp32 to `path` (weights may land in files beside it). Returns (spec, seconds)."""
    spec = graph_spec(component, source, config)
    module = graph_module(component, source, config)
    # dynamo specialises an axis traced at size 1, so it traces at the max shapes
    feeds = example_feeds(spec, which="max" if config.exporter == "dynamo" else "opt", vocab_size=spec.vocab_size)
    example = tuple(torch.from_numpy(a) for a in feeds.values())
    names_in = [t.name for t in spec.inputs]
    names_out = [t.name for t in spec.outputs]
    if config.lora_switchable and component in lora_export.SWITCHABLE:   # weights as graph inputs
        weights = lora_export.switchable_weights(module, config.lora_switchable)
        module = lora_export.WeightsAsInputs(module, list(weights))
        spec.weight_inputs = {lora_export.input_name(n): w for n, w in weights.items()}
        example += tuple(spec.weight_inputs.values())
        names_in += list(spec.weight_inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with getattr(module, "detached", contextlib.nullcontext)(), math_attention(source.text_module(component)), torch.no_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")          # tracer warnings about Python-side shape arithmetic
        if config.exporter == "torchscript":
            torch.onnx.export(module, example, str(path), input_names=names_in, output_names=names_out,
                              dynamic_axes=spec.axes, opset_version=config.opset, do_constant_folding=True,
                              dynamo=False)
        else:
            dims = {}
            dynamic_shapes = {}
            for t, arg in zip(spec.inputs, _forward_arg_names(module)):
                dynamic_shapes[arg] = {i: dims.setdefault(d, _dim(d, t, i)) for i, d in enumerate(t.shape)
                                       if isinstance(d, str)}
            program = torch.onnx.export(module, example, input_names=names_in, output_names=names_out,
                                        dynamic_shapes=dynamic_shapes, opset_version=config.opset, dynamo=True,
                                        external_data=True, verbose=False)
            program.save(str(path), external_data=True)
    seconds = time.perf_counter() - start
    _name_axes(path, spec)
    if component.startswith("text_encoder"):
        float_argmax(path, spec.vocab_size)
    log.info("exported %s with the %s exporter in %.1f s", component, config.exporter, seconds)
    return spec, seconds


def _forward_arg_names(module) -> list[str]:
    import inspect

    return list(inspect.signature(module.forward).parameters)


def _dim(name: str, t: IOSpec, axis: int):
    lo, hi = t.shapes["min"][axis], t.shapes["max"][axis]
    return torch.export.Dim(name, min=max(lo, 1), max=max(hi, 2))


INTEGER_TYPES = (2, 3, 4, 5, 6, 7, 12, 13)          # onnx.TensorProto uint8 .. int64
FLOAT_EXACT_INTEGERS = 2 ** 53                        # float64 holds every integer up to this exactly


def float_argmax(path: Path, vocab_size: int) -> int:
    """Feed each ArgMax / ArgMin over an integer tensor through a Cast to float64; returns how many.

    transformers picks the pooled token with `input_ids.to(torch.int).argmax(-1)` (or the argmax of an
    `== eos` mask), and ONNX Runtime's CUDA provider has ArgMax kernels for floating types only: the node ran
    on the CPU, and a text encoder with a pooled output (SDXL's text_encoder_2) could not be captured as a CUDA
    graph ("not all nodes partitioned to the CUDAExecutionProvider", H100, 2026-12-06). Token ids (< vocab
    size) and 0/1 masks are integers float64 holds exactly, so the index is the same; float64 rather than
    float32 because the fp16 converters rewrite every float32 Cast to float16, which would round ids above
    2048.

    Ties: ONNX's ArgMax picks the first maximal index (transformers' `argmax` too; an `== eos` mask, or ids padded
    with the end-of-text id, the maximum, tie), but which index a CUDA kernel returns on a tie is not specified
    (cuDNN's reduction). Where the reduced axis is the last and of static length n, the node therefore reduces the
    key `x * n + r` with r = n-1 .. 0 (0 .. n-1 for ArgMin; reversed with select_last_index): the order of x with
    ties broken towards the first index, unique, so every kernel returns the same index. Integers up to
    2^53 / n stay exact in float64."""
    import onnx

    if vocab_size > FLOAT_EXACT_INTEGERS:
        return 0
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    argmax = [n for n in graph.node if n.op_type in ("ArgMax", "ArgMin")]
    if not argmax:                  # SD 1.x/2.x text encoders (no pooled output): nothing to infer or write
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]       # the tracer's value_info has unnamed dims ("unk__0"); data_prop: the
    # sequence length through the Shape -> Gather -> Reshape of `input_ids.view(-1, input_shape[-1])`
    inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True).graph.value_info
    values = {v.name: v for v in [*graph.input, *inferred]}
    types = {name: v.type.tensor_type.elem_type for name, v in values.items()}
    types.update({o: a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"
                  for o in n.output})
    nodes, done = [], 0
    for node in graph.node:
        if node.op_type in ("ArgMax", "ArgMin") and types.get(node.input[0]) in INTEGER_TYPES:
            cast = f"{node.name or node.output[0]}/float_input"
            nodes.append(onnx.helper.make_node("Cast", [node.input[0]], [cast], name=cast,
                                               to=onnx.TensorProto.DOUBLE))
            dims = values[node.input[0]].type.tensor_type.shape.dim if node.input[0] in values else []
            node.input[0] = _first_index_key(graph, nodes, node, cast, dims, vocab_size)
            done += 1
        nodes.append(node)
    if done:
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.save(model, str(path))
        log.info("%s: %d integer ArgMax/ArgMin fed through a float64 Cast (CUDA kernels)", path.name, done)
    return done


def _first_index_key(graph, nodes: list, node, x: str, dims, vocab_size: int) -> str:
    """`x * n + r` (float64) for an ArgMax / ArgMin over the last axis of static length n (float_argmax); `x`
    itself where the axis is another or its length is not known."""
    import numpy as np
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis, rank = int(attrs.get("axis", 0)), len(dims)
    n = dims[-1].dim_value if rank and dims[-1].HasField("dim_value") else 0
    if not rank or axis not in (-1, rank - 1) or n < 2 or vocab_size * n > FLOAT_EXACT_INTEGERS:
        return x
    ramp = np.arange(n, dtype=np.float64)       # ArgMin: the smallest key at the first index of the minimum
    if (node.op_type == "ArgMax") != bool(attrs.get("select_last_index", 0)):
        ramp = ramp[::-1].copy()                 # ArgMax: the largest key at the first index of the maximum
    base = f"{node.name or node.output[0]}/first_index"
    graph.initializer.extend([numpy_helper.from_array(np.array(float(n)), f"{base}/n"),
                              numpy_helper.from_array(ramp, f"{base}/ramp")])
    nodes.append(helper.make_node("Mul", [x, f"{base}/n"], [f"{base}/scaled"], name=f"{base}/scaled"))
    nodes.append(helper.make_node("Add", [f"{base}/scaled", f"{base}/ramp"], [f"{base}/key"], name=f"{base}/key"))
    return f"{base}/key"


def _name_axes(path: Path, spec: GraphSpec) -> None:
    """Give every dynamic axis of the graph's inputs and outputs the name the spec says (both exporters)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    by_name = {t.name: t for t in spec.inputs + spec.outputs}
    changed = False
    for value in list(model.graph.input) + list(model.graph.output):
        t = by_name.get(value.name)
        if t is None:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(t.shape):
            raise LdmError(f"exported {spec.component} {value.name} has rank {len(dims)}, expected {len(t.shape)}")
        for d, want in zip(dims, t.shape):
            if isinstance(want, str) and d.dim_param != want:
                d.dim_param = want
                changed = True
    if changed:
        onnx.save(model, str(path))
