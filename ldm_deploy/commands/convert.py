"""`ldm-deploy convert`: an original single-file SD 1.x / 2.x / XL checkpoint -> a diffusers model folder.

Python twin: `training.convert_original.convert_checkpoint(ckpt, out, tokenizer=..., config=...)`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ldm_deploy.errors import LdmError

NAME = "convert"
HELP = "convert an original single-file SD 1.x/2.x/XL checkpoint (.safetensors/.ckpt) into a diffusers model folder"
EXAMPLE = "ldm-deploy convert v1-5-pruned-emaonly.safetensors --out models/sd15 --tokenizer sd15/tokenizer"

log = logging.getLogger("ldm_deploy")


def add_arguments(p) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="original checkpoint: .safetensors, or .ckpt with --allow-pickle")
    p.add_argument("--out", required=True, metavar="MODEL_DIR",
                   help="diffusers folder to write (replaced atomically; an existing one only if ldm-deploy wrote it)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="CLIP tokenizer folder (vocab.json + merges.txt, or tokenizer.json) to copy into the model; "
                        "single-file checkpoints hold none")
    p.add_argument("--tokenizer-2", metavar="DIR",
                   help="SDXL: the second (OpenCLIP) tokenizer folder, padding with '!' (default: derived from "
                        "--tokenizer)")
    p.add_argument("--config", metavar="PRESET|FILE",
                   help="architecture: a preset name (sd15, sd21, tiny, ...) or a JSON/YAML file with "
                        "{unet, vae, text_encoder, scheduler} configs (default: inferred from the tensor shapes, SD 1.x / 2.x)")
    p.add_argument("--extract-ema", action="store_true", help="convert the EMA U-Net weights (model_ema.*)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickled .ckpt (read with torch.load(weights_only=True)); only for files you trust")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="override the detected prediction type (SD 2.x 768 models: v_prediction)")
    p.add_argument("--fp16", action="store_true", help="store the weights in float16")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out that ldm-deploy did not write (never one that is or holds "
                        "CKPT or the tokenizer folder)")


def _config(value: str | None):
    if value is None or not Path(value).suffix:
        return value
    path = Path(value)
    if not path.is_file():
        raise LdmError(f"config file {path} does not exist", hint="pass a preset name or an existing JSON/YAML file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def run(args) -> int:
    from training.convert_original import convert_checkpoint

    out = convert_checkpoint(
        args.checkpoint, args.out, config=_config(args.config), tokenizer=args.tokenizer,
        extract_ema=args.extract_ema, allow_pickle=args.allow_pickle, prediction_type=args.prediction_type,
        fp16=args.fp16, force=args.force, tokenizer_2=args.tokenizer_2,
    )
    log.info("wrote %s", out)
    return 0
