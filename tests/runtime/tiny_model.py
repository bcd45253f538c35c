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


def export_fallback(folder: Path, out: Path) -> Path:
    """A plain torch.onnx export of the diffusers modules with a DESIGN.md manifest (fp32).

    Used only while `ldm_deploy.export.export_artifact` is not available.
    """
    import json

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ldm_deploy.fileio import sha256_file, write_json

    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(folder / "vae")).eval()
    text = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    text.config._attn_implementation = "eager"  # SDPA does not trace

    class Wrap(torch.nn.Module):
        def __init__(self, module, fn):
            super().__init__()
            self.module, self.fn = module, fn

        def forward(self, *args):
            return self.fn(self.module, *args)

    def enc(m, image):
        d = m.encode(image).latent_dist
        return d.mean, d.logvar

    for m in (unet, vae, text):
        m.requires_grad_(False)
    Text = lambda: Wrap(text, lambda m, ids: m(ids.long()).last_hidden_state)  # noqa: E731
    Unet = lambda: Wrap(unet, lambda m, x, t, e: m(x, t, e).sample)  # noqa: E731
    Dec = lambda: Wrap(vae, lambda m, z: m.decode(z).sample)  # noqa: E731
    Enc = lambda: Wrap(vae, enc)  # noqa: E731

    def spec(name, dtype, shape):
        return {"name": name, "dtype": dtype, "shape": shape}

    lat = ["batch", 4, "latent_height", "latent_width"]
    img = ["batch", 3, "height", "width"]
    plan = {
        "text_encoder": (Text(), (torch.zeros(1, 77, dtype=torch.int32),),
                         [spec("input_ids", "int32", ["batch", 77])],
                         [spec("last_hidden_state", "float32", ["batch", 77, 32])], 1),
        "unet": (Unet(), (torch.randn(2, 4, 4, 4), torch.ones(2), torch.randn(2, 77, 32)),
                 [spec("sample", "float32", ["unet_batch", 4, "latent_height", "latent_width"]),
                  spec("timestep", "float32", ["unet_batch"]),
                  spec("encoder_hidden_states", "float32", ["unet_batch", 77, 32])],
                 [spec("noise_pred", "float32", ["unet_batch", 4, "latent_height", "latent_width"])], 2),
        "vae_decoder": (Dec(), (torch.randn(1, 4, 4, 4),), [spec("latent", "float32", lat)],
                        [spec("image", "float32", img)], 1),
        "vae_encoder": (Enc(), (torch.randn(1, 3, 32, 32),), [spec("image", "float32", img)],
                        [spec("mean", "float32", lat), spec("logvar", "float32", lat)], 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    components = {}
    for name, (module, args, inputs, outputs, mult) in plan.items():
        path = out / name / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        axes = {t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)} for t in inputs + outputs}
        with torch.no_grad():
            torch.onnx.export(module, args, str(path), input_names=[t["name"] for t in inputs],
                              output_names=[t["name"] for t in outputs], dynamic_axes=axes, opset_version=17,
                              dynamo=False)
        components[name] = {"file": f"{name}/model.onnx", "external_data": None, "precision": "fp32",
                            "inputs": inputs, "outputs": outputs, "batch_multiplier": mult}
    shutil.copytree(folder / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(folder / "scheduler", out / "scheduler", dirs_exist_ok=True)
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    files = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    write_json(out / "manifest.json", {
        "format": "ldm-deploy-artifact", "format_version": 1, "created": "test",
        "source": {"path": str(folder), "sha256": "test"}, "precision": "fp32",
        "model": {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": {}},
        "scaling_factor": vae.config.scaling_factor, "prediction_type": sched.get("prediction_type", "epsilon"),
        "latent_channels": 4, "vae_scale_factor": 8, "scheduler": sched,
        "tokenizer": {"dir": "tokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>"},
        "profiles": PROFILES, "components": components, "files": files, "tools": {"ldm_deploy": "0.1.0"},
    })
    return out


def export_any(folder: Path, out: Path) -> Path:
    """H5's exporter when it is there, else the fallback above."""
    try:
        from ldm_deploy.export.exporter import export_model  # noqa: F401
    except ImportError:
        return export_fallback(folder, out)
    return export_tiny_artifact(folder, out)


# --- session fixtures shared by the runtime tests (import them into a test module to use them) -------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_folder, tmp_path_factory) -> Path:
    return export_any(tiny_folder, tmp_path_factory.mktemp("tiny") / "onnx")


def psnr(a, b) -> float:
    """PSNR in dB between two uint8 image batches (inf when equal)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
