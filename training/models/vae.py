"""The SD `AutoencoderKL` (kl-f8): encoder -> diagonal Gaussian over latents -> decoder.

Parameter names equal diffusers', so `vae.load_state_dict(diffusers_vae.state_dict(), strict=True)` works.
Every GroupNorm uses eps 1e-6; resnets have no time embedding; the downsample pads right/bottom by one
and convolves with padding 0 (unlike the U-Net's); each mid block holds one single-head attention.

    vae = AutoencoderKL(VAEConfig())
    z = vae.encode(images).sample(generator) * vae.config.scaling_factor     # images in [-1, 1]
    images = vae.decode(z / vae.config.scaling_factor)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.models.attention import attention
from training.models.config import VAEConfig
from training.models.unet import Downsample2D, ResnetBlock2D, Upsample2D

EPS = 1e-6


class DiagonalGaussian:
    """The posterior q(z|x) from its mean and logvar, each (B, latent, h, w); logvar clamped to [-30, 20]."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dims: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class VAEAttention(nn.Module):
    """Single-head self-attention over H*W pixels: group_norm, to_q/to_k/to_v/to_out.0 (all with bias), residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=EPS)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)          # (B, H*W, C)
        out = attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), heads=1, upcast=True)
        return self.to_out[0](out).transpose(1, 2).reshape(x.shape) + x


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(c, c, None, groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([VAEAttention(c, groups)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c_in if i == 0 else c_out, c_out, None, groups, EPS) for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample2D(c_out, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c_in if i == 0 else c_out, c_out, None, groups, EPS) for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    """(B, 3, H, W) image -> (B, 2*latent, H/f, W/f) moments (before quant_conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, levels = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, i < levels - 1)
            for i in range(levels))
        self.mid_block = MidBlock(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, latent, h, w) z (after post_quant_conv) -> (B, 3, f*h, f*w) image."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, levels = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, i < levels - 1)
            for i in range(levels))
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) image in [-1, 1] -> mean, logvar, each (B, latent, H/f, W/f), unscaled; logvar clamped."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(*self.encode_moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent, h, w) z, already divided by scaling_factor -> (B, 3, f*h, f*w) image (about [-1, 1])."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruct: encode, sample the posterior, decode."""
        return self.decode(self.encode(x).sample(generator))
