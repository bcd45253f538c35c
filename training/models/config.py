"""U-Net and VAE configs: frozen dataclasses read from (and written as) diffusers `config.json` dicts.

`UNetConfig.from_dict(d)` takes a diffusers `UNet2DConditionModel` config, `VAEConfig.from_dict(d)` an
`AutoencoderKL` one. Keys starting with `_` are metadata and ignored. Every other key is either one we
use, or one diffusers writes with a no-op default that we accept only while it holds that value; any
other key or value raises `LdmError` naming the key, the value and what is supported, so a checkpoint we
cannot reproduce exactly fails loudly instead of running a silently different network.

`to_dict()` writes a config that diffusers loads (`_class_name`, `_diffusers_version`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ldm_deploy.errors import LdmError
from ldm_deploy.flops import vae_scale_factor
from ldm_deploy.limits import check_model_config

DIFFUSERS_VERSION = "0.30.0"  # written as `_diffusers_version`; any diffusers >= 0.30 reads these configs

UNET_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers keys whose only value we support (the SD 1.x / 2.x value; most are diffusers' defaults).
# Several values are listed where diffusers writes equivalent spellings (null vs false, 1 vs 1.0).
_UNET_FIXED = {
    "act_fn": ("silu",),
    "downsample_padding": (1,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False, None),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False, None),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False, None),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False, None),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# Keys that have no effect on the network while the keys above hold their supported values
# (`addition_embed_type_num_heads` only matters for addition_embed_type "text", which we refuse).
_UNET_INERT = ("addition_embed_type_num_heads",)
# SDXL micro-conditioning (`addition_embed_type: "text_time"`): the pooled text embedding and the size/crop
# (base) or size/crop/aesthetic-score (refiner) numbers, each number embedded like a timestep.
UNET_ADDITION_EMBED_TYPES = (None, "text_time")

_VAE_FIXED = {
    "act_fn": ("silu",),
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
}


def _unsupported(cls: str, key: str, value, supported) -> LdmError:
    return LdmError(
        f"{cls} config key {key!r} = {value!r} is not supported (supported: {supported})",
        hint="this network is not an SD 1.x/2.x/XL-style model ldm-deploy can reproduce exactly",
    )


def _per_level(cls: str, key: str, value, levels: int, kind=int) -> tuple:
    """An int (same for every level) or a list with one entry per level -> tuple of `levels` items."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise _unsupported(cls, key, value, f"one {kind.__name__} or a list of {levels} of them")
        return tuple(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _unsupported(cls, key, value, f"one {kind.__name__} or a list of {levels} of them")
    return (value,) * levels


def _compact(values: tuple):
    """Write a per-level tuple back as one value when every level agrees (as diffusers' configs do)."""
    return values[0] if len(set(values)) == 1 else list(values)


def _check_fixed(cls: str, d: dict, fixed: dict) -> None:
    for key, allowed in fixed.items():
        if key in d and d[key] not in allowed:
            raise _unsupported(cls, key, d[key], " or ".join(repr(a) for a in allowed))


def _known(cls, d: dict, extra: tuple, internal: tuple = ()) -> dict:
    """Split out the dataclass fields of `d`, erroring on any key that is neither a field nor in `extra`.

    `internal` names fields that diffusers spells differently (they are not accepted as keys).
    """
    names = {f.name for f in fields(cls)} - set(internal)
    out = {}
    for key, value in d.items():
        if key.startswith("_"):
            continue
        if key in names:
            out[key] = value
        elif key not in extra:
            raise LdmError(
                f"{cls.__name__}: unknown config key {key!r} = {value!r}",
                hint=f"supported keys: {', '.join(sorted(names | set(extra)))}",
            )
    return out


@dataclass(frozen=True)
class UNetConfig:
    """An SD 1.x/2.x/XL `UNet2DConditionModel`. Defaults are SD 1.5's."""

    in_channels: int = 4                       # latent channels in (9 for inpainting U-Nets)
    out_channels: int = 4                      # eps / v prediction channels
    sample_size: int | tuple[int, int] = 64    # nominal latent side (metadata; any size multiple of 8 runs)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)          # resnets per down level; up levels use +1
    num_heads: tuple[int, ...] = (8, 8, 8, 8)                  # heads per level; diffusers writes this as
    #                                                            `attention_head_dim` (a historic misnaming)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)  # BasicTransformerBlocks per attention
    cross_attention_dim: int = 768             # text-encoder width (1024 for SD 2.x)
    use_linear_projection: bool = False        # proj_in/proj_out: 1x1 conv (SD1) or Linear (SD2)
    upcast_attention: bool = False             # q.k^T and softmax in fp32 (SD 2.1-v needs it in fp16)
    norm_num_groups: int = 32                  # GroupNorm groups everywhere
    norm_eps: float = 1e-5                     # ResBlock + output GroupNorm eps (transformer GroupNorm: 1e-6)
    flip_sin_to_cos: bool = True               # time embedding is [cos, sin] (LDM order)
    freq_shift: float = 0                      # exponent divided by (half_dim - freq_shift)
    center_input_sample: bool = False          # sample = 2 * sample - 1 before conv_in
    mid_block_scale_factor: float = 1.0        # mid resnets divide their output by this
    dropout: float = 0.0                       # ResBlock dropout (training only)
    time_embedding_dim: int | None = None      # None -> 4 * block_out_channels[0]
    # SDXL ("text_time"): add_embedding(cat(text_embeds, sinusoid(time_ids))) is added to the time embedding.
    addition_embed_type: str | None = None     # None (SD 1.x/2.x) or "text_time" (SDXL base and refiner)
    addition_time_embed_dim: int | None = None              # sinusoid width per time_id (256 for SDXL)
    projection_class_embeddings_input_dim: int | None = None  # pooled text width + n_time_ids * the above
    #                                                         (SDXL base 1280 + 6*256 = 2816, refiner 1280 + 5*256 = 2560)

    def __post_init__(self):
        levels = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "layers_per_block", "num_heads",
                     "transformer_layers_per_block"):
            if len(getattr(self, name)) != levels:
                raise _unsupported("UNetConfig", name, getattr(self, name),
                                   f"one entry per level ({levels} levels in block_out_channels)")
        for t in self.down_block_types:
            if t not in UNET_DOWN_BLOCKS:
                raise _unsupported("UNetConfig", "down_block_types", list(self.down_block_types), UNET_DOWN_BLOCKS)
        for t in self.up_block_types:
            if t not in UNET_UP_BLOCKS:
                raise _unsupported("UNetConfig", "up_block_types", list(self.up_block_types), UNET_UP_BLOCKS)
        mirrored = tuple(t.replace("Up", "Down") for t in reversed(self.up_block_types))
        if mirrored != self.down_block_types:
            raise _unsupported("UNetConfig", "up_block_types", list(self.up_block_types),
                               "the mirror of down_block_types (CrossAttnUpBlock2D where the down level has attention)")
        for c, h in zip(self.block_out_channels, self.num_heads):
            if c % h or c % self.norm_num_groups:
                raise _unsupported("UNetConfig", "block_out_channels", list(self.block_out_channels),
                                   "channels divisible by the head count and by norm_num_groups")
        if self.time_embedding_dim not in (None, 4 * self.block_out_channels[0]):
            raise _unsupported("UNetConfig", "time_embedding_dim", self.time_embedding_dim,
                               f"null or {4 * self.block_out_channels[0]}")
        if self.addition_embed_type not in UNET_ADDITION_EMBED_TYPES:
            raise _unsupported("UNetConfig", "addition_embed_type", self.addition_embed_type,
                               " or ".join(map(repr, UNET_ADDITION_EMBED_TYPES)))
        if self.addition_embed_type == "text_time":
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise _unsupported("UNetConfig", name, value, "a positive int with addition_embed_type 'text_time'")
        elif self.addition_time_embed_dim is not None or self.projection_class_embeddings_input_dim is not None:
            bad = "addition_time_embed_dim" if self.addition_time_embed_dim is not None else \
                "projection_class_embeddings_input_dim"
            raise _unsupported("UNetConfig", bad, getattr(self, bad), "null unless addition_embed_type is 'text_time'")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def text_time(self) -> bool:
        """SDXL micro-conditioning: forward takes `text_embeds` and `time_ids`."""
        return self.addition_embed_type == "text_time"

    @property
    def has_attention(self) -> tuple[bool, ...]:
        return tuple(t == "CrossAttnDownBlock2D" for t in self.down_block_types)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        check_model_config(d, "the U-Net config")   # sizes bounded before any module is built
        _check_fixed("UNetConfig", d, _UNET_FIXED)
        kw = _known(cls, d, tuple(_UNET_FIXED) + _UNET_INERT +
                    ("attention_head_dim", "num_attention_heads"), internal=("num_heads",))
        boc = d.get("block_out_channels", cls.block_out_channels)
        levels = len(boc)
        kw["block_out_channels"] = _per_level("UNetConfig", "block_out_channels", list(boc), levels)
        for key in ("down_block_types", "up_block_types"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if "norm_num_groups" in d:
            if not isinstance(d["norm_num_groups"], int) or isinstance(d["norm_num_groups"], bool):
                raise _unsupported("UNetConfig", "norm_num_groups", d["norm_num_groups"], "an int")
            kw["norm_num_groups"] = d["norm_num_groups"]
        for key in ("layers_per_block", "transformer_layers_per_block"):
            kw[key] = _per_level("UNetConfig", key, d.get(key, getattr(cls, key)[0]), levels)
        # diffusers: num_attention_heads = num_attention_heads or attention_head_dim (both head COUNTS).
        # diffusers itself refuses a non-null num_attention_heads; we accept it and write attention_head_dim.
        heads_key = "num_attention_heads" if d.get("num_attention_heads") is not None else "attention_head_dim"
        kw["num_heads"] = _per_level("UNetConfig", heads_key, d.get(heads_key, 8), levels)
        if isinstance(kw.get("cross_attention_dim"), (list, tuple)) or isinstance(kw.get("cross_attention_dim"), bool):
            raise _unsupported("UNetConfig", "cross_attention_dim", kw["cross_attention_dim"], "one int")
        if isinstance(kw.get("sample_size"), list):
            kw["sample_size"] = tuple(kw["sample_size"])
        if "upcast_attention" in kw and kw["upcast_attention"] is None:
            kw["upcast_attention"] = False      # SDXL's configs write null (diffusers: falsy, no upcast)
        return cls(**kw)

    def to_dict(self) -> dict:
        return {
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": list(self.sample_size) if isinstance(self.sample_size, tuple) else self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": self.center_input_sample,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "down_block_types": list(self.down_block_types),
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": list(self.up_block_types),
            "only_cross_attention": False,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": _compact(self.layers_per_block),
            "downsample_padding": 1,
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "dropout": self.dropout,
            "act_fn": "silu",
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "cross_attention_dim": self.cross_attention_dim,
            "transformer_layers_per_block": _compact(self.transformer_layers_per_block),
            "attention_head_dim": _compact(self.num_heads),   # head counts, as diffusers expects
            "num_attention_heads": None,
            "dual_cross_attention": False,
            "use_linear_projection": self.use_linear_projection,
            "class_embed_type": None,
            "addition_embed_type": self.addition_embed_type,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            "num_class_embeds": None,
            "upcast_attention": self.upcast_attention,
            "resnet_time_scale_shift": "default",
            "time_embedding_type": "positional",
            "time_embedding_dim": self.time_embedding_dim,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
        }


@dataclass(frozen=True)
class VAEConfig:
    """An SD `AutoencoderKL` (kl-f8). Defaults are SD 1.5's."""

    in_channels: int = 3                       # image channels
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)   # f = 2 ** (levels - 1) = 8
    layers_per_block: int = 2                  # encoder resnets per level; decoder uses +1
    latent_channels: int = 4
    norm_num_groups: int = 32                  # every GroupNorm (eps fixed at 1e-6)
    sample_size: int | tuple[int, int] = 512   # nominal image side (metadata)
    scaling_factor: float = 0.18215            # latents = z * scaling_factor for the U-Net
    force_upcast: bool = True                  # metadata for pipelines: decode fp16 models in fp32
    use_quant_conv: bool = True                # 1x1 conv on the moments
    use_post_quant_conv: bool = True           # 1x1 conv on z before decoding
    mid_block_add_attention: bool = True       # single-head attention in both mid blocks

    def __post_init__(self):
        levels = len(self.block_out_channels)
        if tuple(self.down_block_types) != ("DownEncoderBlock2D",) * levels:
            raise _unsupported("VAEConfig", "down_block_types", list(self.down_block_types),
                               f"DownEncoderBlock2D x {levels}")
        if tuple(self.up_block_types) != ("UpDecoderBlock2D",) * levels:
            raise _unsupported("VAEConfig", "up_block_types", list(self.up_block_types),
                               f"UpDecoderBlock2D x {levels}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise _unsupported("VAEConfig", "block_out_channels", list(self.block_out_channels),
                               "channels divisible by norm_num_groups")
        if not isinstance(self.layers_per_block, int) or isinstance(self.layers_per_block, bool):
            raise _unsupported("VAEConfig", "layers_per_block", self.layers_per_block, "one int")

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for kl-f8)."""
        return vae_scale_factor({"block_out_channels": self.block_out_channels})

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        check_model_config(d, "the VAE config")
        _check_fixed("VAEConfig", d, _VAE_FIXED)
        kw = _known(cls, d, tuple(_VAE_FIXED))
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if isinstance(kw.get("sample_size"), list):
            kw["sample_size"] = tuple(kw["sample_size"])
        if "scaling_factor" in kw:
            kw["scaling_factor"] = float(kw["scaling_factor"])
        return cls(**kw)

    def to_dict(self) -> dict:
        return {
            "_class_name": "AutoencoderKL",
            "_diffusers_version": DIFFUSERS_VERSION,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": list(self.sample_size) if isinstance(self.sample_size, tuple) else self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": None,
            "latents_mean": None,
            "latents_std": None,
            "force_upcast": self.force_upcast,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }
