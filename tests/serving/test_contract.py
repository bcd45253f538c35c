"""The request contract: every malformed request is one clear RequestError; defaults equal `generate`'s."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.errors import UsageError
from ldm_deploy.serving.batcher import Job, group
from ldm_deploy.serving.contract import (DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_PROMPT_BYTES, Limits, Request,
                                         RequestError, parse_request)

LIMITS = Limits(height=(64, 128, 128), width=(64, 128, 128), max_batch=4, vae_scale_factor=8,
                default_scheduler="ddim", schedulers=("ddim", "euler-ancestral"))


def text(s) -> np.ndarray:
    return np.array([[s.encode() if isinstance(s, str) else s]], dtype=object)   # (1, 1) as Triton hands it


def test_full_request_and_defaults():
    r = parse_request(LIMITS, {"prompt": text("a red circle"), "negative_prompt": text("blur"),
                               "seed": np.array([[7]], np.int64), "steps": np.array([[12]], np.int32),
                               "guidance": np.array([[3.5]], np.float32), "scheduler": text("euler-ancestral"),
                               "height": np.array([[64]], np.int32), "width": np.array([[128]], np.int32)})
    assert r == Request("a red circle", "blur", 7, 12, 3.5, "euler-ancestral", 64, 128)
    d = parse_request(LIMITS, {"prompt": text("x")}, np.random.default_rng(0))
    assert (d.steps, d.guidance, d.scheduler, d.height, d.width, d.negative_prompt) == (
        DEFAULT_STEPS, DEFAULT_GUIDANCE, "ddim", 128, 128, "")
    assert 0 <= d.seed < 2**63 and d.seed == parse_request(LIMITS, {"prompt": text("x")}, np.random.default_rng(0)).seed
    assert r.generate_args()[:4] == ["--prompt", "a red circle", "--seed", "7"]


@pytest.mark.parametrize("tensors, words", [
    ({}, "'prompt' is missing"),
    ({"prompt": np.array([[1]], np.int64)}, "'prompt' has datatype int64, expected BYTES"),
    ({"prompt": text("x"), "seed": np.array([[1.5]], np.float32)}, "'seed' has datatype float32, expected INT64"),
    ({"prompt": text("x"), "steps": np.array([[0]], np.int32)}, "'steps' is 0; it must be in [1, 500]"),
    ({"prompt": text("x"), "seed": np.array([[-1]], np.int64)}, "'seed' is -1"),
    ({"prompt": text("x"), "height": np.array([[256]], np.int32)}, "'height' is 256; the artifact's profile"),
    ({"prompt": text("x"), "width": np.array([[100]], np.int32)}, "multiples of 8 in [64, 128]"),
    ({"prompt": text("x"), "guidance": np.array([[np.nan]], np.float32)}, "'guidance' is nan"),
    ({"prompt": text("x"), "scheduler": text("heun")}, "'scheduler' is 'heun'; choose one of"),
    ({"prompt": text("x" * (10 << 20))}, f"10485760 bytes; at most {MAX_PROMPT_BYTES}"),
    ({"prompt": text(b"\xff\xfe")}, "not valid UTF-8"),
    ({"prompt": np.array([[b"a", b"b"]], object)}, "holds 2 values"),
    ({"prompt": text("x"), "strength": np.array([[0.5]], np.float32)}, "unknown input(s) ['strength']"),
])
def test_malformed_requests_get_one_clear_error(tensors, words):
    with pytest.raises(RequestError) as e:
        parse_request(LIMITS, tensors)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, UsageError)


def test_group_by_settings_and_cap_at_max_batch():
    def job(i, steps=10, size=128):
        return Job(Request(f"p{i}", "", i, steps, 7.5, "ddim", size, size))

    jobs = [job(0), job(1, steps=5), job(2), job(3), job(4), job(5), job(6, size=64), job(7)]
    batches = group(jobs, max_batch=4)
    assert [[j.request.seed for j in b] for b in batches] == [[0, 2, 3, 4], [5, 7], [1], [6]]


def test_lora_input_parses_names_and_scales_and_splits_batches():
    limits = Limits(height=(64, 128, 128), width=(64, 128, 128), max_batch=4, vae_scale_factor=8,
                    default_scheduler="ddim", schedulers=("ddim",), loras=("style", "ink.v2"))
    r = parse_request(limits, {"prompt": text("x"), "seed": np.array([[1]], np.int64),
                               "lora": text("style:0.8, ink.v2")})
    assert r.loras == (("style", 0.8), ("ink.v2", 1.0))
    assert r.generate_args({"style": "s.safetensors", "ink.v2": "i.safetensors"})[-6:-2] == [
        "--lora", "s.safetensors:0.8", "--lora", "i.safetensors:1.0"]
    same = parse_request(limits, {"prompt": text("y"), "seed": np.array([[2]], np.int64),
                                  "lora": text("style:.8,ink.v2:1")})
    base = parse_request(limits, {"prompt": text("z"), "seed": np.array([[3]], np.int64), "lora": text("")})
    other = parse_request(limits, {"prompt": text("w"), "seed": np.array([[4]], np.int64), "lora": text("style:0.5")})
    assert base.loras == () and same.batch_key == r.batch_key
    batches = group([Job(q) for q in (r, base, same, other)], max_batch=4)
    assert [[j.request.seed for j in b] for b in batches] == [[1, 2], [3], [4]]
    for lora, words in (("nope", "names 'nope', which this server was not started with; it has: style, ink.v2"),
                        ("style:", "the scale of 'style' is '', not a number"),
                        ("style:-101", "the scale of 'style' is -101; it must be a finite number in [-100, 100]")):
        with pytest.raises(RequestError) as e:
            parse_request(limits, {"prompt": text("x"), "lora": text(lora)})
        assert words in str(e.value) and "\n" not in str(e.value)


def test_sdxl_zero_negative_only_when_no_negative_prompt_is_sent():
    from dataclasses import replace

    sdxl = replace(LIMITS, zero_negative=True)
    none = parse_request(sdxl, {"prompt": text("x"), "seed": np.array([[1]], np.int64)})
    empty = parse_request(sdxl, {"prompt": text("x"), "seed": np.array([[1]], np.int64), "negative_prompt": text("")})
    assert none.zero_negative and not empty.zero_negative and none.batch_key != empty.batch_key
    assert "--negative-prompt" not in none.generate_args() and empty.generate_args()[-2:] == ["--negative-prompt", ""]
    assert not parse_request(LIMITS, {"prompt": text("x")}).zero_negative      # SD 1.x/2.x: "" and none are one
