"""Tiny model folders (SD1-like `tiny`, SD2-like `tiny-sd2`) with seeded random weights, made once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "clip_tokenizer"


def make_model_folder(preset_name: str, folder: Path) -> Path:
    from training.checkpoint import Components, save_components
    from training.models.presets import build_models, preset

    p = preset(preset_name)
    unet, vae, text_encoder = build_models(p, seed=0)
    return save_components(Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer_dir=TOKENIZER,
                                      scheduler_config=p["scheduler"]), folder)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_model_folder("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_sd2_folder(tmp_path_factory) -> Path:
    return make_model_folder("tiny-sd2", tmp_path_factory.mktemp("models") / "tiny-sd2")
