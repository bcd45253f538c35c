"""A tiny SD-1-shaped diffusers model folder (random weights) and its ONNX artifact, for runtime tests.

`make_tiny_folder(dir)` writes what `StableDiffusionPipeline.save_pretrained` writes (no safety
checker), with the real CLIP tokenizer of tests/data and a CLIP text encoder of width 32; the VAE
has four levels so latents are H/8 x W/8 as in SD. `export_tiny_artifact(folder, out)` exports it
with ldm_deploy.export (fp32, CPU). Images are 32x32..64x64, batch 1..4.
"""
from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "clip_tokenizer"
UNET = dict(sample_size=4, block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=32, attention_head_dim=2,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
VAE = dict(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8, latent_channels=4,
           sample_size=32, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407, projection_dim=32)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
PROFILES = {"batch": {"min": 1, "opt": 1, "max": 4}, "height": {"min": 32, "opt": 32, "max": 64},
            "width": {"min": 32, "opt": 32, "max": 64}}


def make_tiny_folder(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET).eval()
    vae = AutoencoderKL(**VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**TEXT)).eval()
    # random init leaves tiny models nearly constant; widen the weights a bit so images carry structure
    with torch.no_grad():
        for m in (unet, vae):
            for p in m.parameters():
                if p.ndim > 1:
                    p.mul_(1.5)
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER))
    sched = PNDMScheduler(**SCHEDULER, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    shutil.copytree(TOKENIZER, folder / "tokenizer", dirs_exist_ok=True)  # keep the exact tokenizer files
    return folder


def export_config(precision: str = "fp32"):
    from ldm_deploy.export.config import ExportConfig, Range

    return ExportConfig(name="tiny-test", precision=precision,
                        **{k: Range(**v) for k, v in PROFILES.items()})


def export_tiny_artifact(folder: Path, out: Path, precision: str = "fp32") -> Path:
    """The artifact `ldm-deploy export` makes (ldm_deploy.export.exporter.export_model)."""
    from ldm_deploy.export.exporter import export_model

    return export_model(folder, out, export_config(precision)).path


# --- session fixtures shared by the runtime tests (import them into a test module to use them) -------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_folder, tmp_path_factory) -> Path:
    return export_tiny_artifact(tiny_folder, tmp_path_factory.mktemp("tiny") / "onnx")


def psnr(a, b) -> float:
    """PSNR in dB between two uint8 image batches (inf when equal)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
