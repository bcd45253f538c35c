"""What switching LoRAs at run time costs: switch time, extra memory, per-step U-Net latency.

    python scripts/lora_switch_cost.py                                    # demo model, ort-cpu
    python scripts/lora_switch_cost.py --kind sd15 --backend ort-cuda --precision fp16 \\
        --out benchmarks/results/lora-switch-sd15-gpu.json                # SD 1.5-size random weights, GPU
    python scripts/lora_switch_cost.py --kind sd15 --backend ort-cuda --precision fp16 --ort-cuda \\
        --out benchmarks/results/lora/lora-switch-h100-sd15-ortcuda-fused-fp16.json   # the fused variants

Exports the model twice (plain, and with `lora_switchable`: text encoder + U-Net + VAE decoder, static
native size, batch 1), writes two random rank-`--rank` LoRAs in the diffusers/peft layout over every
attention projection, feed-forward and proj_in/proj_out of the U-Net and the text encoder's attention
(what typical SD LoRAs touch), then measures on `--backend`:
- `set_loras` time: A (cold: reads the file), B, none; median of `--repeats`;
- memory: the base weights the switchable runners hold, the merged copies a LoRA adds, process RSS
  (and GPU memory on ort-cuda) around opening and switching;
- U-Net time per step, plain vs switchable graph (weights as inputs cost ORT its constant weight
  pre-packing on CPU), median over `--repeats` generations of `--steps` steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
           "q_proj", "k_proj", "v_proj", "out_proj")


def make_lora(runners, path: Path, rank: int, seed: int) -> dict:
    """A random LoRA (diffusers/peft layout) over the TARGETS layers of the switchable runners."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for component, runner in runners.items():
        for name, w in runner.base_weights.items():
            module = name[: -len(".weight")]
            if not module.endswith(TARGETS):
                continue
            out_f, in_f = w.shape[0], int(np.prod(w.shape[1:]))
            tensors[f"{component}.{module}.lora_A.weight"] = (rng.standard_normal((rank, in_f)) / in_f ** 0.5).astype(
                np.float32).reshape(rank, *w.shape[1:])
            tensors[f"{component}.{module}.lora_B.weight"] = (rng.standard_normal((out_f, rank)) * 0.02).astype(
                np.float32).reshape(out_f, rank, *([1] * (w.ndim - 2)))
    save_file(tensors, str(path))
    return {"modules": len(tensors) // 2, "bytes": path.stat().st_size}


def memory_record(held_base: int, held_merged: int, rss: tuple, gpu: tuple) -> dict:
    """MiB: the base weights held, the merged copies, host RSS and device use (MiB already, None off CUDA) after
    opening, the warm-up and the switches, each against before opening. The device's use after the warm-up
    (activations, ORT's arena) is what its use after switching is to be read against."""
    def mib(x):
        return round(x / 2**20, 1)

    def dev(k):
        return None if gpu[k] is None else round(gpu[k] - gpu[0], 1)

    return {"base_weights_held": mib(held_base), "merged_copies_with_a": mib(held_merged),
            "rss_open_switchable": mib(rss[1] - rss[0]), "rss_after_warmup": mib(rss[2] - rss[0]),
            "rss_after_switching": mib(rss[3] - rss[0]),
            "gpu_used_open": dev(1), "gpu_used_after_warmup": dev(2), "gpu_used_after_switching": dev(3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="diffusers folder (default: models/shapes-demo for --kind demo)")
    ap.add_argument("--kind", default="demo", choices=("demo", "sd15", "tiny"),
                    help="random-weight architecture when --model is not given (ldm_deploy.bench.prepare)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ldm-lora-cost"))
    ap.add_argument("--backend", default="ort-cpu", choices=("ort-cpu", "ort-cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    ap.add_argument("--cuda-graph", action="store_true", help="ort-cuda: capture the U-Net as a CUDA graph")
    ap.add_argument("--switchable", default="linear", choices=("linear", "all"), help="lora_switchable mode")
    ap.add_argument("--ort-cuda", action="store_true",
                    help="export both artifacts with --ort-cuda: ort-cuda then runs the fused variants (the switchable "
                         "one with its weights as inputs, export/ort_lora.py) against the plain fused ones")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora" / "lora-switch-cpu-demo.json")
    args = ap.parse_args(argv)


    from ldm_deploy.bench.machine import gpu_used_mib, machine_info
    from ldm_deploy.export.config import default_config
    from ldm_deploy.export.exporter import export_model
    from ldm_deploy.runtime.pipeline import Pipeline

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        if args.kind == "demo" and (ROOT / "models" / "shapes-demo").is_dir():
            model = ROOT / "models" / "shapes-demo"
        else:
            from ldm_deploy.bench.prepare import random_model_folder
            model, _ = random_model_folder(args.kind, args.work / f"{args.kind}-model")
    config = default_config(model).replace(components=("text_encoder", "unet", "vae_decoder"),
                                           precision=args.precision, measure_runtime=False)
    config = config.replace(batch=type(config.batch)(1, 1, 1), ort_cuda=args.ort_cuda)
    fused = "-ortcuda" if args.ort_cuda else ""
    t0 = time.perf_counter()
    plain = export_model(model, args.work / f"plain-{args.precision}{fused}", config).path
    t1 = time.perf_counter()
    switch = export_model(model, args.work / f"switch-{args.switchable}-{args.precision}{fused}",
                          config.replace(lora_switchable=args.switchable)).path
    t2 = time.perf_counter()

    import psutil

    proc = psutil.Process()
    opts = {"enable_cuda_graph": True} if args.cuda_graph else {}

    def gpu():
        used = gpu_used_mib() if args.backend == "ort-cuda" else None
        return None if used is None else round(used[0], 1)

    rss0, gpu0 = proc.memory_info().rss, gpu()
    pipe = Pipeline.from_artifact(switch, backend=args.backend, **opts)
    rss1, gpu1 = proc.memory_info().rss, gpu()
    from ldm_deploy.runtime.lora_switch import switchable

    runners = switchable(pipe.runners)
    files = {n: args.work / f"lora-{n}.safetensors" for n in ("a", "b")}
    lora_info = {n: make_lora(runners, p, args.rank, seed) for (n, p), seed in zip(files.items(), (1, 2))}
    kw = dict(steps=args.steps, seed=0, guidance=7.5)
    pipe("warm up", **kw)
    rss2, gpu2 = proc.memory_info().rss, gpu()

    times = {"a": [], "b": [], "none": []}
    changed = {}
    for _ in range(args.repeats):
        for name, loras in (("a", [f"{files['a']}:0.8"]), ("b", [f"{files['b']}:0.8"]), ("none", [])):
            info = pipe.set_loras(loras)
            times[name].append(info["seconds"])
            changed[name] = info["changed"]
    pipe.set_loras([f"{files['a']}:0.8"])
    rss3, gpu3 = proc.memory_info().rss, gpu()
    held_base = sum(w.nbytes for r in runners.values() for w in r.base_weights.values())
    held_merged = sum(w.nbytes for r in runners.values() for n, w in r.weights.items() if w is not r.base_weights[n])

    # per-step U-Net time, interleaved (plain, switchable base, switchable A) so machine load hits all three
    plain_pipe = Pipeline.from_artifact(plain, backend=args.backend, **opts)
    plain_pipe("warm up", **kw)
    steps = {"plain": [], "base": [], "a": []}
    for _ in range(args.repeats):
        steps["plain"].append(plain_pipe("a red circle", **kw).timings["unet_per_step"])
        pipe.set_loras([])
        steps["base"].append(pipe("a red circle", **kw).timings["unet_per_step"])
        pipe.set_loras([f"{files['a']}:0.8"])
        steps["a"].append(pipe("a red circle", **kw).timings["unet_per_step"])
    step_plain, step_switch_base, step_switch_lora = (statistics.median(steps[k]) for k in ("plain", "base", "a"))

    result = {
        "machine": machine_info(),
        "model": str(model), "switchable": args.switchable, "backend": args.backend, "precision": args.precision, "cuda_graph": args.cuda_graph,
        "ort_cuda": args.ort_cuda, "unet_graph": {"plain": plain_pipe.runners["unet"].model_path.name,
                                                   "switchable": pipe.runners["unet"].model_path.name},
        "export_seconds": {"plain": round(t1 - t0, 1), "switchable": round(t2 - t1, 1)},
        "switchable_tensors": {c: len(r.base_weights) for c, r in runners.items()},
        "loras": lora_info, "rank": args.rank,
        "switch_seconds_median": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "switch_seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "tensors_rewritten": changed,
        "memory_mib": memory_record(held_base, held_merged, (rss0, rss1, rss2, rss3), (gpu0, gpu1, gpu2, gpu3)),
        "unet_ms_per_step": {"plain": round(step_plain * 1e3, 2), "switchable_base": round(step_switch_base * 1e3, 2),
                             "switchable_lora_a": round(step_switch_lora * 1e3, 2)},
        "unet_ms_per_step_all": {k: [round(x * 1e3, 2) for x in v] for k, v in steps.items()},
        "load_average_1m_at_end": round(__import__("os").getloadavg()[0], 2),
        "steps": args.steps, "repeats": args.repeats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("switch_seconds_median", "memory_mib", "unet_ms_per_step")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
