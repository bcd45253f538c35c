"""`ldm-deploy export`: a diffusers-format model folder -> an ONNX artifact folder (Python twin:
ldm_deploy.export.exporter.export_model)."""
from __future__ import annotations

import logging

NAME = "export"
HELP = "export a diffusers-format model folder to ONNX graphs + manifest.json (skipped when up to date)"
EXAMPLE = "ldm-deploy export models/sd15 --out out/sd15-onnx --config export_configs/sd15.yaml --precision fp16"

log = logging.getLogger("ldm_deploy")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_arguments(p) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="diffusers-format folder (unet/, vae/, text_encoder/, ...)")
    p.add_argument("--out", required=True, metavar="ONNX_DIR",
                   help="artifact folder to write; an existing one is replaced only if it is an artifact or empty")
    p.add_argument("--config", metavar="YAML",
                   help="export config file, or a bundled name: tiny, demo, sd15, sd21, sdxl (default: built-in defaults "
                        "with a static profile at the model's native size, U-Net sample_size x VAE scale factor)")
    p.add_argument("--precision", choices=("fp32", "fp16"), help="U-Net and text encoder precision (overrides the config)")
    p.add_argument("--vae-precision", choices=("fp32", "fp16"), help="VAE precision (default fp32: the SD VAE overflows in fp16)")
    p.add_argument("--components", type=_csv, metavar="NAME,...",
                   help="export only these: text_encoder,unet,vae_decoder,vae_encoder")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), help="torch exporter (default torchscript)")
    p.add_argument("--ort-cuda", action="store_true", default=None,
                   help="also write ONNX Runtime CUDA fused variants (model.ort-cuda.onnx; config key ort_cuda)")
    p.add_argument("--no-cfg-fold", dest="ort_cuda_fold_cfg", action="store_false", default=None,
                   help="keep the ORT CUDA U-Net variant CFG-free (2B rows in, raw prediction out), for serving "
                        "without guidance (config key ort_cuda_fold_cfg; default: CFG folded in)")
    p.add_argument("--device-loop", dest="ort_cuda_device_loop", action="store_true", default=None,
                   help="with --ort-cuda: also write the device-loop U-Net (model.ort-cuda-loop.onnx: the ddim / euler "
                        "step in the graph, for `generate --device-loop`; config key ort_cuda_device_loop)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA .safetensors (kohya or diffusers/peft layout) into the weights at SCALE "
                        "(default 1); repeat to blend several; the manifest records each file's sha256 and scale")
    p.add_argument("--lora-switchable", dest="lora_switchable", nargs="?", const="linear", choices=("linear", "all"),
                   help="export the U-Net / text encoder weights as graph inputs so `generate --lora` and "
                        "Pipeline.set_loras switch LoRAs at run time without a rebuild: linear (default: Linear and "
                        "1x1 conv weights) or all (+ 3x3 convs for LoCon; slower on CPU) (config key lora_switchable)")
    p.add_argument("--layout", choices=("artifact", "optimum"), default="artifact",
                   help="artifact (default): ldm-deploy's folder with manifest.json; optimum: a folder that Optimum's "
                        "ORTStableDiffusionPipeline and diffusers' OnnxStableDiffusionPipeline load (the artifact is "
                        "exported to OUT.artifact/ first and kept, so re-runs are cached)")
    p.add_argument("--force", action="store_true",
                   help="re-export even when an up-to-date artifact exists, and replace an existing --out that is "
                        "not an ldm-deploy artifact (never one that is, holds or lies inside MODEL_DIR)")


def run(args) -> int:
    from ldm_deploy.export.config import default_config, load_config
    from ldm_deploy.export.exporter import export_model

    config = load_config(args.config) if args.config else default_config(args.model_dir)
    flags = {"precision": args.precision, "vae_precision": args.vae_precision, "components": args.components,
             "exporter": args.exporter, "ort_cuda": args.ort_cuda, "ort_cuda_fold_cfg": args.ort_cuda_fold_cfg,
             "ort_cuda_device_loop": args.ort_cuda_device_loop,
             "lora_switchable": args.lora_switchable}
    if args.exporter == "dynamo" and config.opset < 18:
        flags["opset"] = 18
    config = config.replace(**{k: v for k, v in flags.items() if v is not None})
    target = args.out
    if args.layout == "optimum":
        from pathlib import Path

        from ldm_deploy.fileio import check_out_dir
        from ldm_deploy.interop.to_optimum import OPTIMUM_OUTPUT
        from ldm_deploy.lora import LoraSpec

        target = str(Path(args.out).with_name(Path(args.out).name + ".artifact"))
        # --out guarded before the export (not after it), with the export's inputs: never the model folder
        check_out_dir(args.out, OPTIMUM_OUTPUT, force=args.force,
                      inputs=[args.model_dir, target, *(LoraSpec.parse(s).path for s in args.lora or ())])
    result = export_model(args.model_dir, target, config, force=args.force, loras=args.lora)
    if result.cached:
        log.info(f"export (cached): {result.path} is up to date")
    else:
        art = result.artifact
        log.info(f"exported {', '.join(art.components)} ({art.precision}) -> {result.path} in {result.seconds:.1f} s")
    if args.layout == "optimum":
        from ldm_deploy.interop.to_optimum import write_optimum_folder

        write_optimum_folder(result.path, args.out, force=args.force)
        log.info(f"wrote the Optimum / OnnxStableDiffusionPipeline layout -> {args.out}")
    return 0
