"""training/noise.py: equal to diffusers' float32 schedule and to the numpy twin (runtime convert.py)."""
from __future__ import annotations

import importlib.util

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


def _convert_module():
    if importlib.util.find_spec("ldm_deploy.runtime.schedulers") is None or importlib.util.find_spec(CONVERT) is None:
        pytest.skip(f"{CONVERT} (the numpy twin) is not in this checkout")
    return importlib.import_module(CONVERT)


import importlib  # noqa: E402


def test_numpy_twin_schedule_matches():
    convert = _convert_module()
    schedule = importlib.import_module("ldm_deploy.runtime.schedulers.schedule")
    fn = getattr(schedule, "alphas_cumprod", None) or getattr(schedule, "make_alphas_cumprod", None)
    if fn is None:
        pytest.skip("schedule.py exposes no alphas_cumprod(config) function")
    ref = np.asarray(fn(SD_CONFIG), dtype=np.float64)
    assert convert is not None
    assert_close(noise.alphas_cumprod_from_config(SD_CONFIG).numpy(), ref, atol=1e-6, name="alphas_cumprod")


@pytest.mark.parametrize("prediction_type", noise.PREDICTION_TYPES)
def test_conversions_equal_numpy_twin(prediction_type):
    convert = _convert_module()
    rng = np.random.default_rng(0)
    x_t = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    out = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    a = rng.uniform(0.01, 0.99, size=(3, 1, 1, 1)).astype(np.float32)
    tx, to, ta = (torch.from_numpy(v) for v in (x_t, out, a))
    x0_np, eps_np = _numpy_twin(convert, prediction_type, x_t, out, a)
    assert_close(noise.pred_to_x0(prediction_type, tx, to, ta).numpy(), x0_np, atol=1e-6, name="x0")
    assert_close(noise.pred_to_eps(prediction_type, tx, to, ta).numpy(), eps_np, atol=1e-6, name="eps")


def _numpy_twin(convert, prediction_type, x_t, out, a):
    """Call the numpy twin's conversion (its names are fixed in convert.py)."""
    return convert.pred_to_x0(prediction_type, x_t, out, a), convert.pred_to_eps(prediction_type, x_t, out, a)
