"""The SDXL base -> refiner hand-off, sampler by sampler, against diffusers' scheduler classes driven the way
StableDiffusionXLPipeline (`denoising_end`: the timesteps >= the cutoff) and StableDiffusionXLImg2ImgPipeline
(`denoising_start`: a fresh scheduler, `get_timesteps`, `set_begin_index`) drive them; same fake model, same
start latent, same step noise. Fast (no model): the end-to-end checks on tiny SDXL folders are in
test_sdxl_pipeline.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import UsageError
from ldm_deploy.runtime import schedulers as sch
from ldm_deploy.runtime.schedulers.schedule import plms_restart
from ldm_deploy.runtime.sdxl import HANDOFF_SAMPLERS, handoff_range, slice_schedule
from tests.runtime.test_schedulers import CLASS_OF, SD15, SHAPE, fake_model, feed_step_noise, trajectory_rtol

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def run_diffusers(name, cfg, steps, split, start, step_noise, monkeypatch, step_kwargs=None):
    """(hand-off latents, final latents, base steps, refiner steps, noise draws) of diffusers' two stages."""
    cls = getattr(diffusers, CLASS_OF[name])
    overrides = {"use_karras_sigmas": True} if name == "dpmpp-2m-karras" else {}
    drawn = feed_step_noise(cls, step_noise, monkeypatch)
    T = cfg["num_train_timesteps"]
    cutoff = int(round(T - split * T))

    def loop(s, timesteps, x):
        for t in timesteps:
            out = torch.from_numpy(fake_model(s.scale_model_input(x, t).numpy(), float(t)))
            x = s.step(out, t, x, **(step_kwargs or {})).prev_sample
        return x

    base = cls.from_config(cfg, **overrides)                   # StableDiffusionXLPipeline, denoising_end
    base.set_timesteps(steps)
    n_base = len([t for t in base.timesteps if t >= cutoff])
    handoff = loop(base, base.timesteps[:n_base], torch.from_numpy(start) * base.init_noise_sigma)
    refiner = cls.from_config(cfg, **overrides)                # StableDiffusionXLImg2ImgPipeline.get_timesteps
    refiner.set_timesteps(steps)
    n_ref = int((refiner.timesteps < cutoff).sum())
    if refiner.order == 2 and n_ref % 2 == 0:
        n_ref += 1
    t_start = len(refiner.timesteps) - n_ref
    if hasattr(refiner, "set_begin_index"):
        refiner.set_begin_index(t_start)
    final = loop(refiner, refiner.timesteps[t_start:], handoff.clone())
    return handoff.numpy(), final.numpy(), n_base, n_ref, len(drawn)


def run_ours(name, cfg, steps, split, start, step_noise, knobs=None):
    schedule = sch.make_schedule(name, cfg, steps)
    T = cfg["num_train_timesteps"]
    drawn = []

    def noise_fn(i, shape):
        drawn.append(i)
        return step_noise[len(drawn) - 1]

    knobs = dict(knobs or {}, **({"noise_fn": noise_fn} if "noise_fn" in sch.get_sampler(name).knobs else {}))
    a, b = handoff_range(schedule.timesteps, T, None, split)
    handoff = sch.sample(name, fake_model, sch.start_latent(schedule, start), slice_schedule(schedule, a, b), **knobs)
    a2, b2 = handoff_range(schedule.timesteps, T, split, None)
    assert (a, b2) == (0, len(schedule.timesteps))
    final = sch.sample(name, fake_model, handoff.copy(), slice_schedule(schedule, a2, b2), **knobs)
    return handoff, final, b - a, b2 - a2, len(drawn)


def _check(name, cfg, steps, split, monkeypatch, knobs=None):
    rng = np.random.default_rng(11)
    start = rng.standard_normal(SHAPE).astype(np.float32)
    step_noise = rng.standard_normal((2 * steps + 4, *SHAPE)).astype(np.float32)
    want = run_diffusers(name, cfg, steps, split, start, step_noise, monkeypatch, step_kwargs=knobs)
    got = run_ours(name, cfg, steps, split, start, step_noise, knobs=knobs)
    assert got[2:] == want[2:], f"{name}: (base steps, refiner steps, noise draws) {got[2:]} vs diffusers {want[2:]}"
    assert np.abs(want[1]).max() > 1e-3
    # the hand-off latents after the base's steps, the final ones after all of them (float32 bound per step)
    assert_close(got[0], want[0], rtol=trajectory_rtol(want[2]), name=f"{name} hand-off latents")
    if name == "lms":
        # docs/schedulers.md "Deliberate deviations": diffusers' LMS takes its order from the absolute step
        # index after set_begin_index (order 4 with one stored derivative at the refiner's first step); ours
        # from the derivatives it has, as for img2img. The refiner half differs by design.
        assert not np.allclose(got[1], want[1], rtol=0, atol=trajectory_rtol(want[2] + want[3]) * 100)
        return
    assert_close(got[1], want[1], rtol=trajectory_rtol(want[2] + want[3]), name=f"{name} refined latents")


@pytest.mark.parametrize("split", [0.7, 0.35])
@pytest.mark.parametrize("name", list(sch.SCHEDULERS))
def test_handoff_equals_diffusers_every_sampler(name, split, monkeypatch):
    assert name in HANDOFF_SAMPLERS
    _check(name, dict(SD15), 8 if name == "lcm" else 12, split, monkeypatch)


@pytest.mark.parametrize("name,overrides", [
    ("pndm", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("ddpm", {"timestep_spacing": "linspace", "prediction_type": "sample", "clip_sample": True}),
    ("lcm", {"prediction_type": "v_prediction"}),
    ("euler-ancestral", {"timestep_spacing": "leading"}),
])
def test_handoff_config_variants(name, overrides, monkeypatch):
    _check(name, dict(SD15, **overrides), 8 if name == "lcm" else 10, 0.6, monkeypatch)


@pytest.mark.parametrize("name,knobs", [("ddim", {"eta": 0.6}),
                                        ("euler", {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 10.0})])
def test_handoff_with_step_noise_knobs(name, knobs, monkeypatch):
    _check(name, dict(SD15), 10, 0.6, monkeypatch, knobs=knobs)


def test_handoff_at_plms_repeated_step(monkeypatch):
    """A base of one PLMS evaluation: the refiner's slice starts at the repeated timestep."""
    cfg = dict(SD15)
    ts = sch.make_schedule("pndm", cfg, 10).timesteps
    split = 1 - float(ts[0] - 1) / 1000           # cutoff just below ts[0]: only evaluation 0 runs on the base
    assert handoff_range(ts, 1000, None, split) == (0, 1)
    _check("pndm", cfg, 10, split, monkeypatch)


def test_pndm_runge_kutta_base_hands_off_and_its_refiner_is_refused(monkeypatch):
    """skip_prk_steps=false: the base half equals diffusers (the warm-up is cut where diffusers cuts it);
    a refiner half would restart the warm-up at the top of the schedule in diffusers, so it is refused."""
    cfg = dict(SD15, skip_prk_steps=False)
    schedule = sch.make_schedule("pndm", cfg, 10)
    rng = np.random.default_rng(5)
    start = rng.standard_normal(SHAPE).astype(np.float32)
    for split in (0.2, 0.5):                   # cut inside the warm-up and after it
        cls = diffusers.PNDMScheduler.from_config(cfg)
        cls.set_timesteps(10)
        cutoff = int(round(1000 - split * 1000))
        x = torch.from_numpy(start.copy())
        timesteps = [t for t in cls.timesteps if t >= cutoff]
        for t in timesteps:
            x = cls.step(torch.from_numpy(fake_model(x.numpy(), float(t))), t, x).prev_sample
        a, b = handoff_range(schedule.timesteps, 1000, None, split)
        assert (a, b) == (0, len(timesteps))
        got = sch.sample("pndm", fake_model, start.copy(), slice_schedule(schedule, a, b))
        assert_close(got, x.numpy(), rtol=trajectory_rtol(b), name=f"pndm base to {split}")
        a, b = handoff_range(schedule.timesteps, 1000, split, None)
        with pytest.raises(UsageError, match="skip_prk_steps true"):
            slice_schedule(schedule, a, b)


def test_whole_schedule_is_not_rebuilt():
    """No hand-off: the schedule object itself runs (the no-hand-off paths stay bit-identical)."""
    for name in sch.SCHEDULERS:
        schedule = sch.make_schedule(name, dict(SD15), 8)
        assert slice_schedule(schedule, 0, len(schedule.timesteps)) is schedule


def test_plms_restart_from_zero_equals_the_schedule_prefix():
    """plms_restart at a = 0 rebuilds exactly the schedule's own first evaluations (one PLMS rule, two uses)."""
    schedule = sch.make_schedule("pndm", dict(SD15), 10)
    part = plms_restart(schedule, 0, 6)
    np.testing.assert_array_equal(part.timesteps, schedule.timesteps[:6])
    np.testing.assert_array_equal(part.alphas, schedule.alphas[:6])
    np.testing.assert_array_equal(part.alphas_prev, schedule.alphas_prev[:6])
