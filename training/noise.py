"""The one torch place for the noising maths (the numpy twin is ldm_deploy/runtime/schedulers/convert.py).

The schedule is diffusers' float32 one (`torch.linspace(..., dtype=float32)`, float32 cumprod), so a
model trained here is sampled with the very table it was trained on. With a = alphas_cumprod[t]:

    x_t = sqrt(a) x0 + sqrt(1-a) eps                     (add_noise)
    v   = sqrt(a) eps - sqrt(1-a) x0                     (velocity)
    x0  = (x_t - sqrt(1-a) eps) / sqrt(a)  = sqrt(a) x_t - sqrt(1-a) v
    eps = (x_t - sqrt(a) x0) / sqrt(1-a)   = sqrt(a) v + sqrt(1-a) x_t

`tests/training/test_noise.py` pins these to the numpy twin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldm_deploy.errors import LdmError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def betas_from_config(config: dict) -> torch.Tensor:
    """(T,) float32 betas exactly as diffusers' schedulers compute them from a scheduler config."""
    n = int(config.get("num_train_timesteps", 1000))
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                             dtype=torch.float32)
    else:
        raise LdmError(f"unsupported beta_schedule {kind!r} in the scheduler config",
                       hint="use linear, scaled_linear or squaredcos_cap_v2")
    return rescale_zero_terminal_snr(betas) if config.get("rescale_betas_zero_snr") else betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1, as diffusers' `rescale_zero_terminal_snr`: shift and scale sqrt(alpha_bar)
    so the last timestep has zero SNR (alphas_cumprod[-1] = 0) and the first keeps its value."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    return 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])


def alphas_cumprod_from_config(config: dict) -> torch.Tensor:
    """(T,) float32 alphas_cumprod = cumprod(1 - betas), diffusers' float32 values."""
    return torch.cumprod(1.0 - betas_from_config(config), dim=0)


# --- conversions on a = alphas_cumprod[t] already broadcast to x's shape ----------------------------

def eps_to_x0(x_t, eps, a):
    return (x_t - (1 - a) ** 0.5 * eps) / a**0.5


def x0_to_eps(x_t, x0, a):
    return (x_t - a**0.5 * x0) / (1 - a) ** 0.5


def v_to_x0(x_t, v, a):
    return a**0.5 * x_t - (1 - a) ** 0.5 * v


def v_to_eps(x_t, v, a):
    return a**0.5 * v + (1 - a) ** 0.5 * x_t


def pred_to_x0(prediction_type: str, x_t, out, a):
    """The model's raw output `out` (eps, v or x0) -> predicted x0."""
    if prediction_type == "epsilon":
        return eps_to_x0(x_t, out, a)
    if prediction_type == "v_prediction":
        return v_to_x0(x_t, out, a)
    if prediction_type == "sample":
        return out
    raise _bad_type(prediction_type)


def pred_to_eps(prediction_type: str, x_t, out, a):
    """The model's raw output `out` (eps, v or x0) -> predicted eps."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return v_to_eps(x_t, out, a)
    if prediction_type == "sample":
        return x0_to_eps(x_t, out, a)
    raise _bad_type(prediction_type)


def noised(x0, eps, a):
    """x_t = sqrt(a) x0 + sqrt(1-a) eps: the forward process at alphas_cumprod a."""
    return a**0.5 * x0 + (1 - a) ** 0.5 * eps


def ddim_step(prediction_type: str, x_t, out, a, a_prev):
    """One deterministic DDIM step (eta = 0, no clipping): the output's x0 and eps, re-noised to a_prev."""
    return noised(pred_to_x0(prediction_type, x_t, out, a), pred_to_eps(prediction_type, x_t, out, a), a_prev)


def _bad_type(prediction_type: str) -> LdmError:
    return LdmError(f"unknown prediction_type {prediction_type!r}", hint=f"use one of {', '.join(PREDICTION_TYPES)}")


# --- the schedule a training loop holds --------------------------------------------------------------

@dataclass(frozen=True)
class NoiseSchedule:
    """alphas_cumprod plus the per-timestep noising maths used by training."""

    alphas_cumprod: torch.Tensor        # (T,) float32

    @classmethod
    def from_config(cls, scheduler_config: dict) -> "NoiseSchedule":
        return cls(alphas_cumprod_from_config(scheduler_config))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod[t] shaped (B, 1, 1, ...) to broadcast against `like`, in like's dtype."""
        a = self.alphas_cumprod.to(like.device)[t.to(like.device).long()]
        return a.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noised(x0, eps, self.abar(t, x0))

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar(t, x0)
        return a**0.5 * eps - (1 - a) ** 0.5 * x0

    def target(self, prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model learns to output for (x0, eps, t)."""
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "v_prediction":
            return self.velocity(x0, eps, t)
        if prediction_type == "sample":
            return x0
        raise _bad_type(prediction_type)

    def to_x0(self, prediction_type: str, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return pred_to_x0(prediction_type, x_t, out, self.abar(t, x_t))

    def to_eps(self, prediction_type: str, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return pred_to_eps(prediction_type, x_t, out, self.abar(t, x_t))
