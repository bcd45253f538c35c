"""`ldm-deploy generate`: images from an exported artifact, torch-free.

Python twin:
    pipe = Pipeline.from_artifact(ARTIFACT_DIR, backend="ort-cpu")
    result = pipe(prompt, steps=..., seed=...)
    save_images(result.images, out, result.params)
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ldm_deploy.errors import LdmError, UsageError

NAME = "generate"
HELP = "generate images from an exported artifact (numpy sampler, no torch)"
EXAMPLE = 'ldm-deploy generate out/sd15-onnx --prompt "a lighthouse at dusk" --steps 30 --seed 7 --out lighthouse.png'

SCHEDULER_NAMES = ("ddim", "ddpm", "pndm", "euler", "euler-ancestral", "lms", "dpmpp-2m", "dpmpp-2m-karras",
                   "unipc", "lcm")
BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt")

log = logging.getLogger("ldm_deploy")


def add_arguments(p) -> None:
    p.add_argument("artifact", metavar="ARTIFACT_DIR", help="folder written by `ldm-deploy export`")
    p.add_argument("--prompt", required=True, action="append", metavar="TEXT",
                   help="the prompt (repeat for several prompts)")
    p.add_argument("--negative-prompt", metavar="TEXT", help="what to steer away from (default: empty)")
    p.add_argument("--steps", type=int, default=50, metavar="N", help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, metavar="G",
                   help="classifier-free guidance scale; <= 1 turns CFG off (default 7.5)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, metavar="NAME",
                   help=f"sampler: {', '.join(SCHEDULER_NAMES)} (default: the artifact's)")
    seed = p.add_mutually_exclusive_group()
    seed.add_argument("--seed", type=int, metavar="S", help="seed of the numpy RNG (default: random, recorded)")
    seed.add_argument("--latents", metavar="FILE.npy", help="initial latents [N, 4, H/8, W/8], unscaled N(0, I)")
    p.add_argument("--height", type=int, metavar="H", help="image height (default: the profile's opt)")
    p.add_argument("--width", type=int, metavar="W", help="image width (default: the profile's opt)")
    p.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt (default 1)")
    p.add_argument("--image", metavar="INIT.png", help="init image for img2img")
    p.add_argument("--strength", type=float, default=0.8, metavar="S",
                   help="img2img: how much of the schedule to run, (0, 1] (default 0.8)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="R",
                   help="rescale guided output toward the conditional std (Lin et al.; default 0)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu", help="runner backend (default ort-cpu)")
    p.add_argument("--threads", type=int, metavar="N", help="ort-cpu: intra-op threads")
    p.add_argument("--cuda-graph", action="store_true", help="ort-cuda / tensorrt: capture the U-Net as a CUDA graph")
    p.add_argument("--engine-dir", metavar="DIR", help="tensorrt: folder written by `ldm-deploy build`")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA .safetensors at SCALE (default 1) at run time; repeat to blend; the artifact "
                        "must be exported with --lora-switchable")
    p.add_argument("--out", required=True, metavar="PATH", help="a .png for one image, or a directory")


def _runner_options(args) -> dict:
    if args.backend == "ort-cpu":
        return {"intra_op_threads": args.threads} if args.threads else {}
    if args.threads:
        raise UsageError("--threads applies to --backend ort-cpu only")
    if args.backend == "ort-cuda":
        return {"enable_cuda_graph": True} if args.cuda_graph else {}
    opts = {"engine_dir": args.engine_dir} if args.engine_dir else {}
    return {**opts, "cuda_graph": True} if args.cuda_graph else opts


def _latents(path: str | None):
    if path is None:
        return None
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"--latents {path} does not exist") from None
    except ValueError as e:
        raise LdmError(f"--latents {path} is not a plain .npy array: {e}") from None
    if z.ndim != 4:
        raise UsageError(f"--latents must hold [N, 4, H/8, W/8], got shape {list(z.shape)}")
    return z


def run(args) -> int:
    from ldm_deploy.runtime.image import load_image, save_images
    from ldm_deploy.runtime.pipeline import Pipeline

    out = Path(args.out)
    if len(args.prompt) * args.num_images > 1 and out.suffix.lower() == ".png":
        raise UsageError(f"--out {out} names one PNG but {len(args.prompt) * args.num_images} images will be made",
                         hint="give a directory to --out")
    latents = _latents(args.latents)
    image = load_image(args.image) if args.image else None
    pipe = Pipeline.from_artifact(args.artifact, backend=args.backend, **_runner_options(args))
    if args.lora:
        pipe.set_loras(args.lora)

    bar = None

    def progress(i: int, total: int, _x) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm
            bar = tqdm(total=total, desc="denoising", unit="step", disable=args.quiet, leave=False)
        bar.update(1)

    try:
        result = pipe(args.prompt if len(args.prompt) > 1 else args.prompt[0], args.negative_prompt,
                      steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, seed=args.seed,
                      latents=latents, height=args.height, width=args.width, num_images=args.num_images,
                      image=image, strength=args.strength, guidance_rescale=args.guidance_rescale, eta=args.eta,
                      callback=progress)
    finally:
        if bar is not None:
            bar.close()
    paths = save_images(result.images, out, result.params)
    t = result.timings
    log.info(f"{len(paths)} image(s) in {t['total']:.2f} s (U-Net {t['unet_per_step'] * 1e3:.1f} ms/step, "
             f"scheduler+CFG {t['scheduler_overhead_per_step'] * 1e3:.2f} ms/step), seed {result.params['seed']}")
    for path in paths:
        print(path)
    return 0
