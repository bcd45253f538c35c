"""A model folder exactly as `StableDiffusionPipeline.save_pretrained` (diffusers 0.42 + transformers 5)
writes it -- tokenizer.json only, no vocab.json / merges.txt -- exported with no --config and generated
from with no --height/--width: the profile and the default size come from the model (U-Net sample_size x
VAE scale factor), and the images equal diffusers' own on the same latents."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from ldm_deploy.cli import main as cli
from ldm_deploy.export.config import ExportConfig, Range, default_config, load_config, native_size
from tests.runtime.tiny_model import SCHEDULER, TEXT, TOKENIZER, UNET, VAE, psnr

torch = pytest.importorskip("torch")

# truncation (long), the SD 2.x "!" pad token inside a prompt, unicode
PROMPTS = ["a red circle! on a blue square " * 6, "Café 東京 🚀"]
NATIVE = UNET["sample_size"] * 2 ** (len(VAE["block_out_channels"]) - 1)  # 4 * 8 = 32


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    """A tiny SD 2.x-style pipeline (pads with "!") built with diffusers itself and saved by it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**UNET).eval(), AutoencoderKL(**VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**{**TEXT, "pad_token_id": 0})).eval()
    with torch.no_grad():  # widen the random weights so the tiny model's images carry structure
        for p in [*unet.parameters(), *vae.parameters()]:
            if p.ndim > 1:
                p.mul_(1.5)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER), pad_token="!"),
        unet=unet, scheduler=DDIMScheduler.from_config({**SCHEDULER, "clip_sample": False}), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("saved") / "model"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def artifact(saved_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "onnx"
    assert cli(["export", str(saved_folder), "--out", str(out), "-q"]) == 0
    return out


def test_saved_folder_has_tokenizer_json_only(saved_folder):
    names = sorted(p.name for p in (saved_folder / "tokenizer").iterdir())
    assert "tokenizer.json" in names and "vocab.json" not in names and "merges.txt" not in names


def test_export_without_config_uses_native_size_and_records_tokenizer(artifact):
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["profiles"]["height"] == m["profiles"]["width"] == {"min": NATIVE, "opt": NATIVE, "max": NATIVE}
    assert m["export_config"]["name"] == "default"
    tok = m["tokenizer"]
    assert tok["source"] == "tokenizer.json" and "tokenizer.json" in tok["files"] and "vocab.json" not in tok["files"]
    assert (tok["pad_token"], tok["pad_id"], tok["model_max_length"]) == ("!", 0, 77)
    assert (artifact / "tokenizer" / "tokenizer.json").is_file()


def test_generate_defaults_to_native_size(artifact, tmp_path):
    from PIL import Image

    out = tmp_path / "img.png"
    assert cli(["generate", str(artifact), "--prompt", PROMPTS[0], "--steps", "2", "--seed", "1",
                "--out", str(out), "-q"]) == 0
    assert Image.open(out).size == (NATIVE, NATIVE)


def test_images_equal_diffusers_on_the_saved_folder(saved_folder, artifact):
    import diffusers

    from ldm_deploy.runtime.pipeline import Pipeline

    latents = np.random.default_rng(7).standard_normal((2, 4, NATIVE // 8, NATIVE // 8), dtype=np.float32)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(saved_folder), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # height/width unset: diffusers' default, sample_size x VAE scale factor
        ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=7.5, latents=torch.from_numpy(latents),
                   output_type="np").images
    ref = np.round(np.asarray(ref) * 255).astype(np.uint8)
    ours = Pipeline.from_artifact(artifact)(PROMPTS, steps=4, guidance=7.5, scheduler="ddim", latents=latents)
    assert ours.images.shape == ref.shape == (2, NATIVE, NATIVE, 3) and ref.std() > 10
    # fp32 ONNX Runtime vs PyTorch over 4 steps: differences of ~1e-4 relative, far below one 8-bit level
    # on most pixels (the same bound as tests/runtime/test_e2e_parity.py)
    assert psnr(ours.images, ref) >= 40


# ---- the default profile, unit level -----------------------------------------------------------------

def _folder(tmp_path, unet: dict | None, vae: dict | None):
    for part, cfg in (("unet", unet), ("vae", vae)):
        if cfg is not None:
            (tmp_path / part).mkdir(parents=True, exist_ok=True)
            (tmp_path / part / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("unet, vae, want", [
    ({"sample_size": 64}, {"block_out_channels": [128, 256, 512, 512]}, (512, 512)),   # SD 1.x
    ({"sample_size": 96}, {"block_out_channels": [128, 256, 512, 512]}, (768, 768)),   # SD 2.x 768-v
    ({"sample_size": 8}, {"block_out_channels": [32, 64, 64]}, (32, 32)),              # 3 VAE levels: x4
    ({"sample_size": [8, 12]}, {"block_out_channels": [32, 64, 64, 64]}, (64, 96)),    # [height, width]
    ({}, {"block_out_channels": [32]}, None),
    (None, None, None),
])
def test_native_size(tmp_path, unet, vae, want):
    assert native_size(_folder(tmp_path, unet, vae)) == want


def test_default_config_is_static_at_native_size(tmp_path, caplog):
    cfg = default_config(_folder(tmp_path / "a", {"sample_size": 96}, {"block_out_channels": [1, 2, 3, 4]}))
    assert cfg.height == cfg.width == Range(768, 768, 768) and cfg.static_size
    assert cfg.replace(height=None, width=None, name="") == ExportConfig().replace(height=None, width=None,
                                                                                   name="")
    with caplog.at_level(logging.WARNING, logger="ldm_deploy.export.config"):
        cfg = default_config(_folder(tmp_path / "b", {"in_channels": 4}, None))
    assert cfg.height == Range(512, 512, 512) and "gives no sample_size" in caplog.text


def test_bundled_configs_keep_their_profiles():
    assert load_config("tiny").height == Range(64, 64, 64)
    assert load_config("sd21").height.opt == 768 and load_config("sd15").height.opt == 512
