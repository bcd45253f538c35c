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
from training.checkpoint import (
    Components, TEXT_MODEL_PREFIX, build_for_loading, load_pickle_file, load_strict,
    load_state_dict_file, save_components, text_encoder_state_dict,
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


def _resolve_config(config, info: dict, sd: dict) -> dict:
    from training.models.presets import preset

    auto = config is None
    if config is None:
        config = "sd15" if info["family"] == "sd1" else "sd21"
    cfg = preset(config) if isinstance(config, str) else config
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    if auto:  # the reference's detection rules; an explicit config is taken as given
        cfg["unet"]["upcast_attention"] = info["upcast_attention"]
        cfg["scheduler"]["prediction_type"] = info["prediction_type"]
        conv_in = sd.get(UNET + "input_blocks.0.0.weight")
        if conv_in is not None and conv_in.ndim == 4:
            cfg["unet"]["in_channels"] = int(conv_in.shape[1])  # 9 for inpainting U-Nets
    elif info["global_step"] is not None and info["family"] == "sd2":
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
    if blocks != set(range(n + 1)):
        raise LdmError(
            f"the OpenCLIP text encoder has {len(blocks)} blocks but the config's text encoder has "
            f"num_hidden_layers={n}; SD 2.x uses the penultimate block, so the checkpoint must have {n + 1}",
            hint="pass the matching --config",
        )
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
    tokenizer_2: str | os.PathLike | None = None,
) -> Path:
    """Convert an original SD 1.x / 2.x single-file checkpoint into a diffusers folder at `out_dir` (atomically).

    `config`: None (detect SD 1.x -> preset "sd15", SD 2.x -> "sd21"), a preset name, or a preset-style dict
    {unet, vae, text_encoder, scheduler}. `prediction_type` overrides the detected/configured one.
    """
    tok = _check_tokenizer(tokenizer)
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise LdmError(f"unknown prediction type {prediction_type!r}", hint="use epsilon or v_prediction")
    sd, step = load_original_checkpoint(path, allow_pickle=allow_pickle)
    from training.convert_sdxl import convert_sdxl_checkpoint, is_sdxl_checkpoint

    if is_sdxl_checkpoint(sd):  # SDXL base / refiner: training/convert_sdxl.py (tokenizer_2 derived unless given)
        if extract_ema:
            raise LdmError("--extract-ema: SDXL checkpoints carry no LitEma copy", hint="convert without --extract-ema")
        return convert_sdxl_checkpoint(sd, path, out_dir, config=config, tokenizer=tok, tokenizer_2=tokenizer_2,
                                       prediction_type=prediction_type, fp16=fp16)
    info = detect(sd, step)
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
    return save_components(comps, out_dir, fp16=fp16)


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
