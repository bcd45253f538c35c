"""`ldm-deploy validate`: exported graphs vs PyTorch on the same random inputs (Python twin:
ldm_deploy.export.validate.validate)."""
from __future__ import annotations

NAME = "validate"
HELP = "compare every exported component with the PyTorch model at the profile shapes; exit 1 on any failure"
EXAMPLE = "ldm-deploy validate models/tiny out/tiny-onnx --backend ort-cpu"


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_arguments(p) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the diffusers-format folder that was exported, or the Optimum / Hub ONNX "
                        "folder that was imported (then its original graphs are the reference)")
    p.add_argument("onnx_dir", metavar="ONNX_DIR", help="artifact folder written by `ldm-deploy export`")
    p.add_argument("--backend", type=_csv, default=("ort-cpu",), metavar="NAME,...",
                   help="runners to check: ort-cpu (default), ort-cuda, tensorrt (comma-separated)")
    p.add_argument("--components", type=_csv, metavar="NAME,...", help="check only these components")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--layers", action="store_true",
                   help="also compare every intermediate tensor with the fp32 graph (Polygraphy; one backend)")


def run(args) -> int:
    from ldm_deploy.interop.layout import onnx_layout

    if onnx_layout(args.model_dir):   # an imported artifact: checked against the folder's original graphs
        from ldm_deploy.interop.check import validate_imported as validate
    else:
        from ldm_deploy.export.validate import validate

    report = validate(args.model_dir, args.onnx_dir, backends=args.backend, components=args.components,
                      seed=args.seed)
    print(report.table())
    if args.layers:
        from ldm_deploy.export.validate_layers import layers_text, validate_layers

        print(layers_text(validate_layers(args.model_dir, args.onnx_dir, args.backend[-1],
                                          components=args.components, seed=args.seed)))
    return 0 if report.passed else 1
