"""training/noise.py: equal to diffusers' float32 schedule and to the numpy twin (runtime convert.py)."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from ldm_deploy.compare import assert_close
from training import noise

SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
CONFIGS = [SD_CONFIG,
           {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"},
           {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["beta_schedule"])
def test_schedule_equals_diffusers_float32(config):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(**config)
    assert torch.equal(noise.betas_from_config(config), ref.betas)
    assert torch.equal(noise.alphas_cumprod_from_config(config), ref.alphas_cumprod)


def test_reference_values():
    a = noise.alphas_cumprod_from_config(SD_CONFIG)
    assert_close(a[0].item(), 0.99915, atol=1e-6)
    assert_close(a[999].item(), 0.0046601, atol=1e-6)


def test_add_noise_and_velocity_equal_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(**SD_CONFIG)
    sched = noise.NoiseSchedule.from_config(SD_CONFIG)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    assert_close(sched.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-6, name="add_noise")
    assert_close(sched.velocity(x0, eps, t), ref.get_velocity(x0, eps, t), atol=1e-6, name="velocity")
    assert torch.equal(sched.target("epsilon", x0, eps, t), eps)
    assert torch.equal(sched.target("sample", x0, eps, t), x0)
    assert torch.equal(sched.target("v_prediction", x0, eps, t), sched.velocity(x0, eps, t))


@pytest.mark.parametrize("prediction_type", noise.PREDICTION_TYPES)
def test_conversions_round_trip(prediction_type):
    sched = noise.NoiseSchedule.from_config(SD_CONFIG)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([3, 100, 600, 950])
    x_t = sched.add_noise(x0, eps, t)
    out = sched.target(prediction_type, x0, eps, t)
    assert_close(sched.to_x0(prediction_type, x_t, out, t), x0, atol=2e-4, name="x0")
    assert_close(sched.to_eps(prediction_type, x_t, out, t), eps, atol=2e-4, name="eps")


def test_unknown_prediction_type_is_a_clear_error():
    from ldm_deploy.errors import LdmError

    sched = noise.NoiseSchedule.from_config(SD_CONFIG)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(LdmError, match="prediction_type"):
        sched.target("flow", x, x, torch.tensor([0]))


CONVERT = "ldm_deploy.runtime.schedulers.convert"


def _twin():
    """(convert, schedule) of the numpy runtime, or a clean skip where this checkout lacks them."""
    try:
        return (importlib.import_module(CONVERT), importlib.import_module("ldm_deploy.runtime.schedulers.schedule"))
    except ImportError as e:
        pytest.skip(f"{CONVERT} (the numpy twin) is not importable: {e}")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["beta_schedule"])
def test_numpy_twin_schedule_matches(config):
    _, schedule = _twin()
    ref = schedule.train_alphas_cumprod(schedule.SchedulerConfig.from_dict(config), "DDIMScheduler")
    assert_close(noise.alphas_cumprod_from_config(config).numpy(), ref, atol=1e-6, name="alphas_cumprod")


@pytest.mark.parametrize("prediction_type", noise.PREDICTION_TYPES)
@pytest.mark.parametrize("a", [0.9991, 0.5, 0.0047])
def test_conversions_equal_numpy_twin(prediction_type, a):
    convert, _ = _twin()
    rng = np.random.default_rng(0)
    x_t, out, x0, eps = (rng.standard_normal((3, 4, 8, 8)).astype(np.float32) for _ in range(4))
    ta = torch.full((3, 1, 1, 1), a, dtype=torch.float32)
    tx, to, t0, te = (torch.from_numpy(v) for v in (x_t, out, x0, eps))
    x0_np, eps_np = convert.vp_x0_eps(out, x_t, float(ta[0, 0, 0, 0]), prediction_type)
    assert_close(noise.pred_to_x0(prediction_type, tx, to, ta).numpy(), x0_np, atol=1e-6, rtol=1e-6, name="x0")
    assert_close(noise.pred_to_eps(prediction_type, tx, to, ta).numpy(), eps_np, atol=1e-6, rtol=1e-6, name="eps")


def test_noising_equals_numpy_twin():
    convert, _ = _twin()
    sched = noise.NoiseSchedule.from_config(SD_CONFIG)
    rng = np.random.default_rng(2)
    x0, eps = (rng.standard_normal((4, 4, 8, 8)).astype(np.float32) for _ in range(2))
    t = torch.tensor([0, 250, 700, 999])
    a = sched.alphas_cumprod[t].numpy()
    noised = np.stack([convert.vp_noised(x0[i], eps[i], float(a[i])) for i in range(4)])
    vel = np.stack([convert.velocity(x0[i], eps[i], float(a[i])) for i in range(4)])
    assert_close(sched.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), t).numpy(), noised, atol=1e-6)
    assert_close(sched.velocity(torch.from_numpy(x0), torch.from_numpy(eps), t).numpy(), vel, atol=1e-6)


ZERO_SNR = [{**c, "rescale_betas_zero_snr": True} for c in CONFIGS]


@pytest.mark.parametrize("config", ZERO_SNR, ids=lambda c: c["beta_schedule"])
def test_zero_snr_schedule_equals_diffusers_and_numpy_twin(config):
    """rescale_betas_zero_snr (Lin et al. 2023): the torch schedule a model trains on is diffusers' and the
    numpy runtime's; it once ignored the flag (a zero-SNR model trained on the plain schedule)."""
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(**config)
    ours = noise.alphas_cumprod_from_config(config)
    assert torch.equal(noise.betas_from_config(config), ref.betas)
    assert torch.equal(ours, ref.alphas_cumprod) and float(ours[-1]) == 0.0      # zero terminal SNR
    assert not torch.equal(ours, noise.alphas_cumprod_from_config({**config, "rescale_betas_zero_snr": False}))
    _, schedule = _twin()
    twin = schedule.train_alphas_cumprod(schedule.SchedulerConfig.from_dict(config), "DDIMScheduler")
    # the numpy twin's cumprod accumulates in float64 (as torch CPU does); float32 rounding of ~1e-7 relative
    assert_close(ours.numpy(), twin, atol=1e-6, name="alphas_cumprod (zero SNR)")


@pytest.mark.parametrize("prediction_type", noise.PREDICTION_TYPES)
def test_ddim_step_equals_numpy_twin(prediction_type):
    """The torch side's DDIM update (bench/torch_side.py) is the numpy sampler's: x0 and eps from the output
    (convert.vp_x0_eps), re-noised to alpha_prev (convert.vp_noised)."""
    convert, _ = _twin()
    rng = np.random.default_rng(3)
    x_t, out = (rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(2))
    a, a_prev = 0.3, 0.6
    x0, eps = convert.vp_x0_eps(out, x_t, a, prediction_type)
    want = convert.vp_noised(x0, eps, a_prev)
    got = noise.ddim_step(prediction_type, torch.from_numpy(x_t), torch.from_numpy(out), a, a_prev).numpy()
    # float32 both sides; `sample` divides by sqrt(1 - a) ~ 0.84: a few ulps of values of order 1
    assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"ddim_step ({prediction_type})")
