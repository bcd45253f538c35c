"""Benchmark the demo model on CPU: ONNX Runtime (our deployed path) vs PyTorch eager fp32 vs torch.compile.

    python scripts/bench_demo.py                                  # -> benchmarks/results/cpu-demo.json + .png
    python scripts/bench_demo.py --model models/shapes-demo --steps 25 --batches 1,4

Uses `--model DIR` (any diffusers folder; default models/shapes-demo when it exists) or builds a
random-weight folder with the shapes demo architecture (training/configs/shapes.yaml, 128x128) in
`--work`. Exports it (fp32, static 128x128, batch 1..max) unless `--artifact` is given.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="diffusers model folder (default: models/shapes-demo, else random)")
    ap.add_argument("--artifact", type=Path, help="exported artifact of --model (default: export into --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ldm-bench-demo"))
    ap.add_argument("--sides", default="ort-cpu,ort-cpu-no-spin,torch-eager-fp32,torch-compile")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="CPU threads for both ONNX Runtime and torch (default: all cores)")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu-demo.json")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 64 px, 3 steps (a smoke test)")
    args = ap.parse_args(argv)

    from ldm_deploy.bench.harness import ratio, run_bench
    from ldm_deploy.bench.prepare import export_for_bench, random_model_folder
    from ldm_deploy.bench.spec import BenchSpec

    kind = "tiny" if args.quick else "demo"
    steps = 3 if args.quick else args.steps
    batches = tuple(int(b) for b in args.batches.split(","))
    model = args.model or (ROOT / "models" / "shapes-demo" if (ROOT / "models" / "shapes-demo").is_dir() and not args.quick
                           else None)
    model_note = f"trained model {model}" if model else f"random weights, {kind} architecture"
    if model is None:
        model, seconds = random_model_folder(kind, args.work / f"{kind}-model")
        print(f"[bench] random {kind} model folder {model}" + (f" built in {seconds} s" if seconds else " (reused)"),
              flush=True)
    export = None
    artifact = args.artifact
    if artifact is None:
        artifact = args.work / f"{kind}-onnx-fp32"
        export = export_for_bench(model, artifact, batch_max=max(batches))
        how = "cached" if export["cached"] else f"exported in {export['seconds']} s"
        print(f"[bench] artifact {artifact} ({how})", flush=True)
    note = (f"{model_note}; CPU machine with {os.cpu_count()} cores"
            + (f", {args.note}" if args.note else ""))
    spec = BenchSpec(model_dir=str(model), artifact=str(artifact), sides=tuple(args.sides.split(",")), batches=batches,
                     steps=steps, device="cpu", threads=args.threads, repeats=args.repeats,
                     component_repeats=5 if args.quick else 10, note=note)
    results = run_bench(spec, args.out, chart=args.out.with_suffix(".png"), export=export, name=args.out.stem,
                        log=lambda m: print(m, flush=True))
    for b in batches:
        for ours in ("ort-cpu", "ort-cpu-no-spin"):
            for base in ("torch-eager-fp32", "torch-compile"):
                r = ratio(results, ours, base, b)
                if r is not None:
                    print(f"[bench] B={b}: {ours} is {r:.2f}x {base} end to end", flush=True)
    print(f"[bench] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
