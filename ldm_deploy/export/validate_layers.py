"""`validate --layers`: the per-layer view of an artifact's graphs, compared by Polygraphy.

The reference is the component's fp32 graph on ONNX Runtime CPU: the artifact's own graph when it is
fp32, its `fp32_file` (keep_fp32_unet), or else the component exported in fp32 from the model folder
into a temporary folder (the same exporter and config, so node and tensor names match). The test side
is the artifact's graph on the validated backend: ONNX Runtime (CPU or CUDA) or, for `tensorrt`,
Polygraphy's TensorRT runner over an engine it builds from the marked graph (needs a GPU TensorRT
supports). Inputs: validate's random inputs at the profile's opt shapes.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ldm_deploy.artifact import Artifact
from ldm_deploy.export.config import ExportConfig
from ldm_deploy.export.layers import LayerReport, compare_layers, trt_runner
from ldm_deploy.feeds import example_feeds

TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2}    # validate's, per tensor instead of per output


def validate_layers(model_dir, artifact_dir, backend: str = "ort-cpu", *, components=None, seed: int = 0
                    ) -> dict[str, LayerReport]:
    from ldm_deploy.export.exporter import export_model

    artifact = Artifact.open(artifact_dir)
    config = ExportConfig.from_dict(artifact.export_config, where="manifest export_config")
    vocab = int((artifact.model_configs.get("text_encoder") or {}).get("vocab_size", 1000))
    reports = {}
    with tempfile.TemporaryDirectory(prefix="ldm-validate-layers-") as tmp:
        for name in components or artifact.components:
            spec = artifact.component(name)
            graph = artifact.file(name)
            fp32_file = spec.fp32_file
            if spec.precision == "fp32":
                reference = graph
            elif fp32_file:
                reference = artifact.path / fp32_file
            else:
                fp32 = config.replace(precision="fp32", vae_precision="fp32", components=(name,), ort_cuda=False,
                                      keep_fp32_unet=False, measure_runtime=False, fp16_keep_nodes={})
                reference = export_model(model_dir, Path(tmp) / name, fp32).artifact.file(name)
            feeds = [example_feeds(spec, seed=seed, vocab_size=vocab, float_dtype=np.float32)]
            kwargs = {"providers": ("cuda", "cpu") if backend == "ort-cuda" else ("cpu",)}
            if backend == "tensorrt":   # pragma: no cover - needs a GPU TensorRT supports
                kwargs["test_runner"] = lambda path, label: trt_runner(path, label, fp16=spec.precision == "fp16")
            reports[name] = compare_layers(reference, graph, feeds, tolerance=TOLERANCES[spec.precision],
                                           descriptions=[f"random inputs at the opt shapes, seed {seed}"],
                                           labels=("fp32-ort-cpu", f"{spec.precision}-{backend}"), **kwargs)
    return reports


def layers_text(reports: dict[str, LayerReport], limit: int = 10) -> str:
    lines = []
    for name, r in reports.items():
        first = r.first_failure()
        lines.append(f"{name}: {r.reference} vs {r.test}, {len(r.layers)} tensors, tolerance {r.tolerance:g}; "
                     "first node over tolerance: " + ("none" if first is None else
                     f"#{first.order} {first.node} ({first.op}), max rel {first.max_rel:.2e}"))
        over = r.overflows(1.0)
        if over:
            lines.append("  fp16 overflows: " + ", ".join(f"{s.node} ({s.op}, max |fp32| {s.ref_max:.3g})" for s in over))
        lines.append(r.table(limit))
    return "\n".join(lines)
