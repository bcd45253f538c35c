"""Deterministic example inputs for a component: the one maker of test / trace / validation feeds.

    feeds = example_feeds(artifact.component("unet"), batch=2, seed=0)   # {name: ndarray}, 2B rows for the U-Net

Modelled on Polygraphy's data loader: the description of the graph's inputs (names, dtypes, shapes
with named dynamic axes, the min/opt/max profile) decides the arrays; each input gets values in its
natural range (token ids below the vocabulary, fractional timesteps in [0, 999], images in [-1, 1],
SDXL time_ids as pixel sizes, latents and embeddings standard normal). The same (spec, batch, seed)
gives the same arrays everywhere: the export's trace, `ldm-deploy validate`, the tests and the GPU
checks. numpy only, so the runtime side can use it; the export turns the arrays into tensors itself.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ldm_deploy.errors import LdmError

GUIDANCE = 7.5      # guidance_scale of a CFG-folded U-Net (export/cfg_fold.py)


def example_feeds(spec: Any, batch: int | None = None, seed: int = 0, *, which: str = "opt",
                  shapes: Mapping[str, tuple] | None = None, vocab_size: int = 1000,
                  float_dtype: Any = None) -> dict[str, np.ndarray]:
    """{input name: array} for `spec` (an artifact `ComponentSpec` or the export's `GraphSpec`: `.inputs`
    of name / dtype / shape, and the min/opt/max profile).

    Shapes: `shapes[name]` when given, else the profile's `which` shape ("min" | "opt" | "max"), else the
    declared shape when it is all integers. `batch` (images, B) sets a dynamic first axis to
    `batch_multiplier * B` (2B for the CFG U-Net). Dtypes follow the spec; `float_dtype` overrides the
    floating ones (float32 feeds for a PyTorch reference of an fp16 graph). Draw order is fixed: one
    `np.random.default_rng(seed)`, the inputs in the spec's order."""
    rng = np.random.default_rng(seed)
    multiplier = int(getattr(spec, "batch_multiplier", 1) or 1)
    feeds = {}
    for t in spec.inputs:
        shape = _shape(spec, t, which, shapes)
        if batch is not None and len(t.shape) and isinstance(t.shape[0], str):
            shape = (multiplier * int(batch), *shape[1:])
        dtype = np.dtype(t.dtype)
        if dtype.kind == "f" and float_dtype is not None:
            dtype = np.dtype(float_dtype)
        feeds[t.name] = _values(t.name, shape, rng, vocab_size).astype(dtype, copy=False)
    return feeds


def _shape(spec: Any, t: Any, which: str, shapes: Mapping[str, tuple] | None) -> tuple:
    if shapes is not None and t.name in shapes:
        return tuple(int(d) for d in shapes[t.name])
    profile = getattr(spec, "profile", None)
    if isinstance(profile, Mapping) and t.name in profile:          # artifact ComponentSpec
        return tuple(profile[t.name][which])
    own = getattr(t, "shapes", None)
    if own:                                                          # export IOSpec
        return tuple(own[which])
    if all(isinstance(d, int) for d in t.shape):
        return tuple(t.shape)
    raise LdmError(f"input {t.name!r} has dynamic axes {list(t.shape)} and no profile to size them",
                   hint="pass shapes={name: shape}")


def _values(name: str, shape: tuple, rng: np.random.Generator, vocab_size: int) -> np.ndarray:
    if name == "input_ids":
        return rng.integers(0, vocab_size, size=shape).astype(np.int32)
    if name == "timestep":
        return rng.uniform(0, 999, size=shape).astype(np.float32)          # fractional timesteps
    if name == "image":
        return rng.uniform(-1, 1, size=shape).astype(np.float32)
    if name == "time_ids":                                                  # SDXL sizes / crops / scores
        return rng.uniform(0, 1024, size=shape).round().astype(np.float32)
    if name == "guidance_scale":
        return np.full(shape, GUIDANCE, np.float32)
    if name == "guidance_rescale":
        return np.zeros(shape, np.float32)
    return rng.standard_normal(shape).astype(np.float32)


__all__ = ["example_feeds"]
