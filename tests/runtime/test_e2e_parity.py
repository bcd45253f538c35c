"""End-to-end parity on CPU, fp32: the numpy pipeline over ONNX Runtime against

1. the same loop over the PyTorch modules (TorchRunner), every scheduler, same latents and seed;
2. diffusers' StableDiffusionPipeline on the same tiny diffusers folder with the same initial latents
   and the equivalent diffusers scheduler (deterministic samplers: diffusers draws its step noise from
   torch's RNG, which a numpy runtime can't reproduce; the stochastic ones are covered by 1.).

Images must agree to PSNR >= 40 dB. The tiny model is exported once per session by the real exporter.
"""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.runtime.pipeline import Pipeline
from ldm_deploy.runtime.schedulers import SCHEDULERS
from tests.runtime.tiny_model import psnr, tiny_artifact, tiny_folder  # noqa: F401 (fixtures)

torch = pytest.importorskip("torch")

PROMPT, NEGATIVE = "a red circle on a blue square", "blurry"
STEPS = 4

DIFFUSERS = {  # CLI name -> (diffusers class, extra config)
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


@pytest.fixture(scope="module")
def ort_pipe(tiny_artifact):
    return Pipeline.from_artifact(tiny_artifact)


@pytest.fixture(scope="module")
def torch_pipe(tiny_folder):
    from training.runner import pipeline_from_model_folder

    return pipeline_from_model_folder(tiny_folder)


@pytest.fixture(scope="module")
def sd_pipe(tiny_folder):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_folder), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.folder_scheduler_config = pipe.scheduler.config  # each test derives its scheduler from this
    return pipe


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(1234).standard_normal((2, 4, 4, 4), dtype=np.float32)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_ort_equals_torch_every_scheduler(ort_pipe, torch_pipe, latents, name):
    kw = dict(negative_prompt=NEGATIVE, steps=STEPS, scheduler=name, latents=latents[:1], seed=5)
    a, b = ort_pipe(PROMPT, **kw), torch_pipe(PROMPT, **kw)
    assert b.images.std() > 10, "the tiny model should make images with structure"
    assert psnr(a.images, b.images) >= 40, name
    assert_close(a.latents, b.latents, atol=1e-3, name=f"{name} final latents")


def test_ort_equals_torch_img2img_and_batch(ort_pipe, torch_pipe):
    init = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    kw = dict(steps=6, strength=0.6, seed=9, image=init, num_images=2, guidance=6.0, guidance_rescale=0.5)
    a, b = ort_pipe([PROMPT], **kw), torch_pipe([PROMPT], **kw)
    assert a.images.shape == (2, 32, 32, 3)
    assert not np.array_equal(a.images[0], a.images[1])  # different noise per image
    assert psnr(a.images, b.images) >= 40


@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_ort_equals_diffusers(ort_pipe, sd_pipe, latents, name):
    import diffusers

    pipe = sd_pipe
    cls, extra = DIFFUSERS[name]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.folder_scheduler_config, **extra)
    with torch.no_grad():
        ref = pipe([PROMPT, "a green triangle"], negative_prompt=[NEGATIVE, ""], num_inference_steps=STEPS,
                   guidance_scale=7.5, latents=torch.from_numpy(latents), height=32, width=32, output_type="np").images
    ref = np.round(np.asarray(ref) * 255).astype(np.uint8)
    ours = ort_pipe([PROMPT, "a green triangle"], negative_prompt=[NEGATIVE, ""], steps=STEPS, guidance=7.5,
                    scheduler=name, latents=latents).images
    assert ref.std() > 10
    assert psnr(ours, ref) >= 40, name


def test_torch_reference_equals_diffusers_guidance_rescale(torch_pipe, sd_pipe, latents):
    """guidance_rescale through the reference loop equals diffusers' rescale_noise_cfg."""
    import diffusers

    pipe = sd_pipe
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.folder_scheduler_config)
    with torch.no_grad():
        ref = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=9.0, guidance_rescale=0.7,
                   latents=torch.from_numpy(latents[:1]), height=32, width=32, output_type="np").images
    ours = torch_pipe(PROMPT, steps=STEPS, guidance=9.0, guidance_rescale=0.7, scheduler="ddim", latents=latents[:1])
    assert psnr(ours.images, np.round(np.asarray(ref) * 255).astype(np.uint8)) >= 40
