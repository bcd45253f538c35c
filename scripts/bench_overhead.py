#!/usr/bin/env python3
"""The numpy scheduler + CFG cost per step, on this machine's CPU, without a U-Net.

The loop `Pipeline.__call__` runs (`CfgDenoiser` CFG over one 2B batch, the finiteness check, the
sampler's update) over a zero-cost U-Net runner that hands back a preallocated output, at SD 1.5
shapes (latents (B, 4, 64, 64)). Reports µs per step (median of repeats) per sampler and batch, and
the cost of each piece of one DDIM step, so a GPU host's `scheduler_overhead_per_step` (which also
sees the caches and clocks around a real U-Net call) can be read against the CPU's own floor.

    python scripts/bench_overhead.py --json overhead.json [--steps 50] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_deploy.runtime import schedulers as sch          # noqa: E402
from ldm_deploy.runtime.guidance import guide                # noqa: E402
from ldm_deploy.runtime.pipeline import finite_fast, make_denoiser   # noqa: E402

SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
        "skip_prk_steps": True}


class ZeroCostUnet:
    def __init__(self, batch: int):
        self.out = {"noise_pred": np.full((2 * batch, 4, 64, 64), 0.1, np.float32)}

    def __call__(self, inputs):
        return self.out


def per_step_us(name: str, batch: int, steps: int, repeats: int) -> float:
    emb = np.zeros((2 * batch, 77, 768), np.float32)
    emb.setflags(write=False)
    times = []
    for r in range(repeats + 1):
        denoiser = make_denoiser(ZeroCostUnet(batch), emb, guidance=7.5, guidance_rescale=0.0)
        schedule = sch.make_schedule(name, SD15, steps)
        x = sch.start_latent(schedule, np.random.default_rng(r).standard_normal((batch, 4, 64, 64), np.float32))
        t0 = time.perf_counter()
        sch.sample(name, denoiser, x, schedule, rng=np.random.default_rng(0))
        loop = time.perf_counter() - t0
        if r:                                   # the first run warms caches and allocators
            times.append((loop - denoiser.unet_s) / denoiser.calls * 1e6)
    return float(np.median(times))


def pieces_us(batch: int, number: int = 2000) -> dict[str, float]:
    """One DDIM-with-CFG step taken apart (µs each, best of 5)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 4, 64, 64), np.float32)
    pred = rng.standard_normal((2 * batch, 4, 64, 64), np.float32)
    sample = np.empty_like(pred)
    uncond, cond = pred[:batch], pred[batch:]
    guided = cond - uncond

    def cfg_input():
        sample[:batch] = x
        sample[batch:] = x

    def cfg_combine():
        guide(uncond, cond, 7.5)

    def ddim_update():
        y = x * np.float32(1.01)
        y += guided * np.float32(0.02)

    parts = {"cfg_input_copy": cfg_input, "cfg_combine": cfg_combine, "finite_check": lambda: finite_fast(guided),
             "ddim_update": ddim_update, "python_call": lambda: None}
    return {k: round(min(timeit.repeat(f, number=number, repeat=5)) / number * 1e6, 2) for k, f in parts.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", default="1,4")
    args = ap.parse_args()
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                          "numpy": np.__version__},
              "steps": args.steps, "us_per_step": {}, "ddim_step_pieces_us": {}}
    for b in (int(v) for v in args.batches.split(",")):
        for name in ("ddim", "euler", "dpmpp-2m"):
            result["us_per_step"][f"{name} B={b}"] = round(per_step_us(name, b, args.steps, args.repeats), 1)
        result["ddim_step_pieces_us"][f"B={b}"] = pieces_us(b)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
