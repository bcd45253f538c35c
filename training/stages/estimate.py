"""A time estimate for `ldm-train all`, from the analytic FLOP model (ldm_deploy.flops).

    seconds ~= steps * batch * 3 * forward_flops / (peak_flops * utilisation)

3x forward = forward + backward. Peak is bf16 dense for known GPUs; the utilisation reflects that
small convnets reach a small fraction of it (calibrated on an H100 with configs/shapes.yaml, see
docs/training.md). Each stage then prints its measured ms/step and remaining time after 10 steps.
"""
from __future__ import annotations

import torch

from ldm_deploy import flops
from training.config import TrainConfig
from training.stages.architecture import model_dicts

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12, "4090": 165e12, "A10": 125e12}
GPU_UTILISATION = 0.03      # small U-Nets at 16x16 latents: measured 2.2% (U-Net) and 4.8% (VAE) on an H200
CPU_FLOPS = 3e10            # fp32, a few cores


def device_flops() -> tuple[float, str]:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), 100e12)
        return peak * GPU_UTILISATION * max(1, int(__import__("os").environ.get("WORLD_SIZE", "1"))), name
    return CPU_FLOPS, "CPU"


def stage_flops(cfg: TrainConfig) -> dict[str, float]:
    m = model_dicts(cfg)
    res = cfg.data.resolution
    f = flops.vae_scale_factor(m["vae"])
    vae = flops.vae_encoder_flops(m["vae"], res, res) + flops.vae_decoder_flops(m["vae"], res // f, res // f)
    te = flops.text_encoder_flops({**m["text_encoder"]})
    unet_cfg = {**m["unet"], "cross_attention_dim": m["text_encoder"].get("hidden_size", 768)}
    unet = flops.unet_flops(unet_cfg, res // f, res // f)
    out = {}
    if not cfg.vae.path:
        out["vae"] = 3 * vae * cfg.vae.steps * cfg.vae.batch_size
    if not cfg.text_encoder.path:
        out["text-encoder"] = 3 * te * cfg.text_encoder.steps * cfg.text_encoder.batch_size
    out["unet"] = 3 * unet * cfg.unet.steps * cfg.unet.batch_size
    return out


def print_estimate(cfg: TrainConfig) -> dict[str, float]:
    """Print (rank 0) and return the estimated seconds per stage."""
    rate, name = device_flops()
    seconds = {k: v / rate for k, v in stage_flops(cfg).items()}
    from training.distributed import dist_env

    if dist_env().is_main:
        parts = ", ".join(f"{k} ~{_fmt(s)}" for k, s in seconds.items())
        print(f"[estimate] on {name}: {parts}; total ~{_fmt(sum(seconds.values()))} "
              f"(+ data generation and latent caching; rough, each stage prints a measured ETA after 10 steps)")
    return seconds


def _fmt(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"
