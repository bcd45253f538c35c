"""PNDM / PLMS (Liu et al. 2022; LDM `plms.py`), diffusers `PNDMScheduler`.

skip_prk_steps=True (SD's configs) is PLMS:
The schedule has N+1 evaluations, the second timestep repeated. Evaluation 0 takes a DDIM step with e0;
evaluation 1 (at the repeated t) re-takes that step from the same start with (e0 + e1) / 2 (improved
Euler). Later steps use Adams-Bashforth combinations of the last <= 4 outputs:
    (3e_k - e_{k-1})/2, (23e_k - 16e_{k-1} + 5e_{k-2})/12, (55e_k - 59e_{k-1} + 37e_{k-2} - 9e_{k-3})/24.
Like diffusers, raw model outputs are combined first and then converted to eps at (x, a) of the step.
skip_prk_steps=False (the class default) first takes 3 Runge-Kutta steps of 4 evaluations each
(weights 1/6, 1/3, 1/3, 1/6), whose first outputs seed the 4th-order combination from then on.
`schedule.alphas[k]` / `alphas_prev[k]` already hold each evaluation's (from, to) pair.
"""
from __future__ import annotations

import numpy as np

from ldm_deploy.runtime.schedulers.convert import vp_eps
from ldm_deploy.runtime.schedulers.denoiser import Denoiser, evaluate
from ldm_deploy.runtime.schedulers.schedule import Schedule


def plms_step(x: np.ndarray, eps: np.ndarray, a: float, a_prev: float) -> np.ndarray:
    """The DDIM (eta 0) step written as PNDM's transfer function."""
    denom = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
    return (a_prev / a) ** 0.5 * x - ((a_prev - a) / denom) * eps


def sample_pndm(model: Denoiser, x: np.ndarray, schedule: Schedule, *, rng=None, callback=None) -> np.ndarray:
    x = np.asarray(x, np.float32)
    prk = schedule.params.prk_evals
    outs: list[np.ndarray] = []
    x_start = x
    for k, t in enumerate(schedule.timesteps):
        a, a_prev = float(schedule.alphas[k]), float(schedule.alphas_prev[k])
        out = evaluate(model, x, t)
        if k < prk:                    # Runge-Kutta: 4 evaluations per step, all from x_start
            if k % 4 == 0:
                acc, x_start = (1 / 6) * out, x
                outs.append(out)
            elif k % 4 < 3:
                acc = acc + (1 / 3) * out
            else:
                out = acc + (1 / 6) * out
            x = x_start
        elif k == 1 and prk == 0:      # PLMS's repeated timestep: average with e0, restart from x_start
            out, x = (out + outs[-1]) / 2, x_start
        else:
            outs = (outs + [out])[-4:]
            if len(outs) == 2:
                out = (3 * outs[-1] - outs[-2]) / 2
            elif len(outs) == 3:
                out = (23 * outs[-1] - 16 * outs[-2] + 5 * outs[-3]) / 12
            elif len(outs) == 4:
                out = (1 / 24) * (55 * outs[-1] - 59 * outs[-2] + 37 * outs[-3] - 9 * outs[-4])
            if k == 0:
                x_start = x
        x = plms_step(x, vp_eps(out, x, a, schedule.prediction_type), a, a_prev)
        if callback is not None:
            callback(k, len(schedule.timesteps), x)
    return x
