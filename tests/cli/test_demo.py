"""`ldm-deploy demo` on a tiny random model folder: outputs, cached export, parity, prompts, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ldm_deploy.cli import main
from ldm_deploy.compare import assert_close
from ldm_deploy.demo import (MODEL_ENV, SEEN_PROMPTS, DemoConfig, demo_prompts, parse_caption,
                             read_prompts, resolve_model, run_demo)
from ldm_deploy.errors import LdmError
from ldm_deploy.runtime.image import make_grid
from tests.runtime.tiny_model import tiny_folder  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def demo(tiny_folder, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("demo") / "out"
    return run_demo(DemoConfig(model=tiny_folder, out=out, steps=3, progress=False))


def test_demo_writes_grid_images_and_report(demo):
    report = json.loads(demo.report_path.read_text())
    assert demo.grid.is_file() and len(demo.images) == 8 and all(p.is_file() for p in demo.images)
    assert [r["split"] for r in report["images"]] == ["seen"] * 4 + ["holdout"] * 4
    assert report["backend"] == "ort-cpu" and report["timings"]["export_cached"] is False
    assert report["height"] == 128  # the tiny U-Net (sample_size 4 -> 32 px) is below the demo profile: its opt
    assert report["timings"]["images_per_s"] > 0 and report["timings"]["load_s"] > 0
    assert set(report["accuracy"]) == {"seen", "holdout"} and report["accuracy"]["holdout"]["n"] == 4
    for row in report["images"]:
        assert set(row["analysis"]) == {"shape", "colour", "position", "size", "background"}
        assert row["score"] is not None and "all" in row["score"]
    from PIL import Image

    with Image.open(demo.grid) as grid:
        assert grid.width >= 4 * 128 and grid.height > 2 * 128  # 4 columns of 128 px tiles + captions


def test_demo_parity_against_pytorch(demo):
    parity = demo.report["parity"]
    assert parity["max_abs_pixel_diff"] <= 2, parity          # fp32 ORT vs fp32 PyTorch through one loop
    assert parity["latents"]["max_abs"] < 1e-3 and parity["latents"]["nan_count"] == 0


def test_demo_reuses_the_export_and_is_deterministic(demo, tiny_folder, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# comment\n{SEEN_PROMPTS[0]}\n\na photo of a cat\n")
    again = run_demo(DemoConfig(model=tiny_folder, out=demo.out, steps=3, progress=False, parity=False,
                                prompts=read_prompts(prompts)))
    assert again.report["timings"]["export_cached"] is True
    assert "parity" not in again.report
    from PIL import Image

    first, second = (np.asarray(Image.open(p)) for p in (demo.images[0], again.images[0]))
    assert_close(second, first, atol=0, name="same prompt and seed, second run")
    assert [r["split"] for r in again.report["images"]] == ["seen", "custom"]
    assert again.report["images"][1]["score"] is None


def test_cli_demo_with_prompts_file_and_quiet(demo, tiny_folder, tmp_path, capsys):  # noqa: F811
    prompts = tmp_path / "p.txt"
    prompts.write_text("a small red triangle at the top left on a white background\n")
    rc = main(["demo", "--model", str(tiny_folder), "--out", str(demo.out), "--steps", "2", "--prompts",
               str(prompts), "--no-parity", "--quiet"])
    assert rc == 0
    report = json.loads((demo.out / "report.json").read_text())
    assert report["steps"] == 2 and len(report["images"]) == 1 and report["timings"]["export_cached"]
    assert capsys.readouterr().err == ""


def test_default_prompts_hold_seen_and_heldout_combinations():
    from training.data.shapes import HOLDOUT

    rows = demo_prompts()
    for row in rows:
        a = row["attrs"]
        assert ((a["colour"], a["shape"], a["position"]) in HOLDOUT) == (row["split"] == "holdout"), row
        assert parse_caption(row["prompt"]) == a
    assert parse_caption("a photo of a cat") is None


def test_missing_model_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(LdmError, match=MODEL_ENV):
        resolve_model()
    assert main(["demo", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model" in err and "nowhere" in err
    assert not (tmp_path / "o").exists()  # nothing written
    assert main(["demo", "--steps", "x"]) == 2
    assert "invalid int value" in capsys.readouterr().err


def test_env_var_picks_the_model(tiny_folder, monkeypatch):  # noqa: F811
    monkeypatch.setenv(MODEL_ENV, str(tiny_folder))
    assert resolve_model() == tiny_folder
    assert resolve_model(tiny_folder) == tiny_folder


def test_captioned_grid_layout():
    images = np.zeros((5, 32, 32, 3), np.uint8)
    grid = make_grid(images, [f"caption number {i} with several words" for i in range(5)], cols=3, pad=4)
    assert grid.dtype == np.uint8 and grid.shape[1] == 3 * 36 + 4 and grid.shape[0] > 2 * 32
    with pytest.raises(Exception, match="captions"):
        make_grid(images, ["one"])


def test_images_are_made_at_the_models_native_size_when_the_profile_allows(tmp_path):
    from types import SimpleNamespace

    from ldm_deploy.artifact import Profiles, Range
    from ldm_deploy.demo import _native_size

    (tmp_path / "unet").mkdir()
    pipe = SimpleNamespace(vae_scale_factor=8, profiles=Profiles(batch=Range(1, 1, 1), height=Range(64, 128, 128),
                                                                 width=Range(64, 128, 128)))
    for sample, expected in ((8, 64), (16, 128), (4, 128), (32, 128)):
        (tmp_path / "unet" / "config.json").write_text(json.dumps({"sample_size": sample}))
        assert _native_size(tmp_path, pipe) == expected, sample
