#!/usr/bin/env python3
"""Build an artifact's TensorRT engines and record what the build cost: wall time per component,
engine sizes, peak host memory and the machine, as JSON (benchmarks/export/*-build-*.json).

    python scripts/build_report.py ARTIFACT --out ENGINE_DIR --json build.json [--backend tensorrt-rtx]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_deploy.bench.machine import machine_info, peak_rss_mib   # noqa: E402
from ldm_deploy.engine.build import BuildConfig, build_engines     # noqa: E402
from ldm_deploy.fileio import write_json                            # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="engine directory")
    ap.add_argument("--json", type=Path, required=True, help="write the report here")
    ap.add_argument("--backend", choices=("tensorrt", "tensorrt-rtx"))
    ap.add_argument("--opt-level", type=int, default=3)
    ap.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    args = ap.parse_args()
    start = time.perf_counter()
    report = build_engines(args.artifact, args.out, BuildConfig(backend=args.backend, opt_level=args.opt_level,
                                                                force=args.force))
    wall = time.perf_counter() - start
    sidecars = {p.name.removesuffix(".engine.json"): json.loads(p.read_text()) for p in sorted(args.out.glob("*.engine.json"))}
    result = {
        "what": f"ldm-deploy build {args.artifact} --backend {report.flavour}",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "flavour": report.flavour, "tensorrt_version": report.tensorrt_version,
        "wall_s": round(wall, 1), "peak_rss_gib": round(peak_rss_mib() / 1024, 2),
        # a TensorRT for RTX build next to a GPU it cannot run on happens in a child process (GPU hidden)
        "peak_rss_children_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "per_component": {r.component: {k: v for k, v in vars(r).items() if k != "component"} for r in report.results},
        "engine_bytes": {name: s["engine"]["bytes"] for name, s in sidecars.items()},
        "targets": next(iter(sidecars.values()))["key"]["compute_capabilities"] if sidecars else None,
        "gpu_key": next(iter(sidecars.values()))["key"]["gpu"] if sidecars else None,
    }
    write_json(args.json, json.loads(json.dumps(result, default=str)))   # Paths as strings
    print(json.dumps({k: result[k] for k in ("wall_s", "peak_rss_gib", "engine_bytes", "targets", "gpu_key")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
