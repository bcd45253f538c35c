"""UniPC (Zhao et al. 2023), diffusers `UniPCMultistepScheduler` (bh2, predict_x0, lower_order_final).

Each step: convert the output to x0 (m_i) at the *uncorrected* x; then the corrector UniC refines x using
m_i, the previous sample and earlier m's (no extra model call); then the predictor UniP moves the
corrected x to sigma_{i+1}. Order p = min(solver_order, steps left (lower_order_final), steps so far).
With hh = -h, h_phi_1 = expm1(hh), B_h = expm1(hh) (bh2) or hh (bh1), the order-p coefficients solve
R rho = b with R[k] = r^k and b_k = h_phi_{k+1} (k+1)! / B_h (reference §3.11).
"""
from __future__ import annotations

import numpy as np

from ldm_deploy.runtime.schedulers.convert import alpha_sigma_vp, log_snr, vp_x0_eps
from ldm_deploy.runtime.schedulers.denoiser import Denoiser, evaluate
from ldm_deploy.runtime.schedulers.schedule import Schedule


def _coefficients(lambdas_back: list[float], lam_s0: float, lam_t: float, order: int, bh1: bool):
    """rks (order,), R (order, order), b (order,), h_phi_1, B_h for one UniP/UniC update."""
    h = np.float64(lam_t - lam_s0)          # 0 when the final sigma repeats the last one: NaNs in b
    rks = np.array([(lam - lam_s0) / h for lam in lambdas_back[: order - 1]] + [1.0])   # that order 1 ignores
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = hh if bh1 else np.expm1(hh)
    h_phi_k, factorial = h_phi_1 / hh - 1.0, 1
    R, b = [], []
    for k in range(1, order + 1):
        R.append(rks ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return rks, np.array(R), np.array(b), h_phi_1, b_h


@np.errstate(divide="ignore", invalid="ignore")
def _update(x, sigmas, i_s0: int, i_t: int, ms: list, order: int, bh1: bool, m_t=None):
    """UniP (m_t None): x at sigma[i_s0] -> sigma[i_t] from ms; UniC: the same step re-done with m_t."""
    alpha_t, s_t = alpha_sigma_vp(sigmas[i_t])
    _, s_s0 = alpha_sigma_vp(sigmas[i_s0])
    lam_s0 = log_snr(sigmas[i_s0])
    back = [log_snr(sigmas[i_s0 - k]) for k in range(1, order)]
    rks, R, b, h_phi_1, b_h = _coefficients(back, lam_s0, log_snr(sigmas[i_t]), order, bh1)
    m0 = ms[-1]
    d1s = [(ms[-(k + 1)] - m0) / np.float32(rks[k - 1]) for k in range(1, order)]
    x_t = (s_t / s_s0) * x - (alpha_t * h_phi_1) * m0
    if m_t is None:                                           # predictor
        if not d1s:
            return x_t
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        res = sum(float(r) * d for r, d in zip(rhos, d1s))
        return x_t - (alpha_t * b_h) * res
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b)     # corrector
    res = sum(float(r) * d for r, d in zip(rhos[:-1], d1s)) + float(rhos[-1]) * (m_t - m0)
    return x_t - (alpha_t * b_h) * res


def sample_unipc(model: Denoiser, x: np.ndarray, schedule: Schedule, *, rng=None, callback=None) -> np.ndarray:
    x = np.asarray(x, np.float32)
    p = schedule.params
    sigmas, n, bh1 = schedule.sigmas, len(schedule.timesteps), p.solver_type == "bh1"
    ms: list[np.ndarray] = []
    last_x, last_order = None, 0
    for i, t in enumerate(schedule.timesteps):
        alpha, _ = alpha_sigma_vp(sigmas[i])
        m = vp_x0_eps(evaluate(model, x, t), x, alpha**2, schedule.prediction_type)[0]
        if last_x is not None and p.start_index + i - 1 not in p.disable_corrector:
            x = _update(last_x, sigmas, i - 1, i, ms, last_order, bh1, m_t=m).astype(np.float32)
        ms = (ms + [m])[-p.solver_order:]
        # steps left in the whole schedule (`tail_steps`: those after a hand-off slice, runtime/sdxl.py)
        order = min(p.solver_order, n - i + p.tail_steps) if p.lower_order_final else p.solver_order
        last_order = min(order, len(ms))
        last_x = x
        x = _update(x, sigmas, i, i + 1, ms, last_order, bh1).astype(np.float32)
        if callback is not None:
            callback(i, len(schedule.timesteps), x)
    return x
