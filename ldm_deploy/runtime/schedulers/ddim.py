"""DDIM (Song et al. 2021), diffusers `DDIMScheduler.step`; eta > 0 injects noise (eta = 1 ~ DDPM).

    x0, eps = convert(model(x, t))            (x0 clamped when clip_sample)
    std     = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))
    x'      = sqrt(a') x0 + sqrt(1 - a' - std^2) eps + std z
with a = alphas_cumprod[t], a' = alphas_cumprod[t - T//N] (or the final alpha): `schedule.alphas[_prev]`.
"""
from __future__ import annotations

import numpy as np

from ldm_deploy.runtime.schedulers.convert import vp_x0_eps
from ldm_deploy.runtime.schedulers.denoiser import Denoiser, evaluate
from ldm_deploy.runtime.schedulers.noise import NoiseFn, noise_source
from ldm_deploy.runtime.schedulers.schedule import Schedule


def sample_ddim(model: Denoiser, x: np.ndarray, schedule: Schedule, *, rng=None, callback=None, eta: float = 0.0,
                noise_fn: NoiseFn | None = None) -> np.ndarray:
    x = np.asarray(x, np.float32)
    noise = noise_source(rng, noise_fn, "ddim with eta > 0") if eta > 0 else None
    clip = schedule.params.clip
    x0_buf = np.empty_like(x)     # per-step x0, reused: each step allocates only the new x (callbacks may keep it)
    fused = eta == 0 and clip is None and schedule.prediction_type == "epsilon"
    for i, t in enumerate(schedule.timesteps):
        a, a_prev = float(schedule.alphas[i]), float(schedule.alphas_prev[i])
        if fused:
            # x' = sqrt(a') x0 + sqrt(1 - a') eps with x0 = (x - sqrt(1 - a) eps) / sqrt(a), folded into two
            # per-step coefficients (float64): two passes over the latent instead of five
            c_x = (a_prev / a) ** 0.5
            c_eps = (1 - a_prev) ** 0.5 - (a_prev * (1 - a) / a) ** 0.5
            x_next = np.multiply(evaluate(model, x, t), c_eps)
            x = np.add(x_next, np.multiply(x, c_x, out=x0_buf), out=x_next)
            if callback is not None:
                callback(i, len(schedule.timesteps), x)
            continue
        x0, eps = vp_x0_eps(evaluate(model, x, t), x, a, schedule.prediction_type, x0_buf)
        if clip is not None:
            x0 = np.clip(x0, -clip, clip, out=x0_buf if x0 is x0_buf else None)
        std = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        # x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps, without temporaries
        x_next = np.multiply(eps, (1 - a_prev - std**2) ** 0.5)
        x0 = np.multiply(x0, a_prev**0.5, out=x0_buf if x0 is x0_buf else None)
        x = np.add(x0, x_next, out=x_next)
        if eta > 0:
            x = x + std * noise(i, x.shape)
        if callback is not None:
            callback(i, len(schedule.timesteps), x)
    return x
