"""The one numpy place for eps / v / x0 and t / sigma maths (torch twin: training/noise.py).

Two parametrisations of the same forward process, with a = alphas_cumprod[t] (VP) and
sigma = sqrt((1 - a) / a) (VE):

    VP:  x_t  = sqrt(a) x0 + sqrt(1-a) eps            v = sqrt(a) eps - sqrt(1-a) x0
    VE:  x_ve = x0 + sigma eps  = x_t * sqrt(sigma^2 + 1)

DDIM/DDPM/PNDM/LCM/DPM-Solver/UniPC walk the VP sample; Euler/Euler-a/LMS walk the VE sample and feed
the model x_ve / sqrt(sigma^2 + 1) (= x_t). Scalars (a, sigma) are Python floats, so float32 arrays stay
float32 (NumPy 2 promotion keeps weak Python scalars at the array's dtype).
"""
from __future__ import annotations

import math

import numpy as np

from ldm_deploy.errors import LdmError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _bad_prediction(prediction_type: str) -> LdmError:
    return LdmError(f"unsupported prediction_type {prediction_type!r} in the scheduler config",
                    hint=f"use one of {', '.join(PREDICTION_TYPES)}")


# --- VP form: a = alphas_cumprod[t] ----------------------------------------------------------------

def vp_x0_eps(out: np.ndarray, x: np.ndarray, a: float, prediction_type: str,
              x0_buf: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) from the raw model output at VP sample x with cumulative alpha a.

    `x0_buf` (float32, x's shape) receives x0 for epsilon prediction, the samplers' hot path: the same
    ufuncs in the same order, so the bits match the allocating form.
    """
    a, b = float(a), 1.0 - float(a)
    if prediction_type == "epsilon":
        if x0_buf is None:
            return (x - b**0.5 * out) / a**0.5, out
        np.multiply(out, b**0.5, out=x0_buf)
        np.subtract(x, x0_buf, out=x0_buf)
        return np.divide(x0_buf, a**0.5, out=x0_buf), out
    if prediction_type == "v_prediction":
        return a**0.5 * x - b**0.5 * out, a**0.5 * out + b**0.5 * x
    if prediction_type == "sample":
        return out, (x - a**0.5 * out) / b**0.5
    raise _bad_prediction(prediction_type)


def vp_eps(out: np.ndarray, x: np.ndarray, a: float, prediction_type: str) -> np.ndarray:
    """eps from the raw model output (PNDM works on eps only)."""
    return vp_x0_eps(out, x, a, prediction_type)[1]


def vp_noised(x0: np.ndarray, eps: np.ndarray, a: float) -> np.ndarray:
    """Forward process x_t = sqrt(a) x0 + sqrt(1-a) eps (diffusers `add_noise`)."""
    return float(a) ** 0.5 * x0 + (1.0 - float(a)) ** 0.5 * eps


def velocity(x0: np.ndarray, eps: np.ndarray, a: float) -> np.ndarray:
    """The v-prediction target sqrt(a) eps - sqrt(1-a) x0 (diffusers `get_velocity`)."""
    return float(a) ** 0.5 * eps - (1.0 - float(a)) ** 0.5 * x0


# --- VE form: sigma -------------------------------------------------------------------------------

def ve_x0(out: np.ndarray, x: np.ndarray, sigma: float, prediction_type: str,
          x0_buf: np.ndarray | None = None) -> np.ndarray:
    """x0 from the raw model output at VE sample x (Euler / LMS form); `x0_buf` as in `vp_x0_eps`."""
    s = float(sigma)
    if prediction_type == "epsilon":
        if x0_buf is None:
            return x - s * out
        np.multiply(out, s, out=x0_buf)
        return np.subtract(x, x0_buf, out=x0_buf)
    if prediction_type == "v_prediction":
        return out * (-s / (s * s + 1.0) ** 0.5) + x / (s * s + 1.0)
    if prediction_type == "sample":
        return out
    raise _bad_prediction(prediction_type)


def ve_input_scale(sigma: float) -> float:
    """Factor that turns the VE sample into the model input: 1 / sqrt(sigma^2 + 1)."""
    return 1.0 / (float(sigma) ** 2 + 1.0) ** 0.5


# --- conversions between the noise-level parametrisations --------------------------------------------

def sigma_from_alpha_bar(a):
    """VE sigma = sqrt((1 - a) / a); elementwise on arrays (keeps their dtype); inf where a = 0."""
    with np.errstate(divide="ignore"):
        return ((1 - a) / a) ** 0.5


def alpha_bar_from_sigma(sigma):
    return 1.0 / (sigma * sigma + 1.0)


def alpha_sigma_vp(sigma: float) -> tuple[float, float]:
    """DPM-Solver's (alpha_t, sigma_t) of the VP sample from a VE sigma: (1/sqrt(s^2+1), s/sqrt(s^2+1))."""
    s = float(sigma)
    alpha = 1.0 / (s * s + 1.0) ** 0.5
    return alpha, s * alpha


def log_snr(sigma: float) -> float:
    """lambda = log(alpha_t) - log(sigma_t) (= -log sigma); +inf at sigma = 0."""
    alpha, s = alpha_sigma_vp(sigma)
    return math.inf if s == 0.0 else math.log(alpha) - math.log(s)


def t_to_sigma(t: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Sigma at (fractional) timesteps, linear in sigma between integer steps (diffusers' np.interp)."""
    return np.interp(t, np.arange(len(train_sigmas)), train_sigmas)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of sigmas: linear in log sigma between neighbouring integer steps.

    Identical to diffusers `_sigma_to_t` and k-diffusion `DiscreteSchedule.sigma_to_t`; `log_sigmas` is
    log of the (T,) training sigmas, increasing with t.
    """
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10)).reshape(-1)
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)
