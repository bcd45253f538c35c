"""DPM-Solver++(2M) (Lu et al. 2022), diffusers `DPMSolverMultistepScheduler` (dpmsolver++, midpoint).

On the VP sample with alpha_i = 1/sqrt(sigma_i^2 + 1), s_i = sigma_i alpha_i, lambda_i = log(alpha_i / s_i),
h = lambda_{i+1} - lambda_i, and x0_i the data prediction:
    first order:  x = (s_{i+1}/s_i) x - alpha_{i+1} (e^-h - 1) x0_i
    second order: ... - 0.5 alpha_{i+1} (e^-h - 1) D1       (heun: + alpha_{i+1} ((e^-h - 1)/h + 1) D1)
                  D1 = (x0_i - x0_{i-1}) / r0,  r0 = (lambda_i - lambda_{i-1}) / h
The first step is first order; so is the last when final_sigmas_type is "zero" (sigma 0: it returns x0),
euler_at_final, or lower_order_final with fewer than 15 steps (`params.first_order_final`).
"""
from __future__ import annotations

import math

import numpy as np

from ldm_deploy.runtime.schedulers.convert import alpha_sigma_vp, log_snr, vp_x0_eps
from ldm_deploy.runtime.schedulers.denoiser import Denoiser, evaluate
from ldm_deploy.runtime.schedulers.schedule import Schedule


def sample_dpmpp_2m(model: Denoiser, x: np.ndarray, schedule: Schedule, *, rng=None, callback=None) -> np.ndarray:
    x = np.asarray(x, np.float32)
    sigmas, n = schedule.sigmas, len(schedule.timesteps)
    order, heun = schedule.params.solver_order, schedule.params.solver_type == "heun"
    x0_prev = None
    bufs = (np.empty_like(x), np.empty_like(x))   # x0 of this step and the last, ping-ponged
    d_buf = np.empty_like(x)
    for i, t in enumerate(schedule.timesteps):
        alpha_s, s_s = alpha_sigma_vp(sigmas[i])
        alpha_t, s_t = alpha_sigma_vp(sigmas[i + 1])
        x0, _ = vp_x0_eps(evaluate(model, x, t), x, alpha_s**2, schedule.prediction_type, bufs[i % 2])
        h = log_snr(sigmas[i + 1]) - log_snr(sigmas[i])
        phi = math.exp(-h) - 1.0                                  # e^-h - 1 (diffusers, not expm1)
        first_order = order == 1 or x0_prev is None or (i == n - 1 and schedule.params.first_order_final)
        # x_next = (s_t / s_s) x - alpha_t phi x0 [+ c2 D1], D1 = (x0 - x0_prev) / r0, folded into per-step
        # coefficients on x, x0 and x0_prev (float64): one new array (callbacks may keep x), no temporaries
        c_x0 = alpha_t * phi
        c_prev = 0.0
        if not first_order:
            r0 = (log_snr(sigmas[i]) - log_snr(sigmas[i - 1])) / h
            c2 = -alpha_t * (phi / h + 1.0) if heun else 0.5 * alpha_t * phi
            c_x0, c_prev = c_x0 + c2 / r0, c2 / r0
        x_next = np.multiply(x, s_t / s_s)
        x_next -= np.multiply(x0, c_x0, out=d_buf)
        if c_prev:
            x_next += np.multiply(x0_prev, c_prev, out=d_buf)
        x, x0_prev = x_next, x0
        if callback is not None:
            callback(i, len(schedule.timesteps), x)
    return x
