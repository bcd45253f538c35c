"""The denoising loop on the device: one graph per step, no host round trip between steps.

The host loop (runtime/pipeline.py) calls the U-Net once a step and runs the sampler's update in numpy: every
step uploads the latents, waits for the GPU and fetches the prediction. A *loop step graph*
(export/step_graph.py) holds the update itself, for the samplers whose step is linear in the latents and
the model output with per-step constants:

    x_in  = input_scales[i] * x                        (1 for the VP samplers; 1 / sqrt(sigma^2 + 1) for Euler)
    out   = unet(x_in, timesteps[i])                   (CFG folded: the guided prediction)
    x'    = x_coeffs[i] * x + out_coeffs[i] * out
    i'    = i + 1

Its inputs are the latents, the step index and the four per-step tables (length n, the schedule's
evaluations) besides the folded U-Net's own; its outputs the next latents and the next index. The tables are
inputs, not constants, so one graph runs any schedule of any length; they come from `loop_tables`, which
takes the coefficients from the samplers' own conversions (schedulers/convert.py), evaluated at (x, out) =
(1, 0) and (0, 1). Which samplers qualify:

    ddim     eta = 0 and no clip_sample (the clamp is not linear); any prediction_type
    euler    s_churn = 0 (the pipeline's default; churn draws noise); any prediction_type

The others (ancestral, multistep, LCM, DDPM) draw noise or keep history: they run the host loop. The runner
(runners/ort_loop.py) runs the step graph n times against device-resident latents, and on CUDA replays it as
one captured CUDA graph per step with no host synchronisation until the end.

torch-free, onnx-free (numpy only): the graph itself is built at export (ldm_deploy/export/step_graph.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldm_deploy.errors import LdmError
from ldm_deploy.runtime.schedulers.convert import ve_input_scale, ve_x0, vp_x0_eps

# the loop step graph's IO names besides the CFG-folded U-Net's (runtime/guidance.py)
LATENTS, STEP = "latents", "step"                          # float32 (batch, C, h, w); int64 (1,)
TIMESTEPS, INPUT_SCALES = "timesteps", "input_scales"      # (n,): the U-Net's timestep dtype; float32
X_COEFFS, OUT_COEFFS = "x_coeffs", "out_coeffs"            # float32 (n,)
LATENTS_NEXT, STEP_NEXT = "latents_next", "step_next"      # the outputs
TABLES = (TIMESTEPS, INPUT_SCALES, X_COEFFS, OUT_COEFFS)
LOOP_SAMPLERS = ("ddim", "euler")


@dataclass(frozen=True)
class LoopTables:
    """The per-step constants of one schedule (each (n,)); `feeds(t_dtype)` gives them as graph inputs."""
    timesteps: np.ndarray
    input_scales: np.ndarray
    x_coeffs: np.ndarray
    out_coeffs: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def feeds(self, timestep_dtype=np.float32) -> dict[str, np.ndarray]:
        return {TIMESTEPS: np.ascontiguousarray(self.timesteps, dtype=timestep_dtype),
                INPUT_SCALES: self.input_scales, X_COEFFS: self.x_coeffs, OUT_COEFFS: self.out_coeffs}


def why_not(sampler: str, schedule, eta: float = 0.0) -> str | None:
    """Why `sampler` over `schedule` cannot run as a loop step graph, or None when it can."""
    if sampler not in LOOP_SAMPLERS:
        return f"{sampler} draws noise or keeps history between steps (the device loop runs {', '.join(LOOP_SAMPLERS)})"
    if sampler == "ddim" and eta:
        return "ddim with eta > 0 draws noise each step"
    if sampler == "ddim" and getattr(schedule.params, "clip", None) is not None:
        return "ddim with clip_sample clamps x0, which is not linear"
    if len(schedule.timesteps) == 0:
        return "the schedule has no steps"
    return None


def _ddim_step(a: float, a_prev: float, prediction_type: str):
    def step(x, out):
        x0, eps = vp_x0_eps(out, x, a, prediction_type)
        return a_prev**0.5 * x0 + (1.0 - a_prev) ** 0.5 * eps
    return step


def _euler_step(sigma: float, sigma_next: float, prediction_type: str):
    def step(x, out):
        return x + (x - ve_x0(out, x, sigma, prediction_type)) / sigma * (sigma_next - sigma)
    return step


def loop_tables(sampler: str, schedule, eta: float = 0.0) -> LoopTables:
    """The step graph's tables for `sampler` over `schedule`: each step's update evaluated (float64) by the
    samplers' own conversions at (x, out) = (1, 0) and (0, 1). LdmError (naming why) for a sampler whose step
    is not linear in x and out (`why_not`)."""
    reason = why_not(sampler, schedule, eta)
    if reason:
        raise LdmError(f"the sampling loop cannot run on the device: {reason}",
                       hint="run it on the host (the pipeline does so by itself), or pick ddim / euler")
    n = len(schedule.timesteps)
    scales, x_coeffs, out_coeffs = np.ones(n), np.empty(n), np.empty(n)
    one, zero = np.ones(1), np.zeros(1)
    for i in range(n):
        if sampler == "ddim":
            step = _ddim_step(float(schedule.alphas[i]), float(schedule.alphas_prev[i]), schedule.prediction_type)
        else:
            sigma, sigma_next = float(schedule.sigmas[i]), float(schedule.sigmas[i + 1])
            scales[i] = ve_input_scale(sigma)
            step = _euler_step(sigma, sigma_next, schedule.prediction_type)
        x_coeffs[i], out_coeffs[i] = float(step(one, zero)[0]), float(step(zero, one)[0])
    tables = LoopTables(np.asarray(schedule.timesteps, np.float32), scales.astype(np.float32),
                        x_coeffs.astype(np.float32), out_coeffs.astype(np.float32))
    if not all(np.isfinite(t).all() for t in (tables.input_scales, tables.x_coeffs, tables.out_coeffs)):
        raise LdmError(f"the {sampler} schedule has a non-finite step coefficient (a zero-SNR end?)",
                       hint="run the loop on the host")
    return tables


def single_step_tables(timestep: float) -> LoopTables:
    """Tables of one plain U-Net evaluation: x_in = x, x' = 0 x + 1 out = out (exact in float32)."""
    return LoopTables(np.array([timestep], np.float32), np.ones(1, np.float32), np.zeros(1, np.float32),
                      np.ones(1, np.float32))


def reference_loop(tables: LoopTables, model, x: np.ndarray) -> np.ndarray:
    """The step graph's maths in numpy, as the graph orders it: `model(x_in, t) -> out` per step."""
    x = np.asarray(x, np.float32)
    for i in range(tables.steps):
        out = np.asarray(model(x * tables.input_scales[i], float(tables.timesteps[i])), np.float32)
        x = x * tables.x_coeffs[i] + out * tables.out_coeffs[i]
    return x


__all__ = ["INPUT_SCALES", "LATENTS", "LATENTS_NEXT", "LOOP_SAMPLERS", "LoopTables", "OUT_COEFFS", "STEP",
           "STEP_NEXT", "TABLES", "TIMESTEPS", "X_COEFFS", "loop_tables", "reference_loop", "single_step_tables",
           "why_not"]
