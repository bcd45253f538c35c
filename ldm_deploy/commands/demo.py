"""`ldm-deploy demo`: the shipped shapes model -> export (cached) -> a captioned grid, PNGs and report.json.

Python twin:
    from ldm_deploy.demo import DemoConfig, run_demo
    result = run_demo(DemoConfig(out="outputs/demo", steps=25))
"""
from __future__ import annotations

import logging

from ldm_deploy.demo import BACKEND_CHOICES, MODEL_ENV, DemoConfig, read_prompts, run_demo

NAME = "demo"
HELP = "run the shipped shapes model end to end: export (cached), generate a captioned grid, check parity"
EXAMPLE = "ldm-deploy demo --out outputs/demo --steps 25 --guidance 5"

log = logging.getLogger("ldm_deploy")


def add_arguments(p) -> None:
    p.add_argument("--model", metavar="DIR",
                   help=f"diffusers model folder (default: ${MODEL_ENV}, else models/shapes-demo)")
    p.add_argument("--out", default="outputs/demo", metavar="DIR", help="output folder (default outputs/demo)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="auto: ort-cuda when onnxruntime has CUDA, else ort-cpu (default auto)")
    p.add_argument("--steps", type=int, default=25, metavar="N", help="denoising steps (default 25)")
    p.add_argument("--guidance", type=float, default=5.0, metavar="G", help="guidance scale (default 5)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="image i uses seed S + i (default 0)")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: 4 seen + 4 held-out prompts)")
    p.add_argument("--no-parity", action="store_true", help="skip the PyTorch reference check")
    p.add_argument("--force", action="store_true",
                   help="re-export OUT/onnx, replacing it even when it is not an ldm-deploy artifact")


def run(args) -> int:
    config = DemoConfig(model=args.model, out=args.out, backend=args.backend, steps=args.steps,
                        guidance=args.guidance, seed=args.seed,
                        prompts=read_prompts(args.prompts) if args.prompts else None,
                        parity=not args.no_parity, progress=not args.quiet, force=args.force)
    result = run_demo(config)
    r = result.report
    t = r["timings"]
    export = "reused (cached)" if t["export_cached"] else f"{t['export_s']:.1f} s"
    log.info(f"model {r['model']} -> artifact {r['artifact']} (export {export}); backend {r['backend']}, "
             f"load {t['load_s']:.2f} s")
    log.info(f"{len(result.images)} images in {t['generate_s']:.1f} s ({t['images_per_s']:.2f} images/s, "
             f"{r['steps']} steps, guidance {r['guidance']:g})")
    for split, acc in r["accuracy"].items():
        log.info(f"analyser, {split} prompts (n={acc['n']}): shape {acc['shape']:.0%}, colour {acc['colour']:.0%}, "
                 f"position {acc['position']:.0%}, all attributes {acc['all']:.0%}")
    if "parity" in r:
        p = r["parity"]
        log.info(f"parity vs PyTorch (prompt 0): max abs pixel diff {p['max_abs_pixel_diff']}, "
                 f"latent max abs {p['latents']['max_abs']:.2e}")
    log.info(f"grid:    {result.grid}\nimages:  {result.out / 'images'}/\nreport:  {result.report_path}")
    return 0
