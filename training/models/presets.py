"""Full-pipeline model configs: `preset(name)` -> the config dicts a diffusers model folder holds.

    p = preset("tiny")        # {"unet": ..., "vae": ..., "text_encoder": ..., "scheduler": ..., "tokenizer": ...}
    unet, vae, text_encoder = build_models(p)

- `unet` / `vae`: diffusers `config.json` dicts (`UNetConfig.from_dict` / `VAEConfig.from_dict` read them).
- `text_encoder`: a transformers `CLIPTextConfig` dict (we use `transformers.CLIPTextModel` as is).
- `scheduler`: a diffusers `scheduler_config.json` dict.
- `tokenizer`: `model_max_length`, `pad_token` ("<|endoftext|>" for SD 1.x, "!" = id 0 for SD 2.x) and
  `vocab_size` (49408 for the real CLIP vocabulary; the size to train for the tiny presets).

SD 2.x conditions on OpenCLIP-H's PENULTIMATE layer followed by the final LayerNorm. Diffusers (and we)
express that with no special code: the SD2 text encoder is a `CLIPTextModel` with 23 of OpenCLIP's 24
layers, so its `last_hidden_state` is the penultimate output after `final_layer_norm`. `tiny-sd2` keeps
that convention: its text encoder's config simply holds the layers that are used.

SDXL presets add `text_encoder_2` (a transformers `CLIPTextModelWithProjection` config: OpenCLIP bigG,
all 32 layers, whose penultimate hidden states and pooled projection SDXL uses) and `tokenizer_2`
(pads with "!"), and `model_index` (the pipeline flags diffusers' `model_index.json` holds). The
refiner has no first text encoder: `text_encoder` and `tokenizer` are None.

Presets:
  tiny      SD1-like, ~0.8M-parameter U-Net, 64-px images (8x8 latents); for CI and tutorials
  tiny-sd2  SD2-like: linear projections, per-level head counts, upcast attention, gelu CLIP, "!" padding,
            v-prediction DDIM
  sd15      runwayml/stable-diffusion-v1-5, exactly (reference §1.1, §1.5, §1.6, §3.1)
  sd21      stabilityai/stable-diffusion-2-1 (768-v), exactly (reference §1.2, §1.7, §3.1)
  sdxl          stabilityai/stable-diffusion-xl-base-1.0, exactly (the hub's unet/vae/text_encoder(_2)
                /scheduler config.json files)
  sdxl-refiner  stabilityai/stable-diffusion-xl-refiner-1.0, exactly
  tiny-sdxl, tiny-sdxl-refiner   the same layouts at test size (SDXL-like U-Nets with text_time
                micro-conditioning, no attention at the first level, deeper transformers below)
"""
from __future__ import annotations

import copy

from ldm_deploy.errors import UsageError

_SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,                    # head COUNT (diffusers' historic name)
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

_SD21_UNET = {
    **_SD15_UNET,
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [5, 10, 20, 20],      # head dim 64 everywhere
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}

_SD_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,                  # absent from the hub file; this is the class default it gets
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_CLIP_L = {                                     # openai/clip-vit-large-patch14 text tower
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "bos_token_id": 0,                          # legacy placeholder ids, as in SD's config; eos_token_id == 2
    "eos_token_id": 2,                          # makes transformers pool at argmax(ids) (= the EOT token)
    "pad_token_id": 1,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

_OPENCLIP_H = {                                 # OpenCLIP ViT-H/14 text tower as diffusers' SD2 text_encoder
    **_CLIP_L,
    "hidden_act": "gelu",                       # exact GELU (OpenCLIP), not quick_gelu
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,                    # 24 minus the last: SD2 uses the penultimate layer
    "projection_dim": 512,
}

_PNDM = {                                       # SD 1.5 scheduler_config.json (no timestep_spacing key)
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

_DDIM_V = {                                     # SD 2.1 (768-v) scheduler_config.json
    **_PNDM,
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "prediction_type": "v_prediction",
}

_SD1_TOKENIZER = {"model_max_length": 77, "pad_token": "<|endoftext|>", "vocab_size": 49408}
_SD2_TOKENIZER = {"model_max_length": 77, "pad_token": "!", "vocab_size": 49408}

_TINY_UNET = {
    **_SD15_UNET,
    "_diffusers_version": "0.30.0",
    "attention_head_dim": 2,                    # 2 heads of 16 / 32 channels
    "block_out_channels": [32, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 8,                           # 64-px images
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}

_TINY_VAE = {
    **_SD_VAE,
    "_diffusers_version": "0.30.0",
    "block_out_channels": [16, 32, 32, 32],     # 4 levels: f = 8 like SD
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}

_TINY_CLIP = {
    **_CLIP_L,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 32,
    "vocab_size": 1000,                         # a small BPE vocabulary trained on the captions
}

_PRESETS = {
    "tiny": {
        "unet": _TINY_UNET, "vae": _TINY_VAE, "text_encoder": _TINY_CLIP, "scheduler": _PNDM,
        "tokenizer": {**_SD1_TOKENIZER, "vocab_size": 1000},
    },
    "tiny-sd2": {
        "unet": {
            **_TINY_UNET,
            "attention_head_dim": [2, 4],       # per-level head counts (head dim 16 everywhere)
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "upcast_attention": True,
            "use_linear_projection": True,
        },
        "vae": _TINY_VAE,
        "text_encoder": {**_TINY_CLIP, "hidden_act": "gelu"},
        "scheduler": _DDIM_V,
        "tokenizer": {**_SD2_TOKENIZER, "vocab_size": 1000},
    },
    "sd15": {"unet": _SD15_UNET, "vae": _SD_VAE, "text_encoder": _CLIP_L, "scheduler": _PNDM,
             "tokenizer": _SD1_TOKENIZER},
    "sd21": {"unet": _SD21_UNET, "vae": {**_SD_VAE, "sample_size": 768}, "text_encoder": _OPENCLIP_H,
             "scheduler": _DDIM_V, "tokenizer": _SD2_TOKENIZER},
}

# --- SDXL (hub files of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0, key for key) ----------
_SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],          # head COUNTS: head dim 64 everywhere
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,                # CLIP-L (768) + OpenCLIP bigG (1280), concatenated
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,   # 1280 pooled + 6 time_ids x 256
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],  # level 0 has no attention; the mid block uses 10
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

_SDXL_REFINER_UNET = {
    **_SDXL_UNET,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,                # OpenCLIP bigG only
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560,   # 1280 pooled + 5 time_ids (size, crop, aesthetic score) x 256
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}

_SDXL_VAE = {
    **_SD_VAE,
    "_diffusers_version": "0.20.0.dev0",
    "force_upcast": True,                       # SDXL's VAE overflows in fp16: decode in fp32
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}

_OPENCLIP_BIGG = {                              # text_encoder_2: OpenCLIP ViT-bigG/14 text tower + projection
    **_CLIP_L,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

_SDXL_EULER = {                                 # scheduler/scheduler_config.json of both SDXL repositories
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

_SDXL_BASE_INDEX = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}
_SDXL_REFINER_INDEX = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "force_zeros_for_empty_prompt": False,
                       "requires_aesthetics_score": True}

_TINY_SDXL_UNET = {
    **_SDXL_UNET,
    "_diffusers_version": "0.30.0",
    "addition_time_embed_dim": 8,
    "attention_head_dim": [2, 4],
    "block_out_channels": [32, 64],
    "cross_attention_dim": 64,                  # 32 + 32
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "sample_size": 8,
    "transformer_layers_per_block": [1, 2],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}

_TINY_SDXL_REFINER_UNET = {
    **_TINY_SDXL_UNET,
    "attention_head_dim": [2, 4, 4],
    "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 32 + 5 * 8,
    "transformer_layers_per_block": 2,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}

_TINY_BIGG = {**_TINY_CLIP, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
              "num_hidden_layers": 3}

_PRESETS.update({
    "sdxl": {"unet": _SDXL_UNET, "vae": _SDXL_VAE, "text_encoder": _CLIP_L, "text_encoder_2": _OPENCLIP_BIGG,
             "scheduler": _SDXL_EULER, "tokenizer": _SD1_TOKENIZER, "tokenizer_2": _SD2_TOKENIZER,
             "model_index": _SDXL_BASE_INDEX},
    "sdxl-refiner": {"unet": _SDXL_REFINER_UNET, "vae": _SDXL_VAE, "text_encoder": None,
                     "text_encoder_2": _OPENCLIP_BIGG, "scheduler": _SDXL_EULER, "tokenizer": None,
                     "tokenizer_2": _SD2_TOKENIZER, "model_index": _SDXL_REFINER_INDEX},
    "tiny-sdxl": {"unet": _TINY_SDXL_UNET, "vae": {**_TINY_VAE, "scaling_factor": 0.13025},
                  "text_encoder": _TINY_CLIP, "text_encoder_2": _TINY_BIGG, "scheduler": _SDXL_EULER,
                  "tokenizer": {**_SD1_TOKENIZER, "vocab_size": 1000},
                  "tokenizer_2": {**_SD2_TOKENIZER, "vocab_size": 1000}, "model_index": _SDXL_BASE_INDEX},
    "tiny-sdxl-refiner": {"unet": _TINY_SDXL_REFINER_UNET, "vae": {**_TINY_VAE, "scaling_factor": 0.13025},
                          "text_encoder": None, "text_encoder_2": _TINY_BIGG, "scheduler": _SDXL_EULER,
                          "tokenizer": None, "tokenizer_2": {**_SD2_TOKENIZER, "vocab_size": 1000},
                          "model_index": _SDXL_REFINER_INDEX},
})

PRESETS = tuple(_PRESETS)


def preset(name: str) -> dict:
    """A fresh (deep-copied) dict of the named preset's configs; see the module docstring."""
    if name not in _PRESETS:
        raise UsageError(f"unknown model preset {name!r}", hint=f"choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(_PRESETS[name])


def build_models(preset_dict: dict, device="cpu", seed: int = 0):
    """(unet, vae, text_encoder) built from a preset-style dict with seeded random weights.

    `device="meta"` builds them without allocating memory (for parameter counts and FLOP counting).
    The global torch RNG is left as it was. SDXL presets: see `build_all` (text_encoder_2; the refiner's
    text_encoder is None).
    """
    built = build_all(preset_dict, device, seed)
    return built["unet"], built["vae"], built["text_encoder"]


def build_all(preset_dict: dict, device="cpu", seed: int = 0) -> dict:
    """{"unet", "vae", "text_encoder"[, "text_encoder_2"]} with seeded random weights (None where the preset has none)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from training.models.config import UNetConfig, VAEConfig
    from training.models.unet import UNet2DConditionModel
    from training.models.vae import AutoencoderKL

    def text_config(d):
        return CLIPTextConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})

    unet_cfg = UNetConfig.from_dict(preset_dict["unet"])
    vae_cfg = VAEConfig.from_dict(preset_dict["vae"])
    out = {"text_encoder": None}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        out["unet"] = UNet2DConditionModel(unet_cfg)
        torch.manual_seed(seed + 1)
        out["vae"] = AutoencoderKL(vae_cfg)
        if preset_dict.get("text_encoder") is not None:
            torch.manual_seed(seed + 2)
            out["text_encoder"] = CLIPTextModel(text_config(preset_dict["text_encoder"]))
        if preset_dict.get("text_encoder_2") is not None:
            torch.manual_seed(seed + 3)
            out["text_encoder_2"] = CLIPTextModelWithProjection(text_config(preset_dict["text_encoder_2"]))
    return out
