"""Our U-Net / VAE against diffusers' built from the same config with the same weights (fp32, CPU, tiny)."""
from __future__ import annotations

import pytest
import torch

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError
from training.models.attention import attention_backend
from training.models.config import UNetConfig, VAEConfig
from training.models.unet import UNet2DConditionModel
from training.models.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")

SD1_LIKE = dict(
    sample_size=8, block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    attention_head_dim=2, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
SD2_LIKE = dict(
    sample_size=8, block_out_channels=[32, 64, 64], layers_per_block=[1, 2, 1], norm_num_groups=8,
    cross_attention_dim=24, attention_head_dim=[2, 4, 8], transformer_layers_per_block=[1, 2, 1],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    use_linear_projection=True, upcast_attention=True, flip_sin_to_cos=True, freq_shift=0)


def _like_for_like(ref, backend: str):
    """Give diffusers the attention processor our backend mirrors: AttnProcessor2_0 (SDPA) or the classic
    AttnProcessor (baddbmm + softmax, honours upcast_attention), so each backend is pinned exactly."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    ref.set_attn_processor(AttnProcessor() if backend == "math" else AttnProcessor2_0())
    return ref


def _unet_pair(config: dict):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def unet_pair(request):
    return _unet_pair(SD1_LIKE if request.param == "sd1" else SD2_LIKE)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("size", [(8, 8), (8, 16), (16, 24), (7, 9)])   # (7, 9): odd, diffusers forwards skip sizes
def test_unet_matches_diffusers(unet_pair, backend, size):
    ours, ref = unet_pair
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=g)
    ctx = torch.randn(2, 7, ours.config.cross_attention_dim, generator=g)
    t = torch.tensor([3.0, 917.25])                                    # per-row, fractional
    with torch.no_grad(), attention_backend(backend):
        expected = _like_for_like(ref, backend)(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert_close(got, expected, atol=1e-5, name=f"unet {backend} {size}")


@pytest.mark.parametrize("timestep", [torch.tensor(321), torch.tensor([321]), 321, torch.tensor(321.0)])
def test_unet_timestep_forms(timestep):
    ours, ref = _unet_pair(SD1_LIKE)
    x = torch.randn(3, 4, 8, 8)
    ctx = torch.randn(3, 7, 32)
    with torch.no_grad():
        expected = ref(x, torch.tensor([321, 321, 321]), ctx).sample
        got = ours(x, timestep, ctx)
    assert_close(got, expected, atol=1e-5, name="timestep broadcast")


def test_unet_config_round_trips_through_diffusers():
    for config in (SD1_LIKE, SD2_LIKE):
        ours = UNetConfig.from_dict(config)
        ref = diffusers.UNet2DConditionModel.from_config(ours.to_dict())
        assert UNetConfig.from_dict(dict(ref.config)) == ours
        names = {k: v.shape for k, v in ref.state_dict().items()}
        assert {k: v.shape for k, v in UNet2DConditionModel(ours).state_dict().items()} == names


@pytest.mark.parametrize("key,value", [
    ("act_fn", "gelu"), ("class_embed_type", "timestep"), ("addition_embed_type", "text"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]), ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"), ("cross_attention_dim", [32, 32]), ("some_new_key", 1),
    ("attention_head_dim", [2, 2, 2]), ("only_cross_attention", True)])
def test_unsupported_unet_config_names_the_key(key, value):
    with pytest.raises(LdmError, match=key):
        UNetConfig.from_dict({**SD1_LIKE, key: value})


def test_noop_defaults_that_diffusers_writes_are_accepted():
    full = dict(diffusers.UNet2DConditionModel(**SD1_LIKE).config)   # every key diffusers writes
    assert UNetConfig.from_dict(full) == UNetConfig.from_dict(SD1_LIKE)


# ---------------------------------------------------------------- VAE

TINY_VAE = dict(
    block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=64,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


@pytest.fixture(scope="module")
def vae_pair():
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY_VAE).eval()
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("size", [(64, 64), (64, 128), (72, 40)])
def test_vae_encode_decode_match_diffusers(vae_pair, backend, size):
    ours, ref = vae_pair
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, *size, generator=g) * 2 - 1
    z = torch.randn(2, 4, size[0] // 8, size[1] // 8, generator=g)
    _like_for_like(ref, backend)
    with torch.no_grad(), attention_backend(backend):
        posterior = ref.encode(x).latent_dist
        mean, logvar = ours.encode_moments(x)
        assert_close(mean, posterior.mean, atol=1e-5, name="vae mean")
        assert_close(logvar, posterior.logvar, atol=1e-5, name="vae logvar")
        assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, name="vae decode")


def test_vae_posterior_sample_matches_diffusers(vae_pair):
    ours, ref = vae_pair
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ref_posterior = ref.encode(x).latent_dist
        expected = ref_posterior.sample(torch.Generator().manual_seed(5))
        posterior = ours.encode(x)
        assert_close(posterior.kl(), ref_posterior.kl(), rtol=1e-5, name="kl")
        got = posterior.sample(torch.Generator().manual_seed(5))
    assert_close(got, expected, atol=1e-5, name="posterior sample")
    assert torch.equal(posterior.mode(), posterior.mean)
    assert torch.allclose(posterior.std, torch.exp(0.5 * posterior.logvar))


def test_vae_logvar_is_clamped():
    ours = AutoencoderKL(VAEConfig.from_dict(TINY_VAE))
    with torch.no_grad():
        ours.quant_conv.bias.fill_(1e3)
        _, logvar = ours.encode_moments(torch.zeros(1, 3, 16, 16))
    assert float(logvar.max()) == 20.0


def test_vae_config_round_trips_through_diffusers():
    ours = VAEConfig.from_dict(TINY_VAE)
    ref = diffusers.AutoencoderKL.from_config(ours.to_dict())
    assert VAEConfig.from_dict(dict(ref.config)) == ours
    assert {k: v.shape for k, v in AutoencoderKL(ours).state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("key,value", [("act_fn", "relu"), ("shift_factor", 0.1159), ("latents_mean", [0.0] * 4),
                                       ("down_block_types", ["DownBlock2D"] * 4), ("double_z", False)])
def test_unsupported_vae_config_names_the_key(key, value):
    with pytest.raises(LdmError, match=key):
        VAEConfig.from_dict({**TINY_VAE, key: value})


def test_vae_without_quant_convs_or_mid_attention_matches_diffusers():
    config = {**TINY_VAE, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False,
              "block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
              "up_block_types": ["UpDecoderBlock2D"] * 2}
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**config).eval()
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert_close(ours.encode_moments(x)[0], ref.encode(x).latent_dist.mean, atol=1e-5, name="mean")
        z = torch.randn(1, 4, 8, 8)
        assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, name="decode")


# ---------------------------------------------------------------- export-friendliness

def test_unet_traces_to_onnx_with_dynamic_batch_and_size(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import warnings

    ours, _ = _unet_pair(SD2_LIKE)
    example = (torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 7, 24))
    path = tmp_path / "unet.onnx"
    axes = {"sample": {0: "b", 2: "h", 3: "w"}, "timestep": {0: "b"}, "encoder_hidden_states": {0: "b"},
            "out": {0: "b", 2: "h", 3: "w"}}
    with torch.no_grad(), attention_backend("math"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ours, example, str(path), input_names=["sample", "timestep", "encoder_hidden_states"],
                          output_names=["out"], dynamic_axes=axes, opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, h, w in [(2, 8, 8), (3, 16, 24), (1, 7, 9)]:
        x, ctx = torch.randn(batch, 4, h, w), torch.randn(batch, 7, 24)
        t = torch.linspace(0.5, 999.0, batch)
        with torch.no_grad():
            expected = ours(x, t, ctx)
        (got,) = session.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()})
        assert_close(got, expected.numpy(), atol=1e-4, name=f"onnx unet {(batch, h, w)}")


# ---------------------------------------------------------------- attention backends

def test_attention_backends_agree_and_upcast_keeps_low_precision_accurate():
    from training.models.attention import attention, current_backend

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 50, 64, generator=g).mul(4).bfloat16().float() for _ in range(3))  # bf16-exact
    with attention_backend("math"):
        math32 = attention(q, k, v, heads=4)
        up16 = attention(*(t.bfloat16() for t in (q, k, v)), heads=4, upcast=True)
        raw16 = attention(*(t.bfloat16() for t in (q, k, v)), heads=4, upcast=False)
    sdpa32 = attention(q, k, v, heads=4)
    assert current_backend() == "sdpa"
    assert_close(math32, sdpa32, atol=1e-5, name="math vs sdpa")
    assert up16.dtype == torch.bfloat16
    err_up, err_raw = (float((x.float() - math32).abs().max()) for x in (up16, raw16))
    assert err_up < err_raw / 4 and err_up < 0.1      # measured: 0.046 vs 0.63


def test_attention_backend_is_restored_and_checked():
    from training.models.attention import current_backend

    with pytest.raises(RuntimeError), attention_backend("math"):
        raise RuntimeError("boom")
    assert current_backend() == "sdpa"
    with pytest.raises(LdmError, match="flash"):
        with attention_backend("flash"):
            pass


def test_unet_runs_in_bfloat16_with_float32_embedding():
    ours, _ = _unet_pair(SD1_LIKE)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = ours(x, torch.tensor([10.5, 900.0]), ctx)
        got = ours.to(torch.bfloat16)(x.bfloat16(), torch.tensor([10.5, 900.0]), ctx.bfloat16())
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), expected, rtol=0.05, name="bf16 unet")
