"""The PyTorch baseline's own DDIM loop against diffusers' DDIMScheduler, for each prediction type."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ldm_deploy.bench.prepare import random_model_folder

    model, _ = random_model_folder("tiny", tmp_path_factory.mktemp("torch-side") / "model")
    return model


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_loop_matches_diffusers(tiny, prediction_type):
    """Same U-Net outputs in both loops: only the conversion of the model output (eps / v / x0) and the DDIM
    update differ; `sample` was once treated as eps here."""
    from ldm_deploy.bench.torch_side import TorchTxt2Img
    from ldm_deploy.compare import assert_close
    from ldm_deploy.runtime.tokenizer import ClipTokenizer
    from training.checkpoint import load_components

    torch.set_num_threads(1)
    comps = load_components(tiny)
    config = {**comps.scheduler_config, "prediction_type": prediction_type, "clip_sample": False,
              "thresholding": False}
    pipe = TorchTxt2Img(comps, ClipTokenizer.from_dir(comps.tokenizer_dir), config, torch.device("cpu"), torch.float32,
                        steps=3)
    final = {}

    def capture(latents):
        final["x"] = latents.clone()
        return torch.zeros((latents.shape[0], 3, 8, 8), dtype=torch.uint8)

    pipe.decode = capture
    with torch.inference_mode():
        pipe("a red circle", 1, 64, 64, 7.5, seed=0)
        sched = diffusers.DDIMScheduler.from_config(config)
        sched.set_timesteps(3)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((1, pipe.in_channels, 8, 8), generator=gen) * sched.init_noise_sigma
        emb = pipe.encode_text(["", "a red circle"])
        assert [float(t) for t in sched.timesteps] == [s[0] for s in pipe.steps]
        for t in sched.timesteps:
            x = sched.step(pipe.unet_step(x, float(t), emb, 7.5), t, x, eta=0.0).prev_sample
    # float32 throughout; diffusers keeps alphas as float32 tensors, the loop as Python floats: a few ulps per
    # step on latents of order 1 (v / sample divide by sqrt(1 - alpha_bar), up to ~10x at the last step)
    assert_close(final["x"].numpy(), x.numpy(), atol=1e-4, rtol=1e-4, name=f"DDIM latents ({prediction_type})")
