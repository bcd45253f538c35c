"""`ldm-deploy bench`: latency, throughput and memory of PyTorch and the deployed path, side by side.

Python twin:
    spec = BenchSpec(model_dir=..., artifact=..., sides=(...), batches=(1, 4), steps=50)
    run_bench(spec, "results.json", chart="results.png")

`--preset NAME` (ldm_deploy/bench/presets/NAME.yaml, bench/preset.py) is a shipped run: the benchmark model
built with random weights in --work, its export, and defaults for the options below; options given on the
command line win. `ldm-deploy bench --preset sd15-gpu --out R.json` is the SD 1.5 GPU benchmark.
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

    from ldm_deploy.bench.preset import preset_names

    p.add_argument("source", metavar="MODEL_DIR|ARTIFACT", nargs="?",
                   help="a diffusers model folder (torch sides; exported for the deployed sides unless --artifact) "
                        "or an exported artifact (its source folder serves the torch sides unless --model-dir); "
                        "optional with --preset")
    p.add_argument("--preset", metavar="NAME|YAML",
                   help=f"a shipped run ({', '.join(preset_names())}) or a preset file: the model (random weights, "
                        "built in --work unless given), its export and option defaults; given options win")
    p.add_argument("--time-limit", type=float, metavar="S",
                   help="no side starts after this many seconds since the command started, export included "
                        "(sides not started are recorded as skipped)")
    p.add_argument("--side-timeout", type=float, default=900.0, metavar="S",
                   help="one (side, batch) process is ended after this many seconds (default 900)")
    p.add_argument("--component-warmup", type=int, default=3, metavar="N",
                   help="untimed per-component runs (default 3)")
    p.add_argument("--model-dir", metavar="DIR", help="diffusers model folder for the torch sides")
    p.add_argument("--artifact", metavar="DIR", help="exported artifact for the deployed sides")
    p.add_argument("--sides", type=_csv, default=None, metavar="A,B",
                   help=f"comma-separated, run in this order: {', '.join(SIDES)} (default ort-cpu,torch-eager-fp32,"
                        "torch-compile; with --levers the ladder, ort-cuda, ort-cuda-no-graph, ort-cuda-plain, "
                        "torch-eager-fp16, torch-compile)")
    p.add_argument("--levers", action="store_true",
                   help="the GPU lever ladder: write the U-Net lever graphs of the artifact (an fp16 export that "
                        "kept its fp32 U-Net) into the benchmark's own folder (--levers-dir; the artifact is only "
                        "read), run one lever at a time, print the lever table")
    p.add_argument("--levers-dir", metavar="DIR",
                   help="--levers / --tuning: where the lever graphs go (default OUT.levers/ beside the results JSON)")
    p.add_argument("--tuning", action="store_true",
                   help="the profile levers (GPU): ort-cuda, torch.compile reduce-overhead, eager fp16, then ort-cuda "
                        "with one CUDA provider option / CUDA graphs on all components / U-Net graph pass each (the "
                        "pass's graph written into --levers-dir); prints the lever and PyTorch tables")
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
    p.add_argument("--work", metavar="DIR", help="when exporting MODEL_DIR: where the artifact goes (default OUT.artifact/); "
                   "with --preset: the folder of the model and its artifact (default TMP/ldm-bench-PRESET)")
    p.add_argument("--note", default="", help="free text stored in the results (e.g. 'busy shared machine')")
    p.add_argument("--out", required=True, metavar="RESULTS.json", help="results JSON (rewritten after each side)")
    p.add_argument("--chart", metavar="PNG", help="also draw a chart")
    # the options a preset may set parse to None when not given; run() fills in the preset's value or the default
    from ldm_deploy.bench.preset import OPTIONS

    p.set_defaults(bench_defaults={dest: p.get_default(dest) for dest in OPTIONS}, **dict.fromkeys(OPTIONS))


def _apply_preset(args):
    """The options not given on the command line: the --preset's value, else the option's default. Returns
    the preset (None without --preset)."""
    from ldm_deploy.bench.preset import load_preset

    preset = load_preset(args.preset) if args.preset else None
    values = preset.options() if preset else {}
    if args.levers or args.tuning:     # the ladder / profile-lever runs keep their own sides, at B = 1
        values = {k: v for k, v in values.items() if k not in ("sides", "batch")}
    for dest, default in args.bench_defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, values.get(dest, default))
    return preset


def _preset_work(args) -> Path:
    """Where a preset's model folder and artifact go: --work, else TMP/ldm-bench-PRESET."""
    import tempfile

    return Path(args.work or Path(tempfile.gettempdir()) / f"ldm-bench-{Path(args.preset).stem}")


def _check_outputs(args) -> None:
    """--out and --chart replace only an earlier bench's results / chart, never a file of the user's."""
    from ldm_deploy.bench.report import CHART_SOFTWARE
    from ldm_deploy.bench.spec import FORMAT
    from ldm_deploy.fileio import check_out_file

    check_out_file(Path(args.out), FORMAT)
    chart = Path(args.chart) if args.chart else None
    if chart is not None and (chart.exists() or chart.is_symlink()):
        try:
            from PIL import Image

            with Image.open(chart) as im:
                ours = not chart.is_symlink() and im.format == "PNG" and im.text.get("Software") == CHART_SOFTWARE
        except Exception:   # not an image Pillow reads: not ours
            ours = False
        if not ours:
            raise UsageError(f"--chart {chart} already exists and is not a chart written by ldm-deploy bench; "
                             "refusing to replace it", hint="choose a new file name for --chart")


def run(args) -> int:
    import time

    from ldm_deploy.bench.harness import run_bench
    from ldm_deploy.bench.spec import LEVER_REFERENCES, LEVERS, TUNING_RUN, BenchSpec

    t_start = time.perf_counter()
    if args.levers and args.tuning:
        raise UsageError("--levers and --tuning are two runs; pick one")
    if args.levers_dir and not (args.levers or args.tuning):
        raise UsageError("--levers-dir goes with --levers or --tuning")
    _check_outputs(args)                  # before any export or side runs
    preset = _apply_preset(args)
    if args.source is None and preset is None:
        raise UsageError("bench needs a MODEL_DIR or ARTIFACT, or --preset", hint="e.g. --preset sd15-gpu")
    if args.threads is not None:
        from ldm_deploy.limits import check_threads
        check_threads(args.threads)
    if args.sides is None:
        args.sides = ((*LEVERS, *LEVER_REFERENCES) if args.levers else TUNING_RUN if args.tuning
                      else ("ort-cpu", "torch-eager-fp32", "torch-compile"))
    prepared: dict = {}
    artifact, model_dir = _sources(args, preset, prepared)
    artifact, levers_dir, export = _prepare(args, preset, prepared, artifact, model_dir)
    spec = BenchSpec(model_dir=model_dir, artifact=artifact, sides=args.sides, batches=tuple(args.batch),
                     steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                     warmup=args.warmup, repeats=args.repeats, e2e_budget_s=args.budget,
                     component_repeats=args.component_repeats, device=args.device, threads=args.threads,
                     engine_dir=args.engine_dir, levers_dir=levers_dir, note=args.note,
                     compile_budget_s=args.compile_budget, timeout_s=args.side_timeout,
                     component_warmup=args.component_warmup,
                     total_budget_s=(max(60.0, args.time_limit - (time.perf_counter() - t_start))
                                     if args.time_limit else None))
    results = run_bench(spec, args.out, chart=args.chart, export=export, log=log.info)
    _print_tables(args, spec, results)
    return 0


def _sources(args, preset, prepared: dict) -> tuple[str | None, str | None]:
    """(artifact, model folder) the sides run: from the source (a model folder or an artifact, whose recorded
    source folder serves the torch sides), or the preset's random-weight model built in its work folder."""
    from ldm_deploy.artifact import Artifact, is_artifact
    from ldm_deploy.bench.spec import TORCH_SIDES
    from ldm_deploy.interop.layout import onnx_layout, refuse_onnx_folder

    if args.source is None:   # the preset's benchmark model with seeded random weights
        from ldm_deploy.bench.prepare import random_model_folder

        folder = _preset_work(args) / f"{preset.model}-model"
        log.info("the %s random-weight model folder: %s", preset.model, folder)
        source, prepared["make_folder_s"] = random_model_folder(preset.model, folder)
    else:
        source = Path(args.source)
    if not source.is_dir():
        raise UsageError(f"{source} is not a directory (a model folder or an exported artifact)")
    artifact, model_dir = args.artifact, args.model_dir
    refuse_onnx_folder(source, "a model folder or an exported artifact")
    if not is_artifact(source):
        return artifact, model_dir or str(source)
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
    return artifact, model_dir


def _prepare(args, preset, prepared: dict, artifact, model_dir) -> tuple[str | None, str | None, dict | None]:
    """(artifact, levers folder, what was prepared): the bench's own export when the deployed sides have no
    artifact, and with --levers the ladder's graphs in the benchmark's own folder (never in the artifact)."""
    from ldm_deploy.bench.prepare import add_lever_variants, export_for_bench
    from ldm_deploy.bench.spec import TORCH_SIDES, TUNING_RUN

    export = prepared or None
    if artifact is None and any(s not in TORCH_SIDES for s in args.sides):
        settings = preset.export if preset else None
        if preset:
            work = _preset_work(args) / f"{preset.model}-onnx-{settings.precision or 'fp32'}{'-levers' * args.levers}"
        else:
            work = Path(args.work or Path(args.out).with_suffix(".artifact"))
        # the ladder starts from the traced fp32 U-Net (optimize off) beside the fp16 graphs; its last rung
        # is the export's own fused, CFG-folded ort-cuda variant
        done = export_for_bench(model_dir, work, args.export_config or (settings.config if settings else None),
                                batch_max=max(args.batch), height=args.height, width=args.width,
                                **{**({"precision": settings.precision, "vae_precision": settings.vae_precision,
                                       "ort_cuda": settings.ort_cuda} if settings else {}),
                                   **({"precision": "fp16", "keep_fp32_unet": True, "optimize": False, "ort_cuda": True}
                                      if args.levers else {})})
        export = {**prepared, "export": done} if preset else done
        artifact = str(work)
    levers_dir = None
    if args.levers and artifact is not None:
        levers_dir = str(Path(args.levers_dir or Path(args.out).with_suffix(".levers")))
        done = add_lever_variants(artifact, levers_dir)
        export = {**(export or {}), "lever_variants": done, "levers_dir": levers_dir}
        log.info("lever graphs in %s: %s", levers_dir,
                 ", ".join(k for k in done if k not in ("ort-cuda", "fused_ops_match")) or "already present")
    graphs = _tuning_graphs(args.sides)
    if graphs and artifact is not None and tuple(args.sides) == TUNING_RUN and not _has_ort_cuda_unet(artifact):
        log.warning("%s has no ort-cuda U-Net variant: the U-Net graph levers (%s) are skipped; export with "
                    "--ort-cuda to run them", artifact, ", ".join(graphs))
        graphs = ()
    if graphs and artifact is not None:   # the graph-tuning levers' U-Nets, in the benchmark's own folder too
        from ldm_deploy.bench.prepare import add_tuning_variants

        levers_dir = str(Path(args.levers_dir or Path(args.out).with_suffix(".levers")))
        done = add_tuning_variants(artifact, levers_dir, graphs)
        export = {**(export or {}), "tuning_variants": done, "levers_dir": levers_dir}
        log.info("tuning graphs in %s: %s", levers_dir, ", ".join(done) or "already present")
    return artifact, levers_dir, export


def _has_ort_cuda_unet(artifact) -> bool:
    from ldm_deploy.artifact import ORT_CUDA_VARIANT, Artifact

    return ORT_CUDA_VARIANT in Artifact.open(artifact, verify=False).component("unet").variants


def _tuning_graphs(sides) -> tuple[str, ...]:
    """The U-Net graphs the graph-tuning sides among `sides` run (spec.TUNING's "graph" knob)."""
    from ldm_deploy.bench.spec import TUNING

    return tuple(dict.fromkeys(TUNING[s][1]["graph"] for s in sides if s in TUNING and TUNING[s][1].get("graph")))


def _print_tables(args, spec, results) -> None:
    from ldm_deploy.bench.harness import summary_line
    from ldm_deploy.bench.report import lever_table, tuning_table, versus_torch_table
    from ldm_deploy.bench.spec import TORCH_SIDES

    for r in results["results"]:
        print(f"{r['side']:<20} B={r['batch']}: {summary_line(r)}")
    for b in spec.batches:
        if args.levers:
            print(lever_table(results, b))
        if args.tuning:
            print(tuning_table(results, b))
        if any(s in TORCH_SIDES for s in spec.sides):
            print(versus_torch_table(results, b))
    print(f"wrote {args.out}" + (f" and {args.chart}" if args.chart else ""))
