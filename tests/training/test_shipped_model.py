"""The shipped demo model (models/shapes-demo): size, diffusers compatibility, and what it draws.

Numbers from `ldm-train eval` on 200 held-out prompts (docs/demo_model/eval_report.json): colour 100 %,
shape 99.5 %, position 100 %, background 100 %. The bars below are the issue's aims (>= 90 % colour and
shape, >= 80 % position) on a 16-prompt sample; the sampler is seeded, so a failure means the model or the
sampling path changed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "shapes-demo"
N_PROMPTS = 16
BARS = {"position": 13, "background": 15, "colour": 15, "shape": 15}  # of 16 (this seed reads 16 of 16 for all four)


def test_shipped_model_fits_in_12_mb():
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size <= 12_000_000, size


@pytest.fixture(scope="module")
def components():
    from training.checkpoint import load_components

    return load_components(MODEL)


def test_heldout_prompts_read_back_above_the_bar(components):
    from training.data.analyser import analyse, score
    from training.data.shapes import HOLDOUT, holdout_prompts
    from training.stages.sampling import generate

    pairs = holdout_prompts(N_PROMPTS, seed=1)
    assert all((a["colour"], a["shape"], a["position"]) in HOLDOUT for _, a in pairs)
    modules = {"unet": components.unet, "vae": components.vae, "text_encoder": components.text_encoder}
    images = generate(modules, components.tokenizer_dir, components.scheduler_config,
                      components.vae.config.scaling_factor, [p for p, _ in pairs], steps=25, guidance=5.0,
                      seed=0, batch=N_PROMPTS, resolution=128)
    assert images.shape == (N_PROMPTS, 128, 128, 3)
    scores = [score(attrs, analyse(im)) for im, (_, attrs) in zip(images, pairs)]
    hits = {k: sum(s[k] for s in scores) for k in BARS}
    print("hits of", N_PROMPTS, hits)
    assert all(hits[k] >= bar for k, bar in BARS.items()), hits


def test_loads_in_diffusers_with_equal_outputs(components):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(MODEL), safety_checker=None,
                                                             requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 77, components.text_encoder.config.hidden_size, generator=g)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        ours = components.unet(sample, t, text)
        ours = getattr(ours, "sample", ours[0] if isinstance(ours, tuple) else ours)
        theirs = pipe.unet(sample, t, encoder_hidden_states=text).sample
        latents = torch.randn(1, 4, 16, 16, generator=g)
        dec_ours = components.vae.decode(latents)
        dec_ours = getattr(dec_ours, "sample", dec_ours[0] if isinstance(dec_ours, tuple) else dec_ours)
        dec_theirs = pipe.vae.decode(latents).sample
    np.testing.assert_allclose(ours.float().numpy(), theirs.float().numpy(), atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(dec_ours.float().numpy(), dec_theirs.float().numpy(), atol=1e-4, rtol=1e-3)
