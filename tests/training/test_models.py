"""Our U-Net / VAE against diffusers' built from the same config with the same weights (fp32, CPU, tiny)."""
from __future__ import annotations

import pytest
import torch

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError
from training.models.attention import attention_backend
from training.models.config import UNetConfig
from training.models.unet import UNet2DConditionModel

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
        expected = ref(x, t, ctx).sample
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
    ("act_fn", "gelu"), ("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]), ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"), ("cross_attention_dim", [32, 32]), ("some_new_key", 1),
    ("attention_head_dim", [2, 2, 2]), ("only_cross_attention", True)])
def test_unsupported_unet_config_names_the_key(key, value):
    with pytest.raises(LdmError, match=key):
        UNetConfig.from_dict({**SD1_LIKE, key: value})


def test_noop_defaults_that_diffusers_writes_are_accepted():
    full = dict(diffusers.UNet2DConditionModel(**SD1_LIKE).config)   # every key diffusers writes
    assert UNetConfig.from_dict(full) == UNetConfig.from_dict(SD1_LIKE)
