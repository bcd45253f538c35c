"""The analytic FLOP model against torch's FlopCounterMode (exact for convs/linears/attention matmuls)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ldm_deploy.flops import text_encoder_flops, unet_flops, vae_decoder_flops, vae_encoder_flops


def test_flops_module_is_pure_python():
    code = "import sys, ldm_deploy.flops; assert not {'torch', 'numpy'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sd15_unet_is_about_0_8_tflop_at_512px():
    from training.models.presets import preset

    flops = unet_flops(preset("sd15")["unet"], 64, 64, batch=1)
    assert flops == pytest.approx(0.80e12, rel=0.03)
    assert unet_flops(preset("sd15")["unet"], 64, 64, batch=2) == 2 * flops      # CFG doubles it
    assert unet_flops(preset("sd15")["unet"], 96, 96) > 2 * flops                # attention grows with N^2


def _measure(fn) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from training.models.attention import attention_backend

    with torch.no_grad(), attention_backend("math"), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name,device,size", [
    ("tiny", "cpu", (8, 8)), ("tiny-sd2", "cpu", (7, 9)), ("tiny", "cpu", (8, 16)),
    ("sd15", "meta", (64, 64)), ("sd21", "meta", (96, 96))])
def test_flops_match_torch_flop_counter(name, device, size):
    torch = pytest.importorskip("torch")
    from training.models.presets import build_models, preset

    p = preset(name)
    unet, vae, text = build_models(p, device=device)
    text.config._attn_implementation = "eager"           # so the attention matmuls are visible to the counter
    h, w = size
    with torch.device(device):
        x = torch.randn(2, 4, h, w)
        ctx = torch.randn(2, 77, p["unet"]["cross_attention_dim"])
        z, image = torch.randn(1, 4, h, w), torch.randn(1, 3, 8 * h, 8 * w)
        ids = torch.zeros(2, 77, dtype=torch.long)
        t = torch.tensor(500.0)
    assert unet_flops(p["unet"], h, w, batch=2) == _measure(lambda: unet(x, t, ctx))
    assert vae_decoder_flops(p["vae"], h, w) == _measure(lambda: vae.decode(z))
    assert vae_encoder_flops(p["vae"], 8 * h, 8 * w) == _measure(lambda: vae.encode_moments(image))
    assert text_encoder_flops(p["text_encoder"], 77, batch=2) == _measure(lambda: text(input_ids=ids))


def test_vae_scale_factor_is_one_formula():
    from ldm_deploy.flops import vae_scale_factor
    from training.models.config import VAEConfig
    from training.models.presets import preset

    assert vae_scale_factor({"block_out_channels": [128, 256, 512, 512]}) == 8
    assert vae_scale_factor({"block_out_channels": (32, 64)}) == 2
    assert vae_scale_factor(None) == vae_scale_factor({}) == vae_scale_factor({"block_out_channels": []}) == 8
    tiny = preset("tiny")["vae"]
    assert VAEConfig.from_dict(tiny).scale_factor == vae_scale_factor(tiny) == 2 ** (len(tiny["block_out_channels"]) - 1)
