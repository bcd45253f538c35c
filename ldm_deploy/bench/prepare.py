"""What a benchmark runs on: random-weight model folders, the export, the lever ladder's U-Net graphs.

    folder, seconds = random_model_folder("sd15", Path("/tmp/sd15/model"))
    export = export_for_bench(folder, Path("/tmp/sd15/onnx-fp16"), "sd15", precision="fp16", ort_cuda=True)
    add_lever_variants(Path("/tmp/sd15/onnx-fp16"), Path("/tmp/sd15/levers"))   # the bench's folder, not the artifact

Architectures: `demo` is the shapes demo model (training/configs/shapes.yaml: the tiny preset with that
file's sizes, 128x128), `sd15` the full-size SD 1.5 preset, `tiny` the CI preset (64x64). Random
weights are seeded; the text encoder gets the bundled CLIP vocabulary (49408 tokens) so any prompt
tokenizes (an embedding lookup costs no FLOPs, so timings do not depend on it). Imports torch (training).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ldm_deploy.errors import LdmError, UsageError

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tests" / "data" / "clip_tokenizer"
KINDS = ("demo", "sd15", "tiny")
log = logging.getLogger(__name__)


def model_dicts(kind: str) -> dict:
    """unet / vae / text_encoder / scheduler config dicts of a benchmark architecture."""
    if kind == "demo":
        from training.config import load_config
        from training.stages.architecture import model_dicts as merged

        cfg = load_config(ROOT / "training" / "configs" / "shapes.yaml")
        dicts = merged(cfg)
        size = cfg.data.resolution                                        # 128 px -> 16x16 latents
        # as training/stages/unet.py builds it: cross-attention over the text encoder's width
        dicts["unet"] = {**dicts["unet"], "sample_size": size // 8,
                         "cross_attention_dim": dicts["text_encoder"]["hidden_size"]}
        dicts["vae"] = {**dicts["vae"], "sample_size": size}
    elif kind in ("sd15", "tiny"):
        from training.models.presets import preset

        dicts = preset(kind)
    else:
        raise UsageError(f"unknown benchmark model {kind!r}; choose one of {', '.join(KINDS)}")
    dicts["text_encoder"] = {**dicts["text_encoder"], "vocab_size": 49408}
    return dicts


def random_model_folder(kind: str, folder: Path, seed: int = 0, *,
                        norm_bias_std: float = 0.0) -> tuple[Path, float | None]:
    """A diffusers folder with seeded random weights (reused when `folder` already holds one).

    `norm_bias_std` > 0 draws the U-Net's and VAE's norm biases from N(0, std) instead of zeros, as a trained
    model has them: a zero bias lets the exporter's cleanup drop the Add that ONNX Runtime's GroupNorm
    fusion matches."""
    from training.checkpoint import Components, save_components
    from training.models.presets import build_models

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder, None
    start = time.perf_counter()
    dicts = model_dicts(kind)
    unet, vae, text_encoder = build_models(dicts, seed=seed)
    if norm_bias_std:
        import torch

        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for model in (unet, vae):
                for name, param in model.named_parameters():
                    if "norm" in name and name.endswith("bias"):
                        param.copy_(norm_bias_std * torch.randn(param.shape, generator=g))
    save_components(Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer_dir=TOKENIZER,
                               scheduler_config=dicts["scheduler"]), folder)
    return folder, round(time.perf_counter() - start, 2)


def default_size(model_dir: str | Path) -> int:
    import json

    config = json.loads((Path(model_dir) / "unet" / "config.json").read_text(encoding="utf-8"))
    return int(config.get("sample_size", 64)) * 8


def export_for_bench(model_dir, out, config: str | None = None, *, batch_max: int = 1, height: int | None = None,
                     width: int | None = None, precision: str | None = None, vae_precision: str | None = None,
                     ort_cuda: bool = False, keep_fp32_unet: bool = False, optimize: bool | None = None) -> dict:
    """Export `model_dir` to `out` (skipped when up to date) and return what it took.

    Without `config`: a static-size export at (height, width) (default: the U-Net's sample_size * 8),
    batch 1..batch_max, fp32 unless `precision` says otherwise.
    """
    from ldm_deploy.export.config import ExportConfig, Range, load_config
    from ldm_deploy.export.exporter import export_model

    if model_dir is None:
        raise UsageError("exporting for the benchmark needs the model folder", hint="pass --artifact or a model folder")
    if config:
        cfg = load_config(config)
    else:
        size_h = height or default_size(model_dir)
        size_w = width or size_h
        cfg = ExportConfig(name="bench", batch=Range(1, 1, max(1, batch_max)), height=Range(size_h, size_h, size_h),
                           width=Range(size_w, size_w, size_w), measure_runtime=False)
    changes = {"precision": precision} if precision else {}
    if vae_precision:
        changes["vae_precision"] = vae_precision
    if keep_fp32_unet:   # the lever variants start from it
        changes["keep_fp32_unet"] = True
    if optimize is not None:   # False: model_fp32.onnx is the traced graph, whose patterns ORT's fusions match
        changes["optimize"] = bool(optimize)
    if ort_cuda:
        if "ort_cuda" not in {f for f in cfg.__dataclass_fields__}:
            raise LdmError("this ldm-deploy's export config has no ort_cuda option")
        changes["ort_cuda"] = True
    cfg = cfg.replace(**changes)
    if cfg.batch.max < batch_max:
        cfg = cfg.replace(batch=Range(cfg.batch.min, cfg.batch.opt, batch_max))
    start = time.perf_counter()
    result = export_model(model_dir, out, cfg, force=False)
    return {"artifact": str(out), "config": cfg.to_dict(), "cached": bool(result.cached),
            "seconds": None if result.cached else round(result.seconds, 1),
            "wall_s": round(time.perf_counter() - start, 1),
            "components": {name: dict(c.export) or None for name, c in result.artifact.components.items()}}


# The U-Net graphs the lever sides (ldm_deploy.bench.spec.LEVERS, their "graph" knob) run, beyond the artifact's
# plain graph and its "ort-cuda" variant. They are the benchmark's, not the artifact's: add_lever_variants writes
# them into the benchmark's own folder (BenchSpec.levers_dir) with a registry, LEVERS_FILE; the user's artifact
# is only read.
LEVER_VARIANTS = ("lever-fp32", "lever-fused-nchw", "lever-fused")
LEVERS_FILE = "levers.json"


def read_levers(work) -> dict:
    """The lever registry of a benchmark folder: {"artifact", "manifest_sha256", "graphs": {name: entry}}
    ({} when there is none)."""
    import json

    path = Path(work) / LEVERS_FILE
    if not path.is_file():
        return {}
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LdmError(f"{path} is not valid JSON: {e}", hint=f"delete {Path(work)} and run `bench --levers` again")
    return registry if isinstance(registry, dict) else {}


def lever_graph(work, name: str) -> tuple[str, Path, dict]:
    """(name, graph path, entry) of the lever graph `name` in the benchmark folder `work`, for
    `SessionFromArtifact(graph=...)`. Entries marked `in_artifact` name a file of the artifact itself."""
    from ldm_deploy.paths import inside_file

    registry = read_levers(work) if work else {}
    entry = (registry.get("graphs") or {}).get(name)
    if entry is None:
        raise LdmError(f"no lever graph {name!r} in {work or '(no levers folder)'}",
                       hint="`ldm-deploy bench ARTIFACT --levers` prepares them")
    root = Path(registry["artifact"]) if entry.get("in_artifact") else Path(work)
    return name, inside_file(root, entry["file"], named_in=Path(work) / LEVERS_FILE), entry


def add_lever_variants(artifact, work) -> dict:
    """Write the U-Net graphs the lever ladder needs into `work`, the benchmark's own folder, for `artifact` (an
    fp16 export that kept its fp32 U-Net): `lever-fp32` (the artifact's kept fp32 graph itself, no new file),
    `lever-fused-nchw` (ORT fusions, NCHW convolutions, CFG not folded) and `lever-fused` (fusions with NHWC
    convolutions, CFG not folded). The artifact is only read: the ladder's last rung is its own "ort-cuda"
    variant (`export --ort-cuda`). Graphs already in `work` for this artifact are kept; a registry made for
    another artifact (or an older manifest) is started over. Returns what was done, with seconds per graph."""
    from ldm_deploy.artifact import ORT_CUDA_VARIANT, Artifact
    from ldm_deploy.export.manifest import graph_io
    from ldm_deploy.export.onnx_io import data_file
    from ldm_deploy.export.ort_optimize import fp32_source, optimize_for_ort_cuda, variant_entry
    from ldm_deploy.fileio import sha256_file, write_json

    root, work = Path(artifact).resolve(), Path(work).resolve()
    if work == root or root in work.parents:
        raise UsageError(f"the lever graphs go to the benchmark's own folder, not into the artifact ({work})",
                         hint="pass a folder outside the artifact")
    unet = Artifact.open(root, verify=False).component("unet")
    if unet.precision != "fp16":   # refused before anything is written
        raise LdmError(f"the U-Net of {root} is {unet.precision}; the lever ladder's fp16 row runs the "
                       "exported graph, so it needs an fp16 export",
                       hint="export with `precision: fp16` and `keep_fp32_unet: true` (export_configs/sd15.yaml)")
    src = fp32_source(root, unet)
    if src is None:
        raise LdmError(f"{root} keeps no fp32 U-Net graph, which the lever variants start from",
                       hint="export with `keep_fp32_unet: true` (export_configs/sd15.yaml has it)")
    checked = Artifact.open(root, verify=True)   # the lever graphs start from its files: check them before using them
    identity = {"artifact": str(root), "manifest_sha256": checked.manifest_sha256}
    registry = read_levers(work)
    if {k: registry.get(k) for k in identity} != identity:
        registry = {**identity, "graphs": {}}
    graphs = registry["graphs"]
    full = unet.variants.get(ORT_CUDA_VARIANT)
    done: dict = {"ort-cuda": {"in_artifact": full is not None}}
    if full is None:
        log.warning("%s has no ort-cuda U-Net variant: the ladder's last rung (ort-cuda) runs the plain graph; "
                    "export with `ort_cuda: true` for the fused, CFG-folded one", root)
    if "lever-fp32" not in graphs:
        ins, outs = graph_io(src)
        data = data_file(src)
        graphs["lever-fp32"] = {
            "file": src.relative_to(root).as_posix(), "in_artifact": True,
            "external_data": data.relative_to(root).as_posix() if data.exists() else None, "precision": "fp32",
            "inputs": ins, "outputs": outs, "fused_ops": {}, "cfg_folded": False, "nhwc_conv": False}
        write_json(work / LEVERS_FILE, registry)
        done["lever-fp32"] = {"file": graphs["lever-fp32"]["file"]}
    for name, nhwc in (("lever-fused-nchw", False), ("lever-fused", True)):
        if name not in graphs:
            start = time.perf_counter()
            dst = work / "unet" / f"model.{name}.onnx"
            dst.parent.mkdir(parents=True, exist_ok=True)
            stats = optimize_for_ort_cuda(src, dst, "unet", float16=True, fold_guidance=False, nhwc_conv=nhwc)
            graphs[name] = variant_entry(work, dst, stats)
            write_json(work / LEVERS_FILE, registry)
            done[name] = {"seconds": round(time.perf_counter() - start, 1), **stats}
    done.update(_fused_ops_match({"ort-cuda": {"fused_ops": dict(full.fused_ops) if full else {}}, "lever-fused-nchw": graphs["lever-fused-nchw"],
                                  "lever-fused": graphs["lever-fused"]}))
    return done


# The graph-tuning levers' U-Net graphs (spec.TUNING, their "graph" knob): the artifact's own fused, CFG-folded
# ort-cuda U-Net rewritten by ldm_deploy/export/ort_fp16_norm.py. name -> norm_layout_passes options.
TUNING_GRAPHS = {
    "tuning-fp16-norm": {"fp16_norm": True, "fold_transposes": False},
    "tuning-fold-transposes": {"fp16_norm": False, "fold_transposes": True},
    "tuning-norm-layout": {"fp16_norm": True, "fold_transposes": True},
    "tuning-conv-bias-norm": {"fp16_norm": False, "fold_transposes": False, "conv_bias": True},
    "tuning-all-passes": {"fp16_norm": True, "fold_transposes": True, "conv_bias": True},
    "tuning-device-loop": {"fp16_norm": False, "fold_transposes": False, "device_loop": True},
    "tuning-device-loop-all-passes": {"fp16_norm": True, "fold_transposes": True, "conv_bias": True,
                                      "device_loop": True},
    # what `export --ort-cuda --device-loop` writes (export/step_graph.py LOOP_PASSES)
    "tuning-device-loop-nhwc": {"fp16_norm": True, "fold_transposes": True, "conv_bias": True, "nhwc_residual": True,
                                "device_loop": True},
}


def add_tuning_variants(artifact, work, names=tuple(TUNING_GRAPHS)) -> dict:
    """Write the graph-tuning levers' U-Nets (`names` of TUNING_GRAPHS) into `work`, the benchmark's own folder,
    from `artifact`'s ort-cuda U-Net variant (`export --ort-cuda`), registered as add_lever_variants registers
    its graphs (LEVERS_FILE; a registry made for another artifact is started over). The artifact is only read.
    Graphs already in `work` for this artifact are kept. Returns what was done, with each graph's pass stats."""
    from ldm_deploy.artifact import ORT_CUDA_VARIANT, Artifact, named_path
    from ldm_deploy.export.ort_fp16_norm import write_norm_layout_graph
    from ldm_deploy.export.ort_optimize import variant_entry
    from ldm_deploy.fileio import write_json

    unknown = [n for n in names if n not in TUNING_GRAPHS]
    if unknown:
        raise UsageError(f"unknown tuning graphs {unknown}; choose from {', '.join(TUNING_GRAPHS)}")
    root, work = Path(artifact).resolve(), Path(work).resolve()
    if work == root or root in work.parents:
        raise UsageError(f"the tuning graphs go to the benchmark's own folder, not into the artifact ({work})",
                         hint="pass a folder outside the artifact")
    full = Artifact.open(root, verify=False).component("unet").variants.get(ORT_CUDA_VARIANT)
    if full is None:   # refused before anything is written
        raise LdmError(f"{root} has no ort-cuda U-Net variant, which the graph-tuning levers start from",
                       hint="export with `ort_cuda: true` (`ldm-deploy export ... --ort-cuda`)")
    checked = Artifact.open(root, verify=True)   # the graphs start from its files: check them before using them
    identity = {"artifact": str(root), "manifest_sha256": checked.manifest_sha256}
    registry = read_levers(work)
    if {k: registry.get(k) for k in identity} != identity:
        registry = {**identity, "graphs": {}}
    graphs = registry["graphs"]
    src = named_path(root, full.file, regular_file=True)
    done: dict = {}
    for name in names:
        if name in graphs:
            continue
        dst = work / "unet" / f"model.{name}.onnx"
        dst.parent.mkdir(parents=True, exist_ok=True)
        stats = write_norm_layout_graph(src, dst, **TUNING_GRAPHS[name])
        entry = variant_entry(work, dst, {"precision": full.precision, "fused_ops": dict(full.fused_ops),
                                          "cfg_folded": bool(full.record.get("cfg_folded")), "nodes_before": stats["nodes_before"],
                                          "nodes_after": stats["nodes_after"], "seconds": stats["seconds"],
                                          "nhwc_conv": True, "declined_fusions": {}})
        graphs[name] = {**entry, "passes": TUNING_GRAPHS[name], "pass_stats": stats}
        write_json(work / LEVERS_FILE, registry)
        done[name] = stats
    return done


def _fused_ops_match(entries: dict) -> dict:
    """{"fused_ops_match": bool} (+ "fused_ops" when not): the ladder credits each lever with the difference
    between two rows, so the fused graphs must fuse the same ops (an ort-cuda variant fused from the traced graph
    at export can hold more than these, which start from the kept, onnxslim-cleaned fp32 graph)."""
    import json

    ops = {name: {op: n for op, n in (entry.get("fused_ops") or {}).items() if op != "NhwcConv"}
           for name, entry in entries.items()}
    if len({json.dumps(v, sort_keys=True) for v in ops.values()}) == 1:
        return {"fused_ops_match": True}
    log.warning("the U-Net variants fuse different ops (%s): the fusion / NHWC / CFG-fold rows of the lever "
                "ladder are not comparable; export with `optimize: false` so all start from the traced graph", ops)
    return {"fused_ops_match": False, "fused_ops": ops}
