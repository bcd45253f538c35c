"""Shapes generator, image-folder dataset, transforms, loader and resumable sampler."""
import json

import numpy as np
import pytest

from ldm_deploy.errors import LdmError
from training.data.shapes import (BACKGROUNDS, COLOUR_NAMES, HOLDOUT, POSITIONS, SHAPES, SIZES, ShapesDataset,
                                  all_captions, caption, caption_vocabulary, holdout_prompts)


# ---- shapes --------------------------------------------------------------------------------------

def test_shapes_items_are_deterministic_and_random_access():
    a = ShapesDataset(resolution=32, size=20, seed=4)
    b = ShapesDataset(resolution=32, size=20, seed=4)
    img, cap, attrs = a[7]
    assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
    assert cap == caption(attrs)
    for i in (7, 3, 19):  # any order
        assert np.array_equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert a[-1][1] == a[19][1]
    assert not np.array_equal(a[0][0], ShapesDataset(resolution=32, size=20, seed=5)[0][0])
    with pytest.raises(IndexError):
        a[20]


def test_caption_format_and_vocabulary():
    attrs = dict(shape="triangle", colour="red", size="small", position="top left", background="white")
    assert caption(attrs) == "a small red triangle at the top left on a white background"
    assert caption({**attrs, "position": "center"}) == "a small red triangle in the center on a white background"
    vocab = set(caption_vocabulary())
    caps = all_captions()
    assert len(caps) == len(set(caps)) == len(SIZES) * len(SHAPES) * len(POSITIONS) * sum(
        len(BACKGROUNDS) - (c in BACKGROUNDS) for c in COLOUR_NAMES)
    assert all(set(c.split()) <= vocab for c in caps)


def test_holdout_is_documented_balanced_and_never_trained():
    assert len(HOLDOUT) == len(SHAPES) * len(POSITIONS) == 63
    assert ("orange", "circle", "top left") in HOLDOUT  # COLOURS[(3*0 + 5*0 + 1) % 11]
    for shape in SHAPES:
        for pos in POSITIONS:
            assert sum((c, shape, pos) in HOLDOUT for c in COLOUR_NAMES) == 1
    train = ShapesDataset("train", size=3000, seed=0)
    seen = set()
    for i in range(len(train)):
        a = train.attrs(i)[0]
        assert (a["colour"], a["shape"], a["position"]) not in HOLDOUT
        assert a["background"] != a["colour"]
        seen.add((a["colour"], a["shape"], a["position"]))
    assert len(seen) > 500  # most of the 630 training triples appear
    hold = ShapesDataset("holdout", size=200, seed=0)
    assert all((a["colour"], a["shape"], a["position"]) in HOLDOUT for a in (hold.attrs(i)[0] for i in range(200)))
    pairs = holdout_prompts(70, seed=1)
    assert len(pairs) == 70 and len({(a["colour"], a["shape"], a["position"]) for _, a in pairs}) == 63
    assert pairs == holdout_prompts(70, seed=1)
    assert all(p == caption(a) for p, a in pairs)


@pytest.mark.parametrize("resolution", [32, 96, 512])
def test_shapes_resolutions(resolution):
    img, _, attrs = ShapesDataset(resolution=resolution, size=2, seed=1)[1]
    assert img.shape == (resolution, resolution, 3)
    # anti-aliased: some pixels are neither background nor shape
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 2


def test_shapes_bad_arguments():
    for kw in (dict(split="test"), dict(resolution=16), dict(size=0)):
        with pytest.raises(LdmError):
            ShapesDataset(**kw)
