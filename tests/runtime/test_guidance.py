"""runtime/guidance.py: the CFG formula, the rescale and the U-Net feeds, on numpy and on torch tensors."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.runtime import guidance as g
from ldm_deploy.runtime.pipeline import CfgDenoiser, FoldedCfgDenoiser, make_denoiser

RNG = np.random.default_rng(0)
UNCOND, COND = (RNG.standard_normal((2, 4, 4, 4)).astype(np.float32) for _ in range(2))


def test_guide_is_the_cfg_formula_bit_for_bit():
    out = g.guide(UNCOND, COND, 7.5)
    assert out.dtype == np.float32 and out is not COND and out is not UNCOND
    assert np.array_equal(out, (COND - UNCOND) * np.float32(7.5) + UNCOND)       # as the folded graph computes it
    assert np.array_equal(g.guide(UNCOND, COND, 7.5, 0.7), g.rescale_noise_cfg(out, COND, 0.7))
    assert np.array_equal(g.guide(COND, COND, 1.0), COND)    # the folded graph without CFG: cond - cond = 0 exactly


def test_guide_on_torch_tensors_equals_numpy():
    """bench/torch_side.py guides tensors with the same function."""
    torch = pytest.importorskip("torch")
    for rescale in (0.0, 0.7):
        got = g.guide(torch.from_numpy(UNCOND), torch.from_numpy(COND), 7.5, rescale)
        assert isinstance(got, torch.Tensor)
        # the same float32 ops; the rescale's std reduces in another order in torch: a few ulps of values ~10
        assert_close(got.numpy(), g.guide(UNCOND, COND, 7.5, rescale), atol=1e-5, rtol=1e-6, name=f"rescale {rescale}")


def test_rows_and_folded_feeds():
    ctx = RNG.standard_normal((2, 77, 8)).astype(np.float32)
    neg = np.zeros_like(ctx)
    rows = g.rows(neg, ctx, 7.5)
    assert np.array_equal(rows, np.concatenate([neg, ctx])) and not rows.flags.writeable       # [uncond; cond]
    assert g.rows(None, ctx, 1.0) is ctx and not g.uses_cfg(1.0) and g.uses_cfg(1.01)
    # a folded graph always takes two halves: without CFG the cond rows twice and g = 1, phi = 0
    assert np.array_equal(g.folded_context(ctx, 1.0), np.concatenate([ctx, ctx]))
    assert g.folded_context(rows, 7.5) is rows
    off, on = g.folded_scalars(1.0, 0.7), g.folded_scalars(7.5, 0.7)
    assert (off[g.SCALE][0], off[g.RESCALE][0], on[g.SCALE][0]) == (1.0, 0.0, 7.5)
    assert on[g.RESCALE].dtype == np.float32 and on[g.RESCALE].shape == (1,) and not on[g.SCALE].flags.writeable
    x, t = np.zeros((2, 4, 4, 4), np.float32), np.full(2, 500.0, np.float32)
    assert set(g.folded_feeds(x, t, rows, on)) == {"sample", "timestep", "encoder_hidden_states", "guidance_scale",
                                                   "guidance_rescale"}
    assert set(g.plain_feeds(x, t, ctx, {"time_ids": t})) == {"sample", "timestep", "encoder_hidden_states",
                                                              "time_ids"}


class _Runner:
    def __init__(self, fn, input_names):
        self.fn, self.input_names, self.calls = fn, input_names, []

    def __call__(self, feeds):
        self.calls.append(feeds)
        return {"noise_pred": self.fn(feeds)}


def test_make_denoiser_picks_the_path_by_the_runners_inputs():
    ctx = np.concatenate([np.zeros((1, 77, 8), np.float32), np.ones((1, 77, 8), np.float32)])
    x = RNG.standard_normal((1, 4, 4, 4)).astype(np.float32)
    plain = _Runner(lambda f: f["sample"] * f["encoder_hidden_states"][:, :1, :1, None], ("sample",))
    den = make_denoiser(plain, ctx, 7.5, 0.0)
    assert isinstance(den, CfgDenoiser)
    out = den(x, 500.0)
    assert plain.calls[0]["sample"].shape[0] == 2 and np.array_equal(out, g.guide(0 * x, x, 7.5))
    folded = _Runner(lambda f: f["sample"] * f["guidance_scale"][0], ("sample", "guidance_scale"))
    den = make_denoiser(folded, ctx[1:], 1.0, 0.0)                # no CFG: the B rows twice, g = 1
    assert isinstance(den, FoldedCfgDenoiser)
    assert np.array_equal(den(x, 500.0), x) and folded.calls[0]["encoder_hidden_states"].shape[0] == 2
    assert folded.calls[0]["timestep"].shape == (1,)
    timings = den.timings(1.0)
    assert timings["unet_calls"] == 1 and 0 <= timings["unet"] <= timings["denoise"] == 1.0
    # SDXL's per-row conditioning goes to a folded graph as the context does: 2B rows, or the B rows twice
    ids = np.arange(12, dtype=np.float32).reshape(2, 6)
    make_denoiser(folded, ctx, 7.5, 0.0, {"time_ids": ids})(x, 500.0)
    assert folded.calls[-1]["time_ids"] is ids and folded.calls[-1]["guidance_scale"][0] == 7.5
    make_denoiser(folded, ctx[1:], 1.0, 0.0, {"time_ids": ids[1:]})(x, 500.0)
    assert np.array_equal(folded.calls[-1]["time_ids"], ids[[1, 1]])
