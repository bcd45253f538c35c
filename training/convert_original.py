"""Original single-file SD 1.x / 2.x checkpoints (CompVis / Stability LDM layout) <-> diffusers folders.

An original checkpoint is one flat state dict (`.safetensors`, or a pickled `.ckpt` whose tensors sit
under `state_dict`) with these prefixes (reference §2.1):

    model.diffusion_model.      U-Net: input_blocks / middle_block / output_blocks
    model_ema.                  EMA U-Net, the dotted name with its dots removed (LitEma buffers)
    first_stage_model.          VAE: encoder.down.{i}.block.{j}, decoder.up.{n-1-i}, mid.attn_1 (1x1 convs)
    cond_stage_model.transformer.   SD 1.x text encoder, already HF CLIPTextModel keys
    cond_stage_model.model.         SD 2.x OpenCLIP ViT-H text tower (qkv in one in_proj; 24 blocks,
                                    of which SD uses the penultimate output -> a 23-layer CLIPTextModel)
    betas, alphas_cumprod, ...  the training schedule (not weights; dropped)

Without a config the architecture is inferred from the tensor shapes (`infer_config`): levels,
channels, layers per block, attention levels, projections, cross-attention and text encoder sizes;
head counts, which shapes do not carry, follow diffusers' SD 1.x (8 heads) / SD 2.x (head width 64)
configs. SDXL and other families are refused in one line.

Every mapping is an explicit bijection between the diffusers names of the modules built from the
config and the LDM names, derived from the config (levels, layers per block, which levels have
attention), so any depth converts, tiny test models included. A checkpoint key that no rule claims
is an error: nothing is silently dropped except the documented non-weights above, the unused final
OpenCLIP block, and its text projection.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from ldm_deploy.errors import LdmError
from ldm_deploy.fileio import check_out_dir
from training.checkpoint import (
    Components, TEXT_MODEL_PREFIX, build_for_loading, load_pickle_file, load_strict,
    MODEL_OUTPUT, load_state_dict_file, save_components, text_encoder_state_dict,
)

log = logging.getLogger(__name__)

UNET = "model.diffusion_model."
EMA = "model_ema."
VAE_PREFIXES = ("first_stage_model.", "vae.")
CLIP = "cond_stage_model.transformer."      # SD 1.x: + HF CLIPTextModel keys
OPENCLIP = "cond_stage_model.model."        # SD 2.x: + open_clip keys
# Training-time buffers of LatentDiffusion: the noise schedule and the learned-logvar table.
SCHEDULE_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.decay", "model_ema.num_updates",
}
_SHOW = 8

# ResNet internals: diffusers name -> LDM name (U-Net ResBlock Sequential indices; VAE only renames the shortcut).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# ----------------------------------------------------------------------------------------------------
# Key maps: diffusers name -> LDM name, built from the config


def _rename_head(rest: str, table: dict) -> str:
    """Rename the leading module name of `rest` (e.g. 'conv_shortcut.weight') through `table`."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_prefixes(cfg) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is_resnet) for every container of a U-Net with config `cfg` (UNetConfig)."""
    n = len(cfg.block_out_channels)
    out = [("time_embedding.linear_1.", "time_embed.0.", False), ("time_embedding.linear_2.", "time_embed.2.", False),
           ("conv_in.", "input_blocks.0.0.", False), ("conv_norm_out.", "out.0.", False), ("conv_out.", "out.2.", False)]
    idx = 1
    for i in range(n):
        for j in range(cfg.layers_per_block[i]):
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0.", True))
            out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.", False))
            idx += 1
        if i < n - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{idx}.0.op.", False))
            idx += 1
    out += [("mid_block.resnets.0.", "middle_block.0.", True), ("mid_block.attentions.0.", "middle_block.1.", False),
            ("mid_block.resnets.1.", "middle_block.2.", True)]
    idx = 0
    up_layers = list(reversed(cfg.layers_per_block))
    up_attn = list(reversed(cfg.has_attention))
    for i in range(n):
        for j in range(up_layers[i] + 1):
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0.", True))
            out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.", False))
            if j == up_layers[i] and i < n - 1:
                out.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{idx}.{2 if up_attn[i] else 1}.conv.", False))
            idx += 1
    return out


def unet_key_map(cfg, keys) -> dict[str, str]:
    """diffusers U-Net key -> LDM key (without `model.diffusion_model.`). Inside transformers, names agree."""
    prefixes = sorted(unet_prefixes(cfg), key=lambda p: -len(p[0]))
    out = {}
    for key in keys:
        for dif, ldm, resnet in prefixes:
            if key.startswith(dif):
                rest = key[len(dif):]
                out[key] = ldm + (_rename_head(rest, UNET_RESNET) if resnet else rest)
                break
        else:
            raise LdmError(f"U-Net parameter {key} has no original-checkpoint name", hint="unsupported U-Net layout")
    return out


def vae_key_map(n_levels: int, keys) -> dict[str, str]:
    """diffusers VAE key -> LDM key (without `first_stage_model.`)."""
    out = {}
    for key in keys:
        k = key
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            k = f"encoder.down.{m[1]}.block.{m[2]}.{_rename_head(m[3], VAE_RESNET)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", k):
            k = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            k = f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}.{_rename_head(m[3], VAE_RESNET)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", k):
            k = f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", k):
            k = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_head(m[3], VAE_RESNET)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", k):
            k = f"{m[1]}.mid.attn_1.{_rename_head(m[2], VAE_ATTN)}"
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", k):
            k = f"{m[1]}.norm_out.{m[2]}"
        elif not re.match(r"(encoder\.conv_(in|out)|decoder\.conv_(in|out)|quant_conv|post_quant_conv)\.", k):
            raise LdmError(f"VAE parameter {key} has no original-checkpoint name", hint="unsupported VAE layout")
        out[key] = k
    return out


def _is_vae_attn_linear(key: str) -> bool:
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key))


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def openclip_key_map(keys) -> dict[str, str | tuple[str, int]]:
    """bare HF CLIPTextModel key -> open_clip key, or (in_proj key, q/k/v index) for the split projections."""
    out: dict[str, str | tuple[str, int]] = {}
    for key in keys:
        if key == "embeddings.token_embedding.weight":
            out[key] = "token_embedding.weight"
        elif key == "embeddings.position_embedding.weight":
            out[key] = "positional_embedding"
        elif key.startswith("final_layer_norm."):
            out[key] = "ln_final." + key[len("final_layer_norm."):]
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            out[key] = (f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", "qkv".index(m[2]))
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)$", key):
            out[key] = f"transformer.resblocks.{m[1]}.{_rename_head(m[2], _OPENCLIP_LAYER)}"
        else:
            raise LdmError(f"text encoder parameter {key} has no OpenCLIP name")
    return out


# ----------------------------------------------------------------------------------------------------
# Reading an original checkpoint


def load_original_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[dict, int | None]:
    """(flat state dict, global_step or None). `.ckpt` only with allow_pickle, via torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise LdmError(f"checkpoint {path} does not exist")
    if path.name.endswith(".safetensors"):
        return load_state_dict_file(path), None
    obj = load_pickle_file(path, allow_pickle=allow_pickle)
    step = obj.get("global_step")
    step = int(step) if isinstance(step, (int, torch.Tensor)) and torch.as_tensor(step).numel() == 1 else None
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise LdmError(f"{path}: state dict entries that are not tensors: {', '.join(map(str, bad[:_SHOW]))}")
    return sd, step


def detect(sd: dict, global_step: int | None = None) -> dict:
    """What the checkpoint is: text encoder family, prediction type, attention upcast, VAE prefix, EMA."""
    _refuse_unsupported(sd)
    if any(k.startswith(OPENCLIP) for k in sd):
        family = "sd2"
    elif any(k.startswith(CLIP) for k in sd):
        family = "sd1"
    else:
        raise LdmError("no text encoder in the checkpoint (neither cond_stage_model.transformer. nor cond_stage_model.model.)",
                       hint="only full SD 1.x / 2.x checkpoints convert")
    if not any(k.startswith(UNET) for k in sd):
        raise LdmError(f"no U-Net in the checkpoint (no {UNET} keys)", hint="is this an SD 1.x / 2.x checkpoint?")
    vae_prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in sd)), None)
    if vae_prefix is None:
        raise LdmError("no VAE in the checkpoint (no first_stage_model. keys)")
    if family == "sd1":
        prediction, upcast = "epsilon", False
    else:  # reference §2.1: SD 2.x-base was trained to step 875000 with eps; the 768 models predict v
        prediction = "epsilon" if global_step == 875000 else "v_prediction"
        # 2.1-v (step 110000) needs fp32 attention in fp16. Without a step (safetensors) we assume it may be
        # 2.1-v: upcasting changes nothing in fp32 and only prevents fp16 overflow.
        upcast = global_step == 110000 or (global_step is None and prediction == "v_prediction")
    return {
        "family": family, "prediction_type": prediction, "upcast_attention": upcast,
        "vae_prefix": vae_prefix, "has_ema": sum(k.startswith(EMA) for k in sd) > 2, "global_step": global_step,
    }


def _refuse_unsupported(sd: dict) -> None:
    """One clear line for checkpoints of families `convert` does not handle (before any mapping)."""
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise LdmError("this is an SDXL checkpoint (conditioner.embedders. keys): SDXL is not supported by convert "
                       "yet", hint="convert SD 1.x / 2.x checkpoints, or use a diffusers folder")
    for marker, name in (("joint_blocks.", "SD 3"), ("double_blocks.", "Flux")):
        if any(k.startswith(UNET + marker) for k in sd):
            raise LdmError(f"this looks like an {name} checkpoint ({UNET}{marker}...): its shapes match no "
                           "family convert supports (SD 1.x / 2.x)", hint="use a diffusers folder of an SD 1.x / 2.x model")


def _shape(sd: dict, key: str, what: str) -> tuple[int, ...]:
    t = sd.get(key)
    if t is None:
        raise LdmError(f"cannot infer the {what} from the checkpoint: it has no {key}",
                       hint="its shapes match no SD 1.x / 2.x layout; pass the matching --config")
    return tuple(t.shape)


def _count(sd: dict, prefix: str, pattern: str = r"(\d+)\.") -> int:
    """Number of consecutive indices i with keys `prefix` + i + '.' (0, 1, ...)."""
    idx = {int(m[1]) for k in sd if k.startswith(prefix) and (m := re.match(pattern, k[len(prefix):]))}
    n = 0
    while n in idx:
        n += 1
    return n


def _heads(channels: int, head_dim: int = 64, fallback: int = 8) -> int:
    """Head count by head width `head_dim` when it divides `channels`, else `fallback` (or 1)."""
    if channels % head_dim == 0:
        return channels // head_dim
    return fallback if channels % fallback == 0 else 1


def _groups(channels: list[int]) -> int:
    """GroupNorm groups (not in the shapes): SD's 32, or the largest count dividing every channel width."""
    import math

    g = math.gcd(*channels)
    return 32 if g % 32 == 0 else max(d for d in range(1, 33) if g % d == 0)


def infer_unet(sd: dict, family: str) -> tuple[dict, list[str]]:
    """U-Net config fields the LDM U-Net's tensor shapes determine, plus the head-count convention used."""
    u = UNET
    c0, in_ch = _shape(sd, u + "input_blocks.0.0.weight", "U-Net input channels")[:2]
    out_ch = _shape(sd, u + "out.2.weight", "U-Net output channels")[0]
    levels: list[dict] = []
    level: dict = {"channels": [], "attn": [], "depth": []}
    k = 1
    while any(key.startswith(f"{u}input_blocks.{k}.") for key in sd):
        if f"{u}input_blocks.{k}.0.op.weight" in sd:      # downsample: closes the level
            levels.append(level)
            level = {"channels": [], "attn": [], "depth": []}
        else:
            level["channels"].append(_shape(sd, f"{u}input_blocks.{k}.0.out_layers.3.weight", "U-Net channels")[0])
            depth = _count(sd, f"{u}input_blocks.{k}.1.transformer_blocks.")
            level["attn"].append(depth > 0)
            level["depth"].append(depth)
        k += 1
    levels.append(level)
    for i, lv in enumerate(levels):
        if not lv["channels"] or len(set(lv["channels"])) > 1 or len(set(lv["attn"])) > 1 or len(set(lv["depth"])) > 1:
            raise LdmError(f"U-Net level {i} of the checkpoint mixes block shapes (channels {lv['channels']}, "
                           f"attention {lv['attn']}, depth {lv['depth']}): not an SD 1.x / 2.x layout",
                           hint="pass the matching --config")
    channels = [lv["channels"][0] for lv in levels]
    attn = [lv["attn"][0] for lv in levels]
    if channels[0] != c0:
        raise LdmError(f"U-Net conv_in has {c0} channels but the first level {channels[0]}: not an SD 1.x / 2.x layout")
    first = next((j for j in range(1, k) if f"{u}input_blocks.{j}.1.proj_in.weight" in sd), None)
    if first is None:
        raise LdmError("the checkpoint's U-Net has no attention blocks: not an SD 1.x / 2.x layout",
                       hint="pass the matching --config")
    linear = len(_shape(sd, f"{u}input_blocks.{first}.1.proj_in.weight", "projection")) == 2
    cross = _shape(sd, f"{u}input_blocks.{first}.1.transformer_blocks.0.attn2.to_k.weight", "cross-attention width")[1]
    if family == "sd1":   # diffusers' SD 1.x configs: 8 heads on every level
        heads, note = [8 if c % 8 == 0 else 1 for c in channels], "8 heads per level (SD 1.x convention)"
    else:                 # SD 2.x: head width 64 ([5, 10, 20, 20] for 320..1280 channels)
        heads, note = [_heads(c) for c in channels], "head width 64 (SD 2.x convention)"

    def per_level(values):
        return values[0] if len(set(values)) == 1 else list(values)

    cfg = {
        "in_channels": in_ch, "out_channels": out_ch, "block_out_channels": channels,
        "layers_per_block": per_level([len(lv["channels"]) for lv in levels]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "transformer_layers_per_block": per_level([max(lv["depth"][0], 1) for lv in levels]),
        "attention_head_dim": per_level(heads), "cross_attention_dim": cross, "use_linear_projection": linear,
        "norm_num_groups": _groups(channels),
    }
    return cfg, [f"U-Net heads are not in the tensor shapes: {note}, {per_level(heads)}",
                 f"U-Net GroupNorm groups are not in the tensor shapes: {cfg['norm_num_groups']}"]


def infer_vae(sd: dict, prefix: str) -> dict:
    e = prefix + "encoder."
    n = _count(sd, e + "down.")
    if n == 0:
        raise LdmError(f"cannot infer the VAE from the checkpoint: no {e}down.0 keys", hint="pass the matching --config")
    channels = [_shape(sd, f"{e}down.{i}.block.0.conv2.weight", "VAE channels")[0] for i in range(n)]
    return {
        "block_out_channels": channels, "norm_num_groups": _groups(channels),
        "in_channels": _shape(sd, e + "conv_in.weight", "VAE input channels")[1],
        "out_channels": _shape(sd, prefix + "decoder.conv_out.weight", "VAE output channels")[0],
        "layers_per_block": _count(sd, e + "down.0.block."),
        "latent_channels": _shape(sd, e + "conv_out.weight", "VAE latent channels")[0] // 2,
        "use_quant_conv": prefix + "quant_conv.weight" in sd,
        "use_post_quant_conv": prefix + "post_quant_conv.weight" in sd,
        "mid_block_add_attention": any(k.startswith(e + "mid.attn_1.") for k in sd),
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
    }


def infer_text_encoder(sd: dict, family: str) -> tuple[dict, list[str]]:
    if family == "sd1":
        p = CLIP + (TEXT_MODEL_PREFIX if any(k.startswith(CLIP + TEXT_MODEL_PREFIX) for k in sd) else "")
        vocab, width = _shape(sd, p + "embeddings.token_embedding.weight", "text encoder width")
        positions = _shape(sd, p + "embeddings.position_embedding.weight", "text positions")[0]
        layers = _count(sd, p + "encoder.layers.")
        inner = _shape(sd, p + "encoder.layers.0.mlp.fc1.weight", "text MLP width")[0]
        act, note = "quick_gelu", "CLIP ViT-L convention"
    else:
        p = OPENCLIP
        vocab, width = _shape(sd, p + "token_embedding.weight", "text encoder width")
        positions = _shape(sd, p + "positional_embedding", "text positions")[0]
        blocks = _count(sd, p + "transformer.resblocks.")
        # original SD 2.x files keep OpenCLIP's last block (unused: SD conditions on the penultimate layer)
        # and text_projection; diffusers' convert_diffusers_to_original script writes only the used blocks
        layers = blocks - 1 if p + "text_projection" in sd else blocks
        inner = _shape(sd, p + "transformer.resblocks.0.mlp.c_fc.weight", "text MLP width")[0]
        act, note = "gelu", "OpenCLIP ViT-H convention"
    heads = _heads(width)
    cfg = {"vocab_size": vocab, "hidden_size": width, "max_position_embeddings": positions, "num_hidden_layers": layers,
           "intermediate_size": inner, "num_attention_heads": heads, "hidden_act": act}
    return cfg, [f"text encoder heads are not in the tensor shapes: head width 64 ({note}), {heads}"]


def infer_config(sd: dict, info: dict) -> tuple[dict, list[str]]:
    """A preset-style config {unet, vae, text_encoder, scheduler, tokenizer} from the tensor shapes.

    Shapes give channels, levels, layers per block, attention levels, transformer depth, linear vs conv
    projections, cross-attention width, VAE channels and the text encoder's width, depth, MLP width,
    vocabulary and positions. What shapes cannot tell follows the family's diffusers configs (SD 1.5 /
    SD 2.1): head counts (SD 1.x: 8 per level; SD 2.x: head width 64), GroupNorm groups (32), the
    activation (quick_gelu / gelu), scaling factor, scheduler; the returned notes say so.
    """
    from training.models.presets import preset

    if any(k.startswith(UNET + "label_emb.") for k in sd):
        raise LdmError(f"the U-Net is class-conditioned ({UNET}label_emb.: SDXL, unCLIP or an upscaler): its shapes "
                       "match no family convert supports (SD 1.x / 2.x)", hint="use a diffusers folder of an SD 1.x / 2.x model")
    family = info["family"]
    v = info["prediction_type"] == "v_prediction"
    base = preset("sd15" if family == "sd1" else "sd21")
    unet, notes = infer_unet(sd, family)
    vae = infer_vae(sd, info["vae_prefix"])
    if vae["norm_num_groups"] != 32:
        notes.append(f"VAE GroupNorm groups are not in the tensor shapes: {vae['norm_num_groups']}")
    text, text_notes = infer_text_encoder(sd, family)
    if unet["cross_attention_dim"] != text["hidden_size"]:
        raise LdmError(f"the U-Net attends to {unet['cross_attention_dim']}-wide text features but the text encoder "
                       f"is {text['hidden_size']} wide: not an SD 1.x / 2.x checkpoint", hint="pass the matching --config")
    # native size: SD 2.x-v models are 768 px (latent 96), SD 1.x and SD 2.x-base 512 px (latent 64)
    sample = 96 if family == "sd2" and v else 64
    cfg = {
        "unet": {**base["unet"], **unet, "sample_size": sample, "upcast_attention": info["upcast_attention"]},
        "vae": {**base["vae"], **vae, "sample_size": sample * 8},
        "text_encoder": {**base["text_encoder"], **text},
        "scheduler": {**base["scheduler"], "prediction_type": info["prediction_type"]},
        "tokenizer": {**base["tokenizer"], "vocab_size": text["vocab_size"]},
    }
    return cfg, notes + text_notes


def _resolve_config(config, info: dict, sd: dict) -> dict:
    from training.models.presets import preset

    if config is None:  # the architecture from the tensor shapes; an explicit config is taken as given
        cfg, notes = infer_config(sd, info)
        conventional = cfg["unet"]["norm_num_groups"] == 32 and cfg["vae"]["norm_num_groups"] == 32
        for note in notes:  # a non-SD width (groups != 32) is a custom model: say it louder
            log.log(logging.INFO if conventional else logging.WARNING, "%s; pass --config if the model differs", note)
        return cfg
    cfg = preset(config) if isinstance(config, str) else config
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    if info["global_step"] is not None and info["family"] == "sd2":
        cfg["scheduler"]["prediction_type"] = info["prediction_type"]
    return cfg


# ----------------------------------------------------------------------------------------------------
# Original -> diffusers


class _Claims:
    """Tracks which checkpoint keys a rule has taken, so the leftovers can be reported."""

    def __init__(self, sd: dict):
        self.sd = sd
        self.used: set[str] = set()
        self.missing: list[str] = []

    def take(self, key: str) -> torch.Tensor | None:
        if key not in self.sd:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.sd[key]

    def drop(self, key: str) -> None:
        self.used.add(key)


def _unet_sd(claims: _Claims, module, extract_ema: bool) -> dict:
    kmap = unet_key_map(module.config, module.state_dict().keys())
    out = {}
    for dif, ldm in kmap.items():
        ema_key = EMA + ("diffusion_model." + ldm).replace(".", "")
        use, other = (ema_key, UNET + ldm) if extract_ema else (UNET + ldm, ema_key)
        out[dif] = claims.take(use)
        if other in claims.sd:
            claims.drop(other)  # the unused copy (online weights when extracting EMA, or the EMA ones)
    return out


def _vae_sd(claims: _Claims, module, prefix: str) -> dict:
    kmap = vae_key_map(len(module.config.block_out_channels), module.state_dict().keys())
    out = {}
    for dif, ldm in kmap.items():
        t = claims.take(prefix + ldm)
        if t is not None and _is_vae_attn_linear(ldm) and t.ndim > 2:
            t = t.reshape(t.shape[0], t.shape[1])  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
        out[dif] = t
    return out


def _bare(key: str) -> str:
    return key[len(TEXT_MODEL_PREFIX):] if key.startswith(TEXT_MODEL_PREFIX) else key


def _clip_sd(claims: _Claims, module) -> dict:
    # SD 1.x keys are HF keys already; accept them with and without `text_model.`.
    wrapped = any(k.startswith(CLIP + TEXT_MODEL_PREFIX) for k in claims.sd)
    for k in list(claims.sd):
        if k.startswith(CLIP) and k.endswith("embeddings.position_ids"):
            claims.drop(k)  # a buffer (arange), sometimes stored corrupted; always recomputed
    out = {}
    for key in module.state_dict():
        bare = _bare(key)
        out[bare] = claims.take(CLIP + (TEXT_MODEL_PREFIX if wrapped else "") + bare)
    return out


def _openclip_sd(claims: _Claims, module) -> dict:
    n = module.config.num_hidden_layers
    blocks = {int(m[1]) for k in claims.sd if (m := re.match(re.escape(OPENCLIP) + r"transformer\.resblocks\.(\d+)\.", k))}
    # original files keep the unused last block with text_projection; diffusers' script writes n blocks only
    want = n + 1 if OPENCLIP + "text_projection" in claims.sd else n
    if blocks != set(range(want)):
        raise LdmError(
            f"the OpenCLIP text encoder has {len(blocks)} blocks but the config's text encoder has "
            f"num_hidden_layers={n}; SD 2.x uses the penultimate block, so the checkpoint must have {n + 1} "
            f"(with text_projection) or {n} (without)",
            hint="pass the matching --config",
        )
    for k in list(claims.sd):
        if k.startswith(OPENCLIP) and k.endswith("embeddings.position_ids"):
            claims.drop(k)  # a buffer some writers keep; always recomputed
    for k in claims.sd:
        if k.startswith(f"{OPENCLIP}transformer.resblocks.{n}.") or k in (
                OPENCLIP + "text_projection", OPENCLIP + "logit_scale", OPENCLIP + "attn_mask"):
            claims.drop(k)  # the last block and the projection: unused by SD's penultimate-layer conditioning
    out = {}
    for key, ocl in openclip_key_map([_bare(k) for k in module.state_dict()]).items():
        if isinstance(ocl, tuple):
            fused = claims.take(OPENCLIP + ocl[0])
            out[key] = None if fused is None else fused.chunk(3, dim=0)[ocl[1]].clone()
        else:
            out[key] = claims.take(OPENCLIP + ocl)
    return out


def original_to_components_sd(sd: dict, modules: dict, info: dict, *, extract_ema: bool) -> dict[str, dict]:
    """Map an original state dict onto the diffusers names of `modules`; every checkpoint key must be claimed."""
    if extract_ema and not info["has_ema"]:
        raise LdmError("--extract-ema: the checkpoint has no EMA weights (no model_ema. keys)",
                       hint="convert without --extract-ema")
    claims = _Claims(sd)
    out = {
        "unet": _unet_sd(claims, modules["unet"], extract_ema),
        "vae": _vae_sd(claims, modules["vae"], info["vae_prefix"]),
        "text_encoder": (_clip_sd if info["family"] == "sd1" else _openclip_sd)(claims, modules["text_encoder"]),
    }
    for k in SCHEDULE_KEYS & set(sd):
        claims.drop(k)
    if claims.missing:
        raise LdmError(
            f"the checkpoint lacks {len(claims.missing)} tensors the config needs, e.g. {', '.join(claims.missing[:_SHOW])}",
            hint="the checkpoint does not match the config; pass the matching --config",
        )
    left = sorted(set(sd) - claims.used)
    if left:
        raise LdmError(
            f"{len(left)} checkpoint tensors match no part of the model, e.g. {', '.join(left[:_SHOW])}",
            hint="the checkpoint has layers the config lacks (a different architecture?); pass the matching --config",
        )
    return out


def _check_schedule(sd: dict, scheduler: dict) -> None:
    """Warn when the checkpoint's training betas differ from the scheduler config written next to it."""
    betas = sd.get("betas")
    if betas is None or scheduler.get("beta_schedule") != "scaled_linear":
        return
    n = int(scheduler.get("num_train_timesteps", 1000))
    want = torch.linspace(scheduler["beta_start"] ** 0.5, scheduler["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    if betas.shape != want.shape or (betas.double() - want).abs().max() > 1e-6:
        log.warning("the checkpoint was trained with other betas than the scheduler config says "
                    "(scaled_linear %s..%s); check the scheduler config", scheduler["beta_start"], scheduler["beta_end"])


def _pad_token(tok: Path) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            pad = json.loads((tok / name).read_text()).get("pad_token")
        except (OSError, ValueError, AttributeError):
            continue
        if pad is not None:
            return pad.get("content") if isinstance(pad, dict) else pad
    return None


def _check_tokenizer(tokenizer) -> Path:
    if tokenizer is None:
        raise LdmError(
            "converting a single-file checkpoint needs a tokenizer, which such files do not contain",
            hint="pass --tokenizer DIR: a folder with vocab.json and merges.txt, e.g. the tokenizer/ of a "
            "diffusers SD model (SD 2.x needs one whose pad token is '!')",
        )
    tok = Path(tokenizer)
    if not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()) and not (tok / "tokenizer.json").is_file():
        raise LdmError(f"{tok} is not a CLIP tokenizer folder (no vocab.json + merges.txt, no tokenizer.json)",
                       hint="pass the tokenizer/ folder of a diffusers SD model")
    return tok


def convert_checkpoint(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: str | dict | None = None,
    tokenizer: str | os.PathLike | None = None,
    extract_ema: bool = False,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    fp16: bool = False,
    force: bool = False,
    tokenizer_2: str | os.PathLike | None = None,
) -> Path:
    """Convert an original SD 1.x / 2.x single-file checkpoint into a diffusers folder at `out_dir` (atomically).

    `config`: None (detect SD 1.x -> preset "sd15", SD 2.x -> "sd21"), a preset name, or a preset-style dict
    {unet, vae, text_encoder, scheduler}. `prediction_type` overrides the detected/configured one.
    An existing `out_dir` is replaced only when ldm-deploy wrote it (or it is empty), or with `force`;
    never when it is, holds or lies inside the checkpoint or the tokenizer folder.
    """
    tok = _check_tokenizer(tokenizer)
    inputs = [path, tok, tokenizer_2]   # tokenizer_2 (SDXL): refused here, before the long load, not only at save
    check_out_dir(out_dir, MODEL_OUTPUT, inputs=inputs, force=force)   # before the (long) load
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise LdmError(f"unknown prediction type {prediction_type!r}", hint="use epsilon or v_prediction")
    sd, step = load_original_checkpoint(path, allow_pickle=allow_pickle)
    from training.convert_sdxl import convert_sdxl_checkpoint, is_sdxl_checkpoint

    if is_sdxl_checkpoint(sd):  # SDXL base / refiner: training/convert_sdxl.py (tokenizer_2 derived unless given)
        if extract_ema:
            raise LdmError("--extract-ema: SDXL checkpoints carry no LitEma copy", hint="convert without --extract-ema")
        return convert_sdxl_checkpoint(sd, path, out_dir, config=config, tokenizer=tok, tokenizer_2=tokenizer_2,
                                       prediction_type=prediction_type, fp16=fp16, force=force, inputs=inputs)
    info = detect(sd, step)
    if prediction_type:  # the user's word wins over the step-based guess (and sets SD 2.x's native size)
        info["prediction_type"] = prediction_type
    cfg = _resolve_config(config, info, sd)
    if prediction_type:
        cfg["scheduler"]["prediction_type"] = prediction_type
    _check_schedule(sd, cfg["scheduler"])
    want_pad, pad = (cfg.get("tokenizer") or {}).get("pad_token"), _pad_token(tok)
    if want_pad and pad and pad != want_pad:
        log.warning("the tokenizer pads with %r but this model expects %r (SD 1.x: <|endoftext|>, SD 2.x: !); "
                    "prompts will condition differently", pad, want_pad)
    log.info("converting %s: %s, %s%s", path, info["family"], cfg["scheduler"].get("prediction_type"),
             ", EMA weights" if extract_ema else "")
    if info["has_ema"] and not extract_ema:
        log.info("the checkpoint also holds EMA weights; --extract-ema converts those instead")
    modules = {part: build_for_loading(part, cfg[part]) for part in ("unet", "vae", "text_encoder")}
    mapped = original_to_components_sd(sd, modules, info, extract_ema=extract_ema)
    for part, module in modules.items():
        part_sd = text_encoder_state_dict(module, mapped[part]) if part == "text_encoder" else mapped[part]
        load_strict(module, part_sd, f"{part} of {path}")
    comps = Components(
        unet=modules["unet"], vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer_dir=tok,
        scheduler_config=cfg["scheduler"], unet_config=cfg["unet"], vae_config=cfg["vae"],
        text_encoder_config=cfg["text_encoder"],
    )
    return save_components(comps, out_dir, fp16=fp16, force=force, inputs=inputs)


# ----------------------------------------------------------------------------------------------------
# Diffusers -> original (the inverse map)


def to_original_state_dict(components: Components, *, text_encoder: str = "auto") -> dict[str, torch.Tensor]:
    """An original-layout state dict (what LDM's `LatentDiffusion` loads) from our/diffusers modules.

    `text_encoder`: "clip" (SD 1.x layout), "openclip" (SD 2.x layout) or "auto" (openclip when the
    text encoder uses exact GELU, as OpenCLIP ViT-H does). In the OpenCLIP layout the final block that SD
    skips (penultimate-layer conditioning) and `text_projection` are not part of the diffusers model;
    they are written as zeros so the file loads in LDM, and SD's conditioning does not depend on them.
    """
    c = components
    out: dict[str, torch.Tensor] = {}
    unet_sd = c.unet.state_dict()
    for dif, ldm in unet_key_map(c.unet.config, unet_sd).items():
        out[UNET + ldm] = unet_sd[dif].detach().clone()
    vae_sd = c.vae.state_dict()
    for dif, ldm in vae_key_map(len(c.vae.config.block_out_channels), vae_sd).items():
        t = vae_sd[dif].detach().clone()
        out["first_stage_model." + ldm] = t.reshape(*t.shape, 1, 1) if _is_vae_attn_linear(ldm) else t
    te = c.text_encoder
    te_sd = {_bare(k): v.detach().clone() for k, v in te.state_dict().items() if not k.endswith("position_ids")}
    if text_encoder == "auto":
        text_encoder = "openclip" if te.config.hidden_act == "gelu" else "clip"
    if text_encoder == "clip":
        out.update({CLIP + TEXT_MODEL_PREFIX + k: v for k, v in te_sd.items()})
    elif text_encoder == "openclip":
        fused: dict[str, list] = {}
        for key, ocl in openclip_key_map(te_sd).items():
            if isinstance(ocl, tuple):
                fused.setdefault(ocl[0], [None] * 3)[ocl[1]] = te_sd[key]
            else:
                out[OPENCLIP + ocl] = te_sd[key]
        out.update({OPENCLIP + k: torch.cat(qkv, dim=0) for k, qkv in fused.items()})
        n, width = te.config.num_hidden_layers, te.config.hidden_size
        for k in [k for k in out if k.startswith(f"{OPENCLIP}transformer.resblocks.{n - 1}.")]:
            out[k.replace(f".resblocks.{n - 1}.", f".resblocks.{n}.")] = torch.zeros_like(out[k])
        out[OPENCLIP + "text_projection"] = torch.zeros(width, width)
        out[OPENCLIP + "logit_scale"] = torch.tensor(4.6052)  # ln(1/0.07), open_clip's init
    else:
        raise LdmError(f"unknown text encoder layout {text_encoder!r}", hint="use clip, openclip or auto")
    return out
