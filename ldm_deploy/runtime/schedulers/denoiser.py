"""What every sampler calls: the denoiser, one model evaluation at one noise level.

The pipeline builds it around a U-Net runner and classifier-free guidance (runtime/pipeline.py); tests pass
plain functions. Samplers call it only through `evaluate`, so the model's output dtype never leaks into the
latent (float32 throughout).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Denoiser(Protocol):
    def __call__(self, x_in: np.ndarray, t: float) -> np.ndarray:
        """The raw prediction for model input `x_in` (B, C, h, w) at timestep `t`, x_in's shape.

        `x_in` is already scale_model_input-ed (Euler / Euler-a / LMS divide the VE sample by
        sqrt(sigma^2 + 1)); `t` is a Python float, fractional for Euler / LMS linspace and Karras schedules;
        the output is eps, v or x0 as the scheduler config's prediction_type says.
        """
        ...


def evaluate(model: Denoiser, x_in: np.ndarray, t) -> np.ndarray:
    """One model call: t as a Python float (fractional allowed), the output as float32."""
    return np.asarray(model(x_in, float(t)), np.float32)
