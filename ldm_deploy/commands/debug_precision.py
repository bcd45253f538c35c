"""`ldm-deploy debug-precision`: fp32 vs fp16 layer by layer, with Polygraphy; proposes and writes the
export config that keeps the offending nodes in fp32 (Python twin:
ldm_deploy.export.precision.debug_precision; see docs/precision.md)."""
from __future__ import annotations

NAME = "debug-precision"
HELP = "find the layers that break fp16 (per-layer error, fp16 overflows) and write the export config that fixes them"
EXAMPLE = ("ldm-deploy debug-precision models/shapes-demo --component unet --inputs 4 "
           "--write-config export_configs/demo-fp16-fixed.yaml")


# the defaults of ldm_deploy.export.precision, which imports onnx: building the CLI parser must not
# (the torch-free runtime and the serving environment have no onnx); a test keeps the two equal
DEFAULT_TOLERANCE = 2e-2
DEFAULT_MARGIN = 0.5
COMPONENTS = ("unet", "vae_decoder", "text_encoder", "text_encoder_2")   # text_encoder_2: SDXL's


def add_arguments(p) -> None:
    p.add_argument("source", metavar="MODEL_OR_ARTIFACT",
                   help="a diffusers-format model folder, SD 1.x/2.x or SDXL base/refiner (exported in fp32 to a "
                        "temporary folder), or an fp32 artifact")
    p.add_argument("--component", choices=COMPONENTS, default="unet",
                   help="the graph to compare (default unet); SDXL also has text_encoder_2, and its refiner has no "
                        "text_encoder")
    p.add_argument("--inputs", type=int, default=4, metavar="N",
                   help="representative inputs to compare, picked along real sampling trajectories (default 4)")
    p.add_argument("--precision", choices=("fp16", "bf16"), default="fp16",
                   help="reduced precision (fp16; bf16 is refused: see docs/precision.md)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"per tensor: max |fp16 - fp32| / max |fp32| (default {DEFAULT_TOLERANCE:g}, validate's)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"flag activations above MARGIN x 65504 in fp32 (default {DEFAULT_MARGIN:g})")
    p.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                   help="prompt for the trajectories (repeatable; default: two built-in prompts)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps per trajectory (default 10)")
    p.add_argument("--height", type=int, help="image height (default: the profile's opt)")
    p.add_argument("--width", type=int, help="image width (default: the profile's opt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", metavar="YAML", help="base export config for a model folder (as `export --config`)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime device of the comparison")
    p.add_argument("--write-config", metavar="FILE", help="write the export config with the fix (fp16_keep_nodes)")
    p.add_argument("--json", metavar="FILE", help="write the full report (every layer) as JSON")
    p.add_argument("--no-timing", dest="measure", action="store_false", help="skip the latency measurement")


def run(args) -> int:
    from pathlib import Path

    from ldm_deploy.export.precision import REPORT_FORMAT, PrecisionDebugConfig, debug_precision, write_fix
    from ldm_deploy.fileio import check_out_file, write_json

    kwargs = {k: getattr(args, k) for k in ("component", "inputs", "precision", "tolerance", "margin", "steps",
                                            "height", "width", "seed", "device", "measure")}
    if args.prompts:
        kwargs["prompts"] = tuple(args.prompts)
    config = PrecisionDebugConfig(args.source, export_config=args.config, **kwargs)
    if args.write_config:
        _check_write_config(Path(args.write_config))          # before the (long) run
    if args.json:
        check_out_file(Path(args.json), REPORT_FORMAT, "--json")   # likewise: an earlier report only
    report = debug_precision(config)
    print(report.summary())
    if args.json:
        write_json(Path(args.json), report.as_dict())
    if args.write_config:
        write_fix(report, Path(args.write_config), args.source)
        print(f"wrote {args.write_config}: `ldm-deploy export {args.source} --config {args.write_config}` applies it")
    return 0 if report.fixed else 1


WRITTEN_BY = "# written by `ldm-deploy debug-precision"   # the first line of every file write_fix writes


def _check_write_config(path) -> None:
    """--write-config replaces only a file debug-precision wrote (or a new one): never the user's own config."""
    from ldm_deploy.errors import UsageError

    if not path.exists() and not path.is_symlink():
        return
    try:
        ours = path.is_file() and not path.is_symlink() and path.read_bytes()[:len(WRITTEN_BY)] == WRITTEN_BY.encode()
    except OSError:
        ours = False
    if not ours:
        raise UsageError(f"--write-config {path} exists and was not written by debug-precision; refusing to replace it",
                         hint="choose a new file name (then merge the fp16_keep_nodes it lists into your config)")
