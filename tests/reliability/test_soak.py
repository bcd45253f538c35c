"""Soak: 500 generations in one process (tiny artifact, ORT CPU, 2 steps, 32..64 px, batch 1..2,
varying prompts and samplers) with resident memory growing less than 5 % after a 20-generation warm-up.
"""
from __future__ import annotations

import gc
import itertools
import time

import psutil

GENERATIONS, WARMUP, MAX_GROWTH = 500, 20, 0.05
SIZES = [(32, 32), (32, 64), (64, 32), (64, 64), (48, 40)]
SCHEDULERS = ["pndm", "ddim", "euler", "euler-ancestral", "dpmpp-2m"]


def test_500_generations_without_memory_growth(artifact):
    from ldm_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline.from_artifact(artifact)
    proc = psutil.Process()
    cases = itertools.cycle(itertools.product(SIZES, SCHEDULERS, (1, 2)))
    start = time.perf_counter()
    rss = []
    for i in range(GENERATIONS):
        (h, w), scheduler, n = next(cases)
        result = pipe(f"shape {i}", steps=2, seed=i, height=h, width=w, num_images=n, scheduler=scheduler)
        assert result.images.shape == (n, h, w, 3)
        if i + 1 == WARMUP:
            gc.collect()
            base = proc.memory_info().rss
        if (i + 1) % 50 == 0:
            rss.append(proc.memory_info().rss)
    gc.collect()
    final = proc.memory_info().rss
    seconds = time.perf_counter() - start
    growth = final / base - 1
    print(f"\nsoak: {GENERATIONS} generations in {seconds:.1f} s; RSS after warm-up {base / 2**20:.1f} MiB, "
          f"final {final / 2**20:.1f} MiB ({growth:+.2%}); every 50: {[round(r / 2**20, 1) for r in rss]}")
    assert growth < MAX_GROWTH
