#!/usr/bin/env python
"""How many nodes debug-precision keeps in fp32 against today's hand-chosen list, and the fp16 error
against fp32, per component, for the demo model and/or an SD 1.5-size model with random weights.

    python scripts/precision_report.py --model demo --out benchmarks/precision/demo-cpu2core.json
    python scripts/precision_report.py --model sd15 --device cuda --size 256 \
        --out benchmarks/precision/sd15-h100.json          # GPU host; ~1 h of CPU work without --device cuda

`sd15` is made by ldm_deploy.bench.prepare.random_model_folder (cached under --work); each model is
exported once in fp32 (cached under --work) and debug-precision runs on that fp32 artifact per component. The U-Net is
compared at --size (default: 256 for sd15: every marked activation of both graphs is held in memory,
and SD 1.5's 64x64-latent attention scores alone are 1 GiB per layer at batch 2).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("demo", "sd15"), action="append", required=True)
    p.add_argument("--components", default="unet,vae_decoder,text_encoder")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", type=int, help="image size (default: 128 demo, 256 sd15)")
    p.add_argument("--inputs", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--work", default=str(ROOT / "outputs" / "precision"), help="where the sd15 random folder and fp32 exports are cached")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from ldm_deploy.bench.machine import machine_info
    from ldm_deploy.bench.prepare import random_model_folder
    from ldm_deploy.export.config import Range, load_config
    from ldm_deploy.export.exporter import export_model
    from ldm_deploy.export.precision import PrecisionDebugConfig, debug_precision
    from ldm_deploy.fileio import write_json

    results = {"machine": machine_info(), "device": args.device, "command": " ".join(sys.argv), "models": {}}
    for kind in args.model:
        if kind == "demo":
            folder, config, size = ROOT / "models" / "shapes-demo", "demo", args.size or 128
        else:
            folder, _ = random_model_folder("sd15", Path(args.work) / "sd15-random")
            config, size = "sd15", args.size or 256
        entry = {"folder": str(folder), "size": size, "components": {}}
        # one fp32 export (cached by export_model) serves every component: debug-precision takes an fp32 artifact
        start = time.perf_counter()
        fp32 = load_config(config).replace(precision="fp32", vae_precision="fp32", ort_cuda=False,
                                           components=("text_encoder", "unet", "vae_decoder"), measure_runtime=False,
                                           height=Range(size, size, size), width=Range(size, size, size))
        artifact = export_model(folder, Path(args.work) / f"{kind}-fp32", fp32).path
        entry["fp32_export_seconds"] = round(time.perf_counter() - start, 1)
        for component in args.components.split(","):
            start = time.perf_counter()
            report = debug_precision(PrecisionDebugConfig(
                str(artifact), component=component, inputs=args.inputs, steps=args.steps, height=size, width=size,
                device=args.device))
            d = report.as_dict()
            d.pop("layers")
            layers = [s for s in report.as_dict()["layers"] if s["node"] not in d["mask_sentinels"]]
            d["worst_layers"] = sorted(layers, key=lambda s: -s["max_rel"])[:10]
            d["seconds"] = round(time.perf_counter() - start, 1)
            entry["components"][component] = d
            print(report.summary(limit=10), flush=True)
        results["models"][kind] = entry
    write_json(Path(args.out), json.loads(json.dumps(results, default=str)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
