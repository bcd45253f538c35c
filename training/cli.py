"""`ldm-train`: train the tokenizer, VAE, text encoder and U-Net of a latent diffusion model.

    ldm-train all --config shapes                       # every stage -> runs/shapes/model
    ldm-train unet --config shapes --set unet.steps=2000 --resume
    torchrun --nproc_per_node 8 -m training.cli unet --config shapes    # the same, on 8 GPUs
    ldm-train eval --config shapes                       # colour/shape/position accuracy, PSNR, report.json
    ldm-train lora --base models/shapes-demo --config training/configs/lora-brown.yaml --out runs/lora-brown

Each subcommand parses flags into a TrainConfig and calls one function (training.stages / evaluate).
"""
from __future__ import annotations

import argparse
import json
import sys

from ldm_deploy.errors import LdmError

EXAMPLE = "example: ldm-train all --config shapes --out runs/shapes"


def build_parser() -> argparse.ArgumentParser:
    from ldm_deploy.cli import _add_verbosity

    parser = argparse.ArgumentParser(prog="ldm-train", description=__doc__.split("\n\n")[0], epilog=EXAMPLE)
    _add_verbosity(parser, dest_prefix="global_")   # -q / -v as ldm-deploy's, before or after the subcommand
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"tokenizer": "train a CLIP BPE tokenizer on the captions (or copy tokenizer.path)",
             "vae": "train the VAE (reconstruction + KL), report held-out PSNR",
             "text-encoder": "train the CLIP text encoder contrastively (or copy text_encoder.path)",
             "unet": "train the U-Net on cached latents; writes the complete model folder",
             "all": "run every stage in order, with a time estimate",
             "eval": "sample held-out prompts and score them with the shapes analyser"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text, epilog=EXAMPLE)
        p.add_argument("--config", default="shapes", help="YAML file or built-in name (shapes, tiny); default shapes")
        p.add_argument("--out", help="run directory (overrides the config's `out`)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set unet.steps=100 (repeatable)")
        _add_verbosity(p)
        p.add_argument("--steps", type=int, help="steps of this stage (all: of every stage)")
        p.add_argument("--seed", type=int, help="training seed")
        if name != "eval":
            p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
            p.add_argument("--force", action="store_true",
                           help="write into an existing --out that is not an ldm-train run folder (its "
                                "stages/, model/, ... are replaced; never one that is or holds an input path)")
        else:
            p.add_argument("--model", help="model folder to evaluate (default <out>/model)")
            p.add_argument("--prompts", type=int, help="held-out prompts to sample (default eval.prompts)")
    lora = "train a LoRA on a finished model folder for a concept it never saw (training/lora.py)"
    p = sub.add_parser("lora", help=lora, description=lora,
                       epilog="example: ldm-train lora --base models/shapes-demo --config training/configs/lora-brown.yaml "
                              "--out runs/lora-brown")
    p.add_argument("--base", required=True, metavar="MODEL_DIR", help="the model folder to adapt (frozen)")
    p.add_argument("--config", metavar="YAML", help="LoRA training config (training.lora.LoraTrainConfig keys)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes pytorch_lora_weights.safetensors, report.json")
    p.add_argument("--steps", type=int, help="training steps (overrides the config)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="(overrides the config)")
    p.add_argument("--eval-prompts", type=int, help="held-out prompts to evaluate (0: no evaluation)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out that is not a LoRA folder written by ldm-train lora (never one "
                        "that is, holds or lies inside --base)")
    _add_verbosity(p)   # -q / -v as every other command (main reads args.quiet / args.verbose)
    return parser


def config_from_args(args):
    from training.config import load_config

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={args.out}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.steps is not None:
        stages = ["vae", "text_encoder", "unet"] if args.command == "all" else [args.command.replace("-", "_")]
        overrides += [f"{s}.steps={args.steps}" for s in stages if s in ("vae", "text_encoder", "unet")]
    if args.command == "eval" and args.prompts is not None:
        overrides.append(f"eval.prompts={args.prompts}")
    return load_config(args.config, overrides)


def run(args) -> int:
    if args.command == "lora":
        from training.lora import LoraTrainConfig, train_lora

        config = LoraTrainConfig.load(args.config, steps=args.steps, device=args.device, eval_prompts=args.eval_prompts)
        print(json.dumps(train_lora(args.base, args.out, config, force=args.force), indent=2, default=str))
        return 0
    from training.stages import run_all, run_stage

    cfg = config_from_args(args)
    if args.command == "eval":
        from training.stages.evaluate import evaluate

        report = evaluate(cfg, model=args.model)
    elif args.command == "all":
        from training.stages.estimate import print_estimate

        print_estimate(cfg)
        report = run_all(cfg, resume=args.resume, force=args.force)
    else:
        report = run_stage(args.command, cfg, resume=args.resume, force=args.force)
    from training.distributed import dist_env

    if dist_env().is_main:
        print(json.dumps(report, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    from ldm_deploy.cli import output_settings

    args = build_parser().parse_args(argv)
    args.quiet = args.quiet or args.global_quiet
    args.verbose = args.verbose or args.global_verbose
    if args.quiet and args.verbose:
        print("ldm-train: error: --quiet and --verbose exclude each other (see --help)", file=sys.stderr)
        return 2
    with output_settings(args.quiet, args.verbose):   # in-process callers get their environment back
        return _main(args)


def _main(args) -> int:
    from ldm_deploy.cli import stdout_closed

    try:
        code = run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return stdout_closed()
    except LdmError as e:
        if getattr(args, "verbose", False):
            raise
        print(f"ldm-train: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ldm-train: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
