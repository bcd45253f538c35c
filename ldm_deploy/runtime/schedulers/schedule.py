"""Noise schedules as pure functions: a diffusers `scheduler_config.json` in, a frozen `Schedule` out.

`SchedulerConfig.from_dict(d)` keeps exactly the keys the file gave; a key the file lacks takes the
default of the diffusers class that the chosen sampler mirrors (DDIM's `clip_sample` is True, PNDM's
`set_alpha_to_one` False, Euler's `timestep_spacing` "linspace", ...), so `make_schedule("euler", cfg, n)`
equals `EulerDiscreteScheduler.from_config(cfg).set_timesteps(n)`. One builder per family of diffusers
classes turns the config into a `Schedule` whose `params` (typed: `SamplerParams` and its subclasses) carry
what the sampler reads beyond the tables; the registry (`schedulers/__init__.py`) names each sampler's builder
and params type.

The training table is diffusers' float32 one: torch's float32 `linspace` (symmetric, start + step*i
with one rounding, as its fused kernel does) and a cumprod accumulated in float64 then rounded, which
is what torch's CPU cumprod returns. `tests/runtime/test_schedulers.py` pins both to torch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.limits import check_scheduler_numbers, check_train_timesteps
from ldm_deploy.runtime.schedulers import convert

# Which diffusers class each sampler mirrors, and that class's defaults for every key we read.
_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
               trained_betas=None, prediction_type="epsilon", steps_offset=0, rescale_betas_zero_snr=False)
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": dict(_COMMON, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True,
                          timestep_spacing="leading"),
    "DDPMScheduler": dict(_COMMON, clip_sample=True, clip_sample_range=1.0, variance_type="fixed_small",
                          timestep_spacing="leading"),
    "PNDMScheduler": {**{k: v for k, v in _COMMON.items() if k != "rescale_betas_zero_snr"},
                      "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"},
    "EulerDiscreteScheduler": dict(_COMMON, timestep_spacing="linspace", use_karras_sigmas=False,
                                   sigma_min=None, sigma_max=None, final_sigmas_type="zero"),
    "EulerAncestralDiscreteScheduler": dict(_COMMON, timestep_spacing="linspace"),
    "LMSDiscreteScheduler": {**{k: v for k, v in _COMMON.items() if k != "rescale_betas_zero_snr"},
                             "timestep_spacing": "linspace", "use_karras_sigmas": False},
    "DPMSolverMultistepScheduler": dict(_COMMON, timestep_spacing="linspace", solver_order=2,
                                        algorithm_type="dpmsolver++", solver_type="midpoint",
                                        lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                                        final_sigmas_type="zero", lambda_min_clipped=-math.inf),
    "UniPCMultistepScheduler": dict(_COMMON, timestep_spacing="linspace", solver_order=2, solver_type="bh2",
                                    predict_x0=True, lower_order_final=True, disable_corrector=(),
                                    use_karras_sigmas=False, sigma_min=None, sigma_max=None,
                                    final_sigmas_type="zero"),
    "LCMScheduler": dict(_COMMON, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         original_inference_steps=50, timestep_scaling=10.0, clip_sample=False,
                         clip_sample_range=1.0, set_alpha_to_one=True, timestep_spacing="leading"),
}

# Keys that only select features we don't implement: accepted at their "off" value, LdmError otherwise.
_OFF_VALUES: dict[str, tuple] = {
    "thresholding": (False,), "interpolation_type": ("linear",), "timestep_type": ("discrete",),
    "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,), "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,), "solver_p": (None,),
    "shift_terminal": (None,),
}
# Keys that never change the maths here (they only matter when a feature above is on).
_HARMLESS = frozenset({"dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type"})
_VALUES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": convert.PREDICTION_TYPES,
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "variance_type": (None, "fixed_small"),
}


@dataclass(frozen=True)
class SchedulerConfig:
    """The keys a `scheduler_config.json` gave. None = absent: the sampler's diffusers class default applies."""

    class_name: str | None = None              # `_class_name`: picks the default sampler
    num_train_timesteps: int | None = None     # T, 1000 for SD
    beta_start: float | None = None            # SD: 0.00085
    beta_end: float | None = None              # SD: 0.012
    beta_schedule: str | None = None           # linear | scaled_linear (SD) | squaredcos_cap_v2
    trained_betas: tuple | None = None         # explicit (T,) betas, overrides the three above
    prediction_type: str | None = None         # epsilon (SD1) | v_prediction (SD2-v) | sample
    timestep_spacing: str | None = None        # leading | trailing | linspace (class default when absent)
    steps_offset: int | None = None            # SD: 1 (only "leading" uses it)
    set_alpha_to_one: bool | None = None       # DDIM/PNDM final step to alpha=1 (True) or alphas_cumprod[0]
    skip_prk_steps: bool | None = None         # PNDM: SD configs say True (PLMS only)
    clip_sample: bool | None = None            # DDIM/DDPM/LCM clamp x0 (class default True; SD: False)
    clip_sample_range: float | None = None
    variance_type: str | None = None           # DDPM: fixed_small only
    use_karras_sigmas: bool | None = None      # Euler/LMS/DPM/UniPC Karras sigmas
    sigma_min: float | None = None             # Euler/UniPC Karras range override
    sigma_max: float | None = None
    rescale_betas_zero_snr: bool | None = None
    final_sigmas_type: str | None = None       # zero | sigma_min
    solver_order: int | None = None            # DPM-Solver / UniPC multistep order (<= 3 UniPC, <= 2 DPM)
    solver_type: str | None = None             # DPM: midpoint | heun; UniPC: bh1 | bh2
    algorithm_type: str | None = None          # DPM: dpmsolver++ only
    lower_order_final: bool | None = None
    euler_at_final: bool | None = None
    lambda_min_clipped: float | None = None
    predict_x0: bool | None = None             # UniPC: True only
    disable_corrector: tuple | None = None     # UniPC: step indices without the corrector
    original_inference_steps: int | None = None  # LCM: 50
    timestep_scaling: float | None = None      # LCM: 10
    ignored: tuple[str, ...] = ()              # keys read from the file that change nothing here

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SchedulerConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"class_name", "ignored"}
        given: dict[str, Any] = {"class_name": d.get("_class_name")}
        ignored = []
        for key, value in d.items():
            if key.startswith("_"):
                continue
            if key in _OFF_VALUES:
                if value not in _OFF_VALUES[key]:
                    raise LdmError(f"scheduler config sets {key}={value!r}, which ldm-deploy does not implement",
                                   hint=f"remove it or set it to {_OFF_VALUES[key][0]!r}")
                ignored.append(key)
            elif key in _HARMLESS:
                ignored.append(key)
            elif key in names:
                if key in _VALUES and value not in _VALUES[key]:
                    raise LdmError(f"scheduler config has unsupported {key}={value!r}",
                                   hint=f"use one of {', '.join(map(str, _VALUES[key]))}")
                if isinstance(value, list):
                    value = tuple(value)
                given[key] = value
            else:
                raise LdmError(f"unknown key {key!r} in the scheduler config",
                               hint="ldm-deploy refuses keys that might change the sampling maths; remove it")
        return cls(**given, ignored=tuple(sorted(ignored)))

    def get(self, key: str, class_name: str) -> Any:
        """The value a diffusers `class_name.from_config(this)` would use for `key`."""
        defaults = CLASS_DEFAULTS[class_name]
        if key not in defaults:
            return None                  # the class has no such key: from_config ignores the file's value
        value = getattr(self, key)
        return defaults[key] if value is None else value


@dataclass(frozen=True, eq=False)
class Schedule:
    """Everything a sampler needs, precomputed; n = len(timesteps) model evaluations.

    `sigmas[i]` / `alphas[i]` are the noise level at evaluation i, `sigmas[n]` / `alphas_prev[n-1]` where
    the last step lands. VP samplers use alphas / alphas_prev, the VE and DPM samplers use sigmas.
    """

    name: str                        # sampler name (ddim, euler, ...)
    config: SchedulerConfig
    prediction_type: str
    timesteps: np.ndarray            # (n,) float32: t the model sees (fractional for Euler/LMS linspace)
    sigmas: np.ndarray               # (n+1,) float32 VE sigmas
    alphas: np.ndarray               # (n,) float64 alphas_cumprod at each evaluation
    alphas_prev: np.ndarray          # (n,) float64 alphas_cumprod each step moves to
    init_noise_sigma: float          # txt2img start latent = N(0, I) * init_noise_sigma
    num_inference_steps: int         # the N asked for (before strength truncation)
    strength: float                  # 1.0 = txt2img
    ve_input: bool                   # sampler walks the VE sample; model input = x / sqrt(sigma^2 + 1)
    params: "SamplerParams"          # the sampler's own resolved settings (its registry entry names the type)


# --- Schedule.params: what each builder resolves for its sampler (the registry entry names the type) --------

@dataclass(frozen=True)
class SamplerParams:
    """Settings of samplers that read none (euler, euler-ancestral, lms); the base of the others."""

    def sliced(self, a: int, b: int, n: int) -> "SamplerParams":
        """The params of steps [a, b) of an n-step schedule run on their own (an SDXL hand-off stage)."""
        return self


@dataclass(frozen=True)
class ClipParams(SamplerParams):
    """DDIM, DDPM."""
    clip: float | None               # clamp x0 to [-clip, clip] (clip_sample); None = no clamp


@dataclass(frozen=True)
class PndmParams(SamplerParams):
    prk_evals: int                   # model evaluations of the Runge-Kutta warm-up; 0 = PLMS (skip_prk_steps)


@dataclass(frozen=True)
class DpmParams(SamplerParams):
    """DPM-Solver++ (dpmpp-2m, dpmpp-2m-karras)."""
    solver_order: int                # 1 or 2
    solver_type: str                 # midpoint | heun
    first_order_final: bool          # the last step is first order (see dpmpp_2m.py)

    def sliced(self, a: int, b: int, n: int) -> "DpmParams":
        # a stage that stops early is not the schedule's end: its last step stays second order
        return dataclasses.replace(self, first_order_final=False) if b < n else self


@dataclass(frozen=True)
class UniPCParams(SamplerParams):
    solver_order: int                # >= 1
    solver_type: str                 # bh1 | bh2
    lower_order_final: bool          # lower the order over the last steps
    disable_corrector: tuple[int, ...]   # global step indices without the corrector
    start_index: int                 # global index of the first step (img2img start, hand-off slice)
    tail_steps: int = 0              # steps of the whole schedule after this one's last (hand-off slice)

    def sliced(self, a: int, b: int, n: int) -> "UniPCParams":
        # global step indices and the steps after the slice keep the corrector / order choices diffusers makes
        return dataclasses.replace(self, start_index=self.start_index + a, tail_steps=n - b)


@dataclass(frozen=True, eq=False)
class LcmParams(SamplerParams):
    c_skip: np.ndarray               # (n,) float64 boundary-condition weights per step
    c_out: np.ndarray                # (n,) float64
    clip: float | None               # as ClipParams
    ends_schedule: bool = True       # the last step is the schedule's last: it returns the denoised x0, no noise

    def sliced(self, a: int, b: int, n: int) -> "LcmParams":
        # diffusers' LCMScheduler keeps global step indices (set_begin_index): only the schedule's real last
        # step skips the noise, so a base stage that stops early ends noised to the next timestep, as diffusers'
        return dataclasses.replace(self, c_skip=self.c_skip[a:b], c_out=self.c_out[a:b],
                                   ends_schedule=self.ends_schedule and b == n)


# --- the training table -------------------------------------------------------------------------

def torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32): symmetric halves, one rounding per element."""
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32], np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    lo = np.float64(start32) + step * i
    hi = np.float64(end32) - step * (n - 1 - i)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1, in float32 as diffusers does."""
    abar_sqrt = np.sqrt(_cumprod(1 - betas))
    first, last = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    return (1 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])).astype(np.float32)


def _cumprod(a: np.ndarray) -> np.ndarray:
    return np.cumprod(a.astype(np.float64)).astype(np.float32)    # torch CPU accumulates in double


def train_alphas_cumprod(cfg: SchedulerConfig, class_name: str) -> np.ndarray:
    """(T,) float32 alphas_cumprod as diffusers' `class_name` builds it from `cfg`."""
    trained = cfg.get("trained_betas", class_name)
    kind = cfg.get("beta_schedule", class_name)
    n, start, end = (cfg.get(k, class_name) for k in ("num_train_timesteps", "beta_start", "beta_end"))
    if trained is None:
        check_scheduler_numbers(n, start, end)
    else:                               # the betas come from the list; only T sizes a table
        check_train_timesteps(n)
    n, start, end = int(n), float(start), float(end)
    if trained is not None:
        try:
            betas = np.asarray(trained, np.float32)
        except (TypeError, ValueError):
            betas = np.zeros(0, np.float32)
        if betas.shape != (n,):
            raise LdmError(f"trained_betas has {betas.size} entries, num_train_timesteps is {n}",
                           hint="make them agree")
        if not ((betas > 0) & (betas < 1)).all():
            raise LdmError("trained_betas holds values outside (0, 1)", hint="restore the scheduler config")
    elif kind == "linear":
        betas = torch_linspace_f32(start, end, n)
    elif kind == "scaled_linear":
        betas = torch_linspace_f32(start**0.5, end**0.5, n) ** 2
    else:
        betas = _cosine_betas(n)
    if cfg.get("rescale_betas_zero_snr", class_name):
        betas = _rescale_zero_terminal_snr(betas)
    return _cumprod(1 - betas)


# --- timestep spacing (reference §3.2) --------------------------------------------------------------

def spaced_timesteps(spacing: str, T: int, n: int, offset: int) -> np.ndarray:
    """Descending float64 timesteps for the one-step classes (DDIM/DDPM/PNDM/Euler/LMS); linspace unrounded."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + offset
    return np.round(np.arange(T, 0, -T / n)) - 1                     # trailing


def multistep_timesteps(spacing: str, T: int, n: int, offset: int, last: int) -> np.ndarray:
    """DPM-Solver / UniPC spacing: N+1 points with the final one dropped (note T // (N+1) for leading)."""
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64) + offset
    return np.arange(last, 0, -T / n).round().astype(np.int64) - 1


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: n sigmas from sigma_max down to sigma_min, float64."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def truncated_start(steps: int, strength: float) -> int:
    """Index of the first step img2img runs: diffusers `get_timesteps` (order 1 for every sampler here)."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)


def check_steps(steps: int, strength: float, T: int = 1000) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise UsageError(f"steps must be a positive integer, got {steps!r}")
    if steps > T:
        raise UsageError(f"steps={steps} exceeds the model's {T} training timesteps")
    if not 0.0 < strength <= 1.0:
        raise UsageError(f"strength must be in (0, 1], got {strength}")


def check_leading_reach(name: str, cfg: SchedulerConfig, cls: str, steps: int) -> None:
    """Leading spacing reaches t = T at steps = T: diffusers then indexes alphas_cumprod[T] (or repeats a sigma)."""
    T = int(cfg.get("num_train_timesteps", cls))
    offset = int(cfg.get("steps_offset", cls) or 0)
    if cfg.get("timestep_spacing", cls) == "leading" and (steps - 1) * (T // steps) + offset > T - 1:
        most = max(s for s in range(1, T + 1) if (s - 1) * (T // s) + offset <= T - 1)
        raise UsageError(f"{steps} steps with {name}'s leading spacing and steps_offset {offset} reach timestep "
                         f"{(steps - 1) * (T // steps) + offset}, past the model's {T} training timesteps",
                         hint=f"use at most {most} steps, or another scheduler")


# --- builders: one per family of diffusers classes; `build(name, class_name, cfg, steps, strength)` ------

def _schedule(name, cfg, cls, steps, strength, timesteps, sigmas, alphas, alphas_prev, init_sigma,
              ve_input, params: SamplerParams = SamplerParams()) -> Schedule:
    if len(timesteps) == 0:
        raise UsageError(f"strength {strength} with {steps} steps leaves no denoising step",
                         hint="raise the strength or the number of steps")
    return Schedule(name=name, config=cfg, prediction_type=cfg.get("prediction_type", cls),
                    timesteps=np.asarray(timesteps, np.float32), sigmas=np.asarray(sigmas, np.float32),
                    alphas=np.asarray(alphas, np.float64), alphas_prev=np.asarray(alphas_prev, np.float64),
                    init_noise_sigma=float(init_sigma), num_inference_steps=steps,
                    strength=float(strength), ve_input=ve_input, params=params)


def _clip(cfg: SchedulerConfig, cls: str) -> float | None:
    return float(cfg.get("clip_sample_range", cls)) if cfg.get("clip_sample", cls) else None


def plms_pairs(ts: np.ndarray, delta: int) -> tuple[np.ndarray, np.ndarray]:
    """The (from, to) timesteps of each evaluation of a PLMS run that starts at ts[0] (diffusers' PNDMScheduler
    with skip_prk_steps, its step counter at 0): evaluation 1 re-takes the first step (counter == 1: from
    t + delta to t, pseudo-improved Euler), every other evaluation steps from t to t - delta."""
    cur = np.array([t + delta if k == 1 else t for k, t in enumerate(ts)], np.int64)
    prev = np.array([t if k == 1 else t - delta for k, t in enumerate(ts)], np.int64)
    return cur, prev


def _vp_alphas(ac: np.ndarray, cur: np.ndarray, prev: np.ndarray, final: float) -> tuple[np.ndarray, np.ndarray]:
    alphas = np.array([ac[t] for t in cur], np.float64)
    alphas_prev = np.array([ac[t] if t >= 0 else final for t in prev], np.float64)
    return alphas, alphas_prev


def plms_restart(schedule: Schedule, a: int, b: int) -> Schedule:
    """Evaluations [a, b) of a PLMS schedule as a fresh PNDMScheduler runs them (an SDXL refiner stage after
    `denoising_start`): diffusers' refiner pipeline gives the remaining timesteps to a scheduler whose counter
    restarts at 0, so the stage's evaluation 1 re-takes the stage's first step and its history starts empty
    (`plms_pairs` over the sliced timesteps). For a == 0 this equals the schedule's own first b evaluations."""
    cfg, cls = schedule.config, "PNDMScheduler"
    ac = train_alphas_cumprod(cfg, cls)
    ts = schedule.timesteps[a:b].astype(np.int64)
    cur, prev = plms_pairs(ts, len(ac) // schedule.num_inference_steps)
    alphas, alphas_prev = _vp_alphas(ac, cur, prev, 1.0 if cfg.get("set_alpha_to_one", cls) else float(ac[0]))
    sigmas = convert.sigma_from_alpha_bar(np.append(alphas, alphas_prev[-1:]))
    return _schedule(schedule.name, cfg, cls, schedule.num_inference_steps, schedule.strength, ts, sigmas, alphas,
                     alphas_prev, schedule.init_noise_sigma, False, schedule.params)


def vp_schedule(name: str, cls: str, cfg: SchedulerConfig, steps: int, strength: float) -> Schedule:
    """DDIM, DDPM and PNDM(PLMS): integer timesteps, alphas_cumprod lookups."""
    check_leading_reach(name, cfg, cls, steps)
    ac = train_alphas_cumprod(cfg, cls)
    T = len(ac)
    ts = spaced_timesteps(cfg.get("timestep_spacing", cls), T, steps, int(cfg.get("steps_offset", cls)))
    ts = ts.round().astype(np.int64)
    start = truncated_start(steps, strength)
    final = 1.0 if name == "ddpm" or cfg.get("set_alpha_to_one", cls) else float(ac[0])
    params: SamplerParams
    if name == "ddim":                       # prev = t - T//N whatever the spacing (diffusers quirk)
        ts = ts[start:]
        cur, prev = ts, ts - T // steps
        params = ClipParams(_clip(cfg, cls))
    elif name == "ddpm":                     # prev = the next scheduled timestep
        ts = ts[start:]
        cur, prev = ts, np.concatenate([ts[1:], [-1]])
        params = ClipParams(_clip(cfg, cls))
    else:
        asc, delta = ts[::-1], T // steps
        if cfg.get("skip_prk_steps", cls):   # PLMS: N+1 evaluations, the second timestep repeated
            ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1][start:]
            cur, prev = plms_pairs(ts, delta)
            params = PndmParams(prk_evals=0)
        else:                                # PNDM: 3 Runge-Kutta steps (4 evaluations each), then PLMS
            if strength < 1.0 or steps < 4:
                raise UsageError("PNDM's Runge-Kutta warm-up (skip_prk_steps=false, the class default when the "
                                 "config lacks the key) needs steps >= 4 and no img2img strength",
                                 hint="use another scheduler (e.g. ddim, dpmpp-2m) or set skip_prk_steps true")
            half = delta // 2
            prk = (asc[-4:].repeat(2) + np.tile([0, half], 4))[:-1].repeat(2)[1:-1][::-1]
            ts = np.concatenate([prk, asc[:-3][::-1]]).astype(np.int64)
            cur = np.array([prk[k // 4 * 4] if k < len(prk) else t for k, t in enumerate(ts)], np.int64)
            prev = np.array([t - (0 if k % 2 else half) if k < len(prk) else t - delta
                             for k, t in enumerate(ts)], np.int64)
            params = PndmParams(prk_evals=len(prk))
    alphas, alphas_prev = _vp_alphas(ac, cur, prev, final)
    sigmas = convert.sigma_from_alpha_bar(np.append(alphas, alphas_prev[-1:]))
    return _schedule(name, cfg, cls, steps, strength, ts, sigmas, alphas, alphas_prev, 1.0, False, params)


def ve_schedule(name: str, cls: str, cfg: SchedulerConfig, steps: int, strength: float) -> Schedule:
    """Euler, Euler ancestral and LMS: float32 timesteps, sigmas interpolated linearly in sigma."""
    check_leading_reach(name, cfg, cls, steps)
    ac = train_alphas_cumprod(cfg, cls)
    if cfg.get("rescale_betas_zero_snr", cls):
        ac[-1] = 2.0**-24                    # diffusers: keeps the first sigma finite
    T = len(ac)
    spacing = cfg.get("timestep_spacing", cls)
    ts = spaced_timesteps(spacing, T, steps, int(cfg.get("steps_offset", cls))).astype(np.float32)
    train_sigmas = convert.sigma_from_alpha_bar(ac)                    # float32
    sigmas = convert.t_to_sigma(ts, train_sigmas)
    if cfg.get("use_karras_sigmas", cls):   # range of the *interpolated* schedule (reference §3.7)
        lo, hi = cfg.get("sigma_min", cls), cfg.get("sigma_max", cls)
        sigmas = karras_sigmas(float(sigmas[-1]) if lo is None else lo, float(sigmas[0]) if hi is None else hi, steps)
        ts = convert.sigma_to_t(sigmas, np.log(train_sigmas))
    last = float(train_sigmas[0]) if cfg.get("final_sigmas_type", cls) == "sigma_min" else 0.0
    sigmas = np.append(sigmas, last).astype(np.float32)
    top = sigmas.max()
    init = top if spacing in ("linspace", "trailing") else np.sqrt(top * top + np.float32(1))
    start = truncated_start(steps, strength)
    ts, sigmas = ts[start:], sigmas[start:]
    alphas = convert.alpha_bar_from_sigma(sigmas.astype(np.float64))
    return _schedule(name, cfg, cls, steps, strength, ts, sigmas, alphas[:-1], alphas[1:], init, True)


def multistep_schedule(name: str, cls: str, cfg: SchedulerConfig, steps: int, strength: float) -> Schedule:
    """DPM-Solver++ and UniPC: integer timesteps, VP sample, sigmas for the exponential integrator."""
    dpm = cls == "DPMSolverMultistepScheduler"
    ac = train_alphas_cumprod(cfg, cls)
    if cfg.get("rescale_betas_zero_snr", cls):
        ac[-1] = 2.0**-24
    T = len(ac)
    last_t = T
    if dpm and cfg.get("lambda_min_clipped", cls) > -math.inf:
        lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
        last_t = T - int(np.searchsorted(lam[::-1], cfg.get("lambda_min_clipped", cls)))
    ts = multistep_timesteps(cfg.get("timestep_spacing", cls), T, steps, int(cfg.get("steps_offset", cls)), last_t)
    train_sigmas = convert.sigma_from_alpha_bar(ac)
    sigma_min_final = float(train_sigmas[0])
    if cfg.get("use_karras_sigmas", cls):   # (dpmpp-2m-karras: its registry entry sets it) range of the full
                                             # training table (reference §3.7)
        lo, hi = cfg.get("sigma_min", cls), cfg.get("sigma_max", cls)
        sigmas = karras_sigmas(float(train_sigmas[0]) if lo is None else lo,
                               float(train_sigmas[-1]) if hi is None else hi, steps)
        ts = convert.sigma_to_t(sigmas, np.log(train_sigmas))
        if not dpm or cfg.get("beta_schedule", cls) != "squaredcos_cap_v2":
            ts = ts.round()                  # the U-Net sees rounded integer t (diffusers)
        if not dpm:
            sigma_min_final = float(sigmas[-1])   # UniPC: "sigma_min" = the last inference sigma
    else:
        sigmas = convert.t_to_sigma(ts, train_sigmas)
    last = sigma_min_final if cfg.get("final_sigmas_type", cls) == "sigma_min" else 0.0
    sigmas = np.append(sigmas, last).astype(np.float32)
    n_full = len(ts)
    order = int(cfg.get("solver_order", cls))
    solver = cfg.get("solver_type", cls)
    if dpm:
        if cfg.get("algorithm_type", cls) not in ("dpmsolver++", "deis"):
            raise LdmError(f"DPM-Solver algorithm_type={cfg.get('algorithm_type', cls)!r} is not implemented",
                           hint="use dpmsolver++ (the default) or another scheduler")
        if order not in (1, 2):
            raise LdmError(f"DPM-Solver solver_order={order} is not implemented", hint="use 1 or 2")
        solver = "heun" if solver == "heun" else "midpoint"        # diffusers maps bh1/bh2/logrho to midpoint
        first_order_final = bool(cfg.get("euler_at_final", cls) or cfg.get("final_sigmas_type", cls) == "zero"
                                 or (cfg.get("lower_order_final", cls) and n_full < 15))
        params: SamplerParams = DpmParams(order, solver, first_order_final)
    else:
        if not cfg.get("predict_x0", cls):
            raise LdmError("UniPC with predict_x0=false is not implemented", hint="use predict_x0 true (default)")
        if order < 1:
            raise LdmError(f"UniPC solver_order={order} must be >= 1")
        solver = solver if solver in ("bh1", "bh2") else "bh2"     # diffusers maps midpoint/heun/logrho to bh2
    start = truncated_start(steps, strength)
    if not dpm:
        params = UniPCParams(order, solver, bool(cfg.get("lower_order_final", cls)),
                             tuple(int(i) for i in cfg.get("disable_corrector", cls)), start_index=start)
    ts, sigmas = ts[start:], sigmas[start:]
    alphas = convert.alpha_bar_from_sigma(sigmas.astype(np.float64))
    return _schedule(name, cfg, cls, steps, strength, ts, sigmas, alphas[:-1], alphas[1:], 1.0, False, params)


def lcm_schedule(name: str, cls: str, cfg: SchedulerConfig, steps: int, strength: float) -> Schedule:
    """LCM: `steps` points of the 50-step distillation grid; strength shortens that grid (img2img)."""
    ac = train_alphas_cumprod(cfg, cls)
    T = len(ac)
    original = int(cfg.get("original_inference_steps", cls))
    grid = np.arange(1, int(original * strength) + 1) * (T // original) - 1
    if len(grid) // steps < 1 or steps > original:
        raise UsageError(f"LCM samples {steps} steps from a {original}-step grid; with strength {strength} only "
                         f"{len(grid)} grid points remain", hint="use fewer steps or a higher strength")
    grid = grid[::-1]
    ts = grid[np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)]
    prev = np.append(ts[1:], ts[-1])           # last step: prev = t (no noise is added there)
    scaled = ts.astype(np.float64) * float(cfg.get("timestep_scaling", cls))
    c_skip = 0.25 / (scaled**2 + 0.25)         # sigma_data = 0.5
    c_out = scaled / (scaled**2 + 0.25) ** 0.5
    alphas, alphas_prev = ac[ts].astype(np.float64), ac[prev].astype(np.float64)
    sigmas = convert.sigma_from_alpha_bar(np.append(alphas, alphas_prev[-1:]))
    return _schedule(name, cfg, cls, steps, strength, ts, sigmas, alphas, alphas_prev, 1.0, False,
                     LcmParams(c_skip=c_skip, c_out=c_out, clip=_clip(cfg, cls)))


def as_config(config: SchedulerConfig | Mapping[str, Any]) -> SchedulerConfig:
    """The one parse of a scheduler config: a `scheduler_config.json` dict -> `SchedulerConfig` (or it as is)."""
    return config if isinstance(config, SchedulerConfig) else SchedulerConfig.from_dict(config)


def add_noise(schedule: Schedule, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """img2img start latent: x0 noised to the schedule's first step (diffusers `scheduler.add_noise`)."""
    x0 = np.asarray(x0, np.float32)
    noise = np.asarray(noise, np.float32)
    if schedule.ve_input:
        return x0 + noise * schedule.sigmas[0]
    return convert.vp_noised(x0, noise, schedule.alphas[0])
