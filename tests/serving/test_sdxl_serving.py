"""The serving module over an SDXL artifact (tiny SDXL folder, ORT CPU): the same request contract; a request
without negative_prompt gets SDXL's zero negative conditioning (as `generate` without --negative-prompt) and
never shares a pipeline call with one that sent a negative prompt; LoRAs (kohya lora_unet_ / lora_te2_) switch
per batch; every image equals `generate` (the pipeline alone) byte for byte."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.runtime.pipeline import Pipeline
from ldm_deploy.serving.batcher import BatchSampler, Job
from ldm_deploy.serving.contract import parse_request
from tests.serving.lora_setup import export_switchable, write_kohya

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow      # a tiny SDXL folder and its export (~30 s on 2 cores)

SIZE = 32


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from ldm_deploy.export.config import ExportConfig, Range
    from tests.runtime.tiny_sdxl import make_tiny_sdxl

    root = tmp_path_factory.mktemp("serve-sdxl")
    config = ExportConfig(name="tiny-sdxl", batch=Range(1, 1, 2), height=Range(SIZE, SIZE, SIZE),
                          width=Range(SIZE, SIZE, SIZE),
                          components=("text_encoder", "text_encoder_2", "unet", "vae_decoder"))
    return export_switchable(make_tiny_sdxl(root / "base"), root / "onnx", config)


@pytest.fixture(scope="module")
def lora(artifact, tmp_path_factory):
    return write_kohya(artifact, tmp_path_factory.mktemp("serve-sdxl-lora") / "x.safetensors", 4,
                       targets={"unet": ("attn2.to_k.weight", "ff.net.2.weight"), "text_encoder_2": ("q_proj.weight",)})


def text(s: str) -> np.ndarray:
    return np.array([[s.encode()]], dtype=object)


def request(limits, prompt, seed, negative=None, lora=None):
    tensors = {"prompt": text(prompt), "seed": np.array([[seed]], np.int64), "steps": np.array([[3]], np.int32),
               "guidance": np.array([[5.0]], np.float32), "scheduler": text("euler-ancestral")}
    for name, value in (("negative_prompt", negative), ("lora", lora)):
        if value is not None:
            tensors[name] = text(value)
    return parse_request(limits, tensors)


def alone(artifact, lora, r):
    pipe = Pipeline.from_artifact(artifact)
    if r.loras:
        pipe.set_loras([(lora, scale) for _, scale in r.loras])
    return pipe(r.prompt, None if r.zero_negative else r.negative_prompt, steps=r.steps, guidance=r.guidance,
                scheduler=r.scheduler, seed=r.seed, height=r.height, width=r.width).images[0]


def test_sdxl_requests_batch_and_equal_generate(artifact, lora, tmp_path):
    from PIL import Image

    from ldm_deploy.cli import main

    sampler = BatchSampler(Pipeline.from_artifact(artifact), loras={"x": lora})
    limits = sampler.limits
    assert limits.zero_negative and (limits.height, limits.width, limits.max_batch) == ((32,) * 3, (32,) * 3, 2)
    requests = [request(limits, "a red circle", 1), request(limits, "a blue square", 2, negative="blurry"),
                request(limits, "a green star", 3), request(limits, "a red circle", 4, negative=""),
                request(limits, "a red circle", 1, lora="x:0.8")]
    assert [r.zero_negative for r in requests] == [True, False, True, False, True]
    jobs = [Job(r) for r in requests]
    sampler.run(jobs)
    assert [j.batch_size for j in jobs] == [2, 2, 2, 2, 1]
    for job in jobs:
        assert job.error is None and np.array_equal(job.image, alone(artifact, lora, job.request)), job.request
    assert not np.array_equal(jobs[0].image, jobs[4].image)                 # the LoRA changed the image
    for job in (jobs[3], jobs[4]):       # an explicit "" negative (encoded) and a zero one with a LoRA
        out = tmp_path / f"{job.request.seed}.png"
        args = job.request.generate_args({"x": lora})
        assert main(["generate", str(artifact), *args, "--out", str(out), "-q"]) == 0
        assert np.array_equal(np.asarray(Image.open(out)), job.image), args
