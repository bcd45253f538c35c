"""Pure-numpy samplers with diffusers parity: schedules are pure functions, each sampler a small function.

Contract (docs/DESIGN.md "Schedulers", docs/schedulers.md):

    schedule = make_schedule(name, scheduler_config, steps, strength=1.0)
    x = noise * schedule.init_noise_sigma          # txt2img: noise ~ N(0, I), shape (B, 4, h, w)
    x = add_noise(schedule, init_latents, noise)   # img2img: schedule made with strength < 1
    latents = sample(name, model, x, schedule, rng=rng, callback=cb, **knobs)

* Samplers take the START latent as is (already scaled by init_noise_sigma or noised by add_noise);
  `start_latent(schedule, noise, init_latents)` does either.
* `model` is a `Denoiser`: `model(x_in, t) -> raw output` (eps / v / x0, as the config's prediction_type
  says); `x_in` is already scale_model_input-ed (Euler/Euler-a/LMS divide by sqrt(sigma^2 + 1); the others
  pass x as is); `t` is a Python float (fractional for Euler/LMS linspace). The pipeline wraps runner + CFG
  into it.
* `callback(step_index, n_steps, x)` after each step (n_steps = len(schedule.timesteps); the step's t is
  schedule.timesteps[step_index]). Stochastic samplers draw from `rng` (an explicit
  np.random.Generator) or from `noise_fn(step_index, shape)`, at the steps diffusers draws.
* Returned latents are what the VAE decodes (LCM: the last step's denoised x0, as diffusers decodes).

`SCHEDULERS` is the one table of samplers: one `Sampler` row each. The CLI's `--scheduler` choices, the
diffusers class map (`CLASS_TO_NAME`, `default_name`), the serving contract and every error listing the
names are derived from it; `tests/runtime/test_sampler_registry.py` holds the docs to it too.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.limits import check_train_timesteps
from ldm_deploy.runtime.schedulers.ddim import sample_ddim
from ldm_deploy.runtime.schedulers.ddpm import sample_ddpm
from ldm_deploy.runtime.schedulers.denoiser import Denoiser
from ldm_deploy.runtime.schedulers.dpmpp_2m import sample_dpmpp_2m
from ldm_deploy.runtime.schedulers.euler import sample_euler
from ldm_deploy.runtime.schedulers.euler_ancestral import sample_euler_ancestral
from ldm_deploy.runtime.schedulers.lcm import sample_lcm
from ldm_deploy.runtime.schedulers.lms import sample_lms
from ldm_deploy.runtime.schedulers.pndm import sample_pndm
from ldm_deploy.runtime.schedulers.schedule import (
    CLASS_DEFAULTS, ClipParams, DpmParams, LcmParams, PndmParams, SamplerParams, Schedule, SchedulerConfig,
    UniPCParams, add_noise, as_config, check_steps, lcm_schedule, multistep_schedule, ve_schedule, vp_schedule,
)
from ldm_deploy.runtime.schedulers.unipc import sample_unipc

_CALL_ARGS = ("rng", "callback")          # keyword arguments every sampler takes; the rest are its knobs


@dataclass(frozen=True)
class Sampler:
    """One registry row: everything ldm-deploy knows about a sampler, written once."""

    name: str                                 # `--scheduler NAME` / `Pipeline(..., scheduler=NAME)`
    sample: Callable[..., np.ndarray]         # sample_x(model, x, schedule, *, rng, callback, **knobs)
    class_name: str                           # the diffusers class it equals: config defaults, `_class_name`
    build: Callable[..., Schedule]            # build(name, class_name, cfg, steps, strength) -> Schedule
    params: type[SamplerParams]               # the type of Schedule.params `build` makes and `sample` reads
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # ^ config keys the name fixes (dpmpp-2m-karras: use_karras_sigmas); a config of `class_name` that has
    #   them defaults to this sampler

    def __post_init__(self):
        missing = [f.name for f in dataclasses.fields(self) if f.name != "overrides" and not getattr(self, f.name)]
        if missing:
            raise TypeError(f"sampler {self.name!r} lacks {', '.join(missing)}")
        if not (callable(self.sample) and callable(self.build)):
            raise TypeError(f"sampler {self.name!r}: sample and build must be functions")
        if not (isinstance(self.params, type) and issubclass(self.params, SamplerParams)):
            raise TypeError(f"sampler {self.name!r}: params must be a SamplerParams type, not {self.params!r}")
        if self.class_name not in CLASS_DEFAULTS:
            raise TypeError(f"sampler {self.name!r}: {self.class_name} has no defaults in schedule.CLASS_DEFAULTS")
        config_keys = {f.name for f in dataclasses.fields(SchedulerConfig)}
        if not set(self.overrides) <= config_keys:
            raise TypeError(f"sampler {self.name!r}: overrides {sorted(set(self.overrides) - config_keys)} "
                            "are not scheduler config keys")
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))

    @property
    def knobs(self) -> tuple[str, ...]:
        """The sampler's own keyword arguments (beyond rng and callback), as its signature declares them."""
        params = inspect.signature(self.sample).parameters.values()
        return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _CALL_ARGS)


SCHEDULERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddim", sample_ddim, "DDIMScheduler", vp_schedule, ClipParams),
    Sampler("ddpm", sample_ddpm, "DDPMScheduler", vp_schedule, ClipParams),
    Sampler("pndm", sample_pndm, "PNDMScheduler", vp_schedule, PndmParams),
    Sampler("euler", sample_euler, "EulerDiscreteScheduler", ve_schedule, SamplerParams),
    Sampler("euler-ancestral", sample_euler_ancestral, "EulerAncestralDiscreteScheduler", ve_schedule, SamplerParams),
    Sampler("lms", sample_lms, "LMSDiscreteScheduler", ve_schedule, SamplerParams),
    Sampler("dpmpp-2m", sample_dpmpp_2m, "DPMSolverMultistepScheduler", multistep_schedule, DpmParams),
    Sampler("dpmpp-2m-karras", sample_dpmpp_2m, "DPMSolverMultistepScheduler", multistep_schedule, DpmParams,
            overrides={"use_karras_sigmas": True}),
    Sampler("unipc", sample_unipc, "UniPCMultistepScheduler", multistep_schedule, UniPCParams),
    Sampler("lcm", sample_lcm, "LCMScheduler", lcm_schedule, LcmParams),
)}

# diffusers class name -> the sampler of that class without overrides (derived; the reverse is Sampler.class_name)
CLASS_TO_NAME: dict[str, str] = {s.class_name: s.name for s in SCHEDULERS.values() if not s.overrides}


def get_sampler(name: str) -> Sampler:
    """The registry row of `name`; the one check of a sampler name (UsageError listing the choices)."""
    if name not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def default_name(config: SchedulerConfig | Mapping[str, Any]) -> str:
    """The sampler a scheduler config asks for: its `_class_name`, and the row's overrides if the config sets
    them itself (DPMSolverMultistepScheduler + use_karras_sigmas: true -> dpmpp-2m-karras)."""
    cfg = as_config(config)
    matches = [s for s in SCHEDULERS.values() if s.class_name == cfg.class_name
               and all(getattr(cfg, k) == v for k, v in s.overrides.items())]
    if not matches:
        raise LdmError(f"scheduler config names {cfg.class_name!r}, which has no numpy sampler",
                       hint=f"pick one with --scheduler ({', '.join(SCHEDULERS)})")
    return max(matches, key=lambda s: len(s.overrides)).name


def resolve(name: str | None, config: SchedulerConfig | Mapping[str, Any]) -> str:
    """The sampler a request runs: `name` if given (checked), else the config's default."""
    return default_name(config) if name is None else get_sampler(name).name


def make_schedule(name: str, config: SchedulerConfig | Mapping[str, Any], steps: int, *,
                  strength: float = 1.0) -> Schedule:
    """The schedule diffusers' class for `name` builds from `config` for `steps` steps.

    strength < 1 (img2img) keeps the last int(steps * strength) steps, as diffusers' img2img pipelines
    do (`get_timesteps`; LCM shortens its distillation grid instead, as `LCMScheduler` does).
    """
    sampler = get_sampler(name)
    cfg = as_config(config)
    T = check_train_timesteps(cfg.get("num_train_timesteps", sampler.class_name))
    check_steps(steps, strength, T)
    cfg = dataclasses.replace(cfg, **sampler.overrides)
    return sampler.build(name, sampler.class_name, cfg, int(steps), float(strength))


def truncate_schedule(schedule: Schedule, strength: float) -> Schedule:
    """The img2img schedule for `strength` (relative to the schedule's full `num_inference_steps`)."""
    return make_schedule(schedule.name, schedule.config, schedule.num_inference_steps, strength=strength)


def start_latent(schedule: Schedule, noise: np.ndarray, init_latents: np.ndarray | None = None) -> np.ndarray:
    """The latent a sampler starts from: noise * init_noise_sigma (txt2img) or add_noise (img2img)."""
    noise = np.asarray(noise, np.float32)
    if init_latents is None:
        return noise * np.float32(schedule.init_noise_sigma)
    return add_noise(schedule, init_latents, noise)


def sample(name: str, model: Denoiser, x: np.ndarray, schedule: Schedule, *,
           rng: np.random.Generator | None = None, callback=None, eta: float = 0.0, **knobs) -> np.ndarray:
    """Run sampler `name` from start latent x over `schedule` (made by make_schedule for the same name)."""
    entry = get_sampler(name)
    if schedule.name != name:
        raise UsageError(f"schedule was made for {schedule.name!r}, not {name!r}")
    if eta:
        if "eta" not in entry.knobs:
            takers = [s.name for s in SCHEDULERS.values() if "eta" in s.knobs]
            raise UsageError(f"eta applies to {', '.join(takers)} only, not {name}")
        knobs["eta"] = eta
    unknown = sorted(set(knobs) - set(entry.knobs))
    if unknown:
        raise UsageError(f"{name} takes no option(s) {', '.join(unknown)}; it takes: {', '.join(entry.knobs) or 'none'}")
    return entry.sample(model, x, schedule, rng=rng, callback=callback, **knobs)


__all__ = ["CLASS_DEFAULTS", "CLASS_TO_NAME", "SCHEDULERS", "Denoiser", "Sampler", "SamplerParams", "Schedule",
           "SchedulerConfig", "add_noise", "default_name", "get_sampler", "make_schedule", "resolve", "sample",
           "start_latent", "truncate_schedule"]
