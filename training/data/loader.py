"""From a dataset of (uint8 image, caption, attrs) to deterministic, resumable training batches.

    loader = make_loader(ShapesDataset(size=10_000), batch_size=32, seed=0, workers=2,
                         transform=ImageTransform(64, flip="swap"), tokenizer=ClipTokenizer.from_dir(tok))
    for batch in loader:  # {"pixel_values": (B, 3, H, W) float32 in [-1, 1], "caption": [...],
        ...               #  "input_ids": (B, 77) int64 if a tokenizer is given, "index": (B,) int64}

Determinism does not depend on the worker count: the sampler's permutation comes from (seed, epoch),
and each item's random choices (the flip) from (seed, epoch, index). `ResumableSampler` can start at
any (epoch, position), so `--resume` continues at the same data position: the trainer records how many
samples it has consumed this epoch and passes it back as `start`.
"""
from __future__ import annotations

import random
import re

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm_deploy.errors import LdmError

FLIP_MODES = ("none", "swap", "skip_sided")
_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def names_side(caption: str) -> bool:
    """True when the caption says "left" or "right" (as whole words)."""
    return _SIDE.search(caption) is not None


def flip_caption(caption: str) -> str:
    """The caption of the mirrored image: whole-word left <-> right, case kept ("top Left" -> "top Right")."""
    def swap(m):
        word = m.group(0)
        new = "right" if word.lower() == "left" else "left"
        return new.upper() if word.isupper() else new.capitalize() if word[0].isupper() else new

    return _SIDE.sub(swap, caption)


def resize_centre_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (resolution, resolution, 3): shorter side to `resolution`, then centre crop."""
    h, w = image.shape[:2]
    if (h, w) == (resolution, resolution):
        return image
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    im = Image.fromarray(image).resize((nw, nh), Image.LANCZOS if scale < 1 else Image.BICUBIC)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return np.asarray(im.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def to_tensor(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / 127.5 - 1.0


class ImageTransform:
    """Resize + centre crop, optional caption-true horizontal flip, normalisation to [-1, 1] CHW.

    flip: "none"; "swap" flips half the images and swaps left/right in their captions; "skip_sided"
    flips half the images whose caption names no side and never the others.
    """

    def __init__(self, resolution: int, flip: str = "none"):
        if flip not in FLIP_MODES:
            raise LdmError(f"unknown flip mode {flip!r}", hint=f"use one of {FLIP_MODES}")
        if resolution < 8 or resolution % 8:
            raise LdmError(f"training resolution {resolution} must be a positive multiple of 8")
        self.resolution, self.flip = resolution, flip

    def __call__(self, image: np.ndarray, caption: str, rng: np.random.Generator) -> tuple[np.ndarray, str, bool]:
        image = resize_centre_crop(np.asarray(image), self.resolution)
        flipped = False
        if self.flip != "none" and rng.random() < 0.5 and not (self.flip == "skip_sided" and names_side(caption)):
            image, caption, flipped = image[:, ::-1], flip_caption(caption), True
        return to_tensor(image), caption, flipped


class ResumableSampler(Sampler):
    """A deterministic permutation of range(n) per epoch (from seed and epoch), resumable at any position.

    Yields (index, epoch) keys, which `TrainingDataset` uses to seed each item's random choices.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, epoch: int = 0, start: int = 0):
        if n < 1:
            raise LdmError("cannot sample from an empty dataset")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.resume(epoch, start)

    def resume(self, epoch: int, position: int = 0) -> None:
        """Continue at sample `position` of `epoch` (the next iteration starts there)."""
        if not 0 <= position <= self.n:
            raise LdmError(f"resume position {position} is outside the epoch of {self.n} samples")
        self.epoch, self.start = epoch, position

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.start, "n": self.n}

    def __iter__(self):
        epoch, start = self.epoch, self.start
        for index in self.permutation(epoch)[start:].tolist():
            yield index, epoch
        self.resume(epoch + 1, 0)  # a plain `for epoch ...: for batch in loader` moves on by itself

    def __len__(self) -> int:
        return self.n - self.start


class TrainingDataset(Dataset):
    """Wraps a (image, caption, attrs) dataset: transform, optional tokenization, per-item seeded rng."""

    def __init__(self, base, transform: ImageTransform, tokenizer=None, seed: int = 0):
        self.base, self.transform, self.tokenizer, self.seed = base, transform, tokenizer, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image, caption, _ = self.base[index]
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        pixels, caption, flipped = self.transform(image, caption, rng)
        item = {"pixel_values": torch.from_numpy(pixels), "caption": caption, "index": index, "flipped": flipped}
        if self.tokenizer is not None:
            item["input_ids"] = torch.from_numpy(self.tokenizer([caption])[0].astype(np.int64))
        return item


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: seed numpy and random from torch's per-worker seed (itself from the generator)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset, batch_size: int, shuffle: bool = True, seed: int = 0, workers: int = 0, epoch: int = 0,
                *, start: int = 0, transform: ImageTransform | None = None, tokenizer=None,
                resolution: int | None = None, drop_last: bool = False) -> DataLoader:
    """A torch DataLoader over `dataset` with a ResumableSampler at (epoch, start).

    `transform` defaults to ImageTransform(resolution or the first image's size, flip="none").
    `loader.sampler` is the ResumableSampler: call `.resume(epoch, position)` to move it.
    """
    if batch_size < 1:
        raise LdmError(f"batch size must be positive, got {batch_size}")
    if transform is None:
        transform = ImageTransform(resolution or np.asarray(dataset[0][0]).shape[0])
    sampler = ResumableSampler(len(dataset), seed=seed, shuffle=shuffle, epoch=epoch, start=start)
    return DataLoader(
        TrainingDataset(dataset, transform, tokenizer, seed), batch_size=batch_size, sampler=sampler,
        num_workers=workers, worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed),
        drop_last=drop_last, persistent_workers=False, pin_memory=False)
