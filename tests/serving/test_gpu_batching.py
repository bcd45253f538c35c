"""On ort-cuda: a batched request against its image alone. GPU kernels may change algorithm with the batch size,
so byte-identity is not guaranteed there (docs/serving.md); this measures how far apart they are and bounds it."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.serving.batcher import BatchSampler, Job
from ldm_deploy.serving.contract import Request
from ldm_deploy.serving.repository import RepoConfig, read_parameters, write_repository
from ldm_deploy.serving.triton_model import open_sampler
from tests.runtime.tiny_model import tiny_artifact, tiny_folder  # noqa: F401 (fixtures)


def _four_requests() -> list[Request]:
    return [Request(p, "", 50 + i, 8, 5.0, "euler-ancestral", 32, 32)
            for i, p in enumerate(["a red cube", "a blue sphere", "a green cone", ""])]


def _max_diff(a: Job, b: Job) -> int:
    return int(np.abs(a.image.astype(int) - b.image.astype(int)).max())


def _against_alone(sampler: BatchSampler, jobs: list[Job]) -> list[int]:
    """Each job's request run again alone (after the batch): the max abs pixel difference per request."""
    diffs = []
    for job in jobs:
        alone = Job(job.request)
        sampler.run([alone])
        diffs.append(_max_diff(job, alone))
    return diffs


@pytest.mark.gpu
def test_ort_cuda_batched_rows_against_alone(tiny_artifact, tmp_path, capsys):  # noqa: F811
    repo = write_repository(tiny_artifact, tmp_path / "repo", RepoConfig(backend="ort-cuda"))
    sampler: BatchSampler = open_sampler(read_parameters((repo / "config.pbtxt").read_text()), device_id=0)
    assert sampler.pipe.runners["unet"].runner.device_id == 0
    jobs = [Job(r) for r in _four_requests()]
    sampler.run(jobs)
    diffs = _against_alone(sampler, jobs)
    with capsys.disabled():
        print(f"\nort-cuda batch of 4 vs alone, max abs pixel diff per request: {diffs}")
    # fp32 export, TF32 off: another kernel for another batch size only reorders float32 sums (~1e-6 relative),
    # which moves a pixel by one level where its value sits on a rounding boundary, never more
    assert max(diffs) <= 1, diffs


@pytest.mark.gpu
def test_ort_cuda_lora_requests_switch_device_weights(tiny_folder, tmp_path, capsys):  # noqa: F811
    """LoRA requests on ort-cuda: each batch switches the bound device weights in place (IO binding); a request
    equals its image alone (after other switches) to within the batch-size rounding bound above, and the base
    model after LoRAs equals the base model before, byte for byte (same batch size, same kernels)."""
    pytest.importorskip("torch")
    from tests.serving.lora_setup import export_switchable, write_kohya

    artifact = export_switchable(tiny_folder, tmp_path / "switch")
    files = {"a": write_kohya(artifact, tmp_path / "a.safetensors", 1),
             "b": write_kohya(artifact, tmp_path / "b.safetensors", 2)}
    repo = write_repository(artifact, tmp_path / "repo", RepoConfig(backend="ort-cuda", loras=files))
    sampler: BatchSampler = open_sampler(read_parameters((repo / "config.pbtxt").read_text()), device_id=0)
    base = [Request("a red cube", "", 7, 6, 5.0, "euler-ancestral", 32, 32)]
    before = Job(base[0])
    sampler.run([before])
    requests = [Request(p, "", 60 + i, 6, 5.0, "euler-ancestral", 32, 32, loras)
                for i, (p, loras) in enumerate([("a red cube", (("a", 0.7),)), ("a blue sphere", (("a", 0.7),)),
                                                ("a green cone", (("b", 1.0),)), ("a cat", (("a", 0.5), ("b", 0.5)))])]
    jobs = [Job(r) for r in requests]
    sampler.run(jobs)
    assert [j.batch_size for j in jobs] == [2, 2, 1, 1] and all(j.error is None for j in jobs)
    diffs = _against_alone(sampler, jobs)
    after = Job(base[0])
    sampler.run([after])
    with capsys.disabled():
        print(f"\nort-cuda LoRA requests batched vs alone, max abs pixel diff: {diffs}")
    assert max(diffs) <= 1, diffs
    assert np.array_equal(after.image, before.image)


@pytest.mark.gpu
def test_ort_cuda_graphs_per_batch_size(tiny_artifact, tmp_path, capsys):  # noqa: F811
    """enable_cuda_graph on ort-cuda: the batcher's batches of 4 and of 1 each get their own CUDA graph (captured
    on first use, kept while the other size runs); a batch replayed after the other size equals its first run
    byte for byte, each request equals its image alone to the batch-size rounding bound above, and the graphed
    server equals the ungraphed one to that bound."""
    repo = write_repository(tiny_artifact, tmp_path / "repo", RepoConfig(
        backend="ort-cuda", runner_options={"enable_cuda_graph": True}))
    sampler: BatchSampler = open_sampler(read_parameters((repo / "config.pbtxt").read_text()), device_id=0)
    plain: BatchSampler = open_sampler(read_parameters((write_repository(
        tiny_artifact, tmp_path / "plain", RepoConfig(backend="ort-cuda")) / "config.pbtxt").read_text()), device_id=0)
    unet = sampler.pipe.runners["unet"].runner
    assert unet.enable_cuda_graph
    requests = _four_requests()
    first = [Job(r) for r in requests]
    sampler.run(first)
    alone = []
    for r in requests:
        alone.append(Job(r))
        sampler.run([alone[-1]])
    again = [Job(r) for r in requests]
    sampler.run(again)
    reference = [Job(r) for r in requests]
    plain.run(reference)
    assert sorted(unet.cuda_graphs.values()) == [1, 2] and unet.ungraphed_calls == 0, unet.cuda_graphs
    for a, b in zip(first, again):
        assert np.array_equal(a.image, b.image), "a replayed batch-4 graph differs from its first run"
    diffs = [_max_diff(j, a) for j, a in zip(first, alone)]
    graph_vs_plain = [_max_diff(j, p) for j, p in zip(first, reference)]
    with capsys.disabled():
        print(f"\nort-cuda CUDA graphs: batch of 4 vs alone {diffs}, graphed vs ungraphed {graph_vs_plain}")
    assert max(diffs) <= 1 and max(graph_vs_plain) <= 1, (diffs, graph_vs_plain)
