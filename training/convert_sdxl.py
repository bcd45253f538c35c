"""Original single-file SDXL checkpoints (Stability's `sgm` layout) <-> diffusers SDXL folders.

An SDXL checkpoint (`sd_xl_base_1.0.safetensors`, `sd_xl_refiner_1.0.safetensors`, fine-tunes of them)
is one flat state dict:

    model.diffusion_model.              U-Net: input_blocks / middle_block / output_blocks as in SD 1.x/2.x,
                                        plus label_emb.0.{0,2} = diffusers' add_embedding.linear_{1,2}
    first_stage_model.                  VAE (the SD layout)
    conditioner.embedders.0.transformer.  base: CLIP ViT-L/14, HF CLIPTextModel keys (text_model....)
    conditioner.embedders.1.model.        base: OpenCLIP ViT-bigG/14 (open_clip keys, all 32 blocks,
                                          `text_projection` [1280, 1280] used as x @ P)
    conditioner.embedders.0.model.        refiner: the same OpenCLIP bigG, its only text encoder

The bigG tower keeps every block: SDXL conditions on its penultimate hidden states and pools the final
layer (through `text_projection`), so nothing is dropped, unlike SD 2.x. Diffusers stores the projection
as a Linear weight, i.e. transposed. The U-Net and VAE maps are training.convert_original's (derived from
the config), so this module only adds the SDXL prefixes and the micro-conditioning embedding.
A checkpoint key that no rule claims is an error.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ldm_deploy.errors import LdmError
from training.checkpoint import (
    Components, TEXT_MODEL_PREFIX, build_for_loading, load_strict, save_components, text_encoder_state_dict,
)

log = logging.getLogger(__name__)

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CONDITIONER = "conditioner.embedders."
BASE_CLIP = "conditioner.embedders.0.transformer."     # + HF CLIPTextModel keys
BASE_OPENCLIP = "conditioner.embedders.1.model."       # + open_clip keys
REFINER_OPENCLIP = "conditioner.embedders.0.model."
ADD_EMBEDDING = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
# Not weights of the diffusers modules: CLIP's contrastive temperature, buffers recomputed on load, the
# sampler's sigma table and LatentDiffusion's schedule buffers (when a trainer saved them).
_NON_WEIGHTS = ("logit_scale", "attn_mask", "embeddings.position_ids")
_SCHEDULE = ("denoiser.sigmas", "denoiser.log_sigmas", "betas", "alphas_cumprod", "alphas_cumprod_prev",
             "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
             "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
             "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
_SHOW = 8


def is_sdxl_checkpoint(sd: dict) -> bool:
    """SDXL checkpoints keep their text encoders under `conditioner.embedders.` (SD 1.x/2.x: cond_stage_model.)."""
    return any(k.startswith(CONDITIONER) for k in sd)


def detect_sdxl(sd: dict) -> str:
    """"sdxl" (base: CLIP-L + bigG) or "sdxl-refiner" (bigG only), from where the OpenCLIP tower sits."""
    if any(k.startswith(BASE_OPENCLIP) for k in sd) and any(k.startswith(BASE_CLIP) for k in sd):
        return "sdxl"
    if any(k.startswith(REFINER_OPENCLIP) for k in sd):
        return "sdxl-refiner"
    raise LdmError("an SDXL-style checkpoint (conditioner.embedders.) without the SDXL text encoders",
                   hint="expected conditioner.embedders.0.transformer. + .1.model. (base) or .0.model. (refiner)")


# ----------------------------------------------------------------------------------------------------
# Key maps: diffusers name -> original name (full keys)


def unet_key_map(unet) -> dict[str, str]:
    """Our/diffusers SDXL U-Net key -> original key (with `model.diffusion_model.`)."""
    from training.convert_original import unet_key_map as sd_unet_key_map

    keys = list(unet.state_dict())
    add = [k for k in keys if k.startswith("add_embedding.")]
    out = {k: UNET + v for k, v in sd_unet_key_map(unet.config, [k for k in keys if k not in add]).items()}
    for k in add:
        prefix = next(p for p in ADD_EMBEDDING if k.startswith(p))
        out[k] = UNET + ADD_EMBEDDING[prefix] + k[len(prefix):]
    return out


def vae_key_map(vae) -> dict[str, str]:
    from training.convert_original import vae_key_map as sd_vae_key_map

    return {k: VAE + v for k, v in sd_vae_key_map(len(vae.config.block_out_channels), vae.state_dict()).items()}


def _bare(key: str) -> str:
    return key[len(TEXT_MODEL_PREFIX):] if key.startswith(TEXT_MODEL_PREFIX) else key


def clip_key_map(text_encoder) -> dict[str, str]:
    """bare CLIPTextModel key -> original key (HF names under conditioner.embedders.0.transformer.text_model.)."""
    return {_bare(k): BASE_CLIP + TEXT_MODEL_PREFIX + _bare(k) for k in text_encoder.state_dict()
            if not k.endswith("position_ids")}


def openclip_key_map(text_encoder_2, prefix: str) -> dict[str, str | tuple[str, int]]:
    """bare CLIPTextModelWithProjection key -> original key, or (in_proj key, q/k/v index); text_projection
    maps to the transposed `text_projection` parameter."""
    from training.convert_original import openclip_key_map as sd_openclip_key_map

    keys = [_bare(k) for k in text_encoder_2.state_dict() if not k.endswith("position_ids")]
    tower = [k for k in keys if k != "text_projection.weight"]
    out = {k: ((prefix + v[0], v[1]) if isinstance(v, tuple) else prefix + v)
           for k, v in sd_openclip_key_map(tower).items()}
    out["text_projection.weight"] = prefix + "text_projection"
    return out


# ----------------------------------------------------------------------------------------------------
# Original -> diffusers


class _Claims:
    def __init__(self, sd: dict):
        self.sd, self.used, self.missing = sd, set(), []

    def take(self, key: str):
        if key not in self.sd:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.sd[key]


def original_to_components_sd(sd: dict, modules: dict) -> dict[str, dict]:
    """Map an SDXL original state dict onto the diffusers names of `modules` (unet, vae, [text_encoder],
    text_encoder_2); every checkpoint key must be claimed."""
    from training.convert_original import _is_vae_attn_linear

    claims = _Claims(sd)
    out = {"unet": {k: claims.take(v) for k, v in unet_key_map(modules["unet"]).items()}, "vae": {}}
    for k, v in vae_key_map(modules["vae"]).items():
        t = claims.take(v)
        if t is not None and _is_vae_attn_linear(v) and t.ndim > 2:
            t = t.reshape(t.shape[0], t.shape[1])           # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
        out["vae"][k] = t
    if modules.get("text_encoder") is not None:
        out["text_encoder"] = {k: claims.take(v) for k, v in clip_key_map(modules["text_encoder"]).items()}
    prefix = BASE_OPENCLIP if modules.get("text_encoder") is not None else REFINER_OPENCLIP
    te2 = {}
    for k, v in openclip_key_map(modules["text_encoder_2"], prefix).items():
        if isinstance(v, tuple):
            fused = claims.take(v[0])
            te2[k] = None if fused is None else fused.chunk(3, dim=0)[v[1]].clone()
        elif k == "text_projection.weight":
            proj = claims.take(v)
            te2[k] = None if proj is None else proj.T.contiguous()
        else:
            te2[k] = claims.take(v)
    out["text_encoder_2"] = te2
    for k in sd:
        if k in _SCHEDULE or (k.startswith(CONDITIONER) and k.endswith(_NON_WEIGHTS)):
            claims.used.add(k)
    if claims.missing:
        raise LdmError(
            f"the checkpoint lacks {len(claims.missing)} tensors the config needs, e.g. "
            f"{', '.join(claims.missing[:_SHOW])}",
            hint="the checkpoint does not match the SDXL config; pass the matching --config")
    left = sorted(set(sd) - claims.used)
    if left:
        raise LdmError(
            f"{len(left)} checkpoint tensors match no part of the SDXL model, e.g. {', '.join(left[:_SHOW])}",
            hint="the checkpoint has layers the config lacks (EMA copies? another architecture?); "
            "pass the matching --config")
    return out


def sdxl_tokenizer_2(tokenizer: Path, work: Path) -> Path:
    """tokenizer_2 derived from a CLIP tokenizer folder: the same BPE files, padding with "!" (id 0), as
    SDXL's OpenCLIP tokenizer does."""
    from ldm_deploy.runtime.tokenizer import write_tokenizer_configs

    dst = work / "tokenizer_2"
    shutil.copytree(tokenizer, dst)
    (dst / "tokenizer.json").unlink(missing_ok=True)     # its padding/special config would override ours
    if not ((dst / "vocab.json").is_file() and (dst / "merges.txt").is_file()):
        raise LdmError(f"{tokenizer} has no vocab.json + merges.txt to derive SDXL's tokenizer_2 from",
                       hint="pass --tokenizer-2 DIR (the tokenizer_2/ of a diffusers SDXL model)")
    write_tokenizer_configs(dst, pad="zero")
    return dst


def convert_sdxl_checkpoint(
    sd: dict, path: str | os.PathLike, out_dir: str | os.PathLike, *, config: str | dict | None,
    tokenizer: Path | None, tokenizer_2: str | os.PathLike | None = None, prediction_type: str | None = None,
    fp16: bool = False, force: bool = False, inputs=(),
) -> Path:
    """Convert an already-read SDXL original state dict `sd` into a diffusers SDXL folder (atomically).

    `config`: None (detect base / refiner -> preset "sdxl" / "sdxl-refiner"), a preset name, or a preset-style
    dict. `tokenizer`: the CLIP tokenizer folder (the base's `tokenizer/`); `tokenizer_2`: the OpenCLIP one
    (pads with "!"), derived from `tokenizer` when not given.
    """
    from training.models.presets import preset

    kind = detect_sdxl(sd)
    cfg = preset(config or kind) if not isinstance(config, dict) else config
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    if (cfg.get("text_encoder") is None) != (kind == "sdxl-refiner"):
        raise LdmError(f"the checkpoint is an {kind} checkpoint but the config is not",
                       hint=f"pass --config {kind} (or leave --config out)")
    if prediction_type:
        cfg["scheduler"]["prediction_type"] = prediction_type
    modules = {part: build_for_loading(part, cfg[part]) for part in ("unet", "vae", "text_encoder_2")}
    if cfg.get("text_encoder") is not None:
        modules["text_encoder"] = build_for_loading("text_encoder", cfg["text_encoder"])
    mapped = original_to_components_sd(sd, modules)
    for part, module in modules.items():
        part_sd = text_encoder_state_dict(module, mapped[part]) if part.startswith("text_encoder") else mapped[part]
        load_strict(module, part_sd, f"{part} of {path}")
    log.info("converting %s: %s", path, kind)
    with tempfile.TemporaryDirectory() as work:
        tok2 = Path(tokenizer_2) if tokenizer_2 is not None else sdxl_tokenizer_2(tokenizer, Path(work))
        comps = Components(
            unet=modules["unet"], vae=modules["vae"], text_encoder=modules.get("text_encoder"),
            text_encoder_2=modules["text_encoder_2"], tokenizer_dir=tokenizer if "text_encoder" in modules else None,
            tokenizer_2_dir=tok2, scheduler_config=cfg["scheduler"], model_index=dict(cfg.get("model_index") or {}),
            unet_config=cfg["unet"], vae_config=cfg["vae"], text_encoder_config=cfg.get("text_encoder"),
            text_encoder_2_config=cfg["text_encoder_2"])
        return save_components(comps, out_dir, fp16=fp16, force=force, inputs=inputs)


# ----------------------------------------------------------------------------------------------------
# Diffusers -> original (the inverse map)


def to_original_state_dict(components: Components) -> dict[str, torch.Tensor]:
    """An original SDXL state dict (what sgm's DiffusionEngine loads) from our/diffusers SDXL modules."""
    from training.convert_original import _is_vae_attn_linear

    c = components
    if c.text_encoder_2 is None:
        raise LdmError("not an SDXL model: components.text_encoder_2 is not loaded")
    out: dict[str, torch.Tensor] = {}
    unet_sd = c.unet.state_dict()
    for k, v in unet_key_map(c.unet).items():
        out[v] = unet_sd[k].detach().clone()
    vae_sd = c.vae.state_dict()
    for k, v in vae_key_map(c.vae).items():
        t = vae_sd[k].detach().clone()
        out[v] = t.reshape(*t.shape, 1, 1) if _is_vae_attn_linear(v) else t
    if c.text_encoder is not None:
        te = {_bare(k): v for k, v in c.text_encoder.state_dict().items()}
        out.update({v: te[k].detach().clone() for k, v in clip_key_map(c.text_encoder).items()})
    prefix = BASE_OPENCLIP if c.text_encoder is not None else REFINER_OPENCLIP
    te2 = {_bare(k): v.detach().clone() for k, v in c.text_encoder_2.state_dict().items()}
    fused: dict[str, list] = {}
    for k, v in openclip_key_map(c.text_encoder_2, prefix).items():
        if isinstance(v, tuple):
            fused.setdefault(v[0], [None] * 3)[v[1]] = te2[k]
        elif k == "text_projection.weight":
            out[v] = te2[k].T.contiguous()
        else:
            out[v] = te2[k]
    out.update({k: torch.cat(qkv, dim=0) for k, qkv in fused.items()})
    return out
