"""Latent Consistency Model sampling (Luo et al. 2023), diffusers `LCMScheduler.step`.

    x0 = convert(out);  denoised = c_out x0 + c_skip x   (boundary condition, sigma_data 0.5,
    c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25), precomputed per step)
    x' = sqrt(a') denoised + sqrt(1 - a') z   (no noise on the last step: x' = denoised, what is decoded;
                                              a hand-off stage that stops earlier noises its last step too)
The guidance embedding of LCM-distilled U-Nets (time_cond_proj_dim) belongs to the model wrapper.
"""
from __future__ import annotations

import numpy as np

from ldm_deploy.runtime.schedulers.convert import vp_x0_eps
from ldm_deploy.runtime.schedulers.denoiser import Denoiser, evaluate
from ldm_deploy.runtime.schedulers.noise import NoiseFn, noise_source
from ldm_deploy.runtime.schedulers.schedule import Schedule


def sample_lcm(model: Denoiser, x: np.ndarray, schedule: Schedule, *, rng=None, callback=None,
               noise_fn: NoiseFn | None = None) -> np.ndarray:
    x = np.asarray(x, np.float32)
    n = len(schedule.timesteps)
    # the step that returns the denoised x0: the last, or none for a hand-off stage that stops before the end
    last = n - 1 if schedule.params.ends_schedule else n
    noise = noise_source(rng, noise_fn, "lcm") if last > 0 else None
    clip, c_skip, c_out = schedule.params.clip, schedule.params.c_skip, schedule.params.c_out
    for i, t in enumerate(schedule.timesteps):
        a, a_prev = float(schedule.alphas[i]), float(schedule.alphas_prev[i])
        x0, _ = vp_x0_eps(evaluate(model, x, t), x, a, schedule.prediction_type)
        if clip is not None:
            x0 = np.clip(x0, -clip, clip)
        denoised = float(c_out[i]) * x0 + float(c_skip[i]) * x
        x = denoised if i == last else a_prev**0.5 * denoised + (1 - a_prev) ** 0.5 * noise(i, x.shape)
        if callback is not None:
            callback(i, len(schedule.timesteps), x)
    return x
