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
CLASS_OF = {name: entry.class_name for name, entry in sch.SCHEDULERS.items()}
ALL = list(sch.SCHEDULERS)


def fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """Deterministic stand-in for a U-Net: linear in x, a fixed spatial pattern scaled by t."""
    return (0.1 * x + 1e-3 * float(t) * PATTERN).astype(np.float32)


def feed_step_noise(cls, step_noise, monkeypatch) -> list:
    """Make diffusers scheduler `cls` draw its step noise from `step_noise`, in order (its module's
    `randn_tensor` replaced); the returned list grows by one per draw."""
    drawn = []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        drawn.append(len(drawn))
        return torch.from_numpy(step_noise[len(drawn) - 1].copy())

    module = importlib.import_module(cls.__module__)
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", fake_randn)
    return drawn


def run_diffusers(name, cfg, steps, start_noise, step_noise, *, strength=1.0, init=None, step_kwargs=None,
                  monkeypatch=None):
    """The diffusers loop of StableDiffusion(Img2Img)Pipeline around scheduler X.from_config(cfg)."""
    cls = getattr(diffusers, CLASS_OF[name])
    overrides = {"use_karras_sigmas": True} if name == "dpmpp-2m-karras" else {}
    s = cls.from_config(cfg, **overrides)
    calls = feed_step_noise(cls, step_noise, monkeypatch)
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

    if name in STOCHASTIC or knobs.get("eta") or knobs.get("s_churn"):
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
    assert_timesteps(schedule.timesteps, ts_ref, name, cfg)
    assert_close(x0, x0_ref, rtol=1e-6, name=f"{name} start latent")
    assert n_got == n_ref, f"{name}: drew noise {n_got} times, diffusers {n_ref}"
    assert np.abs(ref).max() > 1e-3
    return assert_close(got, ref, rtol=trajectory_rtol(len(ts_ref)), name=f"{name} latents")


# --- tolerances, from float32 arithmetic ----------------------------------------------------------------
# The reference runs on torch, whose vectorised float32 sqrt is not correctly rounded on every CPU: on an
# AMD EPYC (torch CPU capability AVX512) 190 of SD's 1000 training sigmas sqrt((1 - a) / a) are 1 ulp off the
# correctly rounded value numpy computes (on Intel they agree). Nothing else differs in kind: both sides round
# every float32 op to nearest. So the tolerances below are "1 ulp in each training sigma plus rounding".
U32 = 2.0**-24          # float32 unit roundoff: one op's relative error is at most this
OPS_PER_STEP = 20       # float32 roundings on the trajectory per sampler step: scale_model_input (sqrt, add, mul,
                        # div = 4), the fake model (2), the sampler's x0 (v-prediction: 7), derivative (2), dt (1),
                        # update (2) = 18, plus the 1-ulp sigma of the step entering ~2 of them; a multistep update
                        # reuses earlier outputs (already counted) in a combination of the same length. The samplers
                        # here contract the latent (|dx_{k+1}/dx_k| <= 1), so the errors add, step after step.


def trajectory_rtol(steps: int) -> float:
    """max|ours - diffusers| / max|diffusers| allowed after `steps` steps: OPS_PER_STEP roundings of U32 each."""
    return OPS_PER_STEP * U32 * steps


def assert_timesteps(ours, ref, name, cfg) -> None:
    """Integer timesteps must be equal; fractional ones (Karras sigmas mapped back to t) within their error bound.

    t = i + (l - L_i) / (L_{i+1} - L_i), L = float32 log of the training sigmas, l = log of a Karras sigma (float64
    from the two end sigmas). A 1-ulp sigma moves its log by <= 2^-23, and the float32 log of a moved input can round
    the other way: dL <= 2^-23 (1 + |L|); the Karras ends move l by dl <= 2^-23. So
    |dt| <= (dl + 3 dL) / (L_{i+1} - L_i), plus one ulp of t for the two float32 casts of the result.
    """
    ref = np.asarray(ref, np.float64)
    ours = np.asarray(ours, np.float64)
    assert ours.shape == ref.shape, f"{name} timesteps: {ours.shape} vs {ref.shape}"
    if np.array_equal(ref, np.round(ref)):
        np.testing.assert_array_equal(ours, ref.astype(np.float32), err_msg=f"{name} timesteps")
        return
    ac = sched_mod.train_alphas_cumprod(sched_mod.as_config(cfg), CLASS_OF[name]).astype(np.float64)
    L = np.log(np.sqrt((1 - ac) / ac))
    i = np.clip(np.floor(ref).astype(int), 0, len(L) - 2)
    gap = L[i + 1] - L[i]
    dL = 2.0**-23 * (1 + np.maximum(np.abs(L[i]), np.abs(L[i + 1])))
    bound = (2.0**-23 + 3 * dL) / gap + np.spacing(ref.astype(np.float32))
    bad = np.abs(ours - ref) > bound
    assert not bad.any(), (f"{name} timesteps differ beyond the float32 bound at {np.nonzero(bad)[0].tolist()}: "
                           f"ours {ours[bad]}, diffusers {ref[bad]}, bound {bound[bad]}")


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


# --- variants of the config and knobs -----------------------------------------------------------------

VARIANTS = [
    ("euler", {"use_karras_sigmas": True}, {}),
    ("euler", {"final_sigmas_type": "sigma_min", "timestep_spacing": "leading"}, {}),
    ("lms", {"use_karras_sigmas": True}, {}),
    ("unipc", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, {}),
    ("unipc", {"solver_order": 3, "disable_corrector": [2]}, {}),
    ("unipc", {"solver_type": "bh1", "timestep_spacing": "leading", "final_sigmas_type": "sigma_min"}, {}),
    ("dpmpp-2m", {"solver_type": "heun", "final_sigmas_type": "sigma_min"}, {}),
    ("dpmpp-2m-karras", {"prediction_type": "sample"}, {}),
    ("dpmpp-2m", {"lambda_min_clipped": -5.1}, {}),
    ("ddim", {"prediction_type": "sample", "clip_sample": True}, {}),
    ("ddim", {"set_alpha_to_one": True, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
              "timestep_spacing": "trailing"}, {}),
    ("euler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}),
    ("ddpm", {"prediction_type": "sample", "clip_sample": True, "timestep_spacing": "linspace"}, {}),
    ("lcm", {"prediction_type": "v_prediction", "beta_schedule": "linear"}, {}),
    ("pndm", {"beta_schedule": "squaredcos_cap_v2"}, {}),
    ("pndm", {"skip_prk_steps": False}, {}),
    ("pndm", {"skip_prk_steps": False, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}),
]


@pytest.mark.parametrize("name,overrides,_", VARIANTS, ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_config_variants_match_diffusers(name, overrides, _, monkeypatch):
    cfg = {k: v for k, v in SD15.items() if k != "clip_sample"} if "clip_sample" in overrides else dict(SD15)
    cfg.update(overrides)
    _check(name, cfg, 4 if name == "lcm" else 12, monkeypatch)


@pytest.mark.parametrize("steps", [16, 25])
def test_dpm_long_schedules_use_second_order_to_the_end(steps, monkeypatch):
    _check("dpmpp-2m", dict(SD15, final_sigmas_type="sigma_min"), steps, monkeypatch)   # >= 15: 2nd order last
    _check("unipc", dict(SD15), steps, monkeypatch)


def test_ddim_eta_injects_the_same_noise(monkeypatch):
    _check("ddim", dict(SD15), 10, monkeypatch, step_kwargs={"eta": 0.7}, knobs={"eta": 0.7})


def test_euler_churn_injects_the_same_noise(monkeypatch):
    kw = {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 10.0}
    _check("euler", dict(SD15), 10, monkeypatch, step_kwargs=kw, knobs=kw)


def test_class_default_clip_sample_applies_when_the_config_lacks_it(monkeypatch):
    """DDIMScheduler.from_config of a config without clip_sample clamps x0 (class default True)."""
    cfg = {k: v for k, v in SD15.items() if k != "clip_sample"}
    cfg["prediction_type"] = "sample"
    assert sch.make_schedule("ddim", cfg, 10).params.clip == 1.0
    _check("ddim", cfg, 10, monkeypatch)


# --- img2img ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0.55, 0.3])
@pytest.mark.parametrize("name", ALL)
def test_img2img_truncation_add_noise_and_trajectory(name, strength, monkeypatch):
    """get_timesteps' truncation, scheduler.add_noise and the truncated trajectory all equal diffusers."""
    cfg = dict(SD15, timestep_spacing="trailing") if name in ("euler", "dpmpp-2m") else dict(SD15)
    steps = 8 if name == "lcm" else 10
    if name == "lms":   # deliberate deviation (docs/schedulers.md): compare schedule and start latent only
        start, _ = _noises(steps)
        init = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
        ts_ref, x0_ref = run_diffusers_head(name, cfg, steps, start, init, strength)
        schedule = sch.make_schedule(name, cfg, steps, strength=strength)
        assert_timesteps(schedule.timesteps, ts_ref, name, cfg)
        assert_close(sch.start_latent(schedule, start, init), x0_ref, rtol=1e-6, name="lms add_noise")
        return
    _check(name, cfg, steps, monkeypatch, strength=strength, with_init=True)


def test_img2img_euler_churn_injects_the_same_noise(monkeypatch):
    """s_churn's gamma divides by the full schedule's step count in diffusers, also for a truncated one."""
    kw = {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 10.0}
    _check("euler", dict(SD15), 10, monkeypatch, strength=0.6, with_init=True, step_kwargs=kw, knobs=kw)


def run_diffusers_head(name, cfg, steps, noise, init, strength):
    s = getattr(diffusers, CLASS_OF[name]).from_config(cfg)
    s.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = s.timesteps[t_start * s.order:]
    s.set_begin_index(t_start * s.order)
    x = s.add_noise(torch.from_numpy(init), torch.from_numpy(noise), timesteps[:1])
    return timesteps.numpy(), x.numpy()


def test_truncate_schedule_equals_make_schedule_with_strength():
    full = sch.make_schedule("ddim", SD15, 20)
    cut = sch.truncate_schedule(full, 0.5)
    assert cut.timesteps.tolist() == full.timesteps[10:].tolist()
    assert cut.num_inference_steps == 20 and cut.strength == 0.5
    with pytest.raises(UsageError, match="no denoising step"):
        sch.make_schedule("ddim", SD15, 3, strength=0.2)


# --- the training table ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
                                       {"beta_schedule": "squaredcos_cap_v2"}, {"rescale_betas_zero_snr": True}])
def test_alphas_cumprod_equals_diffusers_float32(overrides):
    cfg = dict(SD15, **overrides)
    ref = diffusers.DDIMScheduler.from_config(cfg).alphas_cumprod.numpy()
    got = sched_mod.train_alphas_cumprod(sched_mod.SchedulerConfig.from_dict(cfg), "DDIMScheduler")
    assert got.dtype == np.float32
    assert_close(got, ref, atol=1e-6, name="alphas_cumprod")
    nz = ref > 1e-3
    assert np.max(np.abs(got[nz] / ref[nz] - 1)) < 1e-6


def test_torch_linspace_emulation():
    for start, end, n in [(0.00085**0.5, 0.012**0.5, 1000), (0.0001, 0.02, 1000), (0.1, 0.7, 7)]:
        ref = torch.linspace(start, end, n, dtype=torch.float32).numpy()
        assert_close(sched_mod.torch_linspace_f32(start, end, n), ref, rtol=1e-7, name="linspace")


def test_reference_values():
    s = sch.make_schedule("euler", SD15, 50)
    assert s.timesteps[:2].tolist() == pytest.approx([999.0, 978.6122], abs=1e-4)
    assert sch.make_schedule("ddim", SD15, 50).timesteps[[0, 1, -1]].tolist() == [981, 961, 1]
    assert sch.make_schedule("dpmpp-2m", SD15, 20).timesteps[:3].tolist() == [999, 949, 899]
    assert sch.make_schedule("lcm", SD15, 4).timesteps.tolist() == [999, 759, 499, 259]
    k = sch.make_schedule("dpmpp-2m-karras", SD15, 4).sigmas
    assert_close(k, np.array([14.6146, 3.1686, 0.4469, 0.0292, 0]), atol=1e-4, name="karras sigmas")
    p = sch.make_schedule("pndm", SD15, 50).timesteps
    assert p[:4].tolist() == [981, 961, 961, 941] and len(p) == 51


def test_lms_coefficients_equal_scipy_quad():
    integrate = pytest.importorskip("scipy.integrate")
    from ldm_deploy.runtime.schedulers.lms import lms_coefficient
    sigmas = sch.make_schedule("lms", SD15, 12).sigmas
    for i in range(1, 11):
        order = min(i + 1, 4)
        for j in range(order):
            def basis(tau, i=i, j=j, order=order):
                return np.prod([(tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]) for k in range(order) if k != j])
            ref = integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]
            assert lms_coefficient(sigmas, i, order, j) == pytest.approx(ref, rel=1e-5, abs=1e-7)


# --- contract and errors -------------------------------------------------------------------------------

def test_registry_and_class_names():
    assert set(sch.SCHEDULERS) == {"ddim", "ddpm", "pndm", "euler", "euler-ancestral", "lms", "dpmpp-2m",
                                   "dpmpp-2m-karras", "unipc", "lcm"}
    for name, entry in sch.SCHEDULERS.items():
        assert hasattr(diffusers, entry.class_name)
        assert sch.CLASS_TO_NAME[entry.class_name] in sch.SCHEDULERS
    assert sch.default_name(SD15) == "pndm"
    assert sch.default_name(dict(SD15, _class_name="DDIMScheduler", prediction_type="v_prediction")) == "ddim"
    assert sch.default_name(dict(SD15, _class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True)) \
        == "dpmpp-2m-karras"
    with pytest.raises(LdmError, match="--scheduler"):
        sch.default_name(dict(SD15, _class_name="HeunDiscreteScheduler"))


def test_unknown_scheduler_is_a_usage_error_listing_names():
    with pytest.raises(UsageError, match="ddim, ddpm, pndm, euler, euler-ancestral, lms, dpmpp-2m"):
        sch.get_sampler("heun")
    with pytest.raises(UsageError, match="unipc, lcm"):
        sch.make_schedule("heun", SD15, 10)


@pytest.mark.parametrize("steps", [0, -3, 2.5, 1001])
def test_bad_steps_are_usage_errors(steps):
    with pytest.raises(UsageError, match="steps"):
        sch.make_schedule("euler", SD15, steps)


def test_config_keys_are_checked():
    cfg = sch.SchedulerConfig.from_dict(dict(SD15, sample_max_value=1.0, thresholding=False))
    assert cfg.ignored == ("sample_max_value", "thresholding") and cfg.class_name == "PNDMScheduler"
    with pytest.raises(LdmError, match="unknown key 'karras_rho'"):
        sch.SchedulerConfig.from_dict(dict(SD15, karras_rho=7))
    with pytest.raises(LdmError, match="thresholding=True"):
        sch.SchedulerConfig.from_dict(dict(SD15, thresholding=True))
    with pytest.raises(LdmError, match="beta_schedule"):
        sch.SchedulerConfig.from_dict(dict(SD15, beta_schedule="sigmoid"))
    with pytest.raises(UsageError, match="skip_prk_steps"):
        sch.make_schedule("pndm", dict(SD15, skip_prk_steps=False), 10, strength=0.5)
    with pytest.raises(LdmError, match="algorithm_type"):
        sch.make_schedule("dpmpp-2m", dict(SD15, algorithm_type="sde-dpmsolver++"), 10)


def test_knob_errors_and_rng_path():
    s = sch.make_schedule("euler-ancestral", SD15, 6)
    x = sch.start_latent(s, np.zeros(SHAPE, np.float32))
    with pytest.raises(UsageError, match="rng"):
        sch.sample("euler-ancestral", fake_model, x, s)
    with pytest.raises(UsageError, match="eta applies to ddim"):
        sch.sample("euler-ancestral", fake_model, x, s, rng=np.random.default_rng(0), eta=0.5)
    with pytest.raises(UsageError, match="takes no option"):
        sch.sample("euler-ancestral", fake_model, x, s, rng=np.random.default_rng(0), order=3)
    with pytest.raises(UsageError, match="made for"):
        sch.sample("euler", fake_model, x, s)
    a = sch.sample("euler-ancestral", fake_model, x, s, rng=np.random.default_rng(5))
    b = sch.sample("euler-ancestral", fake_model, x, s, rng=np.random.default_rng(5))
    c = sch.sample("euler-ancestral", fake_model, x, s, rng=np.random.default_rng(6))
    assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)


def test_callback_sees_every_step():
    s = sch.make_schedule("pndm", SD15, 5)
    seen = []
    sch.sample("pndm", fake_model, sch.start_latent(s, PATTERN), s, callback=lambda i, n, x: seen.append((i, n)))
    assert [i for i, _ in seen] == list(range(6)) and all(n == 6 for _, n in seen)
    t = [float(s.timesteps[i]) for i, _ in seen]     # callback(i, n, x): step i runs at schedule.timesteps[i]
    assert t[1] == t[2]


def test_package_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, ldm_deploy.runtime.schedulers as s; s.make_schedule('lms', {}, 5); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'scipy', 'diffusers')], 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
