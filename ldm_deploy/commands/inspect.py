"""`ldm-deploy inspect`: what an artifact, engine folder, .onnx file or diffusers model folder holds.

Python twin:
    from ldm_deploy.inspection import inspect_path, format_inspection
    print(format_inspection(inspect_path("out/sd15-onnx")))
"""
from __future__ import annotations

import json

NAME = "inspect"
HELP = "show an artifact's manifest, an engine folder's sidecars, an ONNX graph's IO or a model folder's parts"
EXAMPLE = "ldm-deploy inspect out/sd15-onnx --json"


def add_arguments(p) -> None:
    p.add_argument("path", metavar="PATH",
                   help="artifact folder (manifest.json), engine folder (*.engine.json), a .onnx file, "
                        "or a diffusers model folder")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args) -> int:
    from ldm_deploy.inspection import format_inspection, inspect_path

    info = inspect_path(args.path)
    print(json.dumps(info, indent=2, default=str) if args.json else format_inspection(info))
    return 0
