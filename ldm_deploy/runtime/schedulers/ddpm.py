"""DDPM ancestral sampling (Ho et al. 2020), diffusers `DDPMScheduler.step` with variance_type fixed_small.

With a = alphas_cumprod[t], a' = that of the next scheduled timestep (1 after the last), beta = 1 - a/a':
    x' = sqrt(a') beta / (1 - a) x0 + sqrt(a/a') (1 - a') / (1 - a) x + sqrt(max(var, 1e-20)) z,
    var = (1 - a') / (1 - a) beta;  z is drawn whenever t > 0, as diffusers draws it.
"""
from __future__ import annotations

import numpy as np

from ldm_deploy.runtime.schedulers.convert import vp_x0_eps
from ldm_deploy.runtime.schedulers.denoiser import Denoiser, evaluate
from ldm_deploy.runtime.schedulers.noise import NoiseFn, noise_source
from ldm_deploy.runtime.schedulers.schedule import Schedule


def sample_ddpm(model: Denoiser, x: np.ndarray, schedule: Schedule, *, rng=None, callback=None,
                noise_fn: NoiseFn | None = None) -> np.ndarray:
    x = np.asarray(x, np.float32)
    noise = noise_source(rng, noise_fn, "ddpm")
    clip = schedule.params.clip
    for i, t in enumerate(schedule.timesteps):
        a, a_prev = float(schedule.alphas[i]), float(schedule.alphas_prev[i])
        x0, _ = vp_x0_eps(evaluate(model, x, t), x, a, schedule.prediction_type)
        if clip is not None:
            x0 = np.clip(x0, -clip, clip)
        beta = 1 - a / a_prev
        x = (a_prev**0.5 * beta / (1 - a)) * x0 + ((a / a_prev) ** 0.5 * (1 - a_prev) / (1 - a)) * x
        if t > 0:
            x = x + max((1 - a_prev) / (1 - a) * beta, 1e-20) ** 0.5 * noise(i, x.shape)
        if callback is not None:
            callback(i, len(schedule.timesteps), x)
    return x
