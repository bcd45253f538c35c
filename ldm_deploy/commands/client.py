"""`ldm-deploy client`: send one request to a served `ldm` model and save the image.

Python twin:
    image, info = request_image(URL, prompt, seed=7, steps=25); save_png(image, "x.png", info)
"""
from __future__ import annotations

NAME = "client"
HELP = "send one image request to a server started with `ldm-deploy serve` (Triton, KServe v2)"
EXAMPLE = 'ldm-deploy client localhost:8000 --prompt "a red circle" --seed 7 --steps 25 --out x.png'


def add_arguments(p) -> None:
    from ldm_deploy.commands.generate import SCHEDULER_NAMES

    p.add_argument("url", metavar="URL", help="host:port of the server's HTTP endpoint (grpc://host:port for gRPC)")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--negative-prompt", metavar="TEXT")
    p.add_argument("--seed", type=int, metavar="S", help="default: chosen by the server (printed)")
    p.add_argument("--steps", type=int, metavar="N", help="default: the server's (50)")
    p.add_argument("--guidance", type=float, metavar="G", help="default: the server's (7.5)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, metavar="NAME", help="default: the artifact's")
    p.add_argument("--height", type=int, metavar="H")
    p.add_argument("--width", type=int, metavar="W")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]",
                   help="a LoRA the server was started with (`serve --lora NAME=FILE`); repeatable")
    p.add_argument("--timeout", type=float, metavar="S", help="fail the request after S seconds")
    p.add_argument("--out", required=True, metavar="FILE.png")


def run(args) -> int:
    import logging

    from ldm_deploy.runtime.image import save_png
    from ldm_deploy.serving.client import request_image

    image, info = request_image(args.url, args.prompt, timeout_s=args.timeout, negative_prompt=args.negative_prompt,
                                seed=args.seed, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                                height=args.height, width=args.width, lora=",".join(args.lora) or None)
    path = save_png(image, args.out, {"prompt": args.prompt, "seed": info["seed"], "server": args.url})
    logging.getLogger("ldm_deploy").info(f"seed {info['seed']}, batch of {info.get('batch_size', '?')}")
    print(path)
    return 0
