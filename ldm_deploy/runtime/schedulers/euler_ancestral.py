"""Euler ancestral (k-diffusion `sample_euler_ancestral`, eta 1), diffusers `EulerAncestralDiscreteScheduler`.

    x0 = convert(out); d = (x - x0) / sigma
    sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2); sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    x = x + d (sigma_down - sigma) + z sigma_up
Like diffusers it draws z on every step, the last one too (where sigma_up = 0), so RNG streams line up.
"""
from __future__ import annotations

import numpy as np

from ldm_deploy.runtime.schedulers.convert import ve_input_scale, ve_x0
from ldm_deploy.runtime.schedulers.denoiser import Denoiser, evaluate
from ldm_deploy.runtime.schedulers.noise import NoiseFn, noise_source
from ldm_deploy.runtime.schedulers.schedule import Schedule


def sample_euler_ancestral(model: Denoiser, x: np.ndarray, schedule: Schedule, *, rng=None, callback=None,
                           noise_fn: NoiseFn | None = None) -> np.ndarray:
    x = np.asarray(x, np.float32)
    noise = noise_source(rng, noise_fn, "euler-ancestral")
    sigmas = schedule.sigmas
    for i, t in enumerate(schedule.timesteps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = ve_x0(evaluate(model, x * np.float32(ve_input_scale(sigma)), t), x, sigma, schedule.prediction_type)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (x - x0) / np.float32(sigma) * np.float32(sigma_down - sigma)
        x = x + noise(i, x.shape) * np.float32(sigma_up)
        if callback is not None:
            callback(i, len(schedule.timesteps), x)
    return x
