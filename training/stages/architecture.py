"""The model a run trains: architecture dicts from the preset and the config, fresh modules built from them."""
from __future__ import annotations

import dataclasses

from torch import nn

from training.config import TrainConfig

SD_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
                "timestep_spacing": "leading", "trained_betas": None}


def model_dicts(cfg: TrainConfig) -> dict:
    """The architecture dicts: the preset's parts (if any) with the config's dicts merged over them."""
    base = {"unet": {}, "vae": {}, "text_encoder": {}, "scheduler": dict(SD_SCHEDULER)}
    if cfg.model.preset:
        from training.models.presets import preset

        p = preset(cfg.model.preset)
        for part in ("unet", "vae", "text_encoder", "scheduler"):
            base[part].update(p.get(part) or {})
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        base[part].update(getattr(cfg.model, part) or {})
    return base


def build(part: str, config: dict) -> nn.Module:
    """A fresh module from a diffusers/transformers config dict (training.checkpoint's builders)."""
    from training.checkpoint import BUILDERS

    return BUILDERS[part](config)


def with_scaling_factor(vae: nn.Module, value: float) -> nn.Module:
    """Set vae.config.scaling_factor (a frozen dataclass in training.models)."""
    vae.config = dataclasses.replace(vae.config, scaling_factor=float(value))
    return vae


def text_encoder_config(cfg: TrainConfig, tokenizer) -> dict:
    """The text encoder's config with the vocabulary and special ids of the tokenizer."""
    d = dict(model_dicts(cfg)["text_encoder"])
    d.update(vocab_size=tokenizer.vocab_size, max_position_embeddings=tokenizer.max_length,
             bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return d
