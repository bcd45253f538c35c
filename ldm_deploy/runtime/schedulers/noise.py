"""Where stochastic samplers get their noise: an explicit `np.random.Generator`, or injected arrays.

`noise_fn(step_index, shape) -> ndarray` lets a parity test (or a pipeline that must reproduce another
implementation's RNG stream) feed the exact noise; by default each draw is
`rng.standard_normal(shape, dtype=float32)`. Samplers draw at the same steps diffusers draws.

`RowRNG(seeds)` stands in for that generator when every batch row has a seed of its own (a server batching
requests): `standard_normal((B, ...))` draws row i from `default_rng(seeds[i])`, so a row gets the numbers it
would get alone with `default_rng(seeds[i])`, whatever else is in its batch (a C-order draw of (1, ...) is the
draw of (...)). Samplers take it unchanged.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ldm_deploy.errors import UsageError

NoiseFn = Callable[[int, tuple], np.ndarray]


class RowRNG:
    """One `np.random.Generator` per batch row, drawn row by row: the `rng` of a batch of independent seeds."""

    def __init__(self, seeds: Sequence[int]):
        self.generators = [np.random.default_rng(int(s)) for s in seeds]

    def standard_normal(self, shape, dtype=np.float64) -> np.ndarray:
        shape = tuple(shape)
        if not shape or shape[0] != len(self.generators):
            raise ValueError(f"RowRNG of {len(self.generators)} rows asked for shape {shape}")
        out = np.empty(shape, dtype)
        for row, gen in zip(out, self.generators):
            row[...] = gen.standard_normal(shape[1:], dtype=dtype)
        return out


def noise_source(rng: np.random.Generator | None, noise_fn: NoiseFn | None, sampler: str) -> NoiseFn:
    if noise_fn is not None:
        return lambda i, shape: np.asarray(noise_fn(i, shape), np.float32)
    if rng is None:
        raise UsageError(f"{sampler} is stochastic: pass rng=np.random.default_rng(seed) or noise_fn")
    return lambda i, shape: rng.standard_normal(shape, dtype=np.float32)
