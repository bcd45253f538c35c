"""Model presets: exact SD parameter counts (meta device), diffusers/transformers load them, text-encoder conventions."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import UsageError
from training.models.config import UNetConfig, VAEConfig
from training.models.presets import PRESETS, build_models, preset


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name,unet,vae,text", [
    ("sd15", 859_520_964, 83_653_863, 123_060_480),
    ("sd21", 865_910_724, 83_653_863, 340_387_840),     # OpenCLIP-H as diffusers' SD2 text_encoder (23 layers)
])
def test_sd_parameter_counts_on_meta_device(name, unet, vae, text):
    u, v, t = build_models(preset(name), device="meta")
    assert (_count(u), _count(v), _count(t)) == (unet, vae, text)
    assert len(u.state_dict()) == 686 and len(v.state_dict()) == 248
    assert u.conv_in.weight.is_meta


def test_sd_configs_are_the_reference_ones():
    sd15, sd21 = preset("sd15"), preset("sd21")
    u1, u2 = UNetConfig.from_dict(sd15["unet"]), UNetConfig.from_dict(sd21["unet"])
    assert u1 == UNetConfig()                              # our defaults are SD 1.5's
    assert u2.num_heads == (5, 10, 20, 20) and u2.cross_attention_dim == 1024
    assert u2.use_linear_projection and u2.upcast_attention and u2.sample_size == 96
    assert VAEConfig.from_dict(sd15["vae"]) == VAEConfig()
    assert sd15["text_encoder"]["hidden_act"] == "quick_gelu" and sd21["text_encoder"]["hidden_act"] == "gelu"
    assert sd21["text_encoder"]["num_hidden_layers"] == 23
    assert sd15["scheduler"]["_class_name"] == "PNDMScheduler" and "prediction_type" not in sd15["scheduler"]
    assert sd21["scheduler"]["prediction_type"] == "v_prediction"
    assert (sd15["tokenizer"]["pad_token"], sd21["tokenizer"]["pad_token"]) == ("<|endoftext|>", "!")


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_tiny_presets_load_in_diffusers_with_our_parameter_names(name):
    diffusers = pytest.importorskip("diffusers")
    p = preset(name)
    unet, vae, _ = build_models(p)
    ref_unet = diffusers.UNet2DConditionModel.from_config(p["unet"])
    ref_vae = diffusers.AutoencoderKL.from_config(p["vae"])
    ref_unet.load_state_dict(unet.state_dict(), strict=True)
    ref_vae.load_state_dict(vae.state_dict(), strict=True)
    sched_cls = getattr(diffusers, p["scheduler"]["_class_name"])
    assert sched_cls.from_config(p["scheduler"]).config.num_train_timesteps == 1000
    assert _count(unet) < 1_200_000 and _count(vae) < 400_000


def test_tiny_sd2_is_sd2_like():
    p = preset("tiny-sd2")
    cfg = UNetConfig.from_dict(p["unet"])
    assert cfg.use_linear_projection and cfg.upcast_attention and len(set(cfg.num_heads)) > 1
    assert p["scheduler"]["prediction_type"] == "v_prediction" and p["scheduler"]["_class_name"] == "DDIMScheduler"
    assert p["text_encoder"]["hidden_act"] == "gelu" and p["tokenizer"]["pad_token"] == "!"


def test_build_models_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_models(preset("tiny"), seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_models(preset("tiny"), seed=7)
    c = build_models(preset("tiny"), seed=8)
    for ma, mb in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    assert not torch.equal(a[0].conv_in.weight, c[0].conv_in.weight)


def test_tiny_pipeline_shapes():
    p = preset("tiny")
    unet, vae, text = build_models(p)
    ids = torch.randint(0, p["text_encoder"]["vocab_size"], (2, 77))
    with torch.no_grad():
        ctx = text(input_ids=ids).last_hidden_state                                   # (2, 77, 32)
        eps = unet(torch.randn(2, 4, 8, 8), torch.tensor(999), ctx)
        image = vae.decode(eps)
    assert ctx.shape == (2, 77, 32) and eps.shape == (2, 4, 8, 8) and image.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_text_encoder_round_trips_through_save_pretrained(name, tmp_path):
    _, _, text = build_models(preset(name))
    text.eval().save_pretrained(tmp_path)
    loaded = CLIPTextModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).last_hidden_state, text(input_ids=ids).last_hidden_state, atol=0,
                     name="reloaded text encoder")


def test_sd2_penultimate_layer_is_a_shorter_clip_text_model():
    """SD2 conditions on the penultimate layer + final LayerNorm of a (k+1)-layer encoder. A k-layer
    CLIPTextModel with the same weights returns exactly that as last_hidden_state, so no special code."""
    cfg = {k: v for k, v in preset("tiny-sd2")["text_encoder"].items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    full = CLIPTextModel(CLIPTextConfig(**{**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1})).eval()
    short = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
    missing, unexpected = short.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(".layers.%d." % cfg["num_hidden_layers"] in k for k in unexpected)
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = full(input_ids=ids, output_hidden_states=True)
        penultimate = getattr(full, "text_model", full).final_layer_norm(out.hidden_states[-2])  # v4 nests it
        assert_close(short(input_ids=ids).last_hidden_state, penultimate, atol=1e-6, name="penultimate")
        assert (out.last_hidden_state - penultimate).abs().max() > 1e-3   # the last layer does matter


def test_presets_are_fresh_copies_and_unknown_names_fail():
    p = preset("tiny")
    p["unet"]["block_out_channels"].append(128)
    assert preset("tiny")["unet"]["block_out_channels"] == [32, 64]
    assert set(PRESETS) == {"tiny", "tiny-sd2", "sd15", "sd21", "sdxl", "sdxl-refiner", "tiny-sdxl", "tiny-sdxl-refiner"}
    with pytest.raises(UsageError, match="sd3"):
        preset("sd3")
