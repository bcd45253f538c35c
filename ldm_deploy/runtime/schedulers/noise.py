"""Where stochastic samplers get their noise: an explicit `np.random.Generator`, or injected arrays.

`noise_fn(step_index, shape) -> ndarray` lets a parity test (or a pipeline that must reproduce another
implementation's RNG stream) feed the exact noise; by default each draw is
`rng.standard_normal(shape, dtype=float32)`. Samplers draw at the same steps diffusers draws.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ldm_deploy.errors import UsageError

NoiseFn = Callable[[int, tuple], np.ndarray]


def noise_source(rng: np.random.Generator | None, noise_fn: NoiseFn | None, sampler: str) -> NoiseFn:
    if noise_fn is not None:
        return lambda i, shape: np.asarray(noise_fn(i, shape), np.float32)
    if rng is None:
        raise UsageError(f"{sampler} is stochastic: pass rng=np.random.default_rng(seed) or noise_fn")
    return lambda i, shape: rng.standard_normal(shape, dtype=np.float32)


def evaluate(model: Model, x_in: np.ndarray, t) -> np.ndarray:
    """One model call: t as a Python float (fractional allowed), the output as float32."""
    return np.asarray(model(x_in, float(t)), np.float32)
