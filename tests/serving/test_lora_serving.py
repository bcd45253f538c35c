"""LoRA in serving, without a server: requests name a LoRA of the set the sampler was started with
(`lora` input, NAME[:SCALE]); requests with different LoRAs or scales never share a pipeline call; every image
equals `generate --lora FILE:SCALE` (and Pipeline.set_loras) byte for byte, alone or batched, whatever ran
before it; bad names and scales are one RequestError; --lora needs a switchable artifact."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime.pipeline import Pipeline
from ldm_deploy.serving.batcher import BatchSampler, Job
from ldm_deploy.serving.contract import RequestError, parse_request
from tests.runtime.tiny_model import tiny_artifact, tiny_folder  # noqa: F401 (fixtures)
from tests.serving.lora_setup import export_switchable, write_kohya

pytest.importorskip("torch")      # the switchable export
pytestmark = pytest.mark.slow    # a switchable tiny export and a dozen tiny pipelines: ~1 min on 2 cores


@pytest.fixture(scope="module")
def artifact(tiny_folder, tmp_path_factory):  # noqa: F811
    return export_switchable(tiny_folder, tmp_path_factory.mktemp("serve-lora") / "switch")


@pytest.fixture(scope="module")
def files(artifact, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-lora-files")
    return {"a": write_kohya(artifact, root / "a.safetensors", 1), "b": write_kohya(artifact, root / "b.safetensors", 2)}


def text(s: str) -> np.ndarray:
    return np.array([[s.encode()]], dtype=object)


def request(sampler, prompt, seed, lora=None, negative=None):
    tensors = {"prompt": text(prompt), "seed": np.array([[seed]], np.int64), "steps": np.array([[3]], np.int32),
               "guidance": np.array([[5.0]], np.float32), "scheduler": text("euler-ancestral"),
               "height": np.array([[32]], np.int32), "width": np.array([[32]], np.int32)}
    if lora is not None:
        tensors["lora"] = text(lora)
    if negative is not None:
        tensors["negative_prompt"] = text(negative)
    return parse_request(sampler.limits, tensors)


def alone(artifact, files, r):
    """The image `generate --lora FILE:SCALE` makes: a fresh pipeline, set_loras once, one row."""
    pipe = Pipeline.from_artifact(artifact)
    if r.loras:
        pipe.set_loras([(files[name], scale) for name, scale in r.loras])
    return pipe(r.prompt, r.negative_prompt or None, steps=r.steps, guidance=r.guidance, scheduler=r.scheduler,
                seed=r.seed, height=r.height, width=r.width).images[0]


def test_lora_requests_batch_by_lora_and_equal_their_images_alone(artifact, files):
    sampler = BatchSampler(Pipeline.from_artifact(artifact), loras=files)
    assert sampler.limits.loras == ("a", "b")
    specs = [("a red cube", 1, "a:0.7"), ("a blue ball", 2, None), ("a green cone", 3, "a:0.7"),
             ("a red cube", 4, "b"), ("a red cube", 5, "a"), ("a blue ball", 6, "a:0.7,b:0.5"), ("a cat", 7, "")]
    jobs = [Job(request(sampler, p, s, lora)) for p, s, lora in specs]
    switches = []
    set_loras = sampler.pipe.set_loras
    sampler.pipe.set_loras = lambda loras: switches.append(len(loras)) or set_loras(loras)   # observation only
    sampler.run(jobs)
    # a:0.7 twice shares a call; no LoRA and an empty lora input are the same (base) set; the rest run alone
    assert [j.batch_size for j in jobs] == [2, 2, 2, 1, 1, 1, 2]
    assert switches == [1, 0, 1, 1, 2]
    for job in jobs:
        assert job.error is None and np.array_equal(job.image, alone(artifact, files, job.request)), job.request
    images = {j.request.seed: j.image for j in jobs}
    assert not np.array_equal(images[1], Pipeline.from_artifact(artifact)(
        "a red cube", steps=3, guidance=5.0, scheduler="euler-ancestral", seed=1, height=32, width=32).images[0])
    assert not np.array_equal(images[4], images[5])        # another LoRA, another image


def test_served_lora_image_equals_the_generate_cli_png(artifact, files, tmp_path):
    from PIL import Image

    from ldm_deploy.cli import main

    sampler = BatchSampler(Pipeline.from_artifact(artifact), loras=files)
    jobs = [Job(request(sampler, "a red cube", 11, "b:0.8")), Job(request(sampler, "a blue ball", 12, "b:0.8"))]
    sampler.run(jobs)
    assert [j.batch_size for j in jobs] == [2, 2]
    out = tmp_path / "gen.png"
    args = jobs[1].request.generate_args({n: str(f) for n, f in files.items()})
    assert "--lora" in args
    assert main(["generate", str(artifact), *args, "--out", str(out), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), jobs[1].image)


@pytest.mark.parametrize("lora, words", [
    ("c", "input 'lora' names 'c', which this server was not started with; it has: a, b"),
    ("a:x", "the scale of 'a' is 'x', not a number"),
    ("a:nan", "the scale of 'a' is nan; it must be a finite number"),
    ("b:1e9", "the scale of 'b' is 1e9; it must be a finite number in [-100, 100]"),
])
def test_bad_lora_names_and_scales_are_one_request_error(artifact, files, lora, words):
    sampler = BatchSampler(Pipeline.from_artifact(artifact), loras=files)
    with pytest.raises(RequestError) as e:
        request(sampler, "x", 1, lora)
    assert words in str(e.value) and "\n" not in str(e.value)
    job = Job(request(sampler, "x", 1, "a"))              # the sampler still serves
    sampler.run([job])
    assert job.error is None and job.image is not None


def test_no_lora_set_means_no_lora_input(tiny_artifact):  # noqa: F811
    sampler = BatchSampler(Pipeline.from_artifact(tiny_artifact))
    with pytest.raises(RequestError, match=r"it has: none \(start it with --lora NAME=FILE\)"):
        request(sampler, "x", 1, "a")
    assert request(sampler, "x", 1, "").loras == ()


def test_lora_needs_a_switchable_artifact(tiny_artifact, artifact, files, tmp_path):  # noqa: F811
    from ldm_deploy.cli import main
    from ldm_deploy.serving.repository import RepoConfig, write_repository

    with pytest.raises(LdmError, match="not exported with switchable weights"):
        BatchSampler(Pipeline.from_artifact(tiny_artifact), loras=files)
    with pytest.raises(UsageError, match="--lora needs an artifact exported with switchable weights"):
        write_repository(tiny_artifact, tmp_path / "r0", RepoConfig(loras={"a": files["a"]}))
    assert not (tmp_path / "r0").exists()
    assert main(["triton-repo", str(tiny_artifact), "--out", str(tmp_path / "r1"), "--lora", f"a={files['a']}",
                 "-q"]) == 2
    assert main(["triton-repo", str(artifact), "--out", str(tmp_path / "r2"), "--lora", str(files["a"]), "-q"]) == 2
    assert main(["triton-repo", str(artifact), "--out", str(tmp_path / "r2"), "--lora", "a=missing.safetensors",
                 "-q"]) == 2
    assert main(["triton-repo", str(artifact), "--out", str(tmp_path / "r2"), "--lora", f"a b={files['a']}",
                 "-q"]) == 2
    assert not (tmp_path / "r2").exists()


def test_repository_records_lora_files_and_checks_them_at_load(artifact, files, tmp_path):
    import shutil

    from ldm_deploy.fileio import sha256_file
    from ldm_deploy.serving.repository import RepoConfig, read_parameters, write_repository
    from ldm_deploy.serving.triton_model import open_sampler

    copy = tmp_path / "a.safetensors"
    shutil.copy(files["a"], copy)
    target = write_repository(artifact, tmp_path / "repo", RepoConfig(backend="ort-cpu", loras={"a": copy}))
    text = (target / "config.pbtxt").read_text()
    assert 'input { name: "lora" data_type: TYPE_STRING dims: [ 1 ] optional: true }' in text
    params = read_parameters(text)
    assert json.loads(params["loras"]) == {"a": {"path": str(copy.resolve()), "sha256": sha256_file(copy)}}
    sampler = open_sampler(params)
    assert sampler.limits.loras == ("a",)
    shutil.copy(files["b"], copy)                         # the file changed after the repository was written
    with pytest.raises(LdmError, match="LoRA 'a': .* changed since the model repository was written"):
        open_sampler(params)
