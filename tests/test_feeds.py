"""example_feeds (ldm_deploy/feeds.py): the one maker of example inputs, from a component description."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm_deploy.artifact import ComponentSpec, TensorSpec
from ldm_deploy.errors import LdmError
from ldm_deploy.feeds import GUIDANCE, example_feeds

UNET = ComponentSpec(
    name="unet", file="unet/model.onnx", external_data=None, precision="fp16", batch_multiplier=2,
    inputs=(TensorSpec("sample", "float16", ("unet_batch", 4, "latent_height", "latent_width")),
            TensorSpec("timestep", "float32", ("unet_batch",)),
            TensorSpec("encoder_hidden_states", "float16", ("unet_batch", 77, 32)),
            TensorSpec("guidance_scale", "float32", (1,))),
    outputs=(TensorSpec("noise_pred", "float16", ("unet_batch", 4, "latent_height", "latent_width")),),
    profile={"sample": {"min": [2, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]},
             "timestep": {"min": [2], "opt": [2], "max": [8]},
             "encoder_hidden_states": {"min": [2, 77, 32], "opt": [2, 77, 32], "max": [8, 77, 32]},
             "guidance_scale": {"min": [1], "opt": [1], "max": [1]}})
TEXT = ComponentSpec(
    name="text_encoder", file="text_encoder/model.onnx", external_data=None, precision="fp32", batch_multiplier=1,
    inputs=(TensorSpec("input_ids", "int32", ("batch", 77)),),
    outputs=(TensorSpec("last_hidden_state", "float32", ("batch", 77, 32)),),
    profile={"input_ids": {"min": [1, 77], "opt": [1, 77], "max": [4, 77]}})


def test_shapes_dtypes_and_ranges_follow_the_spec():
    x = example_feeds(UNET, batch=3, seed=0)
    assert {k: (v.shape, v.dtype.name) for k, v in x.items()} == {
        "sample": ((6, 4, 8, 8), "float16"), "timestep": ((6,), "float32"),
        "encoder_hidden_states": ((6, 77, 32), "float16"), "guidance_scale": ((1,), "float32")}
    assert 0 <= x["timestep"].min() and x["timestep"].max() <= 999 and np.any(x["timestep"] % 1)   # fractional
    assert x["guidance_scale"][0] == GUIDANCE
    assert example_feeds(UNET, which="max")["sample"].shape == (8, 4, 16, 16)
    assert example_feeds(UNET, shapes={"sample": (2, 4, 6, 6)})["sample"].shape == (2, 4, 6, 6)
    assert example_feeds(UNET, float_dtype=np.float32)["sample"].dtype == np.float32
    ids = example_feeds(TEXT, 2, seed=1, vocab_size=50)["input_ids"]
    assert ids.shape == (2, 77) and ids.dtype == np.int32 and 0 <= ids.min() and ids.max() < 50


def test_deterministic_per_seed():
    a, b, c = (example_feeds(UNET, 1, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["sample"], c["sample"])


def test_unsized_dynamic_axis_is_refused():
    bare = ComponentSpec(**{**UNET.__dict__, "profile": {}})
    with pytest.raises(LdmError, match="'sample' has dynamic axes"):
        example_feeds(bare)


def test_torch_free():
    """numpy only: the runtime, bench and tests use it without torch."""
    code = ("import sys; import ldm_deploy.feeds, ldm_deploy.configfile; "
            "bad = [m for m in ('torch', 'onnx', 'training') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
