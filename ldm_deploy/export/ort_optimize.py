"""ONNX Runtime CUDA variants: transformer fusions on a component's fp32 graph, then fp16.

Our own pass (attention_fusion.py) first rewrites the U-Net's attention blocks to com.microsoft
MultiHeadAttention (ORT's matcher expects diffusers' traced pattern, not ours); then ONNX Runtime's
transformer optimizer fuses GroupNorm / SkipGroupNorm, BiasSplitGelu, BiasAdd and NHWC convolutions
(U-Net, VAE) and SkipLayerNormalization / QuickGelu (CLIP). The matchers need an fp32 graph before
any fp16 conversion: at export (`ort_cuda: true`) the traced graph, before onnxslim; afterwards
(`add_ort_cuda_variants`) `fp32_file` (fp16 exports with `keep_fp32_unet`) or an fp32 component's
main file. The result is `<component>/model.ort-cuda.onnx`; the manifest records it under
`components[name]["variants"]["ort-cuda"]` with its own inputs/outputs (the fused graph's IO dtypes),
and `OrtCudaRunner(variant="auto")` runs it.

SDXL artifacts get the same variants for both text encoders (model type "clip", as ORT's own SDXL tooling;
the penultimate hidden state and the pooled projection stay outputs, with the plain graph's dims), the U-Net
(CFG folded, `text_embeds` / `time_ids` taking the 2B rows as the plain graph does; `time_ids` float32 with
an fp32 sinusoid path, as `timestep`) and the VAE decoder (fp32, as SDXL's VAE is exported).

A lora_switchable component's variant takes its switchable weights as inputs in the form the fusions put them
in (a Linear's W^T, an NhwcConv kernel OHWI): export/ort_lora.py finds and checks how each derives from its weight,
and the variant's `lora_weights["fused"]` records it for the runtime.

The fused graph uses com.microsoft contrib ops with CUDA kernels only: it is not portable (no CPU,
no TensorRT). The fusion choices follow ONNX Runtime's own SD demo (models/stable_diffusion/
optimize_pipeline.py): NHWC conv, GroupNorm channels-last,
BiasSplitGelu, BiasAdd; fp16 conversion with all IO in fp16 except the U-Net's `timestep` (kept fp32
so fractional timesteps keep their precision). Needs onnx + onnxruntime (no torch).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from ldm_deploy.errors import LdmError
from ldm_deploy.export import ort_lora
from ldm_deploy.export.attention_fusion import fuse_attention
from ldm_deploy.export.cfg_fold import fold_cfg

log = logging.getLogger(__name__)

# one spelling: the runtime reads the variant name without importing this module (which needs onnx)
from ldm_deploy.artifact import ORT_CUDA_VARIANT as VARIANT  # noqa: E402
FILE_NAME = "model.ort-cuda.onnx"
# written by `--ort-cuda`. SDXL's text_encoder_2 only on request (add_ort_cuda_variants(art, ["text_encoder_2"])):
# on an H100 (2026-12-06, twice, tests/runtime/test_ort_cuda_sdxl_gpu.py) its fp32 fused graph differed from the
# plain one (max abs 1.1 on the penultimate hidden state; ORT CPU agrees to 1e-6), so the pipeline runs its plain
# graph. (CUDA-graph capture was refused too: the pooled token's integer ArgMax ran on the CPU; the exporter now
# casts its input to float64, onnx_export.float_argmax.)
DEFAULT_COMPONENTS = ("unet", "text_encoder", "vae_decoder")
# our component name -> ORT optimizer model type (SDXL's CLIPTextModelWithProjection is "clip" too, as in
# ORT's own SDXL tooling)
MODEL_TYPES = {"unet": "unet", "text_encoder": "clip", "text_encoder_2": "clip", "vae_decoder": "vae",
               "vae_encoder": "vae"}
# components whose attention blocks fuse_attention rewrites to MultiHeadAttention
ATTENTION_COMPONENTS = ("unet", "vae_decoder", "vae_encoder")
# ops whose fp16 versions lose too much: kept fp32 inside fp16 graphs
_CLIP_FP32_OPS = ["SkipLayerNormalization", "LayerNormalization"]
FP32_OPS = {"text_encoder": _CLIP_FP32_OPS, "text_encoder_2": _CLIP_FP32_OPS}
# inputs kept fp32 so fractional timesteps (and SDXL's micro-conditioning time_ids, sinusoid-embedded like the
# timestep) keep their precision; names a graph lacks are ignored by the converter
KEEP_FP32_IO = {"unet": ["timestep", "time_ids"]}
# Shapes ONNX Runtime's CUDA kernels accept (onnxruntime/contrib_ops/cuda/diffusion/*.cc, ORT 1.31): a fused
# node outside them fails at run time, so a fusion is declined for the whole graph when any of its nodes
# would be. The sets are SD's sizes; tiny/demo models get the unfused ops instead.
BIAS_SPLIT_GELU_HIDDEN = (2560, 5120, 6144, 10240, 12288)   # GEGLU proj width (2 x ff inner), bias length
BIAS_ADD_CHANNELS = (320, 640, 1280)                          # BiasAdd's last dimension
GROUP_NORM_MAX_CHANNELS_PER_GROUP = 512                       # and channels per group even (2 per thread)
# the FusionOptions switches behind each op (GroupNorm and SkipGroupNorm share a kernel)
_FUSION_SWITCHES = {"BiasSplitGelu": ("enable_bias_splitgelu",), "BiasAdd": ("enable_bias_add",),
                    "GroupNorm": ("enable_group_norm", "enable_skip_group_norm"),
                    "SkipGroupNorm": ("enable_group_norm", "enable_skip_group_norm")}
FUSED_OPS = ("MultiHeadAttention", "Attention", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd",
             "NhwcConv", "SkipLayerNormalization", "LayerNormalization", "FastGelu", "BiasGelu", "Gelu",
             "QuickGelu")


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def fusion_options(component: str, float16: bool, declined=(), *, nhwc_conv: bool = True):
    """ORT FusionOptions for `component`, as ORT's SD demo sets them, less the fused ops in `declined`.
    `nhwc_conv=False` keeps convolutions NCHW (ORT's demo `--disable_nhwc_conv`; GroupNorm stays
    channels-last with transposes around it: its CUDA kernel has no NCHW layout)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(MODEL_TYPES[component])
    if MODEL_TYPES[component] == "unet":
        # as ORT's demo: packed QKV/KV only in fp16 (they apply to attention ORT itself fused; ours
        # stays 3-D q/k/v MultiHeadAttention, which every kernel takes)
        options.enable_packed_kv = float16
        options.enable_packed_qkv = float16
        options.enable_bias_add = True
    options.group_norm_channels_last = True   # GroupNorm in NHWC, matching NhwcConv around it
    if hasattr(options, "enable_nhwc_conv"):   # unet / vae model types only
        options.enable_nhwc_conv = bool(nhwc_conv)
    for op in declined:
        for switch in _FUSION_SWITCHES[op]:
            setattr(options, switch, False)
    return options


def _const_shape(graph: onnx.GraphProto, name: str) -> tuple[int, ...] | None:
    for t in graph.initializer:
        if t.name == name:
            return tuple(t.dims)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return tuple(a.t.dims)
    return None


def unsupported_fusions(model: onnx.ModelProto) -> dict[str, str]:
    """Fused contrib ops of `model` whose sizes ONNX Runtime's CUDA kernels refuse: {op: why}. Sizes come
    from the constant bias / gamma inputs; one that is not constant counts as unsupported (unverifiable).
    MultiHeadAttention (any head size: flash / memory-efficient kernels need head_size % 8 == 0 and
    fall back to the unfused kernel otherwise), NhwcConv (cuDNN), SkipLayerNormalization and QuickGelu
    have no size limit to check."""
    graph = model.graph
    bad: dict[str, set] = {}
    for node in graph.node:
        if node.domain != "com.microsoft" or node.op_type not in _FUSION_SWITCHES:
            continue
        if node.op_type in ("BiasSplitGelu", "BiasAdd"):
            shape = _const_shape(graph, node.input[1])
            size = shape[0] if shape is not None and len(shape) == 1 else None
            allowed = BIAS_SPLIT_GELU_HIDDEN if node.op_type == "BiasSplitGelu" else BIAS_ADD_CHANNELS
            if size not in allowed:
                bad.setdefault(node.op_type, set()).add(f"size {size if size is not None else '?'} "
                                                        f"not in {list(allowed)}")
        else:
            shape = _const_shape(graph, node.input[1])
            groups = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "groups"), None)
            channels = shape[0] if shape is not None and len(shape) == 1 else None
            per_group = channels // groups if channels and groups and channels % groups == 0 else None
            if per_group is None or per_group % 2 or per_group > GROUP_NORM_MAX_CHANNELS_PER_GROUP:
                bad.setdefault(node.op_type, set()).add(
                    f"{channels} channels / {groups} groups (needs an even count <= "
                    f"{GROUP_NORM_MAX_CHANNELS_PER_GROUP} per group)")
    return {op: "; ".join(sorted(why)) for op, why in sorted(bad.items())}


def restore_output_shapes(graph: onnx.GraphProto, declared: dict) -> int:
    """Give the fused graph's outputs the shapes the traced graph declared (`declared`: name -> dims):
    the optimizer's shape inference renames fixed dims it cannot follow (the text encoders' 77 became
    `Addpenultimate_hidden_state_dim_1`), and the CUDA runner sizes its output buffers from the manifest's
    dims. `declared`: name -> [dim, ...] (an int, or a str for a symbolic dim), the plain graph's manifest
    shapes. Element types stay the fused graph's (fp16 outputs).
    Returns how many outputs were rewritten."""
    changed = 0
    for output in graph.output:
        dims = declared.get(output.name)
        shape = output.type.tensor_type.shape
        if dims is None or [d.dim_param or d.dim_value for d in shape.dim] == list(dims):
            continue
        del shape.dim[:]
        for value in dims:
            dim = shape.dim.add()
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = int(value)
        changed += 1
    return changed


def unique_node_names(graph: onnx.GraphProto) -> int:
    """Rename nodes whose name repeats an earlier one (`<name>_<k>`); ONNX Runtime refuses to load a graph
    with two nodes of one name (onnxruntime <= 1.31's float16 converter names every `_cast_to_fp32`
    Cast after its input, once per consumer). Returns how many were renamed."""
    taken = {n.name for n in graph.node if n.name}
    seen: set[str] = set()
    renamed = 0
    for node in graph.node:
        if not node.name:
            continue
        if node.name in seen:
            k = 1
            while f"{node.name}_{k}" in taken:
                k += 1
            node.name = f"{node.name}_{k}"
            taken.add(node.name)
            renamed += 1
        seen.add(node.name)
    return renamed


def repair_converted_graph(graph: onnx.GraphProto) -> dict:
    """After ORT's float16 converter: drop exact duplicate Cast nodes, rename clashing node names, re-sort
    (the converter appends its Casts at the end). Raises LdmError when two different nodes still write
    one tensor (the graph is not SSA and no renaming can fix it)."""
    from ldm_deploy.export.fp16 import drop_duplicate_nodes, topological_sort

    dropped = drop_duplicate_nodes(graph)
    renamed = unique_node_names(graph)
    writers = Counter(o for n in graph.node for o in n.output if o)
    clash = [o for o, k in writers.items() if k > 1]
    if clash:
        raise LdmError(f"the float16 conversion left {len(clash)} tensors written by several nodes "
                       f"(first: {clash[0]!r})", hint="export the component fp32 (--precision fp32) and report this")
    topological_sort(graph)
    return {"duplicate_nodes_dropped": dropped, "nodes_renamed": renamed}


def _ort_classes(module_names, class_name: str, *methods: str) -> list:
    """The distinct classes `class_name` of ORT's transformer modules, which load both top-level (the optimizer
    puts its folder on sys.path) and as `onnxruntime.*`, having `methods`: what a guard below patches."""
    import sys

    import onnxruntime.transformers  # noqa: F401  (puts its folder on sys.path: modules load top-level)
    found = []
    for module_name in module_names:
        try:
            module = sys.modules.get(module_name) or __import__(module_name, fromlist=[class_name])
        except ImportError:  # pragma: no cover - other ORT layouts
            continue
        cls = getattr(module, class_name, None)
        if cls is not None and all(hasattr(cls, m) for m in methods) and cls not in found:
            found.append(cls)
    return found


LEAN_SHAPE_INFERENCE_MIN = 1 << 16   # float initializers of this many elements or more: no data in the copy


def _lean_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """(a copy of `model` whose float initializers of LEAN_SHAPE_INFERENCE_MIN elements or more keep their name,
    type and dims but no data, {name: the original initializer} of those)."""
    lean = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(lean, field, getattr(model, field))
    lean.opset_import.extend(model.opset_import)
    lean.metadata_props.extend(model.metadata_props)
    lean.functions.extend(model.functions)
    src, graph = model.graph, lean.graph
    graph.name, graph.doc_string = src.name, src.doc_string
    for field in ("node", "input", "output", "value_info", "sparse_initializer", "quantization_annotation"):
        getattr(graph, field).extend(getattr(src, field))
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    left_out = {}
    for tensor in src.initializer:
        if tensor.data_type in floats and int(np.prod(tensor.dims)) >= LEAN_SHAPE_INFERENCE_MIN:
            graph.initializer.append(onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims))
            left_out[tensor.name] = tensor
        else:
            graph.initializer.append(tensor)
    return lean, left_out


@contextlib.contextmanager
def _lean_shape_inference():
    """ORT's symbolic shape inference starts by copying the whole model (`SymbolicShapeInference._preprocess`),
    and the optimizer runs it several times (its fusions and its fp16 conversion), holding copies: on an SD 1.5
    U-Net (3.4 GB fp32) the optimizer reached 14.3 GB RSS after and 20.3 GB at its peak, and `export --ort-cuda`
    was OOM-killed on a 24 GiB machine. Within this block the copy leaves the large float weights' data out
    (`_lean_copy`; shapes and types are what inference reads of them), and the one place it reads a value
    (`_get_value`, for the few ops whose output shape depends on an input's values) reads a left-out weight from
    the model it was given: the same inference, without the copies. The fused graph is the same byte for byte
    (tests/export/test_ort_optimize.py)."""
    from onnx import numpy_helper

    classes = [(cls, cls._preprocess, cls._get_value) for cls in _ort_classes(
        ("symbolic_shape_infer", "onnxruntime.tools.symbolic_shape_infer"), "SymbolicShapeInference",
        "_preprocess", "_get_value")]

    def preprocess(original):
        def _preprocess(self, in_mp):
            lean, self._ldm_left_out = _lean_copy(in_mp)
            return original(self, lean)   # (which copies the lean model once more: small)
        return _preprocess

    def get_value(original):
        def _get_value(self, node, idx):
            name = node.input[idx]
            tensor = getattr(self, "_ldm_left_out", {}).get(name)
            if tensor is not None and name not in self.sympy_data_:
                return numpy_helper.to_array(tensor)
            return original(self, node, idx)
        return _get_value

    for cls, pre, get in classes:
        cls._preprocess, cls._get_value = preprocess(pre), get_value(get)
    try:
        yield
    finally:
        for cls, pre, get in classes:
            cls._preprocess, cls._get_value = pre, get


@contextlib.contextmanager
def _quickgelu_guard():
    """ORT's QuickGelu matcher calls `.item()` on the first Mul's constant; a GroupNorm whose zero beta
    was folded away leaves `Mul(x, gamma[C,1,1]) -> Sigmoid -> Mul` (SiLU), and the matcher raises
    instead of declining. Decline such nodes (they are not QuickGelu)."""
    classes = [(cls, cls.fuse) for cls in _ort_classes(
        ("fusion_quickgelu", "onnxruntime.transformers.fusion_quickgelu"), "FusionQuickGelu", "fuse")]

    def guarded(original):
        def fuse(self, node, *args, **kwargs):
            try:
                return original(self, node, *args, **kwargs)
            except ValueError:
                return None
        return fuse

    for cls, original in classes:
        cls.fuse = guarded(original)
    try:
        yield
    finally:
        for cls, original in classes:
            cls.fuse = original


def _add_standard_types(model: onnx.ModelProto) -> int:
    """Element types of the tensors ONNX's own inference derives (standard ops; the contrib ops are skipped), as
    value_info entries where the graph has none: the float16 converter places the Casts around kept-fp32 nodes
    by them when ORT's symbolic shape inference fails. Runs on a copy without the weights' data (the SDXL U-Net
    is over protobuf's 2 GB). Returns how many entries were added."""
    graph = model.graph
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.node.extend(graph.node)
    light.graph.input.extend(graph.input)
    light.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in graph.initializer)
    light.graph.output.extend(graph.output)
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception as e:   # onnx raises its own types; the converter then works as before
        log.info("ort-cuda: ONNX type inference failed (%s); the fp16 conversion goes without it", e)
        return 0
    known = {v.name for v in graph.value_info} | {v.name for v in graph.input} | {v.name for v in graph.output}
    added = 0
    for vi in inferred.graph.value_info:
        if vi.name not in known and vi.type.tensor_type.elem_type:
            graph.value_info.append(onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, None))
            added += 1
    return added


def _fp32_path(model: onnx.ModelProto, inputs: list[str]) -> list[str]:
    """The nodes kept fp32 behind the fp32 inputs (export/fp16.py's island, up to the first linear layer), plus
    the Constant nodes only they read: when ORT's symbolic shape inference fails (it does on some static-shape
    U-Nets) the float16 converter knows no intermediate types and inserts no Cast between an fp16 Constant and
    a kept node, which leaves a Mul with one fp16 and one fp32 input."""
    from ldm_deploy.export.fp16 import fp32_island

    island = fp32_island(model, inputs)
    if not island:
        return island
    _add_standard_types(model)
    kept = set(island)
    readers: dict[str, set] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name)
    for k, node in enumerate(model.graph.node):
        if node.op_type == "Constant" and all(readers.get(o) and readers[o] <= kept for o in node.output):
            if not node.name:
                node.name = f"fp32_island_constant_{k}"
            island.append(node.name)
    return island


def float_constants_as_initializers(graph) -> int:
    """Constant nodes feeding an input that must stay float32 (ORT float16 converter's ALWAYS_FLOAT_INPUTS:
    Resize's scales, GroupNorm's gamma / beta) become initializers. The converter keeps such initializers fp32,
    but turns a Constant node's tensor into fp16 -- which left the VAE decoder's upsampling Resize with fp16
    scales, a graph ONNX Runtime refuses to load (seen on an H100, 2026-12-07). Returns how many moved."""
    from onnx import numpy_helper
    from onnxruntime.transformers.float16 import ALWAYS_FLOAT_INPUTS

    wanted = {n.input[i] for n in graph.node for i in ALWAYS_FLOAT_INPUTS.get(n.op_type, ()) if i < len(n.input)}
    moved = 0
    for node in list(graph.node):
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is None or node.output[0] not in wanted:
            continue
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), node.output[0]))
        graph.node.remove(node)
        moved += 1
    return moved


def _to_float16(m, component: str) -> dict:
    """Convert the optimizer's fused model `m` to fp16 in place (IO too, but KEEP_FP32_IO); returns the repair
    statistics. The sinusoid paths behind timestep / time_ids stay fp32 up to the first linear layer, as in the
    plain fp16 graph (export/fp16.py): SDXL's time_ids reach 1024, where fp16's spacing is 1 rad."""
    from ldm_deploy.export.fp16 import drop_cast_round_trips

    keep_io = [i.name for i in m.model.graph.input if i.name in KEEP_FP32_IO.get(component, ())]
    float_constants_as_initializers(m.model.graph)
    island = _fp32_path(m.model, keep_io)
    m.convert_float_to_float16(keep_io_types=keep_io or False, op_block_list=FP32_OPS.get(component),
                               node_block_list=island or None)
    drop_cast_round_trips(m.model.graph)
    return repair_converted_graph(m.model.graph)


def declared_outputs(path: Path) -> dict:
    """{output name: shape} of the plain graph at `path`, as its manifest entry lists them."""
    from ldm_deploy.export import manifest as mf

    return {o["name"]: o["shape"] for o in mf.graph_io(path)[1]}


def _fuse(src: Path, component: str, *, float16: bool, nhwc_conv: bool, output_shapes: dict | None,
          fold_guidance: bool, weights: Mapping | None = None):
    """One fusion of the graph at `src` (with `weights` as initializers: a lora_switchable graph's, see
    export/ort_lora.py): (optimizer model, op counts before, attention blocks fused, declined fusions, fp16
    repair statistics, whether CFG was folded)."""
    from onnxruntime.transformers.optimizer import optimize_model

    def load():   # the optimizer rewrites its input: a retry reads the file again (no in-memory copy)
        model = onnx.load(str(src), load_external_data=True)
        if weights is not None:   # switchable weights back as initializers (export/ort_lora.py)
            ort_lora.weights_as_initializers(model, weights)
        counts = op_counts(model)
        # our attention traces to a pattern ORT's U-Net matcher does not know: fuse it ourselves first
        return model, counts, fuse_attention(model) if component in ATTENTION_COMPONENTS else 0

    model, before, attention = load()
    declined: dict[str, str] = {}
    while True:   # fuse; when a fused op has sizes the CUDA kernels refuse, fuse again without it
        with _quickgelu_guard(), _lean_shape_inference():
            m = optimize_model(model, model_type=MODEL_TYPES[component], num_heads=0, hidden_size=0,
                               opt_level=0, use_gpu=True,
                               optimization_options=fusion_options(component, float16, declined,
                                                                   nhwc_conv=nhwc_conv))
        refused = {op: why for op, why in unsupported_fusions(m.model).items() if op not in declined}
        if not refused:
            break
        for op, why in refused.items():
            log.info("ort-cuda %s: %s fusion declined: %s", component, op, why)
        declined.update(refused)
        del m
        model, before, attention = load()
    with _lean_shape_inference():
        repaired = _to_float16(m, component) if float16 else {}
    restore_output_shapes(m.model.graph, output_shapes or {})
    folded = component == "unet" and fold_guidance
    if folded:
        fold_cfg(m.model)
    return m, before, attention, declined, repaired, folded


def optimize_for_ort_cuda(src: str | Path, dst: str | Path, component: str, *, float16: bool = True,
                          fold_guidance: bool = True, nhwc_conv: bool = True, vae_layout: bool = True,
                          output_shapes: dict | None = None, switchable: Mapping | None = None) -> dict:
    """Fuse `src` (an fp32 ONNX graph) for the CUDA execution provider and write it to `dst`
    (+ `dst.data` when the weights pass protobuf's 2 GB limit). For the U-Net, `fold_guidance` also folds
    classifier-free guidance into the graph (ldm_deploy/export/cfg_fold.py): B latents in, guided out.
    `nhwc_conv=False` leaves the convolutions NCHW (the benchmark's layout lever, written into the benchmark's
    own folder by ldm_deploy/bench/prepare.py; slower on tensor cores). `output_shapes` (name -> [dim, ...],
    the plain graph's manifest shapes) replaces the output dims the optimizer's shape inference renamed.
    `vae_layout` (VAE components with NHWC convolutions): keep the fused graph's residual stream in NHWC and its
    adds in SkipGroupNorms (export/ort_nhwc_residual.py); False is the benchmark's before-and-after check.
    `switchable` (weight name -> base values, float32): `src` is a lora_switchable graph taking those weights as
    inputs; the fused graph takes the fused forms of them as inputs (export/ort_lora.py), recorded in the returned
    statistics' `lora_fused` ({input: {weight, perm, shape, dtype}}), `lora_unused` and `lora_nchw_convs`.

    Returns statistics: node counts before/after, fused-op counts, seconds taken, the data file.

    What the optimizer held goes back to the system before this returns: its objects refer to each other, so their
    graphs outlive the call until a garbage collection, and freed protobuf memory stays in the heap until
    `malloc_trim`. Measured on the SDXL U-Net (2-core machine, 24 GiB; 16.4 GB peak): 16.0 GB resident after the
    call, 8.7 GB after `gc.collect()`, 0.3 GB after `trim_heap()` too. Left there, it OOM-killed the export's next
    step (the ORT CPU check of the fp16 graph).
    """
    import gc

    from ldm_deploy.export.onnx_io import trim_heap

    try:
        return _optimize_for_ort_cuda(Path(src), Path(dst), component, float16=float16, fold_guidance=fold_guidance,
                                      nhwc_conv=nhwc_conv, vae_layout=vae_layout, output_shapes=output_shapes,
                                      switchable=switchable)
    finally:
        gc.collect()
        trim_heap()


def _vae_layout(model: onnx.ModelProto) -> dict:
    """The NHWC residual passes on a fused VAE graph with NHWC convolutions (export/ort_nhwc_residual.py)."""
    if not op_counts(model).get("NhwcConv"):
        return {}
    from ldm_deploy.export.ort_nhwc_residual import vae_passes

    return {"vae_layout": vae_passes(model)}


def _optimize_for_ort_cuda(src: Path, dst: Path, component: str, *, float16: bool, fold_guidance: bool,
                           nhwc_conv: bool, vae_layout: bool, output_shapes: dict | None,
                           switchable: Mapping | None) -> dict:
    try:
        from onnxruntime.transformers.optimizer import optimize_model  # noqa: F401  (_fuse uses it)
    except ImportError as e:  # pragma: no cover - onnxruntime always ships it
        raise LdmError(f"onnxruntime's transformer optimizer is unavailable: {e}",
                       hint="pip install 'onnxruntime>=1.18'") from None
    if component not in MODEL_TYPES:
        raise LdmError(f"no ORT CUDA optimisation for component {component!r}",
                       hint=f"choose from {', '.join(MODEL_TYPES)}")
    t0 = time.perf_counter()

    def fuse(weights=None):
        return _fuse(src, component, float16=float16, nhwc_conv=nhwc_conv,
                     output_shapes=output_shapes, fold_guidance=fold_guidance, weights=weights)

    lora = {}
    try:
        if switchable:
            # a first build with random weights tells which fused constants are (permuted) weights and proves
            # that no other constant depends on them (export/ort_lora.py)
            probe = ort_lora.probe_weights(switchable)
            recipe, reference = ort_lora.derive(fuse(probe)[0].model, probe)
            del probe
        m, before, attention, declined, repaired, folded = fuse(switchable)
        if switchable:
            ort_lora.check(m.model, recipe, reference, switchable, component)
            nhwc = op_counts(m.model).get("NhwcConv", 0)
            fused = ort_lora.expose(m.model, recipe)
            lora = {"lora_fused": fused, "lora_unused": ort_lora.unused(fused, switchable),
                    # NhwcConvs with a switchable kernel, rewritten as NCHW Convs (ORT's CUDA EP needs a constant)
                    "lora_nchw_convs": nhwc - op_counts(m.model).get("NhwcConv", 0)}
    except LdmError:
        raise
    except Exception as e:  # the optimizer raises assorted exception types from its matchers
        raise LdmError(f"ONNX Runtime's transformer optimizer failed on the {component} graph {src}: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       hint="export without --ort-cuda (the plain graph runs on ort-cuda too) and report this"
                       ) from None
    domains = {n.domain for n in m.model.graph.node if n.domain not in ("", "ai.onnx")}
    declared = {o.domain for o in m.model.opset_import}
    for domain in sorted(domains - declared):   # ORT's fusions may leave the contrib domain undeclared
        m.model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    layout = _vae_layout(m.model) if vae_layout and component.startswith("vae") else {}
    after = op_counts(m.model)
    from ldm_deploy.export.onnx_io import write_model

    data = write_model(m.model, dst)
    stats = {
        "component": component,
        "precision": "fp16" if float16 else "fp32",
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "fused_ops": {op: n for op, n in sorted(after.items()) if op in FUSED_OPS},
        "seconds": round(time.perf_counter() - t0, 2),
        "external_data": data is not None,
        "attention_fused": attention,
        "declined_fusions": declined,
        "cfg_folded": folded,
        "nhwc_conv": bool(after.get("NhwcConv")),
        **repaired,
        **lora,
        **layout,
    }
    log.info("ort-cuda variant of %s (%s): %d -> %d nodes, fused %s%s", component, stats["precision"],
             stats["nodes_before"], stats["nodes_after"], stats["fused_ops"],
             f"; {lora['lora_nchw_convs']} switchable NhwcConv kernels run as NCHW Convs"
             if lora.get("lora_nchw_convs") else "")
    return stats


def variant_entry(root: Path, path: Path, stats: dict, lora_weights: dict | None = None) -> dict:
    """The manifest's `variants[name]` entry for the fused graph at `path` (relative to `root`). For a switchable
    component (`lora_weights`: its manifest entry's) the fused graph's weight inputs leave `inputs` and go to
    the variant's `lora_weights`: the component's, plus `fused` (how each input derives from a weight)."""
    from ldm_deploy.export import manifest as mf
    from ldm_deploy.export import onnx_io

    ins, outs = mf.graph_io(path)
    data = onnx_io.data_file(path)
    fused = stats.get("lora_fused")
    if fused is not None and not lora_weights:
        raise LdmError(f"the fused graph {path} takes switchable weights but its component has no lora_weights",
                       hint="re-export the artifact")
    lora = {}
    if fused is not None:
        ins = [i for i in ins if i["name"] not in fused]
        lora = {"lora_weights": {**lora_weights, "fused": fused,
                                 **({"fused_unused": stats["lora_unused"]} if stats.get("lora_unused") else {})}}
    return {**lora, "file": path.relative_to(root).as_posix(),
            "external_data": data.relative_to(root).as_posix() if data.exists() else None,
            "precision": stats["precision"], "inputs": ins, "outputs": outs,
            "fused_ops": stats["fused_ops"], "declined_fusions": stats.get("declined_fusions", {}),
            "cfg_folded": bool(stats.get("cfg_folded")), "nhwc_conv": bool(stats.get("nhwc_conv")),
            "nodes_before": stats["nodes_before"],
            "nodes_after": stats["nodes_after"], "seconds": stats["seconds"]}


def fp32_source(root: Path, spec) -> Path | None:
    """The component's fp32 graph (`spec`: its artifact.ComponentSpec): `fp32_file` when the export kept one,
    else the main file if fp32."""
    from ldm_deploy.artifact import named_path   # paths read from the manifest stay inside the artifact

    if spec.fp32_file:
        return named_path(root, spec.fp32_file, regular_file=True)
    if spec.precision == "fp32":
        return named_path(root, spec.file, regular_file=True)
    return None


def _base_weights(artifact, name: str) -> dict | None:
    """A switchable component's base weights in float32 (lora_base.safetensors), None for a plain component."""
    from ldm_deploy.runtime.lora_switch import load_base

    base = load_base(artifact, artifact.component(name))
    return {n: w.astype(np.float32) for n, w in base.items()} or None


def add_ort_cuda_variants(artifact_dir, components=DEFAULT_COMPONENTS, *, float16: bool | None = None,
                          fold_guidance: bool = True) -> dict:
    """Write `<component>/model.ort-cuda.onnx` for each of `components` the artifact has an fp32 graph of
    and record it in the manifest (entry + file hashes, rewritten atomically). Returns per-component stats.
    This is the export product `export --ort-cuda` makes (the fused graph `OrtCudaRunner(variant="auto")`
    runs), for an artifact exported without it; the benchmark's lever graphs never go into an artifact
    (ldm_deploy/bench/prepare.py writes them into the benchmark's own folder).

    `float16=None` keeps each component's exported precision (the VAE stays fp32 unless exported fp16);
    True/False forces it. Components without an fp32 graph are skipped with a log line. `fold_guidance`:
    the U-Net variant takes B latents and the guidance scale and returns the guided prediction (cfg_fold.py).
    A lora_switchable component's variant takes its weights as inputs (export/ort_lora.py), fused from the base
    values in lora_base.safetensors.
    """
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.export.manifest import editable_manifest, write_manifest
    from ldm_deploy.fileio import sha256_file

    artifact = Artifact.open(artifact_dir, verify=True)    # never rewrite hashes over a tampered folder
    root = Path(artifact.path)
    manifest = editable_manifest(artifact)   # edited and written back below
    results = {}
    for name in components:
        entry = manifest["components"].get(name)
        if entry is None:
            log.info("ort-cuda: %s has no %s component; skipped", root, name)
            continue
        src = fp32_source(root, artifact.component(name))
        if src is None:
            log.info("ort-cuda: %s %s is %s without a kept fp32 graph (the fusions need one); skipped -- "
                     "re-export with `ort_cuda: true` (or `keep_fp32_unet: true` for the U-Net)",
                     root, name, entry.get("precision"))
            continue
        half = entry.get("precision") == "fp16" if float16 is None else bool(float16)
        dst = root / name / FILE_NAME
        old = entry.get("variants", {}).get(VARIANT)
        if old:   # forget the previous variant's files before they are overwritten
            for rel in filter(None, (old.get("file"), old.get("external_data"))):
                manifest["files"].pop(rel, None)
        switchable = _base_weights(artifact, name)
        stats = optimize_for_ort_cuda(src, dst, name, float16=half, fold_guidance=fold_guidance,
                                      output_shapes={o["name"]: o["shape"] for o in entry.get("outputs", ())},
                                      switchable=switchable)
        made = variant_entry(root, dst, stats, entry.get("lora_weights"))
        entry.setdefault("variants", {})[VARIANT] = made
        for rel in filter(None, (made["file"], made["external_data"])):
            manifest["files"][rel] = sha256_file(root / rel)
        results[name] = stats
    if results:
        write_manifest(root, manifest)
    return results


__all__ = ["add_ort_cuda_variants", "optimize_for_ort_cuda", "variant_entry", "fp32_source", "VARIANT",
           "FILE_NAME", "DEFAULT_COMPONENTS", "unsupported_fusions", "unique_node_names", "repair_converted_graph",
           "restore_output_shapes"]
