"""Load numbers for `ldm-deploy serve`: throughput and p50/p99 latency at concurrency 1..16 against calling
Pipeline directly (one request at a time, and batches of the profile's max), same artifact, backend and settings.

    python scripts/bench_serving.py ARTIFACT --serve .venv-serve/bin/ldm-deploy --backend ort-cpu \
        --steps 10 --size 64 --out benchmarks/results/serving/cpu-demo.json

Starts the server itself (loopback, free ports) from the serving environment's `ldm-deploy` (numpy < 2), or uses
a running one with --url. Each concurrency level sends `--requests` requests from that many client threads, each
sending its next request when the last one returns (closed loop, tritonclient HTTP); the distinct seeds keep every
request a real one. Latency is the client's (send to image received); `batch_sizes` counts how many requests
shared a pipeline call (the model's `batch_size` output). perf_analyzer is not used: the `perf-analyzer` wheel on
PyPI (0.1.0 here) ships no binary.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

PROMPTS = ["a large red circle in the center on a white background",
           "a medium blue square at the top left on a yellow background",
           "a small purple triangle at the bottom right on a white background",
           "a large yellow star on the left on a blue background"]


def stats(latencies: list[float], wall: float) -> dict:
    lat = np.asarray(latencies) * 1e3
    return {"requests": len(lat), "throughput_rps": round(len(lat) / wall, 3), "wall_s": round(wall, 3),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "mean_ms": round(float(lat.mean()), 1)}


def direct(artifact: str, backend: str, args) -> dict:
    """Pipeline in this process: one request at a time, then batches of the profile's max (seeds per row)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ldm_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline.from_artifact(artifact, backend=backend)
    kw = dict(steps=args.steps, guidance=args.guidance, height=args.size, width=args.size)
    pipe(PROMPTS[0], seed=0, **kw)                       # warm-up
    lat = []
    start = time.perf_counter()
    for i in range(args.direct_requests):
        t0 = time.perf_counter()
        pipe(PROMPTS[i % 4], seed=i, **kw)
        lat.append(time.perf_counter() - t0)
    out = {"one_at_a_time": stats(lat, time.perf_counter() - start)}
    b = pipe.info.profiles.batch.max if pipe.info.profiles else 1
    lat, start = [], time.perf_counter()
    for k in range(max(1, args.direct_requests // b)):
        t0 = time.perf_counter()
        pipe([PROMPTS[(k * b + j) % 4] for j in range(b)], seed=[k * b + j for j in range(b)], **kw)
        lat += [time.perf_counter() - t0] * b           # every request of the batch waits for the batch
    out[f"batches_of_{b}"] = stats(lat, time.perf_counter() - start)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(serve: str, artifact: str, backend: str, args) -> tuple[subprocess.Popen, str]:
    http, grpc, metrics = free_port(), free_port(), free_port()
    cmd = [serve, "serve", artifact, "--backend", backend, "--host", "127.0.0.1", "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-queue-size", "64",
           "--queue-delay-ms", str(args.queue_delay_ms), "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"127.0.0.1:{http}"
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit("the server did not become ready in 120 s")


def load(url: str, concurrency: int, n: int, args, seed0: int) -> dict:
    import tritonclient.http as httpclient

    from ldm_deploy.serving.client import request_tensors

    lock = threading.Lock()
    next_index = [0]
    lat, batches, errors = [], Counter(), []

    def worker():
        client = httpclient.InferenceServerClient(url, network_timeout=600.0)
        try:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= n:
                        return
                    next_index[0] += 1
                inputs = []
                for name, dtype, array in request_tensors(
                        PROMPTS[i % 4], seed=np.int64(seed0 + i), steps=np.int32(args.steps),
                        guidance=np.float32(args.guidance), height=np.int32(args.size), width=np.int32(args.size)):
                    t = httpclient.InferInput(name, list(array.shape), dtype)
                    t.set_data_from_numpy(array)
                    inputs.append(t)
                t0 = time.perf_counter()
                try:
                    r = client.infer("ldm", inputs)
                except Exception as e:  # counted, not hidden
                    with lock:
                        errors.append(str(e)[:200])
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    batches[int(r.as_numpy("batch_size").item())] += 1
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = stats(lat, time.perf_counter() - start) if lat else {"requests": 0}
    out.update(concurrency=concurrency, batch_sizes={str(k): v for k, v in sorted(batches.items())},
               errors=len(errors), first_error=errors[0] if errors else None)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--serve", help="the serving environment's ldm-deploy (starts a server); or --url")
    p.add_argument("--url", help="host:port of a running server's HTTP endpoint")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    p.add_argument("--direct-requests", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--queue-delay-ms", type=float, default=20.0)
    p.add_argument("--machine-note", default="", help="recorded as is (e.g. 'shared, loaded machine')")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not (args.serve or args.url):
        p.error("give --serve PATH/TO/ldm-deploy (starts a server) or --url HOST:PORT")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ldm_deploy.bench.machine import machine_info

    report = {"what": "ldm-deploy serve (Triton, Python backend) vs Pipeline called directly",
              "artifact": str(args.artifact), "backend": args.backend,
              "settings": {"steps": args.steps, "guidance": args.guidance, "height": args.size, "width": args.size,
                           "requests_per_level": args.requests, "queue_delay_ms": args.queue_delay_ms,
                           "client": "tritonclient HTTP, closed loop"},
              "machine": machine_info(), "machine_note": args.machine_note,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # direct runs before and after the served levels: on a shared machine the load changes between them
    report["direct_before"] = direct(args.artifact, args.backend, args)
    print(json.dumps(report["direct_before"]), flush=True)
    proc, url = (None, args.url) if args.url else start_server(args.serve, args.artifact, args.backend, args)
    try:
        load(url, 1, 2, args, seed0=10_000)                # warm-up
        report["served"] = []
        for k, c in enumerate(int(x) for x in args.concurrency.split(",")):
            row = load(url, c, max(args.requests, c), args, seed0=1000 * (k + 1))
            report["served"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    report["direct_after"] = direct(args.artifact, args.backend, args)
    print(json.dumps(report["direct_after"]), flush=True)
    one = min((report[k]["one_at_a_time"] for k in ("direct_before", "direct_after")), key=lambda r: r["p50_ms"])
    batched = [v for k in ("direct_before", "direct_after") for n, v in report[k].items() if n.startswith("batches")]
    c1 = report["served"][0]
    report["summary"] = {
        "direct_one_at_a_time_p50_ms (best of before/after)": one["p50_ms"],
        "served_concurrency_1_p50_ms": c1["p50_ms"],
        "serving_overhead_ms_at_concurrency_1": round(c1["p50_ms"] - one["p50_ms"], 1),
        "direct_one_at_a_time_rps": one["throughput_rps"],
        "direct_batched_rps (best)": max(b["throughput_rps"] for b in batched),
        "best_served_throughput_rps": max(r.get("throughput_rps", 0) for r in report["served"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
