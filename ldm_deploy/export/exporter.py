"""`export_model`: a diffusers-format model folder -> a self-contained, verified artifact folder.

Per component: trace fp32 -> clean up (onnxslim) -> [convert to fp16] -> check by path -> run once on
ORT CPU (finite outputs, latency). The folder is built beside `out` and renamed into place; when an
artifact made from the same source files with the same config is already there, nothing is redone.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ldm_deploy.artifact import ARTIFACT_OUTPUT, Artifact, is_artifact
from ldm_deploy.errors import LdmError
from ldm_deploy.export import manifest as mf
from ldm_deploy.export import lora as lora_export
from ldm_deploy.export import onnx_io, ort_optimize
from ldm_deploy.export.config import ExportConfig, default_config, write_config
from ldm_deploy.export.fp16 import FP32_INPUTS, convert_to_fp16   # FP32_INPUTS: timestep, time_ids
from ldm_deploy.export.onnx_export import export_onnx
from ldm_deploy.export.optimize import cleanup, node_count, time_ort
from ldm_deploy.export.source import PARTS, folder_sha256, load_source
from ldm_deploy.feeds import example_feeds
from ldm_deploy.fileio import atomic_dir, check_free_space, check_out_dir, write_json
from ldm_deploy.interop.layout import refuse_onnx_folder
from ldm_deploy.lora import LoraSpec

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    path: Path
    cached: bool            # True when an up-to-date artifact was already there
    artifact: Artifact
    seconds: float


def export_model(model_dir, out, config: ExportConfig | None = None, *, force: bool = False,
                 loras: Sequence = ()) -> ExportResult:
    """Export `config.components` of the model folder `model_dir` into the artifact folder `out`.

    `config` None: `default_config(model_dir)`, a static profile at the model's native size.
    `loras`: `ldm_deploy.lora.LoraSpec`s (or "FILE[:SCALE]" strings) merged into the weights (export/lora.py).
    `force`: re-export even when `out` is up to date, and replace an `out` that is not an artifact."""
    start = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    if not model_dir.is_dir():
        raise LdmError(f"model folder {model_dir} does not exist")
    refuse_onnx_folder(model_dir, "a diffusers PyTorch model folder")
    if config is None:
        config = default_config(model_dir)
    from ldm_deploy.export.sdxl import resolve_config

    config = resolve_config(config, model_dir)      # SDXL: both text encoders by default, fp32 VAE
    loras = [s if isinstance(s, LoraSpec) else LoraSpec.parse(s) for s in loras]
    inputs = [model_dir, *(spec.path for spec in loras)]   # never replace a folder holding an input
    check_out_dir(out, ARTIFACT_OUTPUT, inputs=inputs, force=force)
    missing = sorted({PARTS[c] for c in config.components} - {p.name for p in model_dir.iterdir()})
    if missing:
        raise LdmError(f"{model_dir} lacks {', '.join(missing)}/ needed for {', '.join(config.components)}",
                       hint="pass --components to export only what the folder has")
    source_sha = folder_sha256(model_dir)
    lora_key = lora_export.cache_key(loras)
    if not force and is_artifact(out):
        cached = _cached(out, source_sha, config)
        if cached is not None and lora_export.cache_key_of({"loras": cached.loras}) != lora_key:
            cached = None
        if cached is not None:
            log.info("export (cached): %s matches %s with this config", out, model_dir)
            return ExportResult(out, True, cached, time.perf_counter() - start)
    check_free_space(out.parent if out.parent.exists() else Path.cwd(), _estimate_bytes(model_dir, config),
                     "the ONNX export")
    source = load_source(model_dir, config.components, lazy=not loras)   # LoRA merges need every module up front
    lora_records = lora_export.merge(source, loras) if loras else []   # before tracing; fails before any write
    with atomic_dir(out, ARTIFACT_OUTPUT, inputs=inputs, force=force) as tmp:
        extra = None   # tokenizers first: a folder the runtime cannot read fails fast
        if source.sdxl:   # tokenizer_2 (pads with "!"); the refiner's only tokenizer is also the manifest's `tokenizer`
            from ldm_deploy.export.sdxl import manifest_block

            tok2 = mf.copy_tokenizer(source.tokenizer_2_dir, tmp / "tokenizer_2") if source.tokenizer_2_dir else None
            extra = {"sdxl": manifest_block(source, config, tok2)}
        tokenizer = (mf.copy_tokenizer(source.tokenizer_dir, tmp / "tokenizer") if source.tokenizer_dir is not None
                     else extra["sdxl"]["tokenizer_2"])
        work = tmp / ".work"
        components = _export_components(source, config, tmp, work)
        shutil.rmtree(work)
        write_json(tmp / "scheduler" / "scheduler_config.json", source.scheduler_config)
        write_config(config, tmp / "export_config.yaml")
        manifest = mf.build_manifest(tmp, source=source, config=config, components=components, tokenizer=tokenizer,
                                     extra=extra)
        if lora_records:
            manifest["loras"] = lora_records
        mf.write_manifest(tmp, manifest)
    artifact = Artifact.open(out, verify=False)
    seconds = time.perf_counter() - start
    log.info("exported %s -> %s in %.1f s", model_dir, out, seconds)
    return ExportResult(out, False, artifact, seconds)


def _export_components(source, config: ExportConfig, root: Path, work: Path) -> dict:
    """Each component in turn, its torch module loaded just before (unless a LoRA merge loaded every module
    up front) and dropped once traced when no later component needs it."""
    components = {}
    for i, c in enumerate(config.components):
        source.load(PARTS[c])
        log.debug("%s: %s loaded", c, PARTS[c])
        last_use = PARTS[c] not in {PARTS[later] for later in config.components[i + 1:]}
        components[c] = _export_component(c, source, config, root, work, release=last_use)
    return components


def _export_component(component: str, source, config: ExportConfig, root: Path, work: Path, *,
                      release: bool = False) -> dict:
    """`release`: drop the component's torch module once traced (no later component uses it)."""
    precision = config.component_precision(component)
    raw = work / component / "raw.onnx"
    spec, export_s = _trace(component, source, config, raw, release)
    final = root / component / "model.onnx"
    keep_fp32 = component == "unet" and precision == "fp16" and config.keep_fp32_unet
    fp32 = final if precision == "fp32" else (root / "unet" / "model_fp32.onnx" if keep_fp32
                                              else work / component / "fp32.onnx")
    if config.optimize:
        clean = cleanup(raw, fp32)
    else:
        onnx_io.copy_model(raw, fp32)
        clean = {"tool": None, "applied": False, "nodes_before": node_count(raw), "nodes_after": node_count(fp32)}
    log.debug("%s: fp32 graph written (%s)", component, "cleaned up" if clean["applied"] else "not cleaned up")
    if precision == "fp16":
        keep_nodes = tuple(config.fp16_keep_nodes.get(component, ()))
        if config.optimize and not clean["applied"]:
            # onnxslim cannot serialize an fp32 graph over 2 GB (the SD 1.5 U-Net is 3.4 GB); its fp16
            # conversion is half that size, so slim the fp16 graph instead
            fp16_raw = work / component / "fp16_raw.onnx"
            convert_to_fp16(fp32, fp16_raw, keep_ops=config.fp16_keep_ops, fp32_inputs=FP32_INPUTS,
                            keep_nodes=keep_nodes)
            clean["fp16"] = cleanup(fp16_raw, final)
        else:
            convert_to_fp16(fp32, final, keep_ops=config.fp16_keep_ops, fp32_inputs=FP32_INPUTS,
                            keep_nodes=keep_nodes)
    onnx_io.trim_heap()
    onnx_io.check_model(final)
    log.debug("%s: checked by the ONNX checker", component)
    dst = root / component / ort_optimize.FILE_NAME
    fused = (_ort_cuda_variant(component, spec, config, raw, final, dst)
             if config.ort_cuda and component in ort_optimize.DEFAULT_COMPONENTS else None)

    stats: dict = {"exporter": config.exporter, "opset": config.opset, "export_seconds": round(export_s, 2),
                   "cleanup": clean}
    _run_on_ort(component, precision, spec, config, (raw, fp32, final), stats)
    shutil.rmtree(work / component, ignore_errors=True)
    onnx_io.trim_heap()     # what onnxslim and ORT freed goes back to the system before the next component

    ins, outs = mf.graph_io(final)
    lora_weights = None
    if spec.weight_inputs:
        ins, lora_weights = lora_export.split_weight_inputs(ins, spec.weight_inputs, root, component,
                                                            config.lora_switchable)
    variants = {}
    if fused is not None:
        variants[ort_optimize.VARIANT] = ort_optimize.variant_entry(root, dst, fused, lora_weights)
    if fused is not None and component == "unet" and config.ort_cuda_device_loop:
        from ldm_deploy.artifact import ORT_CUDA_LOOP_VARIANT
        from ldm_deploy.export.step_graph import write_loop_variant

        variants[ORT_CUDA_LOOP_VARIANT] = write_loop_variant(root, dst, fused)
    data = onnx_io.data_file(final)
    entry = {
        "file": final.relative_to(root).as_posix(),
        "external_data": data.relative_to(root).as_posix() if data.exists() else None,
        "precision": precision,
        "inputs": ins, "outputs": outs,
        "batch_multiplier": spec.batch_multiplier,
        "profile": {name: {k: list(v) for k, v in shapes.items()} for name, shapes in spec.profile().items()},
        "export": stats,
    }
    if variants:
        entry["variants"] = variants
    if lora_weights:
        entry["lora_weights"] = lora_weights
    if keep_fp32:
        entry["fp32_file"] = fp32.relative_to(root).as_posix()
    log.info("%s: %s, %d -> %d nodes", component, precision, clean["nodes_before"], clean["nodes_after"])
    return entry


def _ort_cuda_variant(component: str, spec, config: ExportConfig, raw: Path, final: Path, dst: Path) -> dict:
    """The ORT CUDA fused graph at `dst` (its statistics), fused from the traced fp32 graph `raw`, before onnxslim:
    ORT's matchers expect the exporter's patterns. lora_switchable: with the weights' fused forms as inputs
    (export/ort_lora.py), built from the base values as lora_base.safetensors stores them (the final graph's
    dtype: an fp16 export's rounded to fp16), so with no LoRA the runtime feeds the variant's constants bit for bit."""
    dtypes = {i["name"]: i["dtype"] for i in mf.graph_io(final)[0]}
    weights = {n: w.numpy().astype(dtypes.get(n, "float32"), copy=False).astype(np.float32, copy=False)
               for n, w in spec.weight_inputs.items()} or None   # fp32: the traced tensors themselves, no copy
    return ort_optimize.optimize_for_ort_cuda(raw, dst, component,
                                              float16=config.component_precision(component) == "fp16",
                                              fold_guidance=config.ort_cuda_fold_cfg,
                                              output_shapes=ort_optimize.declared_outputs(final), switchable=weights)


def _trace(component: str, source, config: ExportConfig, raw: Path, release: bool):
    """export_onnx; `release`: drop the torch module once traced (the rest works on the ONNX files)."""
    module = getattr(source, PARTS[component])
    if release and sum(p.numel() * p.element_size() for p in module.parameters()) >= onnx_io.PROTO_LIMIT:
        raw.parent.mkdir(parents=True, exist_ok=True)   # over 2 GB: trace from file-backed weights (Source.spill)
        log.debug("%s: weights moved to a file (%d bytes)", component,
                  source.spill(PARTS[component], raw.with_name("weights.pt")))
    del module
    spec, export_s = export_onnx(component, source, config, raw)
    if release:     # the fp32 SDXL U-Net module alone is 10.3 GB
        source.release(PARTS[component])
        raw.with_name("weights.pt").unlink(missing_ok=True)
        log.debug("%s: %s released", component, PARTS[component])
    return spec, export_s


def _run_on_ort(component: str, precision: str, spec, config: ExportConfig, paths: tuple, stats: dict) -> None:
    """Run the final graph once on ORT CPU (outputs must be finite); with measure_runtime, time every stage.
    A graph over 2 GB runs unoptimized and without arena (time_ort's low_memory), noted in `stats`."""
    raw, fp32, final = paths
    inputs = example_feeds(spec, vocab_size=spec.vocab_size)
    inputs.update({n: w.numpy() for n, w in spec.weight_inputs.items()})   # lora_switchable: the base weights
    if config.measure_runtime:
        stats["ort_cpu_ms"] = {"traced": round(time_ort(raw, inputs, low_memory=onnx_io.is_big(raw))[0], 3)}
        if fp32 != final:
            stats["ort_cpu_ms"]["fp32"] = round(time_ort(fp32, inputs, low_memory=onnx_io.is_big(fp32))[0], 3)
    big = onnx_io.is_big(final)
    log.debug("%s: running it on ONNX Runtime CPU%s", component, " (unoptimized: over 2 GB)" if big else "")
    # the check alone runs on every core (the SDXL U-Net's fp16 graph at 1024 px: 224 s on one core of two)
    ms, outputs = time_ort(final, inputs, runs=3 if config.measure_runtime else 0, low_memory=big,
                           threads=1 if config.measure_runtime else 0)
    if big:
        stats["ort_cpu_check"] = "graph optimizations off, no memory arena (graph over 2 GB)"
    if config.measure_runtime:
        stats["ort_cpu_ms"]["final"] = round(ms, 3)
    bad = {k: int(np.size(v) - np.count_nonzero(np.isfinite(v))) for k, v in outputs.items()}
    if any(bad.values()):
        raise LdmError(f"{precision} {component} gives non-finite outputs on random inputs ({bad})",
                       hint="export this component in fp32 (e.g. `vae_precision: fp32`, or --precision fp32)")


def _cached(out: Path, source_sha: str, config: ExportConfig) -> Artifact | None:
    try:
        artifact = Artifact.open(out, verify=True)
    except LdmError as e:
        log.info("re-exporting: the artifact at %s is not usable (%s)", out, e)
        return None
    return artifact if mf.matches(artifact, source_sha, config) else None


def _estimate_bytes(model_dir: Path, config: ExportConfig) -> int:
    """Rough disk need: the weights once in fp32 (final) plus once more while converting."""
    weights = sum(p.stat().st_size for p in model_dir.rglob("*.safetensors"))
    return int(weights * (3 if config.precision == "fp16" else 2)) + (64 << 20)
