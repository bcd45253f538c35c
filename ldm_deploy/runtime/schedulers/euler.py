"""Euler (Karras et al. 2022 Alg. 2; k-diffusion `sample_euler`), diffusers `EulerDiscreteScheduler.step`.

Walks the VE sample: the model sees x / sqrt(sigma^2 + 1); x0 = convert(out); d = (x - x0) / sigma_hat;
x += d (sigma_next - sigma_hat). With s_churn > 0, sigma is first raised to sigma_hat = sigma (1 + gamma)
by adding noise (gamma = min(s_churn / N, sqrt(2) - 1) inside [s_tmin, s_tmax], N the schedule's full step
count even when img2img or a hand-off runs part of it, as diffusers).
"""
from __future__ import annotations

import math

import numpy as np

from ldm_deploy.runtime.schedulers.convert import ve_input_scale, ve_x0
from ldm_deploy.runtime.schedulers.denoiser import Denoiser, evaluate
from ldm_deploy.runtime.schedulers.noise import NoiseFn, noise_source
from ldm_deploy.runtime.schedulers.schedule import Schedule


def sample_euler(model: Denoiser, x: np.ndarray, schedule: Schedule, *, rng=None, callback=None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
                 noise_fn: NoiseFn | None = None) -> np.ndarray:
    x = np.asarray(x, np.float32)
    sigmas = schedule.sigmas
    noise = noise_source(rng, noise_fn, "euler with s_churn > 0") if s_churn > 0 else None
    x_in = np.empty_like(x)       # model input and x0, reused: each step allocates only the new x
    x0_buf = np.empty_like(x)
    for i, t in enumerate(schedule.timesteps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        out = evaluate(model, np.multiply(x, np.float32(ve_input_scale(sigma)), out=x_in), t)
        # diffusers divides by len(self.sigmas) - 1 of the whole N-step schedule, also for img2img and hand-off
        gamma = min(s_churn / schedule.num_inference_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = x + noise(i, x.shape) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        if gamma == 0 and schedule.prediction_type == "epsilon":
            # x0 = x - sigma eps, d = (x - x0) / sigma = eps: x' = x + eps (sigma_next - sigma), one pass + one add
            x = np.add(x, np.multiply(out, np.float32(sigma_next - sigma), out=x0_buf))
            if callback is not None:
                callback(i, len(schedule.timesteps), x)
            continue
        # diffusers uses sigma_hat for eps but sigma for v (its own quirk; equal when gamma = 0)
        x0 = ve_x0(out, x, sigma_hat if schedule.prediction_type == "epsilon" else sigma, schedule.prediction_type,
                   x0_buf)
        # x = x + (x - x0) / sigma_hat * (sigma_next - sigma_hat), the same ufuncs in place
        d = np.subtract(x, x0, out=x0_buf)
        np.divide(d, np.float32(sigma_hat), out=d)
        np.multiply(d, np.float32(sigma_next - sigma_hat), out=d)
        x = np.add(x, d)
        if callback is not None:
            callback(i, len(schedule.timesteps), x)
    return x
