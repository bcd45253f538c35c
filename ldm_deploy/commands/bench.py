"""`ldm-deploy bench`: latency, throughput and memory of PyTorch and the deployed path, side by side.

Python twin:
    spec = BenchSpec(model_dir=..., artifact=..., sides=(...), batches=(1, 4), steps=50)
    run_bench(spec, "results.json", chart="results.png")
"""
from __future__ import annotations

import logging
from pathlib import Path

from ldm_deploy.errors import UsageError

NAME = "bench"
HELP = "benchmark PyTorch eager/compile against the exported artifact (ONNX Runtime CPU/CUDA, TensorRT)"
EXAMPLE = ("ldm-deploy bench models/shapes-demo --artifact out/demo-onnx --sides ort-cpu,torch-eager-fp32,torch-compile "
           "--steps 25 --batch 1 4 --out benchmarks/results/cpu-demo.json --chart benchmarks/results/cpu-demo.png")

log = logging.getLogger("ldm_deploy")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_arguments(p) -> None:
    from ldm_deploy.bench.spec import SIDES

    p.add_argument("source", metavar="MODEL_DIR|ARTIFACT",
                   help="a diffusers model folder (torch sides; exported for the deployed sides unless --artifact) "
                        "or an exported artifact (its source folder serves the torch sides unless --model-dir)")
    p.add_argument("--model-dir", metavar="DIR", help="diffusers model folder for the torch sides")
    p.add_argument("--artifact", metavar="DIR", help="exported artifact for the deployed sides")
    p.add_argument("--sides", type=_csv, default=None, metavar="A,B",
                   help=f"comma-separated, run in this order: {', '.join(SIDES)} (default ort-cpu,torch-eager-fp32,"
                        "torch-compile; with --levers the ladder, ort-cuda, ort-cuda-no-graph, ort-cuda-plain, "
                        "torch-eager-fp16, torch-compile)")
    p.add_argument("--levers", action="store_true",
                   help="the GPU lever ladder: add the U-Net lever variants to the artifact (an fp16 export that "
                        "kept its fp32 U-Net), run one lever at a time, print the lever table")
    p.add_argument("--tuning", action="store_true",
                   help="the profile levers (GPU): ort-cuda, torch.compile reduce-overhead, eager fp16, then ort-cuda "
                        "with one CUDA provider option / CUDA graphs on all components each; prints the lever and "
                        "PyTorch tables")
    p.add_argument("--compile-budget", type=float, default=300.0, metavar="S",
                   help="torch.compile sides: seconds for all compiles of a side, else recorded as a timeout "
                        "(default 300)")
    p.add_argument("--steps", type=int, default=50, metavar="N", help="denoising steps (default 50)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B", help="batch sizes (images; default 1)")
    p.add_argument("--guidance", type=float, default=7.5, metavar="G", help="CFG scale (default 7.5)")
    p.add_argument("--height", type=int, metavar="H", help="default: the artifact profile's opt")
    p.add_argument("--width", type=int, metavar="W", help="default: the artifact profile's opt")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed end-to-end runs (default 1)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="timed end-to-end runs (default 3)")
    p.add_argument("--budget", type=float, default=120.0, metavar="S",
                   help="max seconds of timed end-to-end runs per side and batch (default 120)")
    p.add_argument("--component-repeats", type=int, default=10, metavar="N", help="per-component timed runs (default 10)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="torch sides' device")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for ort-cpu and torch on CPU, 1 to 4 x the CPU count")
    p.add_argument("--engine-dir", metavar="DIR", help="tensorrt: engines folder (default ARTIFACT/engines)")
    p.add_argument("--export-config", metavar="YAML", help="when exporting MODEL_DIR: export config (name or file)")
    p.add_argument("--work", metavar="DIR", help="when exporting MODEL_DIR: where the artifact goes (default OUT.artifact/)")
    p.add_argument("--note", default="", help="free text stored in the results (e.g. 'busy shared machine')")
    p.add_argument("--out", required=True, metavar="RESULTS.json", help="results JSON (rewritten after each side)")
    p.add_argument("--chart", metavar="PNG", help="also draw a chart")


def run(args) -> int:
    from ldm_deploy.artifact import Artifact, is_artifact
    from ldm_deploy.bench.harness import run_bench, summary_line
    from ldm_deploy.bench.spec import LEVER_REFERENCES, LEVERS, TORCH_SIDES, TUNING_RUN, BenchSpec
    from ldm_deploy.bench.prepare import add_lever_variants, export_for_bench

    if args.levers and args.tuning:
        raise UsageError("--levers and --tuning are two runs; pick one")
    if args.threads is not None:
        from ldm_deploy.limits import check_threads
        check_threads(args.threads)
    if args.sides is None:
        args.sides = ((*LEVERS, *LEVER_REFERENCES) if args.levers else TUNING_RUN if args.tuning
                      else ("ort-cpu", "torch-eager-fp32", "torch-compile"))

    source = Path(args.source)
    if not source.is_dir():
        raise UsageError(f"{source} is not a directory (a model folder or an exported artifact)")
    artifact, model_dir = args.artifact, args.model_dir
    from ldm_deploy.interop.layout import onnx_layout, refuse_onnx_folder

    refuse_onnx_folder(source, "a model folder or an exported artifact")
    if is_artifact(source):
        artifact = artifact or str(source)
        if model_dir is None:
            src = Artifact(source, verify=False).source_path
            model_dir = str(src) if src and src.is_dir() else None
            if model_dir and onnx_layout(model_dir):     # imported from an ONNX folder: no PyTorch weights
                model_dir = None
                torch_sides = [s for s in args.sides if s in TORCH_SIDES]
                if torch_sides:
                    raise UsageError(f"{source} was imported from an ONNX folder; the PyTorch sides "
                                     f"({', '.join(torch_sides)}) need the diffusers model folder",
                                     hint="pass --model-dir DIFFUSERS_FOLDER, or --sides ort-cpu (or other deployed sides)")
    else:
        model_dir = model_dir or str(source)
    export = None
    if artifact is None and any(s not in TORCH_SIDES for s in args.sides):
        work = Path(args.work or Path(args.out).with_suffix(".artifact"))
        # the ladder starts from the traced fp32 U-Net (optimize off) beside the fp16 graphs
        export = export_for_bench(model_dir, work, args.export_config, batch_max=max(args.batch),
                                  height=args.height, width=args.width,
                                  **({"precision": "fp16", "keep_fp32_unet": True, "optimize": False}
                                     if args.levers else {}))
        artifact = str(work)
    if args.levers and artifact is not None:
        done = add_lever_variants(artifact)
        export = {**(export or {}), "lever_variants": done}
        log.info("lever variants: %s", ", ".join(k for k in done if k not in ("ort-cuda", "fused_ops_match"))
                 or "already present")
    spec = BenchSpec(model_dir=model_dir, artifact=artifact, sides=args.sides, batches=tuple(args.batch),
                     steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                     warmup=args.warmup, repeats=args.repeats, e2e_budget_s=args.budget,
                     component_repeats=args.component_repeats, device=args.device, threads=args.threads,
                     engine_dir=args.engine_dir, note=args.note, compile_budget_s=args.compile_budget)
    results = run_bench(spec, args.out, chart=args.chart, export=export, log=log.info)
    for r in results["results"]:
        print(f"{r['side']:<20} B={r['batch']}: {summary_line(r)}")
    from ldm_deploy.bench.report import lever_table, tuning_table, versus_torch_table

    for b in spec.batches:
        if args.levers:
            print(lever_table(results, b))
        if args.tuning:
            print(tuning_table(results, b))
        if any(s in TORCH_SIDES for s in spec.sides):
            print(versus_torch_table(results, b))
    print(f"wrote {args.out}" + (f" and {args.chart}" if args.chart else ""))
    return 0
