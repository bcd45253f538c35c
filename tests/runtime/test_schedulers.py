"""Numpy samplers vs diffusers' scheduler classes (the peer): same config, same fake model, same noise."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime import schedulers as sch
from ldm_deploy.runtime.schedulers import schedule as sched_mod

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD15 = {  # stabilityai SD 1.5 scheduler/scheduler_config.json (no timestep_spacing key)
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SHAPE = (1, 4, 8, 8)
PATTERN = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
STOCHASTIC = {"euler-ancestral", "ddpm", "lcm"}
CLASS_OF = {name: cls for name, cls in sched_mod.SAMPLER_CLASS.items()}
ALL = list(sched_mod.SAMPLER_CLASS)


def fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """Deterministic stand-in for a U-Net: linear in x, a fixed spatial pattern scaled by t."""
    return (0.1 * x + 1e-3 * float(t) * PATTERN).astype(np.float32)


def run_diffusers(name, cfg, steps, start_noise, step_noise, *, strength=1.0, init=None, step_kwargs=None,
                  monkeypatch=None):
    """The diffusers loop of StableDiffusion(Img2Img)Pipeline around scheduler X.from_config(cfg)."""
    cls = getattr(diffusers, CLASS_OF[name])
    overrides = {"use_karras_sigmas": True} if name == "dpmpp-2m-karras" else {}
    s = cls.from_config(cfg, **overrides)
    calls = []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        calls.append(len(calls))
        return torch.from_numpy(step_noise[len(calls) - 1].copy())

    module = importlib.import_module(cls.__module__)
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", fake_randn)
    if name == "lcm":
        s.set_timesteps(steps, strength=strength)
        timesteps = s.timesteps
    else:
        s.set_timesteps(steps)
        timesteps = s.timesteps
        if init is not None:                                  # pipeline_stable_diffusion_img2img.get_timesteps
            init_timestep = min(int(steps * strength), steps)
            t_start = max(steps - init_timestep, 0)
            timesteps = s.timesteps[t_start * s.order:]
            if hasattr(s, "set_begin_index"):
                s.set_begin_index(t_start * s.order)
    if init is None:
        x = torch.from_numpy(start_noise) * s.init_noise_sigma
    else:
        x = s.add_noise(torch.from_numpy(init), torch.from_numpy(start_noise), timesteps[:1])
    x = x.to(torch.float32)
    x_start = x.numpy().copy()
    for t in timesteps:
        x_in = s.scale_model_input(x, t)
        out = torch.from_numpy(fake_model(x_in.numpy(), float(t)))
        x = s.step(out, t, x, **(step_kwargs or {})).prev_sample
    return timesteps.numpy(), x_start, x.numpy(), len(calls)


def run_ours(name, cfg, steps, start_noise, step_noise, *, strength=1.0, init=None, **knobs):
    schedule = sch.make_schedule(name, cfg, steps, strength=strength)
    x = sch.start_latent(schedule, start_noise, init)
    drawn = []

    def noise_fn(i, shape):
        drawn.append(i)
        return step_noise[len(drawn) - 1]

    if name in STOCHASTIC or knobs.get("eta"):
        knobs["noise_fn"] = noise_fn
    out = sch.sample(name, fake_model, x, schedule, **knobs)
    return schedule, x, out, len(drawn)


def _noises(steps, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal((steps + 2, *SHAPE)).astype(np.float32)


def _check(name, cfg, steps, monkeypatch, *, strength=1.0, with_init=False, step_kwargs=None, knobs=None):
    start, step_noise = _noises(steps)
    init = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32) if with_init else None
    ts_ref, x0_ref, ref, n_ref = run_diffusers(name, cfg, steps, start, step_noise, strength=strength, init=init,
                                               step_kwargs=step_kwargs, monkeypatch=monkeypatch)
    schedule, x0, got, n_got = run_ours(name, cfg, steps, start, step_noise, strength=strength, init=init,
                                        **(knobs or {}))
    np.testing.assert_array_equal(schedule.timesteps, ts_ref.astype(np.float32), err_msg=f"{name} timesteps")
    assert_close(x0, x0_ref, rtol=1e-6, name=f"{name} start latent")
    assert n_got == n_ref, f"{name}: drew noise {n_got} times, diffusers {n_ref}"
    assert np.abs(ref).max() > 1e-3
    return assert_close(got, ref, rtol=1e-5, name=f"{name} latents")


SPACINGS = ("leading", "trailing", "linspace", None)          # None: the class default, as the SD hub config


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", ALL)
def test_trajectory_matches_diffusers(name, spacing, prediction, monkeypatch):
    if name == "lcm" and spacing is not None:
        pytest.skip("LCM ignores timestep_spacing (its own 50-step grid)")
    cfg = dict(SD15, prediction_type=prediction)
    if spacing is not None:
        cfg["timestep_spacing"] = spacing
    _check(name, cfg, 4 if name == "lcm" else 12, monkeypatch)
