"""The training and held-out images with their captions, in memory (shapes drawn once and cached, or a folder)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ldm_deploy.errors import LdmError
from training.config import TrainConfig
from training.stages.run_folder import run_dir


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
