"""One (side, batch) of a benchmark, in a process of its own (so its peak RSS and CUDA context are its own).

    python -m ldm_deploy.bench.worker CASE.json RESULT.json

CASE.json: {"spec": BenchSpec.to_dict(), "side": ..., "batch": B, "height": H, "width": W}. The result
is always written: a side that raises records {"status": "error", "error": "..."} (fail soft); a step
run under `deadline` that overruns records {"status": "timeout", ...} and the worker exits.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback

from ldm_deploy.bench.machine import peak_rss_mib
from ldm_deploy.bench.spec import TORCH_SIDES, BenchSpec


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


_CASE: dict = {}   # main() fills: "result" (path), "side", "batch", "start"


@contextlib.contextmanager
def deadline(seconds: float, record: dict, what: str, result_path: str | None = None):
    """Give the block `seconds`; past that, write `record` with status "timeout" as this worker's result
    and end the worker with its whole process group (torch.compile's compile workers included), so one
    compile that does not finish costs its budget and is recorded, not the run. The harness starts each
    worker as a process-group leader; run elsewhere, only this process exits. `result_path` overrides where
    the record goes (default: the worker's result file)."""
    start = time.perf_counter()

    def expire():
        result = {"side": _CASE.get("side"), "batch": _CASE.get("batch"), **record, "status": "timeout",
                  "error": f"{what} did not finish within {seconds:g} s (timeout after {seconds:g} s)",
                  "wall_s": round(time.perf_counter() - _CASE.get("start", start), 2)}
        log(f"{_CASE.get('side')} b{_CASE.get('batch')}: {result['error']}")
        path = result_path or _CASE.get("result")
        if path:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2, default=str)
        sys.stdout.flush()
        if os.getpgid(0) == os.getpid():   # leader of our own group: take the compile workers with us
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(3)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def run_case(case: dict) -> dict:
    spec = BenchSpec.from_dict(case["spec"])
    side, batch, height, width = case["side"], int(case["batch"]), int(case["height"]), int(case["width"])
    start = time.perf_counter()
    load_before = _load_avg()
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
    # 1-minute load average before and after, against the cores: a machine busier than its cores makes
    # timings of threaded CPU code swing by orders of magnitude (a worker thread descheduled at every
    # parallel region), which is how a component median and an end-to-end median stop adding up
    record["load_avg_1min"] = {"before": load_before, "after": _load_avg(), "cores": os.cpu_count()}
    record["wall_s"] = round(time.perf_counter() - start, 2)
    return {"side": side, "batch": batch, **record}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    case = json.loads(open(argv[0], encoding="utf-8").read())
    # run as `python -m`, this file is __main__; the sides import ldm_deploy.bench.worker, a second module
    # object, for `deadline`: fill both
    import ldm_deploy.bench.worker as imported

    for target in {id(_CASE): _CASE, id(imported._CASE): imported._CASE}.values():
        target.update(result=argv[1], side=case.get("side"), batch=case.get("batch"), start=time.perf_counter())
    result = run_case(case)
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
