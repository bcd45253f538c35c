"""Read a shapes image back into its attributes: background, colour, shape, position, size.

Deterministic (numpy + PIL, nothing learned), so it can score generated images against their prompt:

1. background = the median colour of the image border;
2. foreground colour = the median of the pixels farthest from the background; each pixel gets an
   alpha = its projection on the background -> foreground line (0 = background, 1 = shape), which
   undoes anti-aliasing and most blur; the mask is alpha > 0.5, reduced to its largest blob;
3. colour = nearest palette colour (shapes.COLOURS) of the median of the mask's inner (alpha > 0.8) pixels;
   position = 3x3 cell of the mask's bounding-box centre; size = nearest of shapes.SIZES to the larger
   bounding-box side (sub-pixel, from the alpha sums along rows and columns);
4. shape = nearest prototype in a small space of scale-free geometric features of the mask resampled
   to a fixed size: fill of the bounding box, aspect, convex-hull solidity, vertical centroid offset
   and the fill of the bounding box's corners, centre and edge midpoints.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from training.data.shapes import CELL_CENTRES, COLOURS, NEW_COLOURS, POSITIONS, SHAPES, SIZES

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float64)
_EXTENDED_NAMES = _PALETTE_NAMES + tuple(NEW_COLOURS)       # + LoRA concept colours (opt-in)
_EXTENDED = np.array([{**COLOURS, **NEW_COLOURS}[c] for c in _EXTENDED_NAMES], dtype=np.float64)
_CANVAS = 48  # the mask is resampled so its larger side spans this many pixels
_SIZE_NAMES = tuple(SIZES)
_SIZE_VALUES = np.array([SIZES[s] for s in _SIZE_NAMES])


def nearest_colour(rgb, extra_colours: bool = False) -> str:
    names, palette = (_EXTENDED_NAMES, _EXTENDED) if extra_colours else (_PALETTE_NAMES, _PALETTE)
    d = ((palette - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1)
    return names[int(d.argmin())]


def _border(img: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([img[:width].reshape(-1, 3), img[-width:].reshape(-1, 3),
                           img[:, :width].reshape(-1, 3), img[:, -width:].reshape(-1, 3)])


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (iterative flood fill, numpy + python)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        stack, size = [(y0, x0)], 0
        labels[y0, x0] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-d points (Andrew's monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    hull = np.array(half(pts)[:-1] + half(pts[::-1])[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def shape_features(alpha: np.ndarray) -> dict[str, float]:
    """Scale-free geometry of a foreground alpha map (H, W) in [0, 1] holding one shape."""
    ys, xs = np.nonzero(alpha > 0.5)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    pad = 2
    crop = np.pad(alpha[y0:y1, x0:x1], pad)
    h, w = y1 - y0, x1 - x0
    scale = _CANVAS / max(h, w)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    big = np.asarray(Image.fromarray(crop.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    m = big > 0.5
    ys, xs = np.nonzero(m)
    by0, by1, bx0, bx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = m[by0:by1, bx0:bx1]
    bh, bw = box.shape
    area = box.sum()
    corners = np.array([(x + dx, y + dy) for y, x in zip(ys, xs) for dx in (0, 1) for dy in (0, 1)])
    hull = _hull_area(corners)

    def patch(fy, fx):  # mean fill of a small window at a fractional position of the box
        cy, cx, r = int(fy * (bh - 1)), int(fx * (bw - 1)), max(1, min(bh, bw) // 10)
        return float(box[max(0, cy - r): cy + r + 1, max(0, cx - r): cx + r + 1].mean())

    return {
        "fill": float(area / (bh * bw)),
        "aspect": float(bh / bw),
        "solidity": float(area / hull) if hull else 1.0,
        "yoffset": float((ys.mean() - by0 + 0.5) / bh - 0.5),  # + = mass below the box centre
        "corners": float(np.mean([patch(0.08, 0.08), patch(0.08, 0.92), patch(0.92, 0.08), patch(0.92, 0.92)])),
        "top_mid": patch(0.06, 0.5),
        "side_mid": float(np.mean([patch(0.5, 0.06), patch(0.5, 0.94)])),
    }


# Prototype features (means over generated 64 px images) and how much each may vary (~2-3 std).
_PROTOTYPES = {
    "circle":   dict(fill=0.80, aspect=1.00, solidity=0.97, yoffset=0.00, corners=0.09, top_mid=0.99, side_mid=0.99),
    "square":   dict(fill=1.00, aspect=1.00, solidity=1.00, yoffset=0.00, corners=0.98, top_mid=1.00, side_mid=1.00),
    "triangle": dict(fill=0.56, aspect=0.88, solidity=0.945, yoffset=0.15, corners=0.42, top_mid=0.69, side_mid=0.00),
    "star":     dict(fill=0.47, aspect=0.96, solidity=0.65, yoffset=0.05, corners=0.01, top_mid=0.59, side_mid=0.44),
    "diamond":  dict(fill=0.58, aspect=1.31, solidity=0.93, yoffset=0.00, corners=0.00, top_mid=0.84, side_mid=0.90),
    "cross":    dict(fill=0.57, aspect=1.00, solidity=0.76, yoffset=0.00, corners=0.00, top_mid=1.00, side_mid=1.00),
    "heart":    dict(fill=0.67, aspect=0.86, solidity=0.925, yoffset=-0.10, corners=0.30, top_mid=0.35, side_mid=0.59),
}
# LoRA concept shapes (shapes.NEW_SHAPES; opt-in: analyse(..., extra_shapes=True)): >= 32 tolerance-scaled
# squared units from every base prototype on renders and on the demo VAE's round trips of them.
_NEW_PROTOTYPES = {
    "semicircle": dict(fill=0.78, aspect=0.51, solidity=0.965, yoffset=0.07, corners=0.49, top_mid=0.99, side_mid=0.40),
}
_TOLERANCE = dict(fill=0.05, aspect=0.08, solidity=0.04, yoffset=0.03, corners=0.12, top_mid=0.3, side_mid=0.3)


def classify_shape(features: dict[str, float], extra_shapes: bool = False) -> tuple[str, dict[str, float]]:
    """(nearest prototype, {shape: distance}) in tolerance-scaled feature space; `extra_shapes`: the
    shapes.NEW_SHAPES prototypes too."""
    protos = {**_PROTOTYPES, **_NEW_PROTOTYPES} if extra_shapes else _PROTOTYPES
    dist = {name: float(sum(((features[k] - v) / _TOLERANCE[k]) ** 2 for k, v in proto.items()))
            for name, proto in protos.items()}
    return min(dist, key=dist.get), dist


def analyse(image: np.ndarray, extra_colours: bool = False, extra_shapes: bool = False) -> dict:
    """Attributes of a shapes image: {background, colour, shape, position, size, ...diagnostics}.

    `extra_colours`: the shape's colour may also be one of shapes.NEW_COLOURS (LoRA concepts);
    `extra_shapes`: the shape may also be one of shapes.NEW_SHAPES.

    `image` is uint8 (H, W, 3). A blank image reports shape/colour/position/size None.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    img = img.astype(np.float64)
    h, w = img.shape[:2]
    bg = np.median(_border(img, max(1, min(h, w) // 32)), axis=0)
    dist = np.sqrt(((img - bg) ** 2).sum(-1))  # (H, W)
    result = {"background": nearest_colour(bg), "colour": None, "shape": None, "position": None,
              "size": None, "background_rgb": bg.tolist()}
    far = dist > max(40.0, 0.5 * np.percentile(dist, 99.5))
    if far.sum() < 3:
        return result
    far = _largest_blob(far)
    core = far & (dist >= np.percentile(dist[far], 50))
    fg = np.median(img[core], axis=0)
    axis = fg - bg
    alpha = np.clip(((img - bg) @ axis) / (axis @ axis), 0, 1)  # (H, W)
    mask = _largest_blob(alpha > 0.5)
    alpha = np.where(_dilate(mask), alpha, 0.0)
    inner = mask & (alpha > 0.8)  # anti-aliased edge pixels are mixed with the background
    result["colour"] = nearest_colour(np.median(img[inner if inner.any() else mask], axis=0), extra_colours)
    result["colour_rgb"] = fg.tolist()
    # sub-pixel extent: the alpha mass of the rows / columns, crossing 0.5 at the edges
    cols, rows = alpha.max(axis=0), alpha.max(axis=1)
    ext_x, ext_y = cols.sum(), rows.sum()
    cx = (np.arange(w) * cols).sum() / max(ext_x, 1e-9)
    cy = (np.arange(h) * rows).sum() / max(ext_y, 1e-9)
    ys, xs = np.nonzero(mask)
    bx = (xs.min() + xs.max()) / 2 + 0.5
    by = (ys.min() + ys.max()) / 2 + 0.5
    row, col = min(2, int(3 * by / h)), min(2, int(3 * bx / w))
    result["position"] = POSITIONS[3 * row + col]
    extent = max(ext_x / w, ext_y / h)
    result["size"] = _SIZE_NAMES[int(np.abs(_SIZE_VALUES - extent).argmin())]
    feats = shape_features(alpha)
    result["shape"], result["shape_distances"] = classify_shape(feats, extra_shapes)
    result.update(features=feats, extent=float(extent), centre=(float(cx / w), float(cy / h)))
    return result


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= out[:, :-1].copy()
    out[:, :-1] |= out[:, 1:].copy()
    return out


def score(prompt_attrs: dict, analysis: dict) -> dict[str, bool]:
    """Per-attribute agreement of an analysed image with the attributes its prompt asked for,
    plus "all" (every attribute right)."""
    keys = ("shape", "colour", "position", "size", "background")
    out = {k: prompt_attrs.get(k) == analysis.get(k) for k in keys if k in prompt_attrs}
    out["all"] = all(out.values())
    return out


__all__ = ["analyse", "score", "shape_features", "classify_shape", "nearest_colour", "SHAPES", "CELL_CENTRES"]
