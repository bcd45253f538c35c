"""The numpy pipeline over fake runners: CFG glue, argument errors, NaN stages, img2img, reproducibility.

The fake runners are small numpy functions with the real names and shapes, so every test here runs in
milliseconds and checks the loop itself; parity with PyTorch/diffusers is in test_e2e_parity.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.artifact import ModelInfo, Profiles, Range
from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime.guidance import rescale_noise_cfg
from ldm_deploy.runtime.pipeline import GenerationResult, Pipeline, to_uint8

D = 8
SCHED = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}
PROFILES = {"batch": {"min": 1, "opt": 1, "max": 4}, "height": {"min": 16, "opt": 32, "max": 64},
            "width": {"min": 16, "opt": 32, "max": 64}}
INFO = ModelInfo(SCHED, scaling_factor=0.5, prediction_type="epsilon", latent_channels=4, vae_scale_factor=8,
                 profiles=Profiles(**{k: Range(**r) for k, r in PROFILES.items()}))


def fake_tokenizer(prompts):
    ids = np.zeros((len(prompts), 77), np.int32)
    for i, p in enumerate(prompts):
        codes = [ord(c) % 97 + 1 for c in p][:77]
        ids[i, :len(codes)] = codes
    return ids


class Fake:
    """A runner that records its calls and applies `fn` to the inputs."""

    def __init__(self, component, inputs, outputs, fn):
        self.component, self.input_names, self.output_names, self.fn = component, inputs, outputs, fn
        self.calls = []

    def __call__(self, inputs):
        self.calls.append({k: np.array(v) for k, v in inputs.items()})
        return self.fn(**inputs)


def text_fn(input_ids):
    table = np.sin(np.arange(98 * D, dtype=np.float32).reshape(98, D))
    return {"last_hidden_state": table[input_ids]}


def unet_fn(sample, timestep, encoder_hidden_states):
    cond = encoder_hidden_states.mean(axis=(1, 2))[:, None, None, None]
    return {"noise_pred": (0.3 * sample * (1 + cond) + cond + 1e-4 * timestep[:, None, None, None]).astype(np.float32)}


def decoder_fn(latent):
    up = latent.repeat(8, axis=2).repeat(8, axis=3)[:, :3]
    return {"image": np.tanh(up)}


def encoder_fn(image):
    b, _, h, w = image.shape
    pooled = image.reshape(b, 3, h // 8, 8, w // 8, 8).mean(axis=(3, 5))
    mean = np.concatenate([pooled, pooled[:, :1]], axis=1)
    return {"mean": mean, "logvar": np.full_like(mean, -4.0)}


def make_runners(**override):
    runners = {
        "text_encoder": Fake("text_encoder", ["input_ids"], ["last_hidden_state"], text_fn),
        "unet": Fake("unet", ["sample", "timestep", "encoder_hidden_states"], ["noise_pred"], unet_fn),
        "vae_decoder": Fake("vae_decoder", ["latent"], ["image"], decoder_fn),
        "vae_encoder": Fake("vae_encoder", ["image"], ["mean", "logvar"], encoder_fn),
    }
    runners.update(override)
    return runners


@pytest.fixture
def pipe():
    return Pipeline(fake_tokenizer, make_runners(), INFO)


def test_txt2img_shapes_timings_params(pipe):
    res = pipe("a cat", steps=4, seed=1)
    assert isinstance(res, GenerationResult)
    assert res.images.shape == (1, 32, 32, 3) and res.images.dtype == np.uint8
    assert res.latents.shape == (1, 4, 4, 4)
    for key in ("text_encoder", "unet", "vae_decoder", "denoise", "scheduler_overhead", "overhead_fraction", "total"):
        assert key in res.timings
    assert res.timings["unet_calls"] == 4
    assert res.params["scheduler"] == "ddim" and res.params["seed"] == 1 and res.params["steps"] == 4


def test_cfg_is_one_2b_batch_uncond_first(pipe):
    pipe("abc", negative_prompt="xyz", steps=2, guidance=5.0, seed=0, num_images=2)
    unet, text = pipe.runners["unet"], pipe.runners["text_encoder"]
    assert len(unet.calls) == 2
    call = unet.calls[0]
    assert call["sample"].shape == (4, 4, 4, 4) and call["timestep"].shape == (4,)
    assert call["timestep"].dtype == np.float32
    assert_close(call["sample"][:2], call["sample"][2:])                       # cat([x, x])
    uncond = text_fn(fake_tokenizer(["xyz"] * 2))["last_hidden_state"]
    cond = text_fn(fake_tokenizer(["abc"] * 2))["last_hidden_state"]
    assert_close(call["encoder_hidden_states"], np.concatenate([uncond, cond]))  # [uncond, cond]
    assert [c["input_ids"].shape for c in text.calls] == [(2, 77), (2, 77)]


def test_guidance_formula_and_disabled_cfg(pipe):
    """One step of the model the sampler sees: u + s (c - u); guidance <= 1 runs a batch of B."""
    from ldm_deploy.runtime.pipeline import make_denoiser

    emb = np.concatenate([np.zeros((1, 77, D), np.float32), np.ones((1, 77, D), np.float32)])
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    den = make_denoiser(pipe.runners["unet"], emb, 7.5, 0.0)
    out = den(x, 500.0)
    u = unet_fn(x, np.full(1, 500, np.float32), emb[:1])["noise_pred"]
    c = unet_fn(x, np.full(1, 500, np.float32), emb[1:])["noise_pred"]
    assert_close(out, u + 7.5 * (c - u), atol=1e-6)
    pipe.runners["unet"].calls.clear()
    pipe("a", steps=2, guidance=1.0, seed=0)
    assert pipe.runners["unet"].calls[0]["sample"].shape[0] == 1


def test_guidance_rescale_matches_torch_unbiased_std():
    rng = np.random.default_rng(0)
    g, c = rng.standard_normal((2, 4, 4, 4)).astype(np.float32), rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    out = rescale_noise_cfg(g, c, 0.7)
    std = lambda a: np.array([np.std(r, ddof=1) for r in a])[:, None, None, None]  # noqa: E731
    assert_close(out, 0.7 * g * std(c) / std(g) + 0.3 * g, atol=1e-6)
    torch = pytest.importorskip("torch")
    tg, tc = torch.from_numpy(g), torch.from_numpy(c)
    ref = tg * tc.std(dim=[1, 2, 3], keepdim=True) / tg.std(dim=[1, 2, 3], keepdim=True)
    assert_close(out, (0.7 * ref + 0.3 * tg).numpy(), atol=1e-6)


def test_guidance_rescale_changes_the_result(pipe):
    a = pipe("a cat", steps=3, seed=2, guidance=9.0).latents
    b = pipe("a cat", steps=3, seed=2, guidance=9.0, guidance_rescale=0.7).latents
    assert np.abs(a - b).max() > 1e-4


def test_negative_prompt_changes_the_result(pipe):
    a = pipe("a cat", steps=3, seed=2).images
    b = pipe("a cat", negative_prompt="blurry", steps=3, seed=2).images
    assert not np.array_equal(a, b)


def test_num_images_and_prompt_lists(pipe):
    res = pipe(["a", "b"], steps=2, seed=0, num_images=2)
    assert res.images.shape == (4, 32, 32, 3)
    ids = pipe.runners["text_encoder"].calls[0]["input_ids"]
    assert (ids[0] == ids[1]).all() and not (ids[1] == ids[2]).all()  # each prompt repeated num_images times


def test_seed_reproducible_and_latents_given(pipe):
    a, b = pipe("a cat", steps=3, seed=7), pipe("a cat", steps=3, seed=7)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.latents, b.latents)
    assert not np.array_equal(a.latents, pipe("a cat", steps=3, seed=8).latents)
    z = np.random.default_rng(7).standard_normal((1, 4, 4, 4), dtype=np.float32)
    c = pipe("a cat", steps=3, latents=z)
    assert np.array_equal(a.latents, c.latents)  # seed 7 draws exactly these latents
    assert c.params["latents"] == "caller"


def test_seed_as_numpy(pipe):
    """numpy integers and a 1-D integer array of per-row seeds are seeds; a float array is refused."""
    ref = pipe(["a cat", "a dog"], steps=2, seed=[3, 4])
    for seeds in (np.array([3, 4]), [np.int32(3), np.uint64(4)]):
        out = pipe(["a cat", "a dog"], steps=2, seed=seeds)
        assert np.array_equal(out.images, ref.images)
    assert np.array_equal(pipe("a cat", steps=2, seed=np.int64(3)).images, ref.images[:1])
    with pytest.raises(UsageError, match="seed must be an integer"):
        pipe(["a cat", "a dog"], steps=2, seed=np.array([3.0, 4.0]))


def test_latents_set_the_size(pipe):
    z = np.zeros((1, 4, 6, 8), np.float32)
    assert pipe("a", steps=1, latents=z).images.shape == (1, 48, 64, 3)
    with pytest.raises(UsageError, match="latents have shape"):
        pipe("a", steps=1, latents=z, num_images=2)


def test_img2img_strength(pipe):
    init = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    res = pipe("a", image=init, strength=0.5, steps=10, seed=0)
    assert res.images.shape == (1, 32, 32, 3)
    assert res.timings["unet_calls"] == 5 and "vae_encoder" in res.timings
    enc = pipe.runners["vae_encoder"].calls[-1]["image"]
    assert enc.shape == (1, 3, 32, 32) and enc.min() >= -1 and enc.max() <= 1
    low = pipe("a", image=init, strength=0.1, steps=10, seed=0).images.astype(float)
    high = pipe("a", image=init, strength=1.0, steps=10, seed=0).images.astype(float)
    ref = to_uint8(pipe.runners["vae_decoder"]({"latent": encoder_fn(
        np.asarray(init, np.float32)[None].transpose(0, 3, 1, 2) / 127.5 - 1)["mean"]})["image"]).astype(float)
    assert np.abs(low - ref).mean() < np.abs(high - ref).mean()  # low strength stays near the init image
    with pytest.raises(UsageError, match="either an init image"):
        pipe("a", image=init, latents=np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(UsageError, match="init image is 32x32"):
        pipe("a", image=init, height=64, width=64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=-3), "steps must be a positive integer"),
    (dict(guidance=float("nan")), "guidance must be a finite number"),
    (dict(guidance=-1.0), "guidance must be a finite number"),
    (dict(height=36), "height must be a positive multiple of 8"),
    (dict(width=30), "width must be a positive multiple of 8"),
    (dict(height=128), "outside the artifact's profile"),
    (dict(num_images=5), "batch of 5 images"),
    (dict(num_images=0), "num_images must be a positive integer"),
    (dict(scheduler="warp-drive"), "unknown scheduler 'warp-drive'"),
    (dict(strength=0.0, image=np.zeros((32, 32, 3), np.uint8)), "strength must be in"),
    (dict(guidance_rescale=2.0), "guidance_rescale must be in"),
    (dict(negative_prompt=["x", "y"]), "2 negative prompts for 1 prompts"),
])
def test_bad_arguments_are_one_line_usage_errors(pipe, kwargs, match):
    with pytest.raises(UsageError, match=match) as e:
        pipe("a cat", **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("stage", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_nan_names_the_stage(stage):
    def bad(**inputs):
        out = {"text_encoder": text_fn, "unet": unet_fn, "vae_decoder": decoder_fn, "vae_encoder": encoder_fn}[stage](**inputs)
        return {k: np.full_like(v, np.nan) for k, v in out.items()}

    runners = make_runners(**{stage: Fake(stage, [], [], bad)})
    pipe = Pipeline(fake_tokenizer, runners, INFO)
    init = np.zeros((32, 32, 3), np.uint8) if stage == "vae_encoder" else None
    with pytest.raises(LdmError, match=f"{stage} produced .* non-finite") as e:
        pipe("a", steps=2, seed=0, image=init)
    if stage == "vae_decoder":
        assert "fp32" in str(e.value)  # suggests the fp32 VAE


def test_to_uint8_rounds_like_diffusers():
    x = np.array([-1.0, -0.999, 0.0, 0.5, 1.0, 2.0], np.float32).reshape(1, 1, 1, 6).repeat(3, axis=1)
    out = to_uint8(x)[0, 0, :, 0]
    expect = np.round(np.clip(x[0, 0, 0] * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(out, expect) and out[2] == 128  # 127.5 rounds to even -> 128


def test_missing_vae_encoder_for_img2img():
    runners = make_runners()
    del runners["vae_encoder"]
    pipe = Pipeline(fake_tokenizer, runners, INFO)
    with pytest.raises(LdmError, match="vae_encoder"):
        pipe("a", image=np.zeros((32, 32, 3), np.uint8), steps=2)


def test_callback_sees_every_step(pipe):
    seen = []
    pipe("a", steps=3, seed=0, callback=lambda i, n, x: seen.append((i, n, x.shape)))
    assert [s[0] for s in seen] == [0, 1, 2] and all(s[1] == 3 for s in seen)


def test_callback_counts_the_steps_the_sampler_makes(pipe):
    """callback(i, n, x) is the samplers' own convention, passed through: n is the strength-truncated count."""
    init = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    seen = []
    res = pipe("a", image=init, strength=0.5, steps=10, seed=0, callback=lambda i, n, x: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(5)] and res.timings["unet_calls"] == 5
    with pytest.raises(UsageError, match="leaves no denoising step"):       # the schedule refuses, before any stage
        pipe("a", image=init, strength=0.05, steps=10, seed=0)


def test_scheduler_config_is_parsed_once_per_pipeline(pipe, monkeypatch):
    """The name's resolution and every schedule read one parse of the config (issue 18), not one per call."""
    from ldm_deploy.runtime.schedulers.schedule import SchedulerConfig

    calls = []
    parse = SchedulerConfig.from_dict.__func__
    monkeypatch.setattr(SchedulerConfig, "from_dict", classmethod(lambda cls, d: calls.append(1) or parse(cls, d)))
    for scheduler in (None, "ddim", "euler"):
        pipe("a red cube", steps=2, seed=0, scheduler=scheduler)
    assert len(calls) == 1
