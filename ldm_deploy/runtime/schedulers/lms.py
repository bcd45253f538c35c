"""LMS, linear multistep of order 4 (k-diffusion `sample_lms`), diffusers `LMSDiscreteScheduler`.

d_i = (x - x0_i) / sigma_i; x += sum_j c_j d_{i-j}, where c_j integrates the Lagrange basis polynomial
through the last `order` sigmas over [sigma_i, sigma_{i+1}]. The integrand has degree <= 3, so a
4-point Gauss-Legendre rule is exact (diffusers calls scipy.integrate.quad; they agree to roundoff).
"""
from __future__ import annotations

import numpy as np

from ldm_deploy.runtime.schedulers.convert import ve_input_scale, ve_x0
from ldm_deploy.runtime.schedulers.denoiser import Denoiser, evaluate
from ldm_deploy.runtime.schedulers.schedule import Schedule

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(4)


def lms_coefficient(sigmas: np.ndarray, i: int, order: int, j: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of prod_{k != j} (tau - s_{i-k}) / (s_{i-j} - s_{i-k})."""
    s = sigmas.astype(np.float64)
    a, b = s[i], s[i + 1]
    tau = 0.5 * (b - a) * _NODES + 0.5 * (a + b)
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - s[i - k]) / (s[i - j] - s[i - k])
    return float(0.5 * (b - a) * np.dot(_WEIGHTS, basis))


def sample_lms(model: Denoiser, x: np.ndarray, schedule: Schedule, *, rng=None, callback=None,
               order: int = 4) -> np.ndarray:
    x = np.asarray(x, np.float32)
    sigmas = schedule.sigmas
    derivatives: list[np.ndarray] = []
    for i, t in enumerate(schedule.timesteps):
        sigma = float(sigmas[i])
        x0 = ve_x0(evaluate(model, x * np.float32(ve_input_scale(sigma)), t), x, sigma, schedule.prediction_type)
        derivatives = (derivatives + [(x - x0) / np.float32(sigma)])[-order:]
        cur = len(derivatives)          # = min(i + 1, order); see docs/schedulers.md for img2img
        for j in range(cur):
            x = x + np.float32(lms_coefficient(sigmas, i, cur, j)) * derivatives[-1 - j]
        if callback is not None:
            callback(i, len(schedule.timesteps), x)
    return x
