"""The SD 1.x/2.x/XL conditional U-Net (`UNet2DConditionModel`), top to bottom.

Parameter names equal diffusers', so `unet.load_state_dict(diffusers_unet.state_dict(), strict=True)`
works unmapped. The forward pass is export-friendly: no Python branches on tensor values, no in-place
ops, the timestep is broadcast with `expand`, and every upsample targets its skip tensor's size (so
latent sizes that are not multiples of 2**levels work wherever diffusers' do).

    unet = UNet2DConditionModel(UNetConfig.from_dict(json.load(open("unet/config.json"))))
    eps = unet(latents, t, text_embeddings)          # (B, 4, h, w), t: () or (B,), int or float
    eps = sdxl_unet(latents, t, context, text_embeds, time_ids)   # SDXL: + pooled (B, 1280), (B, 6 or 5)

SDXL (`addition_embed_type: "text_time"`) adds `add_embedding(cat(text_embeds, sinusoid(time_ids)))` to
the time embedding; the sinusoid is the timestep one, `addition_time_embed_dim` wide per number
(diffusers' `add_time_proj`, no parameters; LDM's `label_emb`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.models.attention import attention
from training.models.config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps (fractional allowed) -> (B, dim) float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, 1x1 shortcut when widths differ.

    Shared with the VAE (`temb_dim=None`: no time embedding; eps 1e-6 there, `norm_eps` in the U-Net).
    """

    def __init__(self, c_in: int, c_out: int, temb_dim: int | None, groups: int, eps: float,
                 dropout: float = 0.0, output_scale: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out) if temb_dim is not None else None
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out / self.output_scale if self.output_scale != 1.0 else out


class Attention(nn.Module):
    """Multi-head (cross-)attention: to_q/to_k/to_v (no bias in the U-Net), to_out.0 (with bias)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False,
                 upcast: bool = False):
        super().__init__()
        context_dim = context_dim or dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.upcast)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)                 # exact (erf) GELU


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to the text, GEGLU feed-forward; each with a residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """SpatialTransformer: GroupNorm (eps 1e-6), proj_in, transformer blocks over H*W tokens, proj_out, residual."""

    def __init__(self, dim: int, heads: int, layers: int, context_dim: int, groups: int,
                 linear_proj: bool, upcast: bool):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim) if linear_proj else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(dim, heads, context_dim, upcast) for _ in range(layers))
        self.proj_out = nn.Linear(dim, dim) if linear_proj else nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)                                      # (B, C, H, W)
        if not self.linear_proj:
            h = self.proj_in(h)
        tokens = h.flatten(2).transpose(1, 2)                 # (B, H*W, C)
        if self.linear_proj:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.linear_proj:
            tokens = self.proj_out(tokens)
        h = tokens.transpose(1, 2).reshape(x.shape)
        if not self.linear_proj:
            h = self.proj_out(h)
        return h + x


class Downsample2D(nn.Module):
    """U-Net downsample: 3x3 conv, stride 2, symmetric padding 1 (the VAE's differs)."""

    def __init__(self, c: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:                                 # VAE: pad right and bottom only
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsample to `size` (2x by default), then a 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class DownBlock(nn.Module):
    """One down level: [ResBlock (+ SpatialTransformer)] x layers, then a downsample unless it is the last."""

    def __init__(self, cfg: UNetConfig, level: int, c_in: int):
        super().__init__()
        c_out = cfg.block_out_channels[level]
        n = cfg.layers_per_block[level]
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c_in if i == 0 else c_out, c_out, cfg.time_embed_dim, cfg.norm_num_groups,
                          cfg.norm_eps, cfg.dropout) for i in range(n))
        if cfg.has_attention[level]:
            self.attentions = nn.ModuleList(
                Transformer2DModel(c_out, cfg.num_heads[level], cfg.transformer_layers_per_block[level],
                                   cfg.cross_attention_dim, cfg.norm_num_groups, cfg.use_linear_projection,
                                   cfg.upcast_attention) for _ in range(n))
        else:
            self.attentions = None
        last = level == len(cfg.block_out_channels) - 1
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(c_out)])

    def forward(self, x, temb, context) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One up level: [cat(x, skip) -> ResBlock (+ SpatialTransformer)] x (layers+1), then an upsample."""

    def __init__(self, cfg: UNetConfig, level: int):
        super().__init__()
        rev = cfg.block_out_channels[::-1]
        levels = len(rev)
        c_out, c_prev = rev[level], rev[max(level - 1, 0)]
        c_skip_last = rev[min(level + 1, levels - 1)]          # the channels of this level's input skip
        n = cfg.layers_per_block[::-1][level] + 1
        self.resnets = nn.ModuleList(
            ResnetBlock2D((c_prev if i == 0 else c_out) + (c_skip_last if i == n - 1 else c_out), c_out,
                          cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout)
            for i in range(n))
        if cfg.has_attention[::-1][level]:
            heads = cfg.num_heads[::-1][level]
            depth = cfg.transformer_layers_per_block[::-1][level]
            self.attentions = nn.ModuleList(
                Transformer2DModel(c_out, heads, depth, cfg.cross_attention_dim, cfg.norm_num_groups,
                                   cfg.use_linear_projection, cfg.upcast_attention) for _ in range(n))
        else:
            self.attentions = None
        self.upsamplers = None if level == levels - 1 else nn.ModuleList([Upsample2D(c_out)])

    def forward(self, x, skips: list[torch.Tensor], temb, context, out_size=None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, out_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c = cfg.block_out_channels[-1]
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c, c, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout,
                          cfg.mid_block_scale_factor) for _ in range(2))
        self.attentions = nn.ModuleList([
            Transformer2DModel(c, cfg.num_heads[-1], cfg.transformer_layers_per_block[-1],
                               cfg.cross_attention_dim, cfg.norm_num_groups, cfg.use_linear_projection,
                               cfg.upcast_attention)])

    def forward(self, x, temb, context) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c0 = config.block_out_channels[0]
        self.time_embedding = TimestepEmbedding(c0, config.time_embed_dim)   # time_proj has no parameters
        if config.text_time:                                                  # add_time_proj has none either
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, config.time_embed_dim)
        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.down_blocks = nn.ModuleList()
        c_in = c0
        for level, c_out in enumerate(config.block_out_channels):
            self.down_blocks.append(DownBlock(config, level, c_in))
            c_in = c_out
        self.mid_block = UNetMidBlock2DCrossAttn(config)
        self.up_blocks = nn.ModuleList(UpBlock(config, level) for level in range(len(config.block_out_channels)))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, c0, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(c0, config.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def time_proj(self, timestep: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return timestep_embedding(timestep, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)

    def add_time_proj(self, time_ids: torch.Tensor) -> torch.Tensor:
        """(B, n) micro-conditioning numbers -> (B, n * addition_time_embed_dim) float32 sinusoids."""
        cfg = self.config
        emb = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        return emb.reshape(time_ids.shape[0], -1)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, h, w) latents, () or (B,) timesteps, (B, L, cross_attention_dim) text -> (B, C_out, h, w).

        SDXL U-Nets also take `text_embeds` (B, pooled width) and `time_ids` (B, n) (diffusers'
        `added_cond_kwargs`); other U-Nets refuse them.
        """
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        timestep = timestep.to(sample.device).reshape(-1).expand(sample.shape[0])   # () | (1,) | (B,) -> (B,)
        temb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))  # (B, 4*c0)
        if self.config.text_time:
            if text_embeds is None or time_ids is None:
                raise TypeError("this SDXL U-Net (addition_embed_type 'text_time') needs text_embeds and time_ids")
            add = torch.cat([text_embeds.float(), self.add_time_proj(time_ids)], dim=-1)   # (B, proj_in_dim)
            temb = temb + self.add_embedding(add.to(sample.dtype))
        elif text_embeds is not None or time_ids is not None:
            raise TypeError("text_embeds / time_ids are only for SDXL U-Nets (addition_embed_type 'text_time')")
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, encoder_hidden_states)
            skips += block_skips
        x = self.mid_block(x, temb, encoder_hidden_states)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # upsample to the next skip's size: 2x, or the odd size the matching downsample came from
            out_size = skips[-1].shape[2:] if block.upsamplers is not None else None
            x = block(x, block_skips, temb, encoder_hidden_states, out_size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
