"""`ldm-deploy import`: an ONNX Stable Diffusion folder from Optimum or the Hub -> an artifact (Python
twin: ldm_deploy.interop.importer.import_onnx_folder). Needs the `onnx` package ([train] extra); no torch."""
from __future__ import annotations

import logging

from ldm_deploy.errors import UsageError

NAME = "import"
HELP = ("adapt an ONNX folder from `optimum-cli export onnx --task text-to-image` or a Hub \"onnx\" revision "
        "(OnnxStableDiffusionPipeline layout) into an artifact, without re-tracing (needs the [train] extra's "
        "onnx package, not torch)")
EXAMPLE = "ldm-deploy import sd15-optimum-onnx --out out/sd15-onnx --height 256:512:768 --width 256:512:768"

log = logging.getLogger("ldm_deploy")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _range(text: str) -> tuple[int, int, int]:
    """N, or MIN:MAX (opt = MIN), or MIN:OPT:MAX."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        raise UsageError(f"range {text!r} is not N, MIN:MAX or MIN:OPT:MAX (integers)") from None
    if len(parts) == 1:
        return (parts[0],) * 3
    if len(parts) == 2:
        return parts[0], parts[0], parts[1]
    if len(parts) == 3:
        return tuple(parts)
    raise UsageError(f"range {text!r} is not N, MIN:MAX or MIN:OPT:MAX")


def add_arguments(p) -> None:
    p.add_argument("onnx_folder", metavar="ONNX_FOLDER",
                   help="folder with model_index.json and text_encoder/, unet/, vae_decoder/ [, vae_encoder/] "
                        "model.onnx, tokenizer/, scheduler/")
    p.add_argument("--out", required=True, metavar="ARTIFACT", help="artifact folder to write")
    p.add_argument("--components", type=_csv, metavar="NAME,...",
                   help="import only these (default: every graph present; a VAE encoder that returns a sampled "
                        "latent is left out with a warning)")
    p.add_argument("--batch", type=_range, metavar="MIN:OPT:MAX", help="prompts x images range (default 1:1:4)")
    p.add_argument("--height", type=_range, metavar="MIN:OPT:MAX",
                   help="pixel range for graphs with a dynamic size (default: native/2 : native : 2 x native, "
                        "native = U-Net sample_size x VAE scale factor); static graphs keep their size")
    p.add_argument("--width", type=_range, metavar="MIN:OPT:MAX", help="as --height")
    p.add_argument("--force", action="store_true", help="re-import even when an up-to-date artifact exists")


def run(args) -> int:
    from ldm_deploy.interop.importer import import_onnx_folder

    r = import_onnx_folder(args.onnx_folder, args.out, components=args.components, batch=args.batch,
                           height=args.height, width=args.width, force=args.force)
    art = r.artifact
    if r.cached:
        log.info(f"import (cached): {r.path} is up to date")
    else:
        log.info(f"imported {', '.join(art.components)} ({art.precision}) -> {r.path} in {r.seconds:.1f} s; "
                 f"batch {art.profiles.batch}, height {art.profiles.height}, width {art.profiles.width}")
    return 0
