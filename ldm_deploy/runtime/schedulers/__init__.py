"""Pure-numpy samplers with diffusers parity: schedules are pure functions, each sampler a small function.

Contract (docs/DESIGN.md "Schedulers", docs/schedulers.md):

    schedule = make_schedule(name, scheduler_config_dict, steps, strength=1.0)
    x = noise * schedule.init_noise_sigma          # txt2img: noise ~ N(0, I), shape (B, 4, h, w)
    x = add_noise(schedule, init_latents, noise)   # img2img: schedule made with strength < 1
    latents = sample(name, model, x, schedule, rng=rng, callback=cb, **knobs)

* Samplers take the START latent as is (already scaled by init_noise_sigma or noised by add_noise);
  `start_latent(schedule, noise, init_latents)` does either.
* `model(x_in, t) -> raw output` (eps / v / x0, as the config's prediction_type says); `x_in` is already
  scale_model_input-ed (Euler/Euler-a/LMS divide by sqrt(sigma^2 + 1); the others pass x as is);
  `t` is a Python float (fractional for Euler/LMS linspace). The pipeline wraps runner + CFG into it.
* `callback(step_index, n_steps, x)` after each step (n_steps = len(schedule.timesteps); the step's t is
  schedule.timesteps[step_index]). Stochastic samplers draw from `rng` (an explicit
  np.random.Generator) or from `noise_fn(step_index, shape)`, at the steps diffusers draws.
* Returned latents are what the VAE decodes (LCM: the last step's denoised x0, as diffusers decodes).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime.schedulers.ddim import sample_ddim
from ldm_deploy.runtime.schedulers.ddpm import sample_ddpm
from ldm_deploy.runtime.schedulers.dpmpp_2m import sample_dpmpp_2m
from ldm_deploy.runtime.schedulers.euler import sample_euler
from ldm_deploy.runtime.schedulers.euler_ancestral import sample_euler_ancestral
from ldm_deploy.runtime.schedulers.lcm import sample_lcm
from ldm_deploy.runtime.schedulers.lms import sample_lms
from ldm_deploy.runtime.schedulers.pndm import sample_pndm
from ldm_deploy.runtime.schedulers.unipc import sample_unipc
from ldm_deploy.runtime.schedulers.schedule import (
    CLASS_DEFAULTS, SAMPLER_CLASS, Schedule, SchedulerConfig, add_noise, as_config, make_schedule,
    truncate_schedule,
)


class Scheduler(NamedTuple):
    sample: Callable[..., np.ndarray]        # sample_x(model, x, schedule, *, rng, callback, **knobs)
    class_name: str                          # the diffusers class it matches
    knobs: tuple[str, ...]                   # extra keyword arguments the sampler takes


SCHEDULERS: dict[str, Scheduler] = {
    "ddim": Scheduler(sample_ddim, "DDIMScheduler", ("eta", "noise_fn")),
    "ddpm": Scheduler(sample_ddpm, "DDPMScheduler", ("noise_fn",)),
    "pndm": Scheduler(sample_pndm, "PNDMScheduler", ()),
    "euler": Scheduler(sample_euler, "EulerDiscreteScheduler", ("s_churn", "s_tmin", "s_tmax", "s_noise", "noise_fn")),
    "euler-ancestral": Scheduler(sample_euler_ancestral, "EulerAncestralDiscreteScheduler", ("noise_fn",)),
    "lms": Scheduler(sample_lms, "LMSDiscreteScheduler", ("order",)),
    "dpmpp-2m": Scheduler(sample_dpmpp_2m, "DPMSolverMultistepScheduler", ()),
    "dpmpp-2m-karras": Scheduler(sample_dpmpp_2m, "DPMSolverMultistepScheduler", ()),   # + use_karras_sigmas
    "unipc": Scheduler(sample_unipc, "UniPCMultistepScheduler", ()),
    "lcm": Scheduler(sample_lcm, "LCMScheduler", ("noise_fn",)),
}

# diffusers class name -> the CLI name a config with that `_class_name` samples with by default
CLASS_TO_NAME: dict[str, str] = {
    "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler-ancestral",
    "LMSDiscreteScheduler": "lms", "DPMSolverMultistepScheduler": "dpmpp-2m",
    "UniPCMultistepScheduler": "unipc", "LCMScheduler": "lcm",
}


def get_sampler(name: str) -> Scheduler:
    if name not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def default_name(config: SchedulerConfig | Mapping[str, Any]) -> str:
    """The sampler a scheduler config asks for (its `_class_name`; Karras DPM -> dpmpp-2m-karras)."""
    cfg = as_config(config)
    if cfg.class_name not in CLASS_TO_NAME:
        raise LdmError(f"scheduler config names {cfg.class_name!r}, which has no numpy sampler",
                       hint=f"pick one with --scheduler ({', '.join(SCHEDULERS)})")
    name = CLASS_TO_NAME[cfg.class_name]
    return "dpmpp-2m-karras" if name == "dpmpp-2m" and cfg.use_karras_sigmas else name


def start_latent(schedule: Schedule, noise: np.ndarray, init_latents: np.ndarray | None = None) -> np.ndarray:
    """The latent a sampler starts from: noise * init_noise_sigma (txt2img) or add_noise (img2img)."""
    noise = np.asarray(noise, np.float32)
    if init_latents is None:
        return noise * np.float32(schedule.init_noise_sigma)
    return add_noise(schedule, init_latents, noise)


def sample(name: str, model, x: np.ndarray, schedule: Schedule, *, rng: np.random.Generator | None = None,
           callback=None, eta: float = 0.0, **knobs) -> np.ndarray:
    """Run sampler `name` from start latent x over `schedule` (made by make_schedule for the same name)."""
    entry = get_sampler(name)
    if schedule.name != name:
        raise UsageError(f"schedule was made for {schedule.name!r}, not {name!r}")
    if eta:
        if "eta" not in entry.knobs:
            raise UsageError(f"eta applies to ddim only, not {name}")
        knobs["eta"] = eta
    unknown = sorted(set(knobs) - set(entry.knobs))
    if unknown:
        raise UsageError(f"{name} takes no option(s) {', '.join(unknown)}; it takes: {', '.join(entry.knobs) or 'none'}")
    return entry.sample(model, x, schedule, rng=rng, callback=callback, **knobs)


__all__ = ["CLASS_DEFAULTS", "CLASS_TO_NAME", "SAMPLER_CLASS", "SCHEDULERS", "Schedule", "SchedulerConfig",
           "Scheduler", "add_noise", "default_name", "get_sampler", "make_schedule", "sample", "start_latent",
           "truncate_schedule"]
