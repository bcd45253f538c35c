"""What the stages share: building models from config dicts, the run folder layout, datasets and prompts.

Run folder (TrainConfig.out):
    stages/tokenizer/        the tokenizer (vocab.json, merges.txt, ...)
    stages/vae/              config.json + diffusion_pytorch_model.safetensors (+ report.json)
    stages/text_encoder/     config.json + model.safetensors (+ report.json)
    model/                   the complete diffusers folder (written after the U-Net stage)
    checkpoints/<stage>/     resumable training state (trainer.py)
    logs/<stage>.csv, .png   loss curves;  samples/  sample grids;  cache/  cached latents
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm_deploy.errors import LdmError
from ldm_deploy.fileio import (MARKER, OutputKind, atomic_dir, check_free_space, check_out_dir, has_marker, write_json,
                               write_marker)
from training.config import TrainConfig

SD_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
                "timestep_spacing": "leading", "trained_betas": None}


def run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out)


# What a run folder holds; one holding nothing else (with stages/, checkpoints/ or reports/) is a run folder
# written before runs carried fileio.MARKER.
RUN_ENTRIES = {"stages", "checkpoints", "logs", "reports", "samples", "model", "cache", "eval", "train_config.json", MARKER}


def _is_older_run_dir(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    return names <= RUN_ENTRIES and bool(names & {"stages", "checkpoints", "reports"})


RUN_OUTPUT = OutputKind("training-run", "an ldm-train run folder", _is_older_run_dir)


def claim_run_dir(cfg: TrainConfig, force: bool = False) -> Path:
    """Check that `cfg.out` may be written (fileio.check_out_dir: an ldm-train run folder or a new or empty
    one, or any folder with `force`; never one that is, holds or lies inside an input path of the config),
    then create it with its marker. Every stage calls this first: the run's sub-folders are then ours."""
    inputs = [p for p in (cfg.data.path, cfg.tokenizer.path, cfg.vae.path, cfg.text_encoder.path) if p]
    out = check_out_dir(run_dir(cfg), RUN_OUTPUT, inputs=inputs, force=force)
    from training.trainer import dist_env

    if dist_env().is_main and not has_marker(out, RUN_OUTPUT.name):
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, RUN_OUTPUT.name)
    return out


def stage_dir(cfg: TrainConfig, part: str) -> Path:
    return run_dir(cfg) / "stages" / part


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


# --- stage outputs: one diffusers sub-folder each --------------------------------------------------------

WEIGHT_FILE = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
               "text_encoder": "model.safetensors"}


def save_part(part: str, module: nn.Module, folder: Path, report: dict | None = None) -> Path:
    """Write one component in the diffusers sub-folder layout, atomically (same files as save_components)."""
    from safetensors.torch import save_file

    from training.checkpoint import TEXT_MODEL_PREFIX, module_config_dict

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if not k.endswith("position_ids")}
    if part == "text_encoder":
        config = module.config.to_dict()
        config["architectures"] = ["CLIPTextModel"]
        state = {k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k: v for k, v in state.items()}
    else:
        config = module_config_dict(module)
    check_free_space(folder, sum(v.numel() * v.element_size() for v in state.values()) + (16 << 20),
                     f"the trained {part}")
    with atomic_dir(folder) as tmp:
        write_json(tmp / "config.json", config)
        save_file(state, str(tmp / WEIGHT_FILE[part]), metadata={"format": "pt"})
        if report is not None:
            write_json(tmp / "report.json", report)
    return folder


def load_part(part: str, folder: Path) -> nn.Module:
    from training import checkpoint

    loader = {"unet": checkpoint.load_unet, "vae": checkpoint.load_vae, "text_encoder": checkpoint.load_text_encoder}
    if not (folder / "config.json").is_file():
        raise LdmError(f"no trained {part} at {folder}",
                       hint=f"run `ldm-train {part.replace('_', '-')}` first, or set {part}.path to an existing folder")
    return loader[part](folder)


def frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# --- tokenizer and prompts -----------------------------------------------------------------------------


def tokenizer_path(cfg: TrainConfig) -> Path:
    return Path(cfg.tokenizer.path) if cfg.tokenizer.path else stage_dir(cfg, "tokenizer")


def has_tokenizer(folder: Path) -> bool:
    """A CLIP tokenizer folder: vocab.json (+ merges.txt), or tokenizer.json as transformers 5 saves it."""
    return (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()


def load_tokenizer(folder: Path):
    """The runtime's ClipTokenizer (ldm_deploy.runtime.tokenizer): training tokenizes as deployment does."""
    from ldm_deploy.runtime.tokenizer import ClipTokenizer

    if not has_tokenizer(folder):
        raise LdmError(f"no tokenizer at {folder}", hint="run `ldm-train tokenizer` first, or set tokenizer.path")
    return ClipTokenizer.from_dir(folder)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(N, 77) int64 ids: BOS + BPE + EOS, padded/truncated exactly as the pipeline does."""
    return torch.from_numpy(tokenizer(list(captions)).astype(np.int64))


def text_encoder_config(cfg: TrainConfig, tokenizer) -> dict:
    """The text encoder's config with the vocabulary and special ids of the tokenizer."""
    d = dict(model_dicts(cfg)["text_encoder"])
    d.update(vocab_size=tokenizer.vocab_size, max_position_embeddings=tokenizer.max_length,
             bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return d


@torch.no_grad()
def encode_text(text_encoder: nn.Module, ids: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """last_hidden_state (N, 77, D) for token ids, in batches."""
    outs = [text_encoder(input_ids=ids[i:i + batch])[0] for i in range(0, len(ids), batch)]
    return torch.cat(outs)


# --- datasets --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageSet:
    """Images in memory as uint8 (N, 3, H, W) with one caption each."""

    images: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device) -> "ImageSet":
        """Keep the uint8 images on `device` (a GPU holds 30k 128-px images in 1.5 GB)."""
        return ImageSet(self.images.to(device), self.captions)

    def batch(self, indices, device) -> torch.Tensor:
        """Float images in [-1, 1]: (B, 3, H, W)."""
        x = self.images[torch.as_tensor(indices, dtype=torch.long, device=self.images.device)].to(device)
        return x.float() / 127.5 - 1.0


def load_images(cfg: TrainConfig, split: str = "train", limit: int | None = None) -> ImageSet:
    """The training ("train") or held-out ("holdout") images + captions at cfg.data.resolution."""
    data = cfg.data
    if data.kind == "shapes":
        from training.data.shapes import ShapesDataset

        size = data.train_size if split == "train" else data.holdout_size
        ds = ShapesDataset(split=split, resolution=data.resolution, size=min(size, limit or size), seed=data.seed)
        images, captions = render_shapes(ds, run_dir(cfg) / "cache"), ds.captions()
    elif data.kind == "folder":
        images, captions = _folder_images(data, split, limit)
    else:
        raise LdmError(f"unknown data.kind {data.kind!r}", hint="use shapes or folder")
    arr = images if isinstance(images, np.ndarray) else np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise LdmError(f"expected (N, H, W, 3) images, got {arr.shape}")
    return ImageSet(torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2))), list(captions))


def render_shapes(ds, cache_dir: Path) -> np.ndarray:
    """uint8 (N, H, W, 3) images of a ShapesDataset, drawn in parallel once and cached as .npy."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    from ldm_deploy.fileio import atomic_file

    path = cache_dir / f"shapes-{ds.split}-{ds.resolution}px-seed{ds.seed}-n{ds.size}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")[:]
    workers = min(os.cpu_count() or 1, 32)
    if ds.size < 512 or workers < 2:
        arr = _render_range(ds, 0, ds.size)
    else:
        chunks = [(i, min(i + 256, ds.size)) for i in range(0, ds.size, 256)]
        with ProcessPoolExecutor(workers) as pool:
            arr = np.concatenate(list(pool.map(_render_range, [ds] * len(chunks), *zip(*chunks))))
    if ds.size >= 512:
        with atomic_file(path) as f:
            np.save(f, arr)
    return arr


def _render_range(ds, start: int, stop: int) -> np.ndarray:
    return np.stack([ds[i][0] for i in range(start, stop)])


def load_captions(cfg: TrainConfig, split: str = "train") -> list[str]:
    """Captions only (cheap for shapes: no drawing)."""
    if cfg.data.kind == "shapes":
        from training.data.shapes import ShapesDataset

        size = cfg.data.train_size if split == "train" else cfg.data.holdout_size
        return ShapesDataset(split=split, resolution=cfg.data.resolution, size=size, seed=cfg.data.seed).captions()
    return load_images(cfg, split).captions


def _folder_images(data, split: str, limit: int | None):
    """An image folder (captions in <name>.txt); the last holdout_size items are the held-out split."""
    from training.data.folder import ImageFolderDataset

    if not data.path:
        raise LdmError("data.kind is folder but data.path is not set", hint="--set data.path=/path/to/images")
    from training.data.loader import resize_centre_crop

    ds = ImageFolderDataset(data.path)
    n = len(ds)
    hold = min(data.holdout_size, n // 10)
    idx = range(0, n - hold) if split == "train" else range(n - hold, n)
    idx = list(idx)[: limit or None]
    items = [ds[i] for i in idx]
    return [resize_centre_crop(it[0], data.resolution) for it in items], [it[1] for it in items]
