"""ONNX Runtime CUDA graphs: transformer fusions on the fp32 graph, then fp16.

ONNX Runtime's transformer optimizer fuses attention (MultiHeadAttention with packed QKV / KV),
GroupNorm / SkipGroupNorm, BiasSplitGelu, BiasAdd and NHWC convolutions for the SD U-Net, VAE and CLIP.
Its pattern matchers need the fp32 graph as exported from PyTorch (before any fp16 conversion), so
the exporter keeps `model_fp32.onnx` and this module writes a `model.ort-cuda.onnx` next to it.

The result uses contrib ops with CUDA kernels only: it is not portable (no CPU, no TensorRT).
Needs onnx + onnxruntime (no torch).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import onnx

from ldm_deploy.errors import LdmError

log = logging.getLogger(__name__)

# our component name -> ORT optimizer model type
MODEL_TYPES = {"unet": "unet", "text_encoder": "clip", "vae_decoder": "vae", "vae_encoder": "vae"}
# ops whose fp16 versions lose too much: kept fp32 inside fp16 graphs (ORT's own SD demo does this for CLIP)
FP32_OPS = {"text_encoder": ["SkipLayerNormalization", "LayerNormalization"]}
# inputs kept fp32 so fractional timesteps keep their precision
KEEP_FP32_IO = {"unet": ["timestep"]}


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def optimize_for_ort_cuda(src: str | Path, dst: str | Path, component: str, *, float16: bool = True) -> dict:
    """Fuse `src` (an fp32 ONNX graph) for the CUDA execution provider and write it to `dst`.

    Returns statistics: node counts before/after, fused-op counts, seconds taken.
    """
    try:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as e:  # pragma: no cover - onnxruntime always ships it
        raise LdmError(f"onnxruntime's transformer optimizer is unavailable: {e}",
                       hint="pip install 'onnxruntime>=1.18'") from None
    if component not in MODEL_TYPES:
        raise LdmError(f"no ORT CUDA optimisation for component {component!r}",
                       hint=f"choose from {', '.join(MODEL_TYPES)}")
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    before = op_counts(onnx.load(str(src), load_external_data=False))

    model_type = MODEL_TYPES[component]
    options = FusionOptions(model_type)
    if model_type == "unet" and not float16:
        # no fp32 fused-attention kernel for packed layouts
        options.enable_packed_kv = False
        options.enable_packed_qkv = False
    m = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                       optimization_options=options, use_gpu=True)
    if float16:
        m.convert_float_to_float16(keep_io_types=KEEP_FP32_IO.get(component, False),
                                   op_block_list=FP32_OPS.get(component))
    after = op_counts(m.model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    large = m.model.ByteSize() >= onnx.checker.MAXIMUM_PROTOBUF
    m.save_model_to_file(str(tmp), use_external_data_format=large, all_tensors_to_one_file=True)
    if large:
        # external data was written as <tmp>.data; give it its final name and point the graph at it
        model = onnx.load(str(tmp), load_external_data=True)
        tmp.unlink()
        for p in tmp.parent.glob(f"{tmp.name}*"):
            p.unlink()
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{dst.name}.data")
    tmp.replace(dst)
    fused = {op: n for op, n in after.items()
             if op in ("MultiHeadAttention", "Attention", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu",
                       "BiasAdd", "NhwcConv", "SkipLayerNormalization", "LayerNormalization", "FastGelu",
                       "BiasGelu", "QuickGelu")}
    stats = {
        "component": component,
        "float16": float16,
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "fused_ops": fused,
        "seconds": round(time.perf_counter() - t0, 2),
        "external_data": large,
    }
    log.info("ort-cuda optimise %s: %d -> %d nodes, fused %s", component, stats["nodes_before"],
             stats["nodes_after"], fused)
    return stats
