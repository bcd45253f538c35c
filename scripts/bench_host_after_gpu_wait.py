#!/usr/bin/env python3
"""What one folded DDIM step costs the host right after a GPU wait (needs torch with CUDA).

The numpy part of a denoising step (finiteness check + the two-pass DDIM update, as
`ldm_deploy/runtime/schedulers/ddim.py` runs it) measured after `torch.cuda.synchronize()` on ~`wait`
ms of GPU matmuls, with the U-Net output as a fresh host array (as `OrtValue.numpy()` hands it back),
at SD 1.5 latent shapes. `scripts/bench_overhead.py` measures the same pieces back to back (a hot
core); the difference is what the CPU loses while it waits for the GPU, which no numpy change removes.

    python scripts/bench_host_after_gpu_wait.py [--json out.json]

Variants: `check+update` (what the pipeline runs), `update` (no check), `update-prealloc` (the new
latents written into two reused buffers instead of a new array), `one-pass` (a single in-place multiply).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

VARIANTS = ("check+update", "update", "update-prealloc", "one-pass")


def host_step_us(batch: int, wait_ms: float, variant: str, steps: int = 50) -> float:
    import torch

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    matmuls = max(1, int(wait_ms / 1e3 / ((time.perf_counter() - start) / 10)))
    src = torch.randn(batch, 4, 64, 64, device="cuda")
    x = np.random.default_rng(0).standard_normal((batch, 4, 64, 64), dtype=np.float32)
    x0, bufs = np.empty_like(x), [np.zeros_like(x), np.zeros_like(x)]
    times = []
    for i in range(steps):
        for _ in range(matmuls):
            a @ a
        torch.cuda.synchronize()
        eps = src.cpu().numpy()                       # a fresh host array, as the runner returns
        t = time.perf_counter()
        if variant == "check+update" and not math.isfinite(np.vdot(eps, eps)):
            raise RuntimeError("non-finite")
        if variant == "one-pass":
            np.multiply(x, 0.9, out=x0)
        else:
            xn = np.multiply(eps, 0.3, out=bufs[i % 2] if variant == "update-prealloc" else None)
            x = np.add(xn, np.multiply(x, 0.9, out=x0), out=xn)
        times.append(time.perf_counter() - t)
    return round(float(np.median(times[5:])) * 1e6, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    # the GPU wait of one U-Net step of the deployed SD 1.5 path on an H200: ~8 ms at B=1, ~24 ms at B=4
    results = {f"B={b} {v}": host_step_us(b, w, v) for b, w in ((1, 8.0), (4, 24.0)) for v in VARIANTS}
    text = json.dumps({"us_per_step": results}, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
