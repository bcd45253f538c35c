"""Shapes: a deterministic captioned dataset of coloured shapes, for training and evaluating tiny LDMs.

Each image holds one shape on a plain background, described completely by its caption:

    "a small red triangle at the top left on a white background"

Attributes (each drawn uniformly):
    shape       circle, square, triangle, star, diamond, cross, heart            (SHAPES)
    colour      11 named colours                                                (COLOURS)
    size        small / medium / large: the shape's larger bounding-box side is
                18% / 25% / 32% of the image side (+-3%)                        (SIZES)
    position    a 3x3 grid; the shape's bounding-box centre lies in that cell  (POSITIONS)
    background  6 colours, never the shape's colour                            (BACKGROUNDS)

Images are drawn with PIL at 4x (2x from 256 px up) and downscaled with a box filter, so edges are
anti-aliased at every resolution (32..512). Item i of a split depends only on (seed, split, i):
random access, any worker order, same pixels every time.

Held-out combinations (compositional generalisation): for each (shape, position) pair exactly one
colour is never generated in the "train" split,

    HOLDOUT = {(COLOURS[(3 * s + 5 * p + 1) % 11], SHAPES[s], POSITIONS[p])}   s < 7, p < 9

i.e. 63 of the 693 colour x shape x position triples (9.1%); every colour, shape and position (and
every pair of them but the held-out colour with that shape-position) is still seen in training. The
"holdout" split and `holdout_prompts(n, seed)` draw only these triples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ldm_deploy.errors import LdmError

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "heart")
COLOURS = {  # name -> sRGB; pairwise far apart so a blurry generated image still reads unambiguously
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 165, 60),
    "cyan": (40, 210, 225),
    "blue": (30, 60, 220),
    "purple": (135, 40, 175),
    "pink": (250, 130, 200),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
# Colours no shipped model saw: concepts for LoRA training (training/lora.py). Never drawn by `sample_attrs`,
# never a background; `render` draws them and `analyser.analyse(image, extra_colours=True)` reads them.
NEW_COLOURS = {"brown": (140, 80, 30)}   # >= 94 (sRGB distance) from every colour above
# Shapes no shipped model saw (LoRA concepts), drawn by `render`, read by `analyse(image, extra_shapes=True)`.
# The demo's VAE (trained on the base palette only) cannot carry brown: its encode + decode turns it orange
# on grey, pinkish on blue (training/lora.vae_ceiling); it carries a semicircle as it carries every shape.
NEW_SHAPES = ("semicircle",)             # flat side down; bounding box 2:1
BACKGROUNDS = ("white", "black", "grey", "yellow", "blue", "green")
SIZES = {"small": 0.18, "medium": 0.25, "large": 0.32}  # larger bbox side / image side
SIZE_JITTER = 0.03  # relative
# (row, col) of the 3x3 grid, named as in the captions
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
POSITION_CELL = {name: divmod(i, 3) for i, name in enumerate(POSITIONS)}
POSITION_PHRASE = {"top left": "at the top left", "top": "at the top", "top right": "at the top right",
                   "left": "on the left", "center": "in the center", "right": "on the right",
                   "bottom left": "at the bottom left", "bottom": "at the bottom",
                   "bottom right": "at the bottom right"}
CELL_CENTRES = (0.2, 0.5, 0.8)  # bbox centre of each row/column, fraction of the side
POSITION_JITTER = 0.03  # +- fraction of the side; keeps the centre inside its third of the image
COLOUR_JITTER = 10  # +- per channel, so the model sees shades rather than one exact value

HOLDOUT = frozenset(
    (COLOUR_NAMES[(3 * s + 5 * p + 1) % len(COLOUR_NAMES)], shape, position)
    for s, shape in enumerate(SHAPES) for p, position in enumerate(POSITIONS)
)
SPLITS = ("train", "holdout")


def caption(attrs: dict) -> str:
    """'a small red triangle at the top left on a white background'."""
    return (f"a {attrs['size']} {attrs['colour']} {attrs['shape']} {POSITION_PHRASE[attrs['position']]} "
            f"on a {attrs['background']} background")


def caption_vocabulary() -> list[str]:
    """Every caption word (the tokenizer is trained on these)."""
    words = {"a", "on", "background"}
    for phrase in POSITION_PHRASE.values():
        words.update(phrase.split())
    words.update(SHAPES, COLOUR_NAMES, SIZES)
    return sorted(words)


def all_captions() -> list[str]:
    """One caption per (size, colour, shape, position, background) combination, train and holdout."""
    return [caption(dict(size=z, colour=c, shape=s, position=p, background=b))
            for z in SIZES for c in COLOUR_NAMES for s in SHAPES for p in POSITIONS
            for b in BACKGROUNDS if b != c]


def sample_attrs(rng: np.random.Generator, split: str = "train") -> dict:
    """Attributes of one image: uniform over the split's (colour, shape, position) triples."""
    if split not in SPLITS:
        raise LdmError(f"unknown shapes split {split!r}", hint=f"use one of {SPLITS}")
    if split == "holdout":
        colour, shape, position = _HOLDOUT_SORTED[rng.integers(len(_HOLDOUT_SORTED))]
    else:
        while True:
            colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
            shape = SHAPES[rng.integers(len(SHAPES))]
            position = POSITIONS[rng.integers(len(POSITIONS))]
            if (colour, shape, position) not in HOLDOUT:
                break
    backgrounds = [b for b in BACKGROUNDS if b != colour]
    return {"shape": shape, "colour": colour, "size": tuple(SIZES)[rng.integers(len(SIZES))],
            "position": position, "background": backgrounds[rng.integers(len(backgrounds))]}


_HOLDOUT_SORTED = sorted(HOLDOUT)


# ---- drawing -------------------------------------------------------------------------------------

def _star(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = [((1.0 if k % 2 == 0 else inner) * math.sin(math.pi * k / n),
            -(1.0 if k % 2 == 0 else inner) * math.cos(math.pi * k / n)) for k in range(2 * n)]
    return pts


def _heart(n: int = 96) -> list[tuple[float, float]]:
    ts = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(ts) ** 3
    y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    return list(zip(x.tolist(), y.tolist()))


_ARM = 1 / 3  # cross arm width / extent
# outlines in arbitrary units; _fit scales each so its bounding box is centred with larger side 1
_OUTLINES = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -math.sqrt(3) / 2), (1, math.sqrt(3) / 2), (-1, math.sqrt(3) / 2)],
    "diamond": [(0, -1), (0.75, 0), (0, 1), (-0.75, 0)],
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
              (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
    "star": _star(),
    "heart": _heart(),
    "semicircle": [(math.cos(t), -math.sin(t)) for t in np.linspace(0, math.pi, 97).tolist()],
}


def _fit(points) -> np.ndarray:
    """Centre the outline's bounding box at 0 and scale its larger side to 1."""
    p = np.asarray(points, dtype=np.float64)
    lo, hi = p.min(0), p.max(0)
    return (p - (lo + hi) / 2) / (hi - lo).max()


_UNIT = {name: _fit(pts) for name, pts in _OUTLINES.items()}


def _jitter_colour(rgb, rng) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for c in rgb)


def render(attrs: dict, resolution: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (resolution, resolution, 3) image of `attrs`; `rng` adds size/position/colour jitter."""
    if not 16 <= resolution <= 1024:
        raise LdmError(f"shapes resolution {resolution} is out of range", hint="use 32..512")
    ss = 4 if resolution < 256 else 2  # supersampling factor
    big = resolution * ss
    fg, bg = {**COLOURS, **NEW_COLOURS}[attrs["colour"]], COLOURS[attrs["background"]]
    extent = SIZES[attrs["size"]]
    row, col = POSITION_CELL[attrs["position"]]
    cy, cx = CELL_CENTRES[row], CELL_CENTRES[col]
    if rng is not None:
        fg, bg = _jitter_colour(fg, rng), _jitter_colour(bg, rng)
        extent *= 1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    centre, scale = np.array([cx, cy]) * big, extent * big
    if attrs["shape"] == "circle":
        r = scale / 2
        draw.ellipse([centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r], fill=fg)
    else:
        pts = _UNIT[attrs["shape"]] * scale + centre
        draw.polygon([tuple(p) for p in pts.tolist()], fill=fg)
    return np.asarray(img.resize((resolution, resolution), Image.BOX), dtype=np.uint8)


# ---- dataset -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapesDataset:
    """`ds[i] -> (uint8 HxWx3 image, caption, attrs)`; item i depends only on (seed, split, i)."""

    split: str = "train"  # "train" (never a HOLDOUT triple) or "holdout" (only HOLDOUT triples)
    resolution: int = 64  # image side in pixels, 32..512
    size: int = 10_000  # number of items
    seed: int = 0

    def __post_init__(self):
        if self.split not in SPLITS:
            raise LdmError(f"unknown shapes split {self.split!r}", hint=f"use one of {SPLITS}")
        if not 32 <= self.resolution <= 512:
            raise LdmError(f"shapes resolution {self.resolution} is out of range", hint="use 32..512")
        if self.size < 1:
            raise LdmError(f"shapes dataset size must be positive, got {self.size}")

    def __len__(self) -> int:
        return self.size

    def attrs(self, index: int) -> tuple[dict, np.random.Generator]:
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        return sample_attrs(rng, self.split), rng

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, dict]:
        if not -self.size <= index < self.size:
            raise IndexError(index)
        index %= self.size
        attrs, rng = self.attrs(index)
        return render(attrs, self.resolution, rng), caption(attrs), attrs

    def captions(self) -> list[str]:
        """Every item's caption, without drawing (cheap)."""
        return [caption(self.attrs(i)[0]) for i in range(self.size)]


def holdout_prompts(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """`n` (prompt, attrs) pairs over the held-out triples, for evaluation; cycles through all 63
    triples in a seeded order before repeating, with seeded size and background."""
    rng = np.random.default_rng([seed, 7])
    out = []
    while len(out) < n:
        for k in rng.permutation(len(_HOLDOUT_SORTED)):
            colour, shape, position = _HOLDOUT_SORTED[k]
            backgrounds = [b for b in BACKGROUNDS if b != colour]
            attrs = {"shape": shape, "colour": colour, "size": tuple(SIZES)[rng.integers(len(SIZES))],
                     "position": position, "background": backgrounds[rng.integers(len(backgrounds))]}
            out.append((caption(attrs), attrs))
            if len(out) == n:
                break
    return out
