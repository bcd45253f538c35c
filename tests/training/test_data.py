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


# ---- image folders -------------------------------------------------------------------------------

def _save(path, h=40, w=60, value=128):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def test_image_folder_jsonl_and_sidecars(tmp_path):
    from training.data.folder import ImageFolderDataset

    _save(tmp_path / "j" / "a.png")
    _save(tmp_path / "j" / "sub" / "b.jpg", value=10)
    (tmp_path / "j" / "captions.jsonl").write_text(
        json.dumps({"file": "a.png", "caption": "grey"}) + "\n\n" + json.dumps({"file": "sub/b.jpg", "caption": "dark"}) + "\n")
    ds = ImageFolderDataset(tmp_path / "j")
    img, cap, attrs = ds[1]
    assert len(ds) == 2 and img.shape == (40, 60, 3) and img.dtype == np.uint8 and cap == "dark"
    assert attrs == {"file": "sub/b.jpg"}

    _save(tmp_path / "s" / "x.png")
    (tmp_path / "s" / "x.txt").write_text("a thing\n")
    assert ImageFolderDataset(tmp_path / "s")[0][1] == "a thing"


def test_image_folder_errors(tmp_path):
    from training.data.folder import ImageFolderDataset

    with pytest.raises(LdmError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    _save(tmp_path / "s" / "x.png")
    with pytest.raises(LdmError, match="have no caption: x.png"):
        ImageFolderDataset(tmp_path / "s")
    (tmp_path / "e").mkdir()
    with pytest.raises(LdmError, match="no captioned images"):
        ImageFolderDataset(tmp_path / "e")
    (tmp_path / "e" / "captions.jsonl").write_text('{"file": "gone.png", "caption": "x"}\n')
    with pytest.raises(LdmError, match="do not exist: gone.png"):
        ImageFolderDataset(tmp_path / "e")
    (tmp_path / "e" / "captions.jsonl").write_text('{"file": "gone.png"}\n')
    with pytest.raises(LdmError, match="line 1 needs"):
        ImageFolderDataset(tmp_path / "e")
    (tmp_path / "e" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "e" / "captions.jsonl").write_text('{"file": "bad.png", "caption": "x"}\n')
    with pytest.raises(LdmError, match="cannot read image .*bad.png"):
        ImageFolderDataset(tmp_path / "e")[0]


# ---- transforms, loader, sampler -----------------------------------------------------------------

def test_flip_caption_word_boundaries():
    from training.data.loader import flip_caption, names_side

    assert flip_caption("a small red triangle at the top left on a white background") == \
        "a small red triangle at the top right on a white background"
    assert flip_caption("Left of the right one, LEFT!") == "Right of the left one, RIGHT!"
    assert flip_caption("leftover bright copyright") == "leftover bright copyright"
    assert names_side("on the right") and not names_side("leftover bright")


def test_transform_resize_crop_normalise_and_flip():
    from training.data.loader import ImageTransform, resize_centre_crop

    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 40:] = 255  # right half white
    out = resize_centre_crop(img, 16)
    assert out.shape == (16, 16, 3)
    px, cap, flipped = ImageTransform(16)(img, "white on the right", np.random.default_rng(0))
    assert px.dtype == np.float32 and px.shape == (3, 16, 16) and px.min() == -1.0 and px.max() == 1.0
    assert px[:, :, -1].mean() > 0.9 and not flipped and cap == "white on the right"
    rngs = [np.random.default_rng(i) for i in range(40)]
    results = [ImageTransform(16, flip="swap")(img, "white on the right", r) for r in rngs]
    flips = [r for r in results if r[2]]
    assert 5 < len(flips) < 35
    for px, cap, _ in flips:  # the caption stays true for the mirrored image
        assert cap == "white on the left" and px[:, :, 0].mean() > 0.9
    skip = [ImageTransform(16, flip="skip_sided")(img, "white on the right", np.random.default_rng(i))
            for i in range(40)]
    assert not any(r[2] for r in skip)
    with pytest.raises(LdmError):
        ImageTransform(16, flip="vertical")


def test_resumable_sampler():
    from training.data.loader import ResumableSampler

    s = ResumableSampler(10, seed=3)
    e0 = [i for i, _ in s]
    e1 = [i for i, e in s]
    assert sorted(e0) == list(range(10)) and e0 != e1 and s.epoch == 2
    r = ResumableSampler(10, seed=3, epoch=1, start=4)
    assert [i for i, _ in r] == e1[4:] and len(ResumableSampler(10, seed=3, start=4)) == 6
    assert [k for k in ResumableSampler(10, seed=3, epoch=1)] == [(i, 1) for i in e1]
    assert [i for i, _ in ResumableSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]
    with pytest.raises(LdmError):
        r.resume(0, 11)


def _batches(loader):
    return [(b["index"].tolist(), b["caption"], b["pixel_values"].clone()) for b in loader]


def test_loader_deterministic_across_workers_and_resumable():
    from ldm_deploy.runtime.tokenizer import ClipTokenizer
    from pathlib import Path
    from training.data.loader import ImageTransform, make_loader

    tok = ClipTokenizer.from_dir(Path(__file__).resolve().parents[1] / "data" / "clip_tokenizer")
    ds = ShapesDataset(resolution=32, size=12, seed=2)
    kw = dict(batch_size=4, seed=7, transform=ImageTransform(32, flip="swap"))
    a = make_loader(ds, workers=0, tokenizer=tok, **kw)
    first = next(iter(a))
    assert first["pixel_values"].shape == (4, 3, 32, 32) and first["input_ids"].shape == (4, 77)
    assert first["input_ids"].dtype.is_floating_point is False
    a0 = _batches(make_loader(ds, workers=0, **kw))
    a1 = _batches(make_loader(ds, workers=2, **kw))
    for (i0, c0, p0), (i1, c1, p1) in zip(a0, a1, strict=True):
        assert i0 == i1 and c0 == c1 and bool((p0 == p1).all())
    # flipped captions stay true: "left"/"right" swapped exactly for the mirrored items
    flat = [(i, c) for idx, caps, _ in a0 for i, c in zip(idx, caps)]
    assert any(c != ds[i][1] for i, c in flat) and all(c == ds[i][1] or "left" in c or "right" in c for i, c in flat)
    # epoch 1 differs; resuming epoch 1 at sample 4 gives the rest of epoch 1
    loader = make_loader(ds, workers=0, **kw)
    e0, e1 = _batches(loader), _batches(loader)
    assert [b[0] for b in e0] == [b[0] for b in a0] and [b[0] for b in e1] != [b[0] for b in e0]
    resumed = _batches(make_loader(ds, workers=0, epoch=1, start=4, **kw))
    assert [b[0] for b in resumed] == [b[0] for b in e1[1:]]
    assert all(bool((p == q).all()) for (_, _, p), (_, _, q) in zip(resumed, e1[1:]))
