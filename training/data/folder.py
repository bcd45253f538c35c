"""An image folder with captions: `ds[i] -> (uint8 HxWx3 image, caption, {"file": name})`.

Captions come from `captions.jsonl` in the folder (one `{"file": "cat.png", "caption": "a cat"}` per
line, `file` relative to the folder), or else from a sidecar `cat.txt` next to each `cat.png`.
Every image must have a caption; problems are reported up front as one LdmError naming the files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm_deploy.errors import LdmError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"


def _listing(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def read_captions_jsonl(path: Path) -> list[tuple[str, str]]:
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LdmError(f"{path} line {lineno} is not JSON: {e.msg}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("file"), str) or not isinstance(obj.get("caption"), str):
            raise LdmError(f"{path} line {lineno} needs string fields \"file\" and \"caption\"",
                           hint='write lines like {"file": "cat.png", "caption": "a cat"}')
        items.append((obj["file"], obj["caption"]))
    return items


class ImageFolderDataset:
    """Images + captions from a folder (captions.jsonl, or a .txt sidecar per image)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise LdmError(f"image folder {self.root} does not exist")
        jsonl = self.root / CAPTIONS_FILE
        if jsonl.is_file():
            self.items = read_captions_jsonl(jsonl)
            missing = [f for f, _ in self.items if not (self.root / f).is_file()]
            if missing:
                raise LdmError(f"{jsonl} names {len(missing)} images that do not exist: {_listing(missing)}")
        else:
            images = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            uncaptioned = [f for f in images if not (self.root / f).with_suffix(".txt").is_file()]
            if uncaptioned:
                raise LdmError(f"{len(uncaptioned)} images in {self.root} have no caption: {_listing(uncaptioned)}",
                               hint=f"add a .txt file with the caption next to each image, or a {CAPTIONS_FILE}")
            self.items = [(f, (self.root / f).with_suffix(".txt").read_text(encoding="utf-8").strip())
                          for f in images]
        if not self.items:
            raise LdmError(f"image folder {self.root} has no captioned images",
                           hint=f"expected {'/'.join(IMAGE_EXTENSIONS)} files with captions")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, dict]:
        name, text = self.items[index]
        path = self.root / name
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as e:
            raise LdmError(f"cannot read image {path}: {e}", hint="remove or replace the file") from None
        return image, text, {"file": name}

    def captions(self) -> list[str]:
        return [c for _, c in self.items]
