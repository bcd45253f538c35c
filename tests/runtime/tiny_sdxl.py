"""Tiny SDXL folders (random weights) written by diffusers itself, base and refiner layouts.

`make_tiny_sdxl(dir)` is what `StableDiffusionXLPipeline.save_pretrained` writes: two text encoders
(CLIP-L-like `CLIPTextModel` and bigG-like `CLIPTextModelWithProjection`, width 32 each, so the
U-Net cross-attends to 64 channels), `tokenizer/` (pads with <|endoftext|>) and `tokenizer_2/`
(pads with "!"), an SDXL-shaped U-Net (no attention at the first level, `text_time` micro-
conditioning), a 4-level VAE with SDXL's scaling factor. `make_tiny_sdxl_refiner(dir)` is the
`StableDiffusionXLImg2ImgPipeline` refiner layout: text_encoder_2 only, aesthetic-score conditioning.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.runtime.tiny_model import TOKENIZER, VAE

TIME_DIM = 8                      # addition_time_embed_dim
POOLED = 32                       # text_encoder_2 projection_dim
TEXT_1 = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
              pad_token_id=1, projection_dim=32)          # SDXL's configs keep the legacy ids (argmax pooling)
TEXT_2 = dict(TEXT_1, hidden_act="gelu", num_hidden_layers=3, projection_dim=POOLED)
BASE_UNET = dict(
    sample_size=4, block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=64,
    attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2], use_linear_projection=True,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM)
REFINER_UNET = dict(
    BASE_UNET, block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], transformer_layers_per_block=2,
    cross_attention_dim=32, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM)
EULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)


def _widen(*modules) -> None:
    """Random init leaves tiny models nearly constant; widen the weights so images carry structure."""
    import torch

    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if p.ndim > 1:
                    p.mul_(1.5)


def _parts(seed: int, unet_cfg: dict, with_text_1: bool):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg).eval()
    vae = AutoencoderKL(**VAE, scaling_factor=0.13025, force_upcast=True).eval()
    _widen(unet, vae)
    parts = {"unet": unet, "vae": vae, "scheduler": EulerDiscreteScheduler(**EULER),
             "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)).eval(),
             "tokenizer_2": CLIPTokenizer.from_pretrained(str(TOKENIZER), pad_token="!")}
    if with_text_1:
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**TEXT_1)).eval()
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(str(TOKENIZER))
    return parts


def make_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**_parts(seed, BASE_UNET, True), add_watermarker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _hub_tokenizers(folder, ("tokenizer", "tokenizer_2"))
    return folder


def _hub_tokenizers(folder: Path, names) -> None:
    """The hub's SDXL tokenizer folders: vocab.json + merges.txt, tokenizer_2 padding with "!" (transformers 5
    saves tokenizer.json only; the runtime tokenizer reads the BPE files)."""
    from ldm_deploy.runtime.tokenizer import write_tokenizer_configs

    for name in names:
        shutil.copytree(TOKENIZER, folder / name, dirs_exist_ok=True)
        if name == "tokenizer_2":
            (folder / name / "tokenizer.json").unlink(missing_ok=True)
            write_tokenizer_configs(folder / name, pad="zero")


def make_tiny_sdxl_refiner(folder: Path, seed: int = 1) -> Path:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(**_parts(seed, REFINER_UNET, False), text_encoder=None, tokenizer=None,
                                            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                            add_watermarker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _hub_tokenizers(folder, ("tokenizer_2",))
    return folder


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory):
    """(base, refiner): tiny SDXL folders saved by diffusers, made once per test module."""
    root = tmp_path_factory.mktemp("sdxl")
    return make_tiny_sdxl(root / "base"), make_tiny_sdxl_refiner(root / "refiner")
