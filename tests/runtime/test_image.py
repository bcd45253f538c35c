"""make_grid (runtime/image.py): the one grid maker, with and without captions."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.errors import UsageError
from ldm_deploy.runtime.image import make_grid


def test_tiles_row_major_with_padding_between_and_around():
    images = np.stack([np.full((4, 6, 3), i + 1, np.uint8) for i in range(5)])
    grid = make_grid(images, cols=2, pad=2, fill=0)
    assert grid.shape == (3 * (4 + 2) + 2, 2 * (6 + 2) + 2, 3)
    for i in range(5):
        r, c = divmod(i, 2)
        y, x = 2 + r * 6, 2 + c * 8
        assert (grid[y:y + 4, x:x + 6] == i + 1).all()
    assert grid.sum() == sum((i + 1) * 4 * 6 * 3 for i in range(5))      # padding and the empty tile stay fill


def test_captions_add_a_text_band_and_must_match():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    plain, captioned = make_grid(images), make_grid(images, ["a red circle", "a blue square"])
    assert captioned.shape[1] == plain.shape[1] and captioned.shape[0] > plain.shape[0]
    assert (captioned[34:, 2:34] < 255).any()                            # text drawn under the first tile
    with pytest.raises(UsageError, match="1 captions for 2 images"):
        make_grid(images, ["one"])
    with pytest.raises(UsageError, match=r"\(N, H, W, 3\)"):
        make_grid(np.zeros((2, 4, 4), np.uint8))
