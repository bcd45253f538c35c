"""ldm_deploy.lora.merge (the run-time switch's merge) against the formula written out, whole-file deltas first
(`LoraFile.deltas`, as the export merges them): bit for bit, for
fp16 and fp32 bases, two LoRAs, two modules on one weight, a LoCon kernel, weights outside the base, and any number
of threads (each weight is its own task, so the thread count cannot change a result)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldm_deploy.lora import LoraFile, LoraModule, merge

SHAPES = {"a.weight": (48, 32), "b.weight": (64, 48), "c.weight": (16, 8, 3, 3), "d.weight": (32, 32)}


def _module(rng, param, shape, rank=4, alpha=None, rslora=False):
    conv = len(shape) == 4
    down = rng.standard_normal((rank, *shape[1:]) if conv else (rank, shape[1]), dtype=np.float32)
    up = rng.standard_normal((shape[0], rank, 1, 1) if conv else (shape[0], rank), dtype=np.float32)
    return LoraModule("unet", param, down.astype(np.float16), up.astype(np.float16), alpha, rslora)


@pytest.fixture(scope="module")
def loras():
    rng = np.random.default_rng(0)
    one = LoraFile(Path("one.safetensors"), "", "peft",
                   [_module(rng, "a.weight", SHAPES["a.weight"], alpha=2.0),
                    _module(rng, "a.weight", SHAPES["a.weight"], rank=2),           # a second module on one weight
                    _module(rng, "c.weight", SHAPES["c.weight"], rslora=True),
                    _module(rng, "gone.weight", (8, 8))])                            # not in the base: left out
    two = LoraFile(Path("two.safetensors"), "", "kohya",
                   [_module(rng, "a.weight", SHAPES["a.weight"]), _module(rng, "b.weight", SHAPES["b.weight"], 8)])
    return one, two


def _formula(base, pairs, shapes) -> dict:
    """W + sum_i (scale_i * delta_i), summed in float32 over each LoRA's full delta set, then cast to W's dtype."""
    total: dict = {}
    for lora, scale in pairs:
        for name, d in lora.deltas("unet", shapes, scale).items():
            if name in base:
                total[name] = total[name] + d if name in total else d
    return {n: (base[n].astype(np.float32) + t).astype(base[n].dtype) for n, t in total.items()}


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("workers", [1, 3])
def test_merge_equals_the_formula_bit_for_bit(loras, dtype, workers):
    rng = np.random.default_rng(1)
    base = {n: rng.standard_normal(s, dtype=np.float32).astype(dtype) for n, s in SHAPES.items()}
    shapes = {**SHAPES, "gone.weight": (8, 8)}
    pairs = [(loras[0], 0.8), (loras[1], -1.3)]
    want = {**base, **_formula(base, pairs, shapes)}
    got = merge(base, pairs, "unet", shapes, workers=workers)
    assert set(got) == set(base)
    for name in base:
        assert got[name].dtype == base[name].dtype and got[name].shape == base[name].shape
        assert np.array_equal(got[name], want[name]), name
    assert got["d.weight"] is base["d.weight"]          # untouched weights are the base arrays themselves
    none = merge(base, [], "unet", shapes)
    assert all(none[n] is base[n] for n in base) and set(none) == set(base)     # no LoRA: the base, as is
