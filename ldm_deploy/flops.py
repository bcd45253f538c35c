"""Analytic FLOP counts for one forward pass of the U-Net, the VAE halves and the CLIP text encoder.

Pure Python (no numpy, no torch): the performance model for benchmarks and MFU reports. Counts the
convolutions, linear layers and attention matmuls (q.k^T and attn.v) at 2 FLOPs per multiply-add, the
same convention and scope as `torch.utils.flop_counter.FlopCounterMode` (which also skips biases, norms,
activations, softmax and resampling, a fraction of a percent here). Inputs are the diffusers /
transformers config dicts (as in `config.json`), so the runtime can size a model from an artifact's
manifest without importing the training code.

    unet_flops(sd15_unet_config, 64, 64)       # ~0.80e12: one SD 1.5 U-Net call at 512x512, batch 1
    # a CFG step runs the U-Net at batch 2B.

Every function first checks the config's sizes against ldm_deploy/limits.py (LdmError outside them), so
a damaged config (layers_per_block 1e9) is refused instead of looping for hours.
"""
from __future__ import annotations

from typing import Any, Mapping

from ldm_deploy.limits import MAX_BATCH, MAX_IMAGE_SIDE, check_config_sizes

SD_VAE_SCALE_FACTOR = 8     # kl-f8, what diffusers' pipelines assume when a folder has no VAE config


def vae_scale_factor(vae_config: Mapping[str, Any] | None) -> int:
    """Image pixels per latent pixel: 2 ** (len(block_out_channels) - 1), one 2x resample between VAE
    levels (8 for SD's four levels); 8 when the config is missing or gives no block list. The one formula:
    the export, the import, training and the torch reference all call it."""
    blocks = vae_config.get("block_out_channels") if isinstance(vae_config, Mapping) else None
    return 2 ** (len(blocks) - 1) if isinstance(blocks, (list, tuple)) and blocks else SD_VAE_SCALE_FACTOR


def _checked(config: dict, what: str, *sizes: int) -> None:
    check_config_sizes(config, f"the {what} config")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max(MAX_IMAGE_SIDE, MAX_BATCH, 16384):
            raise ValueError(f"flops: size {n!r} out of range")


def _conv(batch: int, c_in: int, c_out: int, k: int, h_out: int, w_out: int) -> int:
    return 2 * batch * c_in * c_out * k * k * h_out * w_out


def _linear(rows: int, d_in: int, d_out: int) -> int:
    return 2 * rows * d_in * d_out


def _attention(batch: int, n_q: int, n_kv: int, width: int) -> int:
    """q.k^T and probs.v over all heads (heads * head_dim = width)."""
    return 2 * 2 * batch * n_q * n_kv * width


def _per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _resnet(b: int, c_in: int, c_out: int, h: int, w: int, temb: int | None) -> int:
    f = _conv(b, c_in, c_out, 3, h, w) + _conv(b, c_out, c_out, 3, h, w)
    if temb:
        f += _linear(b, temb, c_out)
    if c_in != c_out:
        f += _conv(b, c_in, c_out, 1, h, w)
    return f


def _spatial_transformer(b: int, c: int, h: int, w: int, depth: int, text_len: int, text_dim: int) -> int:
    n = h * w
    block = (4 * _linear(b * n, c, c) + _attention(b, n, n, c)                  # self-attention
             + 2 * _linear(b * n, c, c) + 2 * _linear(b * text_len, text_dim, c)  # cross: q, out; k, v
             + _attention(b, n, text_len, c)
             + _linear(b * n, c, 8 * c) + _linear(b * n, 4 * c, c))              # GEGLU feed-forward
    return 2 * _linear(b * n, c, c) + depth * block                             # proj_in / proj_out


def unet_flops(config: dict, height: int, width: int, batch: int = 1, text_len: int = 77) -> int:
    """One `UNet2DConditionModel` forward on (batch, C, height, width) latents and `text_len` tokens."""
    _checked(config, "U-Net", height, width, batch, text_len)
    ch = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(ch)
    layers = _per_level(config.get("layers_per_block", 2), levels)
    depth = _per_level(config.get("transformer_layers_per_block", 1), levels)
    attn = [t.startswith("CrossAttn") for t in config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])]
    text_dim = config.get("cross_attention_dim", 1280)
    b, temb = batch, 4 * ch[0]

    f = _linear(b, ch[0], temb) + _linear(b, temb, temb)                       # time embedding
    f += _conv(b, config.get("in_channels", 4), ch[0], 3, height, width)        # conv_in
    h, w, c_prev = height, width, ch[0]
    sizes, skip_channels = [(h, w)], [ch[0]]
    for i, c in enumerate(ch):
        for j in range(layers[i]):
            f += _resnet(b, c_prev if j == 0 else c, c, h, w, temb)
            if attn[i]:
                f += _spatial_transformer(b, c, h, w, depth[i], text_len, text_dim)
            sizes.append((h, w))
            skip_channels.append(c)
        c_prev = c
        if i < levels - 1:                                                      # 3x3 stride 2, pad 1
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            f += _conv(b, c, c, 3, h, w)
            sizes.append((h, w))
            skip_channels.append(c)

    f += 2 * _resnet(b, ch[-1], ch[-1], h, w, temb)                            # mid block
    f += _spatial_transformer(b, ch[-1], h, w, depth[-1], text_len, text_dim)

    for i, c in enumerate(reversed(ch)):
        level = levels - 1 - i
        for j in range(layers[level] + 1):
            sizes.pop()
            f += _resnet(b, c_prev + skip_channels.pop(), c, h, w, temb)
            c_prev = c
            if attn[level]:
                f += _spatial_transformer(b, c, h, w, depth[level], text_len, text_dim)
        if i < levels - 1:                                                      # upsample to the skip's size
            h, w = sizes[-1]
            f += _conv(b, c, c, 3, h, w)
    f += _conv(b, ch[0], config.get("out_channels", 4), 3, h, w)                # conv_out
    return f


def _vae_mid(b: int, c: int, h: int, w: int, attention: bool) -> int:
    f = 2 * _resnet(b, c, c, h, w, None)
    if attention:
        f += 4 * _linear(b * h * w, c, c) + _attention(b, h * w, h * w, c)
    return f


def vae_decoder_flops(config: dict, height: int, width: int, batch: int = 1) -> int:
    """`AutoencoderKL.decode` (post_quant_conv + decoder) of (batch, latent, height, width) latents."""
    _checked(config, "VAE", height, width, batch)
    ch = list(reversed(config.get("block_out_channels", (128, 256, 512, 512))))
    layers, latent, b = config.get("layers_per_block", 2) + 1, config.get("latent_channels", 4), batch
    h, w = height, width
    f = _conv(b, latent, latent, 1, h, w) if config.get("use_post_quant_conv", True) else 0
    f += _conv(b, latent, ch[0], 3, h, w)
    f += _vae_mid(b, ch[0], h, w, config.get("mid_block_add_attention", True))
    c_prev = ch[0]
    for i, c in enumerate(ch):
        for j in range(layers):
            f += _resnet(b, c_prev if j == 0 else c, c, h, w, None)
        c_prev = c
        if i < len(ch) - 1:
            h, w = 2 * h, 2 * w
            f += _conv(b, c, c, 3, h, w)
    return f + _conv(b, ch[-1], config.get("out_channels", 3), 3, h, w)


def vae_encoder_flops(config: dict, height: int, width: int, batch: int = 1) -> int:
    """`AutoencoderKL.encode` (encoder + quant_conv) of (batch, 3, height, width) images."""
    _checked(config, "VAE", height, width, batch)
    ch = list(config.get("block_out_channels", (128, 256, 512, 512)))
    layers, latent, b = config.get("layers_per_block", 2), config.get("latent_channels", 4), batch
    h, w = height, width
    f = _conv(b, config.get("in_channels", 3), ch[0], 3, h, w)
    c_prev = ch[0]
    for i, c in enumerate(ch):
        for j in range(layers):
            f += _resnet(b, c_prev if j == 0 else c, c, h, w, None)
        c_prev = c
        if i < len(ch) - 1:                                                     # pad (0,1,0,1), 3x3 stride 2
            h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
            f += _conv(b, c, c, 3, h, w)
    f += _vae_mid(b, ch[-1], h, w, config.get("mid_block_add_attention", True))
    f += _conv(b, ch[-1], 2 * latent, 3, h, w)
    if config.get("use_quant_conv", True):
        f += _conv(b, 2 * latent, 2 * latent, 1, h, w)
    return f


def text_encoder_flops(config: dict, seq_len: int = 77, batch: int = 1) -> int:
    """`CLIPTextModel` forward (no projection head) over (batch, seq_len) token ids."""
    _checked(config, "text encoder", seq_len, batch)
    d, inner = config.get("hidden_size", 512), config.get("intermediate_size", 2048)
    rows = batch * seq_len
    layer = 4 * _linear(rows, d, d) + _attention(batch, seq_len, seq_len, d) + 2 * _linear(rows, d, inner)
    return config.get("num_hidden_layers", 12) * layer
