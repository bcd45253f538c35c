"""The per-step scheduler + CFG path allocates a bounded number of latent-sized arrays, whatever the step count.

Not a timed test (timings flake on shared CI cores): tracemalloc's peak over the denoising loop must not
grow with the number of steps, and stays within a few latent-sized arrays beyond the loop's fixed buffers.
The fast path's finiteness check must still name the U-Net stage on NaN/Inf.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from ldm_deploy.errors import LdmError
from ldm_deploy.runtime import schedulers as sch
from ldm_deploy.runtime.pipeline import check_finite, finite_fast, make_denoiser

SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
        "skip_prk_steps": True}
SHAPE = (1, 4, 64, 64)                       # SD1.5 512x512 latents; the U-Net sees (2, 4, 64, 64)
LATENT_BYTES = int(np.prod(SHAPE)) * 4


class ZeroCostUnet:
    """Returns one preallocated noise_pred: the U-Net's own memory is not the loop's."""

    def __init__(self, nan_at: int | None = None):
        self.out = {"noise_pred": np.full((2 * SHAPE[0], *SHAPE[1:]), 0.1, np.float32)}
        self.out["noise_pred"][SHAPE[0]:] = 0.2
        self.calls, self.nan_at = 0, nan_at

    def __call__(self, inputs):
        self.calls += 1
        if self.calls == self.nan_at:
            bad = self.out["noise_pred"].copy()
            bad[1, 2, 3, 4] = np.nan
            return {"noise_pred": bad}
        return self.out


def loop_peak(name: str, steps: int) -> int:
    emb = np.zeros((2, 77, 8), np.float32)
    denoiser = make_denoiser(ZeroCostUnet(), emb, guidance=7.5, guidance_rescale=0.0)
    schedule = sch.make_schedule(name, SD15, steps)
    x = sch.start_latent(schedule, np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32))
    denoiser(x, schedule.timesteps[0])       # allocate the reused buffers before measuring
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = sch.sample(name, denoiser, x, schedule, rng=np.random.default_rng(0))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert np.isfinite(out).all() and denoiser.calls == steps + 1
    return peak


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp-2m"])
def test_per_step_allocations_do_not_grow_with_steps(name):
    short, long = loop_peak(name, 5), loop_peak(name, 40)
    # x, x_next, the guided output and the sampler's 1-3 scratch buffers: 4 / 5 / 6 latents for ddim / euler /
    # dpmpp-2m (the allocating loop before issue 8 peaked at 7 / 8 / 9)
    assert long <= 6.5 * LATENT_BYTES, f"{name}: peak {long / LATENT_BYTES:.1f} latents over the loop"
    assert long <= short + LATENT_BYTES // 4, f"{name}: peak grows with steps ({short} -> {long} bytes)"


def test_finite_fast_and_exact_check_agree():
    x = np.ones(SHAPE, np.float32)
    assert finite_fast(x)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[0, 1, 2, 3] = bad
        assert not finite_fast(y)
    huge = np.full(SHAPE, 3e30, np.float32)  # finite but its sum of squares overflows: the exact check decides
    assert not finite_fast(huge)
    check_finite(huge, "unet")


def test_nan_from_the_unet_is_still_named():
    emb = np.zeros((2, 77, 8), np.float32)
    denoiser = make_denoiser(ZeroCostUnet(nan_at=3), emb, guidance=7.5, guidance_rescale=0.0)
    schedule = sch.make_schedule("ddim", SD15, 10)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(LdmError, match=r"unet produced 1 non-finite values .*step 3"):
        sch.sample("ddim", denoiser, x, schedule)


def test_cfg_buffers_are_not_aliased_across_steps():
    """The reused 2B input buffer never leaks into what the sampler keeps (multistep history, callbacks)."""
    emb = np.zeros((2, 77, 8), np.float32)
    seen = []
    denoiser = make_denoiser(lambda inputs: {"noise_pred": inputs["sample"] * 0.5}, emb, 7.5, 0.0)
    schedule = sch.make_schedule("dpmpp-2m", SD15, 6)
    x = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
    sch.sample("dpmpp-2m", denoiser, x, schedule, callback=lambda i, t, xi: seen.append(xi))
    assert len({id(a) for a in seen}) == len(seen) and not any(np.shares_memory(a, b) for a in seen for b in seen
                                                              if a is not b)
