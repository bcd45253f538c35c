"""Bad arguments to `ldm-deploy generate` and `Pipeline.__call__`: a one-line usage error (exit 2),
or a documented behaviour (docs/DESIGN.md "Input checking"): an empty prompt is the unconditional
prompt; a prompt over 77 tokens is truncated with a warning; any valid Unicode is accepted.

The Pipeline's numeric checks are also pinned with fake runners in tests/runtime/test_pipeline.py
(test_bad_arguments_are_one_line_usage_errors); here they run on the real tiny artifact and CLI.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from ldm_deploy.errors import UsageError
from tests.reliability.conftest import cli

ODD_PROMPTS = {
    "empty": "",
    "10000 chars": "a lighthouse at dusk, " * 454 + "ab",
    "rtl": "\u0645\u0646\u0627\u0631\u0629 \u0639\u0646\u062f \u0627\u0644\u063a\u0633\u0642 \u202e reversed",
    "zero-width": "a\u200bred\u200c\u200dcube\ufeff",
    "emoji": "\U0001f680\U0001f525 \U0001f468\u200d\U0001f469\u200d\U0001f467 cube",
    "nul": "a red\x00cube",
    "combining": "e\u0301" * 200,
    "control": "\t\n\r\x1b[31mred\x7f",
}


@pytest.fixture(scope="module")
def pipe(artifact):
    from ldm_deploy.runtime.pipeline import Pipeline

    return Pipeline.from_artifact(artifact)


@pytest.mark.parametrize("case", list(ODD_PROMPTS))
def test_odd_prompts_generate_images(pipe, case, caplog):
    result = pipe(ODD_PROMPTS[case], steps=2, seed=0, height=32, width=32)
    assert result.images.shape == (1, 32, 32, 3) and result.images.dtype == np.uint8
    if case == "10000 chars":
        assert "too long for the text encoder" in caplog.text and "were dropped" in caplog.text


def test_undecodable_prompt_is_a_usage_error(pipe):
    with pytest.raises(UsageError, match="not valid Unicode"):
        pipe("a \udcff cube", steps=2, seed=0, height=32, width=32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=-1), "steps must be a positive integer"),
    (dict(steps=2.5), "steps must be a positive integer"),
    (dict(guidance=-1.0), "guidance must be a finite number"),
    (dict(guidance=math.nan), "guidance must be a finite number"),
    (dict(guidance=math.inf), "guidance must be a finite number"),
    (dict(height=36), "multiple of 8"),
    (dict(width=0), "multiple of 8"),
    (dict(height=128), "outside the artifact's profile"),
    (dict(width=16), "outside the artifact's profile"),
    (dict(num_images=5), "batch of 5 images .* outside the artifact's profile"),
    (dict(scheduler="warp-drive"), "unknown scheduler"),
    (dict(latents=np.zeros((1, 3, 4, 4), np.float32)), "latents have shape"),
    (dict(latents=np.zeros((1, 4, 3, 3), np.float32)), "outside the artifact's profile"),
    (dict(eta=math.nan), "eta must be"),
    (dict(latents=np.full((1, 4, 4, 4), np.nan, np.float32)), "latents contain NaN"),
])
def test_pipeline_refuses(pipe, kwargs, match):
    with pytest.raises(UsageError, match=match) as e:
        pipe("a red cube", **{"steps": 2, "seed": 0, **kwargs})
    assert "\n" not in str(e.value)


CLI_CASES = {
    "steps 0": (["--steps", "0"], "steps must be a positive integer"),
    "steps negative": (["--steps", "-3"], "steps must be a positive integer"),
    "steps not a number": (["--steps", "many"], "invalid int value"),
    "guidance negative": (["--guidance", "-2"], "guidance must be a finite number"),
    "guidance nan": (["--guidance", "nan"], "guidance must be a finite number"),
    "guidance inf": (["--guidance", "inf"], "guidance must be a finite number"),
    "height not multiple of 8": (["--height", "36"], "multiple of 8"),
    "height outside profile": (["--height", "512"], "outside the artifact's profile"),
    "width outside profile": (["--width", "8"], "outside the artifact's profile"),
    "batch beyond profile": (["--num-images", "5"], "outside the artifact's profile"),
    "num-images 0": (["--num-images", "0"], "num_images must be a positive integer"),
    "unknown scheduler": (["--scheduler", "warp-drive"], "invalid choice"),
    "unknown backend": (["--backend", "cuda-magic"], "invalid choice"),
    "strength out of range": (["--strength", "1.5", "--image", "INIT"], "strength must be in"),
    "prompt with undecodable bytes": (["--prompt", "a \udcff cube"], "not valid Unicode"),
}


@pytest.fixture(scope="module")
def init_png(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_generate_cli_refuses(artifact, tmp_path, init_png, case):
    flags, match = CLI_CASES[case]
    flags = [str(init_png) if f == "INIT" else f for f in flags]
    prompt = [] if "--prompt" in flags else ["--prompt", "a red cube"]
    out = tmp_path / ("outdir" if "--num-images" in flags else "x.png")
    base = {"--steps": "2", "--height": "32", "--width": "32"}
    for flag in flags:
        base.pop(flag, None)
    extra = [x for kv in base.items() for x in kv]
    ran = cli("generate", artifact, *prompt, *flags, *extra, "--seed", "0", "--out", out)
    ran.assert_clean_failure(2, match)
    assert not out.exists()


def test_generate_cli_empty_and_long_prompts_work(artifact, tmp_path):
    """The documented behaviours: "" is the unconditional prompt; long prompts are truncated with a warning."""
    out = tmp_path / "empty.png"
    ran = cli("generate", artifact, "--prompt", "", "--steps", "2", "--height", "32", "--width", "32",
              "--seed", "0", "--out", out)
    assert ran.rc == 0, ran.stderr
    assert out.is_file()
    out = tmp_path / "long.png"
    ran = cli("generate", artifact, "--prompt", ODD_PROMPTS["10000 chars"], "--steps", "2", "--height", "32",
              "--width", "32", "--seed", "0", "--out", out)
    assert ran.rc == 0, ran.stderr
    assert "too long for the text encoder" in ran.stderr and out.is_file()
