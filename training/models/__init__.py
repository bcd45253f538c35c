"""The networks: SD 1.x/2.x U-Net and VAE with diffusers parameter names; CLIP comes from transformers.

    from training.models import UNet2DConditionModel, UNetConfig, AutoencoderKL, VAEConfig, preset, build_models
"""
from training.models.attention import attention_backend
from training.models.config import UNetConfig, VAEConfig
from training.models.presets import PRESETS, build_models, preset
from training.models.unet import UNet2DConditionModel
from training.models.vae import AutoencoderKL, DiagonalGaussian

__all__ = [
    "PRESETS", "AutoencoderKL", "DiagonalGaussian", "UNet2DConditionModel", "UNetConfig", "VAEConfig",
    "attention_backend", "build_models", "preset",
]
