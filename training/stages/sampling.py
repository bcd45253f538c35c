"""Sampling from in-memory modules for sample grids and evaluation: the numpy pipeline over TorchRunners.

The same loop as the deployed path (ldm_deploy.runtime.pipeline), so what training shows is what
export will reproduce.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def pipeline(modules: dict, tok_dir: Path, scheduler_config: dict, scaling_factor: float, device=None):
    """A Pipeline over TorchRunners of {"unet", "vae", "text_encoder"} modules (float32, on `device`)."""
    from ldm_deploy.runtime.pipeline import Pipeline
    from ldm_deploy.runtime.tokenizer import ClipTokenizer
    from training.checkpoint import module_info
    from training.runner import IO, TorchRunner

    device = device or next(modules["unet"].parameters()).device
    runners = {c: TorchRunner(modules, c, device=str(device)) for c in IO}
    info = module_info({c: modules[c] for c in ("unet", "vae")}, scheduler_config, scaling_factor=scaling_factor)
    return Pipeline(ClipTokenizer.from_dir(Path(tok_dir)), runners, info, backend="torch")


def generate(modules: dict, tok_dir: Path, scheduler_config: dict, scaling_factor: float, prompts: list[str], *,
             steps: int = 25, guidance: float = 5.0, seed: int = 0, sampler: str = "ddim", batch: int = 50,
             resolution: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) images, one per prompt, in batches (seed + batch index per batch)."""
    pipe = pipeline(modules, tok_dir, scheduler_config, scaling_factor)
    out = []
    for k, i in enumerate(range(0, len(prompts), batch)):
        res = pipe(prompts[i:i + batch], steps=steps, guidance=guidance, scheduler=sampler, seed=seed + k,
                   height=resolution, width=resolution)
        out.append(res.images)
    return np.concatenate(out)


def save_grid(images: np.ndarray, path: Path, captions: list[str] | None = None, cols: int = 4) -> Path:
    """A PNG grid of uint8 (N, H, W, 3) images (atomic write)."""
    from PIL import Image

    from ldm_deploy.fileio import atomic_file
    from ldm_deploy.runtime.image import make_grid

    grid = make_grid(images, cols=cols)
    path = Path(path)
    with atomic_file(path) as f:
        Image.fromarray(grid).save(f, format="PNG")
    if captions:
        path.with_suffix(".txt").write_text("\n".join(captions) + "\n")
    return path
