"""What a benchmark runs on: random-weight model folders, the export, ONNX Runtime CUDA variants.

    folder, seconds = random_model_folder("sd15", Path("/tmp/sd15/model"))
    export = export_for_bench(folder, Path("/tmp/sd15/onnx-fp16"), "sd15", precision="fp16", ort_cuda=True)

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
        from training.stages.common import model_dicts as merged

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
                     width: int | None = None, precision: str | None = None, ort_cuda: bool = False,
                     keep_fp32_unet: bool = False, optimize: bool | None = None) -> dict:
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


def add_ort_cuda_variants(artifact) -> dict:
    """The ONNX Runtime CUDA fused graphs (model.ort-cuda.onnx) for an artifact that lacks them."""
    from ldm_deploy.artifact import ORT_CUDA_VARIANT, Artifact

    components = Artifact(artifact, verify=False).components
    have = {name for name, c in components.items() if ORT_CUDA_VARIANT in c.variants}
    missing = [c for c in ("unet", "text_encoder", "vae_decoder") if c in components and c not in have]
    if not missing:
        return {"already_present": sorted(have)}
    try:
        from ldm_deploy.export.ort_optimize import add_ort_cuda_variants as add
    except ImportError as e:
        log.warning("ort-cuda variants skipped: %s", e)
        return {"skipped": f"ldm_deploy.export.ort_optimize.add_ort_cuda_variants unavailable: {e}"}
    start = time.perf_counter()
    stats = add(artifact, components=tuple(missing))
    return {"seconds": round(time.perf_counter() - start, 1), "components": stats, "already_present": sorted(have),
            "without_fp32_graph": [c for c in missing if c not in stats]}


# the U-Net variants the lever sides (ldm_deploy.bench.spec.LEVERS) run, beyond the plain graph and "ort-cuda"
LEVER_VARIANTS = ("lever-fp32", "lever-fused-nchw", "lever-fused")


def add_lever_variants(artifact) -> dict:
    """Add the U-Net variants the lever ladder needs to `artifact` (an fp16 export that kept its fp32 U-Net):
    `lever-fp32` (the kept fp32 graph itself, no new file), `lever-fused-nchw` (ORT fusions, NCHW
    convolutions, CFG not folded) and `lever-fused` (fusions with NHWC convolutions, CFG not folded);
    plus the full "ort-cuda" variants when missing. Variants already present are kept. Returns what was
    done, with seconds per variant."""
    import json

    from ldm_deploy.artifact import Artifact
    from ldm_deploy.export.manifest import editable_manifest, graph_io, write_manifest
    from ldm_deploy.export.onnx_io import data_file
    from ldm_deploy.export.ort_optimize import add_ort_cuda_variants as add, fp32_source

    root = Path(artifact)
    unet = Artifact(root, verify=False).component("unet")
    if unet.precision != "fp16":   # refused before anything is written
        raise LdmError(f"the U-Net of {root} is {unet.precision}; the lever ladder's fp16 row runs the "
                       "exported graph, so it needs an fp16 export",
                       hint="export with `precision: fp16` and `keep_fp32_unet: true` (export_configs/sd15.yaml)")
    src = fp32_source(root, unet)
    if src is None:
        raise LdmError(f"{root} keeps no fp32 U-Net graph, which the lever variants start from",
                       hint="export with `keep_fp32_unet: true` (export_configs/sd15.yaml has it)")
    done = {"ort-cuda": add_ort_cuda_variants(root)}
    have = set(Artifact(root, verify=False).component("unet").variants)
    if "lever-fp32" not in have:
        # the entry reuses a hashed file: check it before pointing at it
        manifest = editable_manifest(Artifact.open(root, verify=True))
        unet = manifest["components"]["unet"]
        ins, outs = graph_io(src)
        rel = src.relative_to(root).as_posix()
        data = data_file(src)
        unet.setdefault("variants", {})["lever-fp32"] = {
            "file": rel, "external_data": data.relative_to(root).as_posix() if data.exists() else None,
            "precision": "fp32",
            "inputs": ins, "outputs": outs, "fused_ops": {}, "cfg_folded": False, "nhwc_conv": False}
        write_manifest(root, manifest)
        done["lever-fp32"] = {"file": rel}
    for name, nhwc in (("lever-fused-nchw", False), ("lever-fused", True)):
        if name not in have:
            start = time.perf_counter()
            stats = add(root, components=("unet",), fold_guidance=False, nhwc_conv=nhwc, variant=name)
            done[name] = {"seconds": round(time.perf_counter() - start, 1), **stats.get("unet", {})}
    # the ladder credits each lever with the difference between two rows: the fused variants must fuse the
    # same ops (an ort-cuda variant fused from the traced graph at export can hold more than these, which
    # start from the kept, onnxslim-cleaned fp32 graph)
    variants = Artifact(root, verify=False).component("unet").variants
    ops = {name: {op: n for op, n in (variants[name].fused_ops if name in variants else {}).items() if op != "NhwcConv"}
           for name in ("ort-cuda", "lever-fused-nchw", "lever-fused")}
    done["fused_ops_match"] = len({json.dumps(v, sort_keys=True) for v in ops.values()}) == 1
    if not done["fused_ops_match"]:
        log.warning("the U-Net variants fuse different ops (%s): the fusion / NHWC / CFG-fold rows of the lever "
                    "ladder are not comparable; export with `optimize: false` so all start from the traced graph",
                    ops)
        done["fused_ops"] = ops
    return done
