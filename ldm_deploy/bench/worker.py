"""One (side, batch) of a benchmark, in a process of its own (so its peak RSS and CUDA context are its own).

    python -m ldm_deploy.bench.worker CASE.json RESULT.json

CASE.json: {"spec": BenchSpec.to_dict(), "side": ..., "batch": B, "height": H, "width": W}. The result
is always written: a side that raises records {"status": "error", "error": "..."} (fail soft).
"""
from __future__ import annotations

import json
import sys
import time
import traceback

from ldm_deploy.bench.machine import peak_rss_mib
from ldm_deploy.bench.spec import TORCH_SIDES, BenchSpec


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def run_case(case: dict) -> dict:
    spec = BenchSpec.from_dict(case["spec"])
    side, batch, height, width = case["side"], int(case["batch"]), int(case["height"]), int(case["width"])
    start = time.perf_counter()
    try:
        if side in TORCH_SIDES:
            from ldm_deploy.bench import torch_side as impl
        else:
            from ldm_deploy.bench import ort_side as impl
        record = impl.run(spec, side, batch, height, width, log)
        record.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001 - fail soft: the other sides still run
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        record = {"status": "error", "error": f"{type(e).__name__}: {message}"[:500],
                  "traceback": traceback.format_exc(limit=6)[-2000:]}
        log(f"{side} b{batch}: ERROR {record['error']}")
    record["peak_rss_mib"] = round(peak_rss_mib(), 1)
    record["wall_s"] = round(time.perf_counter() - start, 2)
    return {"side": side, "batch": batch, **record}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    case = json.loads(open(argv[0], encoding="utf-8").read())
    result = run_case(case)
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
