"""uint8 images to PNG files that carry how they were made, written atomically; a grid helper.

Every PNG gets text chunks: `parameters` (the whole record as JSON) plus one chunk per field
(prompt, negative_prompt, seed, steps, guidance, scheduler, size, backend, artifact_hash,
ldm_deploy_version), so `PIL.Image.open(p).text["seed"]` reads it back.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ldm_deploy import __version__
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.fileio import atomic_file

FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler", "size", "backend",
          "artifact_hash", "guidance_rescale", "strength", "eta", "index")


def png_metadata(params: Mapping[str, Any]) -> dict[str, str]:
    """Text chunks for one image from a GenerationResult.params-like dict."""
    record = dict(params)
    if "height" in record and "width" in record:
        record.setdefault("size", f"{record['width']}x{record['height']}")
    record["ldm_deploy_version"] = __version__
    text = {"parameters": json.dumps(record, sort_keys=True, default=str)}
    for key in (*FIELDS, "ldm_deploy_version"):
        if record.get(key) is not None:
            value = record[key]
            text[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    return text


def save_png(image: np.ndarray, path: str | Path, params: Mapping[str, Any] | None = None) -> Path:
    """Write one uint8 (H, W, 3) image as PNG with `params` in its text chunks (atomic)."""
    from PIL import Image, PngImagePlugin

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise UsageError(f"save_png wants uint8 (H, W, 3), got {image.dtype} {list(image.shape)}")
    info = PngImagePlugin.PngInfo()
    for key, value in png_metadata(params or {}).items():
        info.add_itxt(key, value)
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", pnginfo=info)
    path = Path(path)
    with atomic_file(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def save_images(images: np.ndarray, out: str | Path, params: Mapping[str, Any] | None = None,
                stem: str = "image") -> list[Path]:
    """Save (N, H, W, 3) images: `out` a .png path for one image, else a directory (stem-0000.png, ...).

    Each image's metadata records its index and, when one prompt per image was given, its own prompt.
    """
    images = np.asarray(images)
    out = Path(out)
    params = dict(params or {})
    if out.suffix.lower() == ".png":
        if len(images) != 1:
            raise UsageError(f"--out {out} names one PNG but {len(images)} images were made",
                             hint="give a directory to --out for several images")
        return [save_png(images[0], out, params)]
    if out.exists() and not out.is_dir():
        raise LdmError(f"--out {out} exists and is not a directory")
    prompts = params.get("prompt")
    per_image = len(images) // len(prompts) if isinstance(prompts, list) and prompts else None
    paths = []
    for i, image in enumerate(images):
        p = dict(params, index=i)
        if per_image:
            p["prompt"] = prompts[i // per_image]
            negatives = params.get("negative_prompt")
            if isinstance(negatives, list):
                p["negative_prompt"] = negatives[i // per_image]
        paths.append(save_png(image, out / f"{stem}-{i:04d}.png", p))
    return paths


def read_png_metadata(path: str | Path) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as im:
        return dict(im.text)


def load_image(path: str | Path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise UsageError(f"init image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise LdmError(f"cannot read image {path}: {e}") from None


def make_grid(images: np.ndarray | Sequence[np.ndarray], captions: Sequence[str] | None = None,
              cols: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images row-major into one uint8 image, `pad` pixels of `fill` between and
    around the tiles, each with its caption (word-wrapped) under it when `captions` are given. The one grid
    maker: `ldm-deploy demo`'s grid, training's sample grids."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UsageError(f"make_grid wants (N, H, W, 3) images, got {list(images.shape)}")
    n, h, w, _ = images.shape
    if captions is not None and len(captions) != n:
        raise UsageError(f"{len(captions)} captions for {n} images")
    cols = min(cols or 4, n)
    rows = -(-n // cols)
    line_h, per_line = 12, max(8, w // 6)              # PIL's default bitmap font: ~6 px a character, 12 a line
    wrapped = [_wrap(c, per_line) for c in captions] if captions else []
    cap_h = line_h * max(len(x) for x in wrapped) + pad if wrapped else 0
    grid = np.full((rows * (h + cap_h + pad) + pad, cols * (w + pad) + pad, 3), fill, dtype=images.dtype)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + cap_h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = image
    if wrapped:
        from PIL import Image, ImageDraw, ImageFont

        canvas = Image.fromarray(grid, "RGB")
        draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
        for i, lines in enumerate(wrapped):
            r, c = divmod(i, cols)
            y, x = pad + r * (h + cap_h + pad), pad + c * (w + pad)
            for k, line in enumerate(lines):
                draw.text((x, y + h + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
        grid = np.asarray(canvas)
    return grid


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines
