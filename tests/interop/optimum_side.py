"""The Optimum / diffusers side of the interop tests; runs in the optimum venv (`make .venv-optimum`).

optimum 2.1 + optimum-onnx 0.1 pin transformers < 4.58 and diffusers 0.39, so this script runs in an
environment of its own and the tests call it in a subprocess:

    python tests/interop/optimum_side.py prepare --family sd1 --out DIR --latents L.npy --prompts P.json
        DIR/model       a tiny random diffusers folder (StableDiffusionPipeline.save_pretrained)
        DIR/optimum     `optimum-cli export onnx --task text-to-image` of it (optimum's main_export)
        DIR/reference.npz  diffusers' own PyTorch images, uint8 [N, H, W, 3], one array per scheduler
    python tests/interop/optimum_side.py run-onnx --folder DIR --latents L.npy --prompts P.json --out R.npz
        diffusers' OnnxStableDiffusionPipeline and optimum's ORTStableDiffusionPipeline on an ONNX folder
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SCHEDULERS = {  # our CLI name -> (diffusers class, extra config)
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
}
STEPS, GUIDANCE, NEGATIVE = 4, 7.5, "blurry"


def make_folder(family: str, folder: Path) -> Path:
    """SD1: tests/runtime/tiny_model.py's folder. SD2: the same sizes with SD 2.x traits (linear
    projections, per-level heads, upcast attention, gelu CLIP, "!" padding, v-prediction, trailing)."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.runtime import tiny_model as tm

    unet_cfg, text_cfg = dict(tm.UNET), dict(tm.TEXT)
    if family == "sd2":
        unet_cfg.update(attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True,
                        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
        text_cfg.update(hidden_act="gelu", pad_token_id=0)
    torch.manual_seed(0 if family == "sd1" else 1)
    unet = UNet2DConditionModel(**unet_cfg).eval()
    vae = AutoencoderKL(**tm.VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**text_cfg)).eval()
    with torch.no_grad():  # random init leaves tiny models nearly constant; widen the weights
        for m in (unet, vae):
            for p in m.parameters():
                if p.ndim > 1:
                    p.mul_(1.5)
    tok = CLIPTokenizer.from_pretrained(str(tm.TOKENIZER), **({"pad_token": "!"} if family == "sd2" else {}))
    if family == "sd2":
        sched = DDIMScheduler(**{k: v for k, v in tm.SCHEDULER.items() if k != "skip_prk_steps"},
                              prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    else:
        sched = PNDMScheduler(**tm.SCHEDULER)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def optimum_export(model: Path, out: Path) -> None:
    """What `optimum-cli export onnx --model MODEL --task text-to-image OUT` runs."""
    from optimum.exporters.onnx import main_export

    main_export(model_name_or_path=str(model), output=str(out), task="text-to-image", device="cpu")


def reference(model: Path, latents: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
    """diffusers' StableDiffusionPipeline (PyTorch) on the same latents, per scheduler."""
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config
    out = {}
    h, w = latents.shape[2] * 8, latents.shape[3] * 8
    for name, (cls, extra) in SCHEDULERS.items():
        pipe.scheduler = getattr(diffusers, cls).from_config(base, **extra)
        with torch.no_grad():
            img = pipe(prompts, negative_prompt=[NEGATIVE] * len(prompts), num_inference_steps=STEPS,
                       guidance_scale=GUIDANCE, latents=torch.from_numpy(latents), height=h, width=w,
                       output_type="np").images
        out[name] = np.round(np.asarray(img) * 255).astype(np.uint8)
    return out


def run_onnx(folder: Path, latents: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
    """diffusers' OnnxStableDiffusionPipeline and optimum's ORTStableDiffusionPipeline on an ONNX folder (DDIM)."""
    import diffusers
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    h, w = latents.shape[2] * 8, latents.shape[3] * 8
    kw = dict(negative_prompt=[NEGATIVE] * len(prompts), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
              height=h, width=w, output_type="np")
    out = {}
    pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(str(folder), provider="CPUExecutionProvider",
                                                                 safety_checker=None, feature_extractor=None,
                                                                 requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    out["diffusers-onnx"] = pipe(prompts, latents=latents, **kw).images
    ort = ORTStableDiffusionPipeline.from_pretrained(str(folder))
    ort.set_progress_bar_config(disable=True)
    ort.scheduler = diffusers.DDIMScheduler.from_config(ort.scheduler.config)
    out["optimum"] = ort(prompts, latents=torch.from_numpy(latents), **kw).images
    return {k: np.round(np.asarray(v) * 255).astype(np.uint8) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("prepare", "run-onnx"))
    p.add_argument("--family", choices=("sd1", "sd2"), default="sd1")
    p.add_argument("--out")
    p.add_argument("--folder")
    p.add_argument("--latents", required=True)
    p.add_argument("--prompts", required=True)
    a = p.parse_args()
    latents = np.load(a.latents)
    prompts = json.loads(Path(a.prompts).read_text())
    if a.what == "prepare":
        out = Path(a.out)
        make_folder(a.family, out / "model")
        optimum_export(out / "model", out / "optimum")
        np.savez(out / "reference.npz", **reference(out / "model", latents, prompts))
    else:
        np.savez(a.out, **run_onnx(Path(a.folder), latents, prompts))


if __name__ == "__main__":
    main()
