"""Benchmark SDXL-size random fp16 weights on one GPU: our deployed path vs diffusers' PyTorch pipeline.

    python scripts/bench_sdxl.py --work /tmp/sdxl                 # H100: folder + export + every side
    python scripts/bench_sdxl.py --quick --work /tmp/sdxl-quick   # CPU smoke test: tiny-sdxl, 64 px, 3 steps

Workload (issue 21): 1024x1024, 30 steps, guidance 5, batch 1, Euler (SDXL's scheduler), one prompt.
Steps, each recorded in the JSON (rewritten after every step, so a run cut short keeps what finished):

1. the model folder: the `sdxl` preset (the hub's stable-diffusion-xl-base-1.0 configs) with seeded random
   weights, saved in fp16 (~5 GB; building it holds the fp32 modules, ~10 GB of host memory);
2. the export, in a child process: fp16 U-Net and text encoders, fp32 VAE decoder (SDXL's VAE overflows
   in fp16), static 1024x1024, batch 1, with the ONNX Runtime CUDA fused variants (`--ort-cuda`: U-Net with
   CFG folded in, text_encoder, the VAE decoder in fp32); its wall time, the child's peak RSS (VmHWM) and the
   highest RSS of each export phase (`rss_phases`, sampled every 20 ms; scripts/export_memory.py);
3. TensorRT engines for the artifact (`ldm-deploy build`), when a TensorRT builder is installed;
4. every side in its own child process: one warm-up run (compile / graph capture / engine load), then
   `--runs` timed end-to-end runs (text encoders, 30 U-Net steps under CFG, VAE decode), the median
   reported; peak GPU memory (PyTorch: max_memory_allocated; ours: device used memory, cudaMemGetInfo
   or nvidia-smi, sampled at every step).

Sides: ours-ort-cuda (ONNX Runtime CUDA over the fused variants, IO binding, CUDA graph on: what
`generate --backend ort-cuda --cuda-graph` runs), ours-ort-cuda-plain (the plain graphs, CUDA graph off: the
side as it ran before SDXL had fused variants, for comparison), ours-tensorrt, torch-eager (diffusers
StableDiffusionXLPipeline, fp16, SDPA), torch-compile (torch.compile(unet)), torch-compile-ro (channels_last
U-Net + torch.compile(mode="reduce-overhead")). The VAE decodes in fp32 on every side (diffusers upcasts it:
force_upcast). The public TensorRT figure for this workload on an H100 is 1.47 s (TensorRT's demoDiffusion,
SDXL base 1.0, 30 steps); compare with the ours-tensorrt row.
Writes benchmarks/results/sdxl/<machine>-sdxl.json (or --json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDES = ("ours-tensorrt", "ours-ort-cuda", "ours-ort-cuda-plain", "torch-eager", "torch-compile", "torch-compile-ro")
# our sides: (backend, runner options); ours-ort-cuda must run the fused variants (checked in run_ours)
OURS = {"ours-ort-cpu": ("ort-cpu", {}), "ours-tensorrt": ("tensorrt", {}),
        "ours-ort-cuda": ("ort-cuda", {"enable_cuda_graph": True}),
        "ours-ort-cuda-plain": ("ort-cuda", {"variant": None})}
QUICK_SIDES = ("ours-ort-cpu", "torch-eager")
PROMPT = "a lighthouse on a cliff at dusk, detailed oil painting"


def say(message: str) -> None:
    print(f"[bench_sdxl {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- steps run in child processes --------------------------------------------------------------------

def make_folder(preset_name: str, folder: Path) -> dict:
    from ldm_deploy.bench.machine import peak_rss_mib
    from ldm_deploy.bench.prepare import TOKENIZER
    from training.checkpoint import Components, save_components
    from training.models.presets import build_all, preset
    from training.convert_sdxl import sdxl_tokenizer_2

    start = time.perf_counter()
    p = preset(preset_name)
    for key in ("text_encoder", "text_encoder_2"):
        if p.get(key):
            p[key] = {**p[key], "vocab_size": 49408}      # the bundled CLIP vocabulary tokenizes any prompt
    m = build_all(p, seed=0)
    tok2 = sdxl_tokenizer_2(TOKENIZER, folder.parent / f"{folder.name}.tok")
    save_components(Components(unet=m["unet"], vae=m["vae"], text_encoder=m["text_encoder"],
                               text_encoder_2=m["text_encoder_2"], tokenizer_dir=TOKENIZER, tokenizer_2_dir=tok2,
                               scheduler_config=p["scheduler"], model_index=p["model_index"]), folder, fp16=True)
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mib": round(peak_rss_mib())}


def export(folder: Path, out: Path, size: int, ort_cuda: bool = True, trace: str | None = None) -> dict:
    from ldm_deploy.bench.machine import peak_rss_mib
    from ldm_deploy.export.config import ExportConfig, Range
    from ldm_deploy.export.exporter import export_model
    from scripts.export_memory import PhaseSampler

    cfg = ExportConfig(name="bench-sdxl", precision="fp16", batch=Range(1, 1, 1), height=Range(size, size, size),
                       width=Range(size, size, size), measure_runtime=False,
                       components=("text_encoder", "text_encoder_2", "unet", "vae_decoder"))
    # the fused variants the ours-ort-cuda side runs (beside the plain graphs); --no-ort-cuda measures the export a
    # user runs by default (ORT's optimizer holds the fp32 U-Net graph, 10 GB, in memory: a GPU host's job)
    cfg = cfg.replace(ort_cuda=ort_cuda)
    start = time.perf_counter()
    with PhaseSampler(trace=trace) as sampler:      # RSS per export phase (where the peak is)
        result = export_model(folder, out, cfg)
    comps = result.artifact.components
    return {"seconds": round(time.perf_counter() - start, 1), "cached": result.cached,
            "peak_rss_mib": round(peak_rss_mib()), "rss_phases": sampler.phases(),
            "components": {k: {"precision": v.precision, "export": dict(v.export) or None} for k, v in comps.items()}}


def build(artifact: Path) -> dict:
    from ldm_deploy.engine.build import BuildConfig, build_engines

    start = time.perf_counter()
    report = build_engines(artifact, artifact / "engines", BuildConfig())
    return {"seconds": round(time.perf_counter() - start, 1), "built": list(report.built)}


def run_ours(artifact: Path, side: str, steps: int, guidance: float, runs: int) -> dict:
    import numpy as np

    from ldm_deploy.bench.machine import gpu_used_mib, peak_rss_mib
    from ldm_deploy.runtime.pipeline import Pipeline

    backend, options = OURS[side]
    pipe = Pipeline.from_artifact(artifact, backend=backend, **options)
    graphs = {c: getattr(r, "variant", None) or "plain" for c, r in pipe.runners.items()}
    if side == "ours-ort-cuda" and graphs.get("unet") != "ort-cuda":
        raise SystemExit(f"{artifact} has no ort-cuda variants (an export from before they existed): "
                         "rerun without --reuse")
    peak = [0.0]

    def sample(*_):
        used = gpu_used_mib() if backend != "ort-cpu" else None
        if used:
            peak[0] = max(peak[0], used[0])

    latents = np.random.default_rng(0).standard_normal(
        (1, 4, pipe.info.profiles.height.opt // 8, pipe.info.profiles.width.opt // 8), dtype=np.float32)
    kw = dict(steps=steps, guidance=guidance, latents=latents, callback=sample)
    pipe(PROMPT, **kw)                                                      # warm-up
    times, unet = [], []
    for _ in range(runs):
        r = pipe(PROMPT, **kw)
        times.append(r.timings["total"])
        unet.append(r.timings["unet_per_step"])
    return {"seconds": [round(t, 4) for t in times], "median_s": round(statistics.median(times), 4),
            "unet_ms_per_step": round(1e3 * statistics.median(unet), 2), "peak_gpu_mib": round(peak[0]) or None,
            "peak_rss_mib": round(peak_rss_mib()), "graphs": graphs, "options": options}


def run_torch(folder: Path, side: str, steps: int, guidance: float, runs: int, size: int, device: str) -> dict:
    import torch
    from diffusers import StableDiffusionXLPipeline

    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    if side == "torch-compile":
        pipe.unet = torch.compile(pipe.unet)
    elif side == "torch-compile-ro":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    g = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn((1, 4, size // 8, size // 8), generator=g).to(device, dtype)
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, latents=latents,
              output_type="np")

    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(PROMPT, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warm = [once() for _ in range(2 if "compile" in side else 1)]     # compile / CUDA-graph capture
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [once() for _ in range(runs)]
    out = {"seconds": [round(t, 4) for t in times], "median_s": round(statistics.median(times), 4),
           "warmup_s": [round(t, 2) for t in warm]}
    if device == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


# --- the driver ------------------------------------------------------------------------------------

def _failure(proc: subprocess.CompletedProcess | None, trace: str | None) -> dict:
    """A failed step's record: the exit (a signal named: SIGKILL with no traceback is, in practice, the kernel's
    OOM killer), the last lines of its stderr, and, for the export, the RSS of each phase it reached."""
    import signal

    if proc is None:        # timed out: the caller names it
        error = ""
    elif proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        error = f"killed by {name}" + (" (out of memory: the kernel's OOM killer, most likely)" if name == "SIGKILL" else "")
    else:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        error = f"exit {proc.returncode}: {' | '.join(tail)}"
    record = {"error": error}
    if trace and Path(f"{trace}.marks").is_file():
        from scripts.export_memory import trace_phases

        record["rss_phases"] = phases = trace_phases(Path(trace))
        if phases:
            last = phases[-1]
            record["error"] += (f"; last phase: '{last['after']}' at {last['t_s']} s, "
                                f"{max(p['peak_rss_mib'] for p in phases)} MiB peak RSS")
    return record


def child(step: str, timeout_s: float, **kwargs) -> dict:
    """Run `step` in a fresh interpreter (own memory peak, a crash costs only that step)."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); import scripts.bench_sdxl as b; "
            f"from pathlib import Path; kw = json.loads(sys.argv[1]); "
            f"kw = {{k: Path(v) if k in ('folder', 'out', 'artifact') else v for k, v in kw.items()}}; "
            f"print('RESULT ' + json.dumps(b.{step}(**kw)))")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps({k: str(v) if isinstance(v, Path) else v
                                                                        for k, v in kwargs.items()})],
                              capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        record = _failure(None, kwargs.get("trace"))
        record["error"] = f"timed out after {timeout_s:.0f} s" + record["error"]
        return record
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return _failure(proc, kwargs.get("trace"))
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def _export_step(args, folder: Path, artifact: Path, results: dict, save) -> None:
    from ldm_deploy.artifact import is_artifact

    if args.reuse and is_artifact(artifact):
        say(f"reusing the export in {artifact}")
        return
    say("exporting (fp16 U-Net and text encoders, fp32 VAE decoder)")
    for stale in ("export-rss.marks", "export-rss.rss"):     # a trace is this export's alone
        (args.work / stale).unlink(missing_ok=True)
    results["steps"]["export"] = child("export", args.timeout, folder=folder, out=artifact, size=args.size,
                                       ort_cuda=args.ort_cuda, trace=str(args.work / "export-rss"))
    save()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-sdxl"), help="model folder, artifact, engines")
    ap.add_argument("--sides", default=None, help=f"comma list (default: {','.join(SIDES)}); 'none': folder and export "
                    "only; torch sides alone skip the export")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per side after one warm-up (median reported)")
    ap.add_argument("--quick", action="store_true", help="tiny-sdxl preset, 64 px, 3 steps, CPU sides")
    ap.add_argument("--json", type=Path, help="results file (default benchmarks/results/sdxl/<machine>-sdxl.json)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per step")
    ap.add_argument("--no-ort-cuda", dest="ort_cuda", action="store_false",
                    help="export without the ONNX Runtime CUDA fused variants (the default export's memory)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep an export already in --work (its time and memory were recorded by the run that made it)")
    args = ap.parse_args(argv)
    from ldm_deploy.bench.machine import machine_info

    if args.quick:
        args.size, args.steps = 64, 3
    sides = (() if args.sides == "none" else tuple(args.sides.split(","))) if args.sides else (QUICK_SIDES if args.quick else SIDES)
    info = machine_info()
    gpu = (info.get("gpus") or ["cpu"])[0].split(",")[0]
    out = args.json or ROOT / "benchmarks" / "results" / "sdxl" / f"{'quick' if args.quick else gpu.lower().replace(' ', '-')}-sdxl.json"
    results = {"workload": {"model": "tiny-sdxl" if args.quick else "sdxl", "size": args.size, "steps": args.steps,
                            "guidance": args.guidance, "batch": 1, "scheduler": "euler", "runs": args.runs},
               "machine": info, "steps": {}, "sides": {}}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    folder, artifact = args.work / "model", args.work / "onnx-fp16"
    args.work.mkdir(parents=True, exist_ok=True)
    if not (folder / "model_index.json").is_file():
        say(f"building the random-weight {'tiny-sdxl' if args.quick else 'sdxl'} folder in {folder}")
        results["steps"]["folder"] = child("make_folder", args.timeout, preset_name="tiny-sdxl" if args.quick else "sdxl",
                                           folder=folder)
        save()
    if not sides or any(side in OURS for side in sides):     # the torch sides read the folder alone
        _export_step(args, folder, artifact, results, save)
    if "ours-tensorrt" in sides:
        say("building TensorRT engines")
        results["steps"]["build"] = child("build", args.timeout, artifact=artifact)
        save()
    for side in sides:
        say(f"side {side}")
        if side in OURS:
            r = child("run_ours", args.timeout, artifact=artifact, side=side, steps=args.steps,
                      guidance=args.guidance, runs=args.runs)
        else:
            r = child("run_torch", args.timeout, folder=folder, side=side, steps=args.steps, guidance=args.guidance,
                      runs=args.runs, size=args.size, device="cpu" if args.quick else "cuda")
        results["sides"][side] = r
        save()
        say(f"  {side}: {r.get('median_s', r.get('error'))} s, peak GPU {r.get('peak_gpu_mib')} MiB")
    say(f"wrote {out}")
    return 0 if all("error" not in r for r in [*results["steps"].values(), *results["sides"].values()]) else 1


if __name__ == "__main__":
    sys.exit(main())
