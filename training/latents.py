"""Latent caching: encode a dataset once with the frozen VAE, in memory or on disk under a hash key.

The cache holds the posterior's mean and std per image (float32, (N, C, h, w) each), so the U-Net stage
still samples z = mean + std * n every step, as an uncached run would. The disk key hashes the VAE's
weights and config and the dataset's identity (kind, path, resolution, seed, size): a changed VAE or
dataset never reuses a stale cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from training.config import TrainConfig
from training.stages.images import ImageSet
from training.stages.run_folder import run_dir


def cache_key(vae_dir: Path, cfg: TrainConfig, n: int) -> str:
    """Hash of the VAE weights + config and of the dataset's identity: a stale cache is never reused."""
    from ldm_deploy.fileio import sha256_file

    h = hashlib.sha256()
    for f in sorted(vae_dir.glob("*")):
        if f.suffix in (".json", ".safetensors") and f.name != "report.json":
            h.update(f.name.encode() + sha256_file(f).encode())
    h.update(json.dumps([cfg.data.kind, cfg.data.path, cfg.data.resolution, cfg.data.seed, n], sort_keys=True).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_latents(vae: nn.Module, images: ImageSet, device, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of every image: (N, 4, h, w) float32 each, on CPU."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(images.batch(range(i, min(i + batch, len(images))), device))
        means.append(d.mean.float().cpu())
        stds.append(d.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def cached_latents(cfg: TrainConfig, vae: nn.Module, vae_dir: Path, images: ImageSet, device):
    """Encode once; with cache_latents=disk, reuse <out>/cache/latents-<hash>.safetensors."""
    from safetensors.torch import load_file, save

    from ldm_deploy.fileio import atomic_file

    path = None
    if cfg.unet.cache_latents == "disk":
        path = run_dir(cfg) / "cache" / f"latents-{cache_key(vae_dir, cfg, len(images))}.safetensors"
        if path.is_file():
            d = load_file(path)
            return d["mean"], d["std"]
    mean, std = encode_latents(vae, images, device)
    if path is not None:
        with atomic_file(path) as f:
            f.write(save({"mean": mean.contiguous(), "std": std.contiguous()}))
    return mean, std
