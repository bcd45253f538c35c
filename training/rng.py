"""Randomness a resumed run repeats exactly: per-step generator seeds, and the global RNG state a checkpoint saves.

Everything random in a training step draws from a torch.Generator seeded with `step_seed(seed, step, rank,
micro)`; the global states (python, numpy, torch, cuda) are saved and restored too, for any module that
draws from them (dropout). The state is plain tensors and lists, so `torch.load(weights_only=True)` reads it.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def step_seed(*values: int) -> int:
    """A stable 63-bit seed from integers (splitmix64-style)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [list(s) if isinstance(s, tuple) else s for s in random.getstate()],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
