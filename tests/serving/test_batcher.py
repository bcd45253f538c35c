"""BatchSampler over the tiny artifact (ORT CPU): batched rows equal their images alone, byte for byte;
cancellation and timeouts end one request at the next step and leave its batch's other rows unchanged."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.runtime.pipeline import Pipeline
from ldm_deploy.runtime.schedulers.noise import RowRNG
from ldm_deploy.serving.batcher import BatchSampler, Cancelled, Job, TimedOut
from ldm_deploy.serving.contract import Request
from tests.runtime.tiny_model import tiny_artifact, tiny_folder  # noqa: F401 (fixtures)

PROMPTS = ["a red cube", "a blue sphere on grass", "", "a green cone, at dusk"]


@pytest.fixture(scope="module")
def pipe(tiny_artifact):  # noqa: F811
    return Pipeline.from_artifact(tiny_artifact)


class Recorder:
    """Records the batch size of every call of the runner it wraps (observation only)."""

    def __init__(self, runner):
        self.runner, self.rows = runner, []
        self.component, self.input_names = runner.component, runner.input_names
        self.output_names = runner.output_names

    def __call__(self, inputs):
        self.rows.append(int(np.shape(inputs["sample"])[0]))
        return self.runner(inputs)


def requests(scheduler="ddim", steps=4, n=4, size=32):
    return [Request(PROMPTS[i % 4], "blurry" if i == 1 else "", 100 + i, steps, 5.0, scheduler, size, size)
            for i in range(n)]


def alone(pipe, r: Request) -> np.ndarray:
    return pipe(r.prompt, r.negative_prompt or None, steps=r.steps, guidance=r.guidance, scheduler=r.scheduler,
                seed=r.seed, height=r.height, width=r.width).images[0]


def test_row_rng_draws_each_row_from_its_own_seed():
    rng = RowRNG([3, 4])
    x = rng.standard_normal((2, 5, 2), dtype=np.float32)
    for row, seed in zip(x, (3, 4)):
        assert np.array_equal(row, np.random.default_rng(seed).standard_normal((5, 2), dtype=np.float32))
    assert np.array_equal(RowRNG([9]).standard_normal((1, 3)), np.random.default_rng(9).standard_normal((1, 3)))
    with pytest.raises(ValueError):
        rng.standard_normal((3, 5))


@pytest.mark.parametrize("scheduler", ["ddim", "euler-ancestral", "ddpm", "dpmpp-2m"])
def test_batched_requests_equal_their_images_alone(pipe, scheduler):
    sampler = BatchSampler(pipe)
    jobs = [Job(r) for r in requests(scheduler)]
    sampler.run(jobs)
    assert [j.batch_size for j in jobs] == [4] * 4
    for job in jobs:   # bit-identical: ORT CPU computes each batch row independently (measured: 0 diff)
        assert job.error is None and np.array_equal(job.image, alone(pipe, job.request)), job.request


def test_served_image_equals_the_generate_cli_png(pipe, tiny_artifact, tmp_path):  # noqa: F811
    from PIL import Image

    from ldm_deploy.cli import main

    jobs = [Job(r) for r in requests("euler-ancestral", steps=3)]
    BatchSampler(pipe).run(jobs)
    r = jobs[1].request
    out = tmp_path / "one.png"
    assert main(["generate", str(tiny_artifact), *r.generate_args(), "--out", str(out), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), jobs[1].image)


def test_seed_list_img2img_rows_equal_alone(pipe):
    init = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    both = pipe(["a cat", "a dog"], steps=4, seed=[5, 6], image=init, strength=0.6, scheduler="euler-ancestral")
    for i, (p, s) in enumerate((("a cat", 5), ("a dog", 6))):
        one = pipe(p, steps=4, seed=s, image=init, strength=0.6, scheduler="euler-ancestral")
        assert np.array_equal(both.images[i], one.images[0])
    assert both.params["seed"] == [5, 6]
    with pytest.raises(Exception, match="2 seeds for a batch of 1"):
        pipe("a cat", steps=2, seed=[1, 2])


def test_cancel_drops_the_rows_at_the_next_step_and_keeps_the_others(pipe):
    sampler = BatchSampler(pipe)
    recorder = Recorder(sampler.pipe.runners["unet"].runner)
    sampler.pipe.runners["unet"].runner = recorder
    try:
        jobs = [Job(r) for r in requests("euler-ancestral", steps=5)]
        jobs[2].cancelled = lambda: jobs[0].steps_run >= 2          # the client cancels after step 2
        ended = []
        sampler.run(jobs, on_done=lambda j: ended.append((j.request.seed, j.steps_run)))
    finally:
        sampler.pipe.runners["unet"].runner = recorder.runner
    assert ended[0] == (102, 2)                                     # answered at once, before the batch ended
    assert isinstance(jobs[2].error, Cancelled) and jobs[2].image is None
    assert recorder.rows == [8, 8, 6, 6, 6]                         # CFG rows 2B: 4 requests, then 3
    for i in (0, 1, 3):
        assert jobs[i].error is None and np.array_equal(jobs[i].image, alone(pipe, jobs[i].request))


def test_all_rows_ended_stops_the_loop(pipe):
    sampler = BatchSampler(pipe)
    recorder = Recorder(sampler.pipe.runners["unet"].runner)
    sampler.pipe.runners["unet"].runner = recorder
    try:
        jobs = [Job(r) for r in requests(steps=10, n=2)]
        for job in jobs:
            job.cancelled = lambda job=job: job.steps_run >= 1
        sampler.run(jobs)
    finally:
        sampler.pipe.runners["unet"].runner = recorder.runner
    assert len(recorder.rows) == 1 and all(isinstance(j.error, Cancelled) for j in jobs)


class FakeClock:
    """time.monotonic for the batcher: advances one second per reading (no real time in the test)."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        self.now += 1.0
        return self.now


def test_timeouts_before_and_during_the_batch(pipe, monkeypatch):
    import ldm_deploy.serving.batcher as batcher

    clock = FakeClock()
    monkeypatch.setattr(batcher, "time", clock)
    jobs = [Job(r) for r in requests("ddim", steps=6)]
    jobs[0].deadline = 0.5          # expired while queued: never enters the batch
    jobs[3].deadline = 3.5          # the clock reads 1 before the batch, then 2, 3, 4 after steps 1, 2, 3
    BatchSampler(pipe).run(jobs)
    assert isinstance(jobs[0].error, TimedOut) and jobs[0].batch_size == 0
    assert isinstance(jobs[3].error, TimedOut) and jobs[3].steps_run == 3 and "after 3 of 6 steps" in str(jobs[3].error)
    for job in jobs[1:3]:
        assert job.batch_size == 3 and np.array_equal(job.image, alone(pipe, job.request))


def test_a_failing_send_does_not_break_the_batch(pipe):
    jobs = [Job(r) for r in requests(steps=2, n=2)]

    def send(job):
        if job is jobs[0]:
            raise OSError("client went away")

    BatchSampler(pipe).run(jobs, on_done=send)
    assert all(j.done and j.image is not None for j in jobs)
