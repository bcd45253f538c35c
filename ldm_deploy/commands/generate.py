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
from ldm_deploy.runtime.schedulers import SCHEDULERS

NAME = "generate"
HELP = "generate images from an exported artifact (numpy sampler, no torch)"
EXAMPLE = 'ldm-deploy generate out/sd15-onnx --prompt "a lighthouse at dusk" --steps 30 --seed 7 --out lighthouse.png'

SCHEDULER_NAMES = tuple(SCHEDULERS)      # the sampler registry's names (runtime/schedulers/__init__.py)
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
    p.add_argument("--strength", type=float, metavar="S",
                   help="img2img (needs --image): how much of the schedule to run, (0, 1] (default 0.8)")
    p.add_argument("--resize", action="store_true",
                   help="img2img: resize the init image to --height x --width (default: its size rounded to "
                        "multiples of 8)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="R",
                   help="rescale guided output toward the conditional std (Lin et al.; default 0)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--refiner", metavar="REFINER_DIR",
                   help="SDXL: an exported refiner artifact that finishes the base's denoising (needs --denoising-end)")
    p.add_argument("--denoising-end", type=float, metavar="F",
                   help="SDXL with --refiner: the fraction of the schedule the base runs, e.g. 0.8")
    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu", help="runner backend (default ort-cpu)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="ort-cpu: intra-op threads, 1 to 4 x the CPU count (default: onnxruntime's, one per core)")
    p.add_argument("--cuda-graph", action="store_true", help="ort-cuda / tensorrt: capture the U-Net as a CUDA graph")
    p.add_argument("--device-loop", action="store_true",
                   help="ort-cuda: run the whole ddim / euler loop on the GPU, one CUDA graph launch a step and no host "
                        "wait between steps, no progress bar (needs an export with --ort-cuda --device-loop; other "
                        "schedulers run the host loop on the same U-Net, slower)")
    p.add_argument("--engine-dir", metavar="DIR", help="tensorrt: folder written by `ldm-deploy build`")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA .safetensors at SCALE (default 1) at run time; repeat to blend; the artifact "
                        "must be exported with --lora-switchable")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="a .png for one image, or a directory (PNG only: the generation record is in its text chunks)")


def _runner_options(args) -> dict:
    if args.backend == "ort-cpu":
        return {"intra_op_threads": args.threads} if args.threads is not None else {}
    if args.threads is not None:
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


# image formats Pillow writes that we refuse for --out: the generation record lives in PNG text chunks
OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".jxl")


def check_out(out: Path, images: int) -> None:
    """Refuse an --out that could not be written, before any work: one line, exit 2."""
    suffix = out.suffix.lower()
    if suffix in OTHER_IMAGE_SUFFIXES:
        raise UsageError(f"--out {out}: generate writes PNG only (the seed, prompt and settings are stored in its "
                         f"text chunks)", hint=f"use --out {out.with_suffix('.png')} and convert it if you need {suffix}")
    if suffix == ".png":
        if images > 1:
            raise UsageError(f"--out {out} names one PNG but {images} images will be made",
                             hint="give a directory to --out")
        if out.is_dir():
            raise UsageError(f"--out {out} is an existing directory", hint="give a file name, or remove the directory")
    elif out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory",
                         hint="give a .png file name for one image, or a directory")


def _init_image(args):
    """The --image as uint8 (H, W, 3), resized with --resize; a size that is no multiple of 8 is refused."""
    from ldm_deploy.runtime.image import load_image

    if args.image is None:
        if args.strength is not None or args.resize:
            raise UsageError(f"{'--strength' if args.strength is not None else '--resize'} applies to img2img only",
                             hint="pass --image INIT.png, or drop the flag")
        return None
    image = load_image(args.image)
    h, w = image.shape[:2]
    if args.resize:
        size = (args.width or max(8, round(w / 8) * 8), args.height or max(8, round(h / 8) * 8))
        if size != (w, h):
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))
        return image
    if (h % 8 or w % 8) and args.height is None and args.width is None:
        raise UsageError(f"init image {args.image} is {w}x{h}; its sides must be multiples of 8",
                         hint=f"pass --resize to scale it to {max(8, round(w / 8) * 8)}x{max(8, round(h / 8) * 8)}, "
                              "or crop it")
    if args.height is not None and args.width is not None and (h, w) != (args.height, args.width):
        raise UsageError(f"init image {args.image} is {w}x{h} but --width {args.width} --height {args.height} "
                         "was asked", hint="pass --resize to scale it, or drop --height/--width")
    return image


def run(args) -> int:
    from ldm_deploy.limits import check_seed, check_threads
    from ldm_deploy.runtime.image import save_images
    from ldm_deploy.runtime.pipeline import Pipeline

    out = Path(args.out)
    check_out(out, len(args.prompt) * args.num_images)
    if args.seed is not None:
        check_seed(args.seed)
    if args.threads is not None:
        check_threads(args.threads)
    latents = _latents(args.latents)
    image = _init_image(args)
    if not Path(args.artifact).is_dir():
        from ldm_deploy.artifact import not_an_artifact
        raise not_an_artifact(Path(args.artifact))
    if (args.refiner is None) != (args.denoising_end is None):
        raise UsageError("--refiner and --denoising-end go together (SDXL base -> refiner hand-off)")
    loop = {"device_loop": True} if args.device_loop else {}
    with Pipeline.from_artifact(args.artifact, backend=args.backend, **loop, **_runner_options(args)) as pipe:
        result = _generate(args, pipe, latents, image)
    paths = save_images(result.images, out, result.params)
    t = result.timings
    log.info(f"{len(paths)} image(s) in {t['total']:.2f} s (U-Net {t['unet_per_step'] * 1e3:.1f} ms/step, "
             f"scheduler+CFG {t['scheduler_overhead_per_step'] * 1e3:.2f} ms/step), seed {result.params['seed']}")
    for path in paths:
        print(path)
    return 0


def _generate(args, pipe, latents, image):
    """The base pipeline's images (and the SDXL refiner's, which is opened and closed here)."""
    from ldm_deploy.runtime.pipeline import Pipeline

    if args.lora:
        pipe.set_loras(args.lora)

    bar = None

    def progress(i: int, total: int, _x) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm
            bar = tqdm(total=total, desc="denoising", unit="step", disable=args.quiet, leave=False)
        bar.update(1)

    if args.refiner and not hasattr(pipe, "encode_prompts"):
        raise UsageError(f"--refiner: {args.artifact} is not an SDXL artifact", hint="export an SDXL base model")
    handoff = {"denoising_end": args.denoising_end, "decode": False} if args.refiner else {}
    refiner = Pipeline.from_artifact(args.refiner, backend=args.backend, **_runner_options(args)) if args.refiner else None
    try:
        if refiner is not None and not hasattr(refiner, "stage_schedule"):
            raise UsageError(f"--refiner: {args.refiner} is not an SDXL artifact", hint="export an SDXL refiner model")
        if refiner is not None:   # a hand-off the refiner refuses (pndm's warm-up) fails before the base runs
            refiner.stage_schedule(args.scheduler, args.steps, denoising_start=args.denoising_end)
        prompt = args.prompt if len(args.prompt) > 1 else args.prompt[0]
        # the device loop runs every step on the GPU: no per-step progress (a callback would make it decline)
        kw = dict(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, guidance_rescale=args.guidance_rescale,
                  eta=args.eta, callback=None if args.device_loop else progress)
        result = pipe(prompt, args.negative_prompt, seed=args.seed, latents=latents, height=args.height,
                      width=args.width, num_images=args.num_images, image=image,
                      strength=0.8 if args.strength is None else args.strength,
                      **kw, **handoff)
        if refiner is not None:   # runtime/sdxl.py: the refiner runs the rest of the same schedule from the base's latents
            if bar is not None:
                bar.close()
                bar = None
            seed = result.params["seed"]
            result = refiner(prompt, args.negative_prompt, seed=seed, init_latents=result.latents,
                             denoising_start=args.denoising_end, num_images=args.num_images, **kw)
            result.params["seed"] = seed
    finally:
        if bar is not None:
            bar.close()
        if refiner is not None:
            refiner.close()
    return result
