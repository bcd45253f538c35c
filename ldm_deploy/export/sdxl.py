"""SDXL in the export: the extra graphs and inputs, and the rules that differ from SD 1.x/2.x.

    text_encoder    input_ids int32 (B, 77) -> penultimate_hidden_state (B, 77, 768)     [base only]
    text_encoder_2  input_ids int32 (B, 77) -> penultimate_hidden_state (B, 77, 1280),
                                               text_embeds (B, 1280)   (pooled final layer @ projection)
    unet            sample (2B, 4, h, w), timestep (2B,), encoder_hidden_states (2B, 77, 2048 | 1280),
                    text_embeds (2B, 1280), time_ids f32 (2B, 6 | 5)  -> noise_pred (2B, 4, h, w)

SDXL conditions on the PENULTIMATE hidden states of both encoders, without the final LayerNorm
(diffusers' `hidden_states[-2]`), so the graphs return exactly that; the pooled embedding is
`CLIPTextModelWithProjection.text_embeds`. `time_ids` are the micro-conditioning numbers (original size,
crop top-left, target size; the refiner: original size, crop, aesthetic score) and stay fp32 in fp16
graphs, like the timestep. The VAE decoder stays fp32 unless the config says the folder's VAE is
fp16-safe (`vae_fp16_safe: true`, e.g. after putting madebyollin/sdxl-vae-fp16-fix in vae/): SDXL's
own VAE overflows in fp16 (diffusers upcasts it: `force_upcast`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ldm_deploy.artifact import SDXL_COMPONENTS
from ldm_deploy.errors import UsageError

HIDDEN = "penultimate_hidden_state"
POOLED = "text_embeds"
VAE_FP32_REASON = ("SDXL's VAE overflows in fp16 (NaN/black images); the decoder and encoder are exported in fp32 "
                   "unless the export config sets vae_fp16_safe: true for an fp16-safe VAE (e.g. sdxl-vae-fp16-fix)")


def configs_are_sdxl(configs: dict) -> bool:
    return (configs.get("unet") or {}).get("addition_embed_type") == "text_time" or "text_encoder_2" in configs


def folder_is_sdxl(folder: Path) -> bool:
    """A diffusers SDXL folder: model_index.json names a text_encoder_2, or the folder has one."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get("text_encoder_2") if isinstance(index, dict) else None
    return bool(isinstance(entry, list) and any(entry)) or (Path(folder) / "text_encoder_2").is_dir()


def resolve_config(config, folder: Path):
    """The export config for `folder`: SDXL folders export their text encoders (the refiner has only
    text_encoder_2) when the components are the default ones; an fp16 VAE needs `vae_fp16_safe`."""
    from ldm_deploy.export.config import COMPONENTS

    if not folder_is_sdxl(folder):
        return config
    if config.vae_precision == "fp16" and not config.vae_fp16_safe:
        raise UsageError("vae_precision fp16 on an SDXL model: SDXL's VAE overflows in fp16",
                         hint="keep the VAE in fp32 (the default), or put an fp16-safe VAE (sdxl-vae-fp16-fix) in "
                              "vae/ and set `vae_fp16_safe: true` in the export config")
    if tuple(config.components) == COMPONENTS:
        present = {p.name for p in Path(folder).iterdir()}
        parts = {"vae_decoder": "vae", "vae_encoder": "vae"}
        return config.replace(components=tuple(c for c in SDXL_COMPONENTS if parts.get(c, c) in present))
    return config


def time_ids_count(configs: dict) -> int:
    """6 for the base (size, crop, target size), 5 for the refiner (size, crop, aesthetic score)."""
    unet = configs["unet"]
    pooled = pooled_dim(configs)
    return (int(unet["projection_class_embeddings_input_dim"]) - pooled) // int(unet["addition_time_embed_dim"])


def pooled_dim(configs: dict) -> int:
    te2 = configs.get("text_encoder_2")
    if te2 is not None:
        return int(te2.get("projection_dim", te2["hidden_size"]))
    return 1280


# --- the modules that get traced ----------------------------------------------------------------
class TextEncoderXLGraph(torch.nn.Module):
    """Penultimate hidden states (+ the pooled projection for text_encoder_2), as SDXL pipelines take them."""

    def __init__(self, text_encoder, pooled: bool):
        super().__init__()
        self.text_encoder, self.pooled = text_encoder, pooled

    def forward(self, input_ids):                                       # (B, 77) int32
        out = self.text_encoder(input_ids=input_ids.long(), output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[-2]                                  # (B, 77, D), no final LayerNorm
        if self.pooled:
            return hidden, out.text_embeds                              # (B, P)
        return hidden


class UNetXLGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids)


# --- IO contracts ----------------------------------------------------------------------------------
def text_encoder_outputs(component: str, source) -> list:
    from ldm_deploy.export.onnx_export import TEXT_LENGTH, IOSpec

    cfg = source.configs[component]
    outs = [IOSpec(HIDDEN, "float32", ["batch", TEXT_LENGTH, int(cfg["hidden_size"])])]
    if component == "text_encoder_2":
        outs.append(IOSpec(POOLED, "float32", ["batch", int(cfg.get("projection_dim", cfg["hidden_size"]))]))
    return outs


def unet_extra_inputs(source, batch_sizes: dict) -> list:
    """text_embeds (2B, P) and time_ids (2B, n) with the U-Net's batch profile."""
    from ldm_deploy.export.onnx_export import IOSpec

    p, n = pooled_dim(source.configs), time_ids_count(source.configs)
    return [IOSpec(POOLED, "float32", ["unet_batch", p], {k: (b, p) for k, b in batch_sizes.items()}),
            IOSpec("time_ids", "float32", ["unet_batch", n], {k: (b, n) for k, b in batch_sizes.items()})]


def graph_module(component: str, source):
    if component in ("text_encoder", "text_encoder_2"):
        return TextEncoderXLGraph(getattr(source, component), pooled=component == "text_encoder_2").eval()
    return UNetXLGraph(source.unet).eval()


def manifest_block(source, config, tokenizer_2: dict | None) -> dict:
    """The manifest's `sdxl` entry: what the runtime needs beyond the SD fields."""
    index = source.model_index or {}
    return {
        "text_encoders": [c for c in ("text_encoder", "text_encoder_2") if c in source.configs],
        "tokenizer_2": tokenizer_2,
        "pooled_dim": pooled_dim(source.configs),
        "time_ids": time_ids_count(source.configs),
        "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False)),
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
        "vae_precision_reason": None if config.vae_fp16_safe else VAE_FP32_REASON,
    }
