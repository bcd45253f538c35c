"""`ldm-deploy build`: one TensorRT engine per component of an exported artifact (Python twin:
ldm_deploy.engine.build.build_engines)."""
from __future__ import annotations

import dataclasses
import logging

from ldm_deploy.engine.build import PRECISIONS, BuildConfig, build_engines
from ldm_deploy.engine.trt_api import FLAVOURS

NAME = "build"
HELP = "build TensorRT engines from an exported ONNX artifact (only what changed is rebuilt)"
EXAMPLE = "ldm-deploy build out/sd15-onnx --out out/sd15-trt --backend tensorrt-rtx --opt-level 3"

log = logging.getLogger("ldm_deploy")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_arguments(p) -> None:
    p.add_argument("onnx_dir", metavar="ONNX_DIR", help="artifact folder written by `ldm-deploy export`")
    p.add_argument("--out", required=True, metavar="ENGINE_DIR", help="folder for <component>.engine + sidecar JSON")
    p.add_argument("--config", metavar="YAML", help="build config (BuildConfig keys); flags override it")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="default: as the ONNX types dictate (strongly typed network)")
    p.add_argument("--backend", choices=list(FLAVOURS), help="default: what is installed (tensorrt when a GPU is present)")
    p.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache to reuse and update")
    p.add_argument("--opt-level", type=int, choices=range(6), metavar="N", help="builder optimization level 0..5 (default 3)")
    p.add_argument("--workspace-mb", type=int, metavar="MB", help="workspace memory limit")
    p.add_argument("--targets", type=_csv, metavar="CC,...",
                   help="TensorRT for RTX target compute capabilities, e.g. 8.6,8.9,12.0 (default: portable set)")
    p.add_argument("--components", type=_csv, metavar="NAME,...", help="build only these components")
    p.add_argument("--unet-max-batch", type=int, metavar="N", help="cap the U-Net batch (default 2 x batch.max)")
    p.add_argument("--vae-max-batch", type=int, metavar="N", help="cap the VAE batch (default batch.max)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even engines that are up to date, and write into an existing --out that is not "
                        "an engines folder (never one that is or holds ONNX_DIR)")


def run(args) -> int:
    config = BuildConfig.from_yaml(args.config) if args.config else BuildConfig()
    flags = {"precision": args.precision, "backend": args.backend, "timing_cache": args.timing_cache,
             "opt_level": args.opt_level, "workspace_mb": args.workspace_mb, "targets": args.targets,
             "components": args.components, "unet_max_batch": args.unet_max_batch,
             "vae_max_batch": args.vae_max_batch, "force": args.force or None,
             "verbose": getattr(args, "verbose", False) or None}
    config = dataclasses.replace(config, **{k: v for k, v in flags.items() if v is not None})
    report = build_engines(args.onnx_dir, args.out, config, config_file=args.config)
    total = sum(r.seconds for r in report.results)
    log.info(f"{report.flavour} {report.tensorrt_version}: {len(report.built)} built, "
             f"{len(report.results) - len(report.built)} up to date, {total:.1f} s -> {report.engine_dir}")
    return 0
