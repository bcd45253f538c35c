"""Benchmark the SD 1.5-size model (random weights) on a GPU: our deployed path vs PyTorch eager / compile.

    python scripts/bench_sd15.py                                   # build + export + all sides, 512x512, 50 steps
    python scripts/bench_sd15.py --artifact /tmp/sd15/onnx-fp16 --model-dir /tmp/sd15/model
    python scripts/bench_sd15.py --quick                           # tiny preset, 64 px, 3 steps: a CPU smoke test
    python scripts/bench_sd15.py --levers --artifact ... --model-dir ...   # the GPU levers one at a time, B=1

Steps: (1) the model folder (`--model-dir`, else the sd15 preset with seeded random weights in `--work`),
(2) the fp16 artifact (`--artifact`, else `export_configs/sd15.yaml` in fp16 with the ONNX Runtime CUDA
fused variants), (3) the fused variants added if the artifact lacks them, (4) every side at each batch
(batch 1 for all sides first), each in its own subprocess; the JSON is rewritten after every side, so
a run cut short keeps what finished. Writes benchmarks/results/<machine>-sd15.json and .png.

`--levers` runs the lever ladder instead (ldm_deploy.bench.spec.LEVERS: fp32 -> fp16 -> IO binding ->
CUDA graph -> ORT fusions -> NHWC conv -> CFG fold = ort-cuda, each row adding one lever to the U-Net),
then the full path less one lever (ort-cuda-no-graph, ort-cuda-plain) and PyTorch eager fp16 /
torch.compile for reference; step (3) adds the U-Net lever variants. Writes
benchmarks/results/levers/<machine>-sd15-levers.json, which `scripts/bench_table.py` renders as
the README's lever table.

`--tuning` runs the profile levers instead (ldm_deploy.bench.spec.TUNING_RUN: ort-cuda, torch.compile
mode=reduce-overhead + channels_last, eager fp16, then ort-cuda with one CUDA provider option -- cuDNN
algorithm search, workspace, prefer_nhwc, fuse_conv_bias, TF32, the attention kernel -- or CUDA graphs on
all three components) and prints the lever table and the PyTorch comparison. Torch compile sides get
`--compile-budget` seconds for their compiles, else they are recorded as a timeout.
`scripts/gpu_perf_run.sh` is the one-shot GPU plan built on this (issue 23).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_SIDES = ("ort-cuda,torch-eager-fp16,torch-compile,torch-compile-ro,ort-cuda-graph-all,torch-eager-fp32,"
             "ort-cuda-no-graph,ort-cuda-plain,tensorrt")
QUICK_SIDES = "ort-cpu,torch-eager-fp32,torch-compile,ort-cuda,torch-eager-fp16,tensorrt"


def say(message: str) -> None:
    print(f"[bench_sd15 {time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine_slug() -> str:
    from ldm_deploy.bench.machine import machine_info

    gpus = machine_info()["gpus"]
    if not gpus:
        return "cpu"
    name = gpus[0].split(",")[0].upper()
    match = re.search(r"\b([AHLB]\d{2,3}[A-Z]?)\b", name)
    return match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def has_cuda_ep() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def variants_in_subprocess(artifact: Path, timeout_s: float, function: str = "add_ort_cuda_variants") -> dict:
    """ldm_deploy.bench.prepare.<function>(artifact) in a child process: a crash or a hang there costs the
    variants, not the run."""
    import json
    import subprocess

    code = (f"import json, sys; from ldm_deploy.bench.prepare import {function}; "
            f"print('RESULT ' + json.dumps({function}(sys.argv[1]), default=str))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(artifact)], cwd=str(ROOT), capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s; ort-cuda runs the plain graphs"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len("RESULT "):])
    tail = " | ".join(line for line in (proc.stderr or "").splitlines()[-3:] if line.strip())
    return {"error": f"exit code {proc.returncode}: {tail[-400:]}; ort-cuda runs the plain graphs"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ldm-bench-sd15"), help="model folder / artifact go here")
    ap.add_argument("--model-dir", type=Path, help="an existing model folder (default: build WORK/model)")
    ap.add_argument("--artifact", type=Path, help="an existing fp16 artifact (default: export WORK/onnx-fp16)")
    ap.add_argument("--sides", help=f"comma-separated (default: {GPU_SIDES})")
    ap.add_argument("--steps", type=int, help="denoising steps (default 50; --quick 3)")
    ap.add_argument("--batches", help="comma-separated image batch sizes (default 1,4; --levers: 1)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed end-to-end runs (default 0: the component timings just before ran every "
                         "kernel at the same shapes, CUDA graph captured, torch.compile done)")
    ap.add_argument("--repeats", type=int, default=3, help="timed end-to-end runs (default 3)")
    ap.add_argument("--budget", type=float, default=25.0,
                    help="max seconds of timed end-to-end runs per side and batch (default 25)")
    ap.add_argument("--time-limit", type=float, default=420.0,
                    help="no side starts after this many seconds since the script started, export included "
                         "(default 420; sides not started are recorded as skipped)")
    ap.add_argument("--variants-timeout", type=float, default=240.0,
                    help="seconds allowed for writing the ORT CUDA fused variants (default 240)")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/<machine>-sd15.json)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 64 px, 3 steps, CPU sides too: a smoke test")
    ap.add_argument("--levers", action="store_true",
                    help="the lever ladder (one lever at a time) instead of the side-by-side run; default batch 1")
    ap.add_argument("--tuning", action="store_true",
                    help="the profile levers (spec.TUNING_RUN) instead of the side-by-side run; default batch 1")
    ap.add_argument("--compile-budget", type=float, default=240.0,
                    help="seconds for all torch.compile compiles of one side, else recorded as a timeout (default 240)")
    ap.add_argument("--side-timeout", type=float, default=420.0,
                    help="one (side, batch) process is ended after this many seconds (default 420)")
    ap.add_argument("--no-chart", action="store_true", help="write the JSON only")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    from ldm_deploy.bench.harness import ratio, run_bench
    from ldm_deploy.bench.prepare import export_for_bench, random_model_folder
    from ldm_deploy.bench.spec import LEVER_REFERENCES, LEVERS, TORCH_SIDES, TUNING_RUN, BenchSpec

    if args.levers and args.tuning:
        ap.error("--levers and --tuning are two runs; pick one")

    kind = "tiny" if args.quick else "sd15"
    steps = args.steps or (3 if args.quick else 50)
    batches = tuple(int(b) for b in (args.batches or ("1" if args.levers or args.tuning else "1,4")).split(","))
    default_sides = (",".join([*LEVERS, *LEVER_REFERENCES]) if args.levers else ",".join(TUNING_RUN) if args.tuning
                     else QUICK_SIDES if args.quick else GPU_SIDES)
    sides = tuple((args.sides or default_sides).split(","))
    suffix = "sd15-levers" if args.levers else "sd15-tuning" if args.tuning else "sd15"
    out = args.out or (args.work / f"quick-{suffix}.json" if args.quick
                       else ROOT / "benchmarks" / "results" / ("levers" if args.levers else "") / f"{machine_slug()}-{suffix}.json")
    export: dict = {}

    # 1. the model folder
    model = args.model_dir
    if model is None and args.artifact is not None:   # the folder the artifact was exported from, if it is here
        from ldm_deploy.artifact import Artifact

        src = Artifact(args.artifact, verify=False).source_path
        model = src if src and (src / "model_index.json").is_file() else None
    if model is None:
        say(f"building the {kind} random-weight model folder in {args.work / (kind + '-model')} ...")
        model, seconds = random_model_folder(kind, args.work / f"{kind}-model")
        export["make_folder_s"] = seconds
        say(f"model folder {model} " + (f"built in {seconds} s" if seconds else "reused"))

    # 2. the fp16 artifact (with the ORT CUDA fused variants)
    artifact = args.artifact
    deployed = any(s not in TORCH_SIDES for s in sides)
    if artifact is None and deployed:
        artifact = args.work / f"{kind}-onnx-fp16{'-levers' if args.levers else ''}"
        say(f"exporting {model} -> {artifact} (fp16, ort-cuda variants) ...")
        try:
            if args.quick:
                export["export"] = export_for_bench(model, artifact, batch_max=max(batches), precision="fp16",
                                                    ort_cuda=True, keep_fp32_unet=args.levers,
                                                    optimize=False if args.levers else None)
            else:
                export["export"] = export_for_bench(model, artifact, "sd15", batch_max=max(batches),
                                                    precision="fp16", ort_cuda=True,
                                                    optimize=False if args.levers else None)
        except Exception as e:  # noqa: BLE001 - e.g. an ldm-deploy without the ort_cuda option: export without
            say(f"export with ort-cuda variants failed ({type(e).__name__}: {e}); exporting without them")
            export["export_error"] = f"{type(e).__name__}: {e}"[:300]
            export["export"] = export_for_bench(model, artifact, None if args.quick else "sd15",
                                                batch_max=max(batches), precision="fp16")
        e = export["export"]
        say(f"artifact {artifact} " + ("up to date (cached)" if e["cached"] else f"exported in {e['seconds']} s"))

    # 3. the fused variants, when the artifact lacks them and ONNX Runtime CUDA will run
    if artifact is not None and any(s.startswith("ort-cuda") for s in sides) and (has_cuda_ep() or args.quick):
        if args.levers:
            say("adding the ONNX Runtime CUDA fused variants and the U-Net lever variants (if missing) ...")
            export["lever_variants"] = variants_in_subprocess(artifact, 3 * args.variants_timeout, "add_lever_variants")
            say(f"lever variants: {str(export['lever_variants'])[:300]}")
        else:
            say("adding the ONNX Runtime CUDA fused variants (if missing) ...")
            export["ort_cuda_variants"] = variants_in_subprocess(artifact, args.variants_timeout)
            say(f"ort-cuda variants: {str(export['ort_cuda_variants'])[:300]}")
    export["prepare_wall_s"] = round(time.perf_counter() - t_start, 1)

    # 4. every side
    spec = BenchSpec(model_dir=str(model), artifact=str(artifact) if artifact else None, sides=sides, batches=batches, steps=steps,
                     guidance=7.5, height=64 if args.quick else 512, width=64 if args.quick else 512,
                     warmup=args.warmup, repeats=args.repeats, e2e_budget_s=args.budget,
                     component_warmup=2 if args.quick else 3, component_repeats=5 if args.quick else 10,
                     timeout_s=args.side_timeout, compile_budget_s=args.compile_budget,
                     total_budget_s=max(60.0, args.time_limit - (time.perf_counter() - t_start)),
                     note=("quick smoke test (tiny preset)" if args.quick else
                           "SD 1.5 architecture with random weights; DDIM, CFG as one 2B batch"))
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"benchmarking {', '.join(sides)} at batches {batches} -> {out}")
    chart = None if args.no_chart else out.with_suffix(".png")
    results = run_bench(spec, out, chart=chart, export=export, name=out.stem, log=lambda m: print(m, flush=True))

    for b in batches:
        for base in ("torch-eager-fp16", "torch-compile", "torch-compile-ro", "torch-compile-max-autotune-no-cg",
                     "torch-compile-max-autotune", "torch-eager-fp32"):
            r = ratio(results, "ort-cuda", base, b)
            if r is not None:
                say(f"B={b}: ort-cuda end to end is {r:.2f}x {base}")
        if args.quick:
            r = ratio(results, "ort-cpu", "torch-eager-fp32", b)
            if r is not None:
                say(f"B={b}: ort-cpu end to end is {r:.2f}x torch-eager-fp32")
    for rec in results["results"]:
        if rec.get("scheduler_overhead"):
            o = rec["scheduler_overhead"]
            say(f"{rec['side']} B={rec['batch']}: numpy scheduler+CFG {o['ms_per_step']:.3f} ms/step = "
                f"{o['fraction_of_step']:.2%} of a U-Net step")
    from ldm_deploy.bench.report import lever_table, tuning_table, versus_torch_table

    for b in batches:
        if args.levers:
            print(lever_table(results, b), flush=True)
        if args.tuning:
            print(tuning_table(results, b), flush=True)
        if any(s in TORCH_SIDES for s in sides):
            print(versus_torch_table(results, b), flush=True)
    for rec in results["results"]:
        if (rec.get("timing_check") or {}).get("ok") is False:
            say(f"WARNING {rec['side']} B={rec['batch']}: {rec['timing_check']['message']}")
    say(f"wrote {out}" + (f" and {chart}" if chart else "") + f" in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
