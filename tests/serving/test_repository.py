"""`ldm-deploy triton-repo`: config.pbtxt (batching, queue policy, instances, the contract) and the model.py shim;
the artifact hash is checked when an instance loads; runner options carry the instance's device."""
from __future__ import annotations

import json
import shutil

import pytest

from ldm_deploy.cli import main
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.serving.repository import RepoConfig, read_parameters, write_repository
from ldm_deploy.serving.triton_model import open_sampler, runner_options
from tests.runtime.tiny_model import tiny_artifact, tiny_folder  # noqa: F401 (fixtures)


def test_cli_writes_config_and_shim(tiny_artifact, tmp_path):  # noqa: F811
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_artifact), "--out", str(repo), "--backend", "ort-cuda", "--instances", "2",
                 "--max-batch", "3", "--max-queue-size", "5", "--queue-delay-ms", "7.5", "--request-timeout", "2",
                 "--runner-options", '{"use_tf32": true}', "-q"]) == 0
    text = (repo / "ldm" / "config.pbtxt").read_text()
    for line in ('name: "ldm"', 'backend: "python"', "max_batch_size: 3", "preferred_batch_size: [ 3 ]",
                 "max_queue_delay_microseconds: 7500", "max_queue_size: 5", "timeout_action: REJECT",
                 "default_timeout_microseconds: 2000000", "instance_group [ { count: 2 kind: KIND_GPU } ]",
                 'input { name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }',
                 'input { name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }',
                 'output { name: "image" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }'):
        assert line in text, line
    params = read_parameters(text)
    from ldm_deploy.artifact import manifest_sha256 as artifact_hash

    assert params["artifact_sha256"] == artifact_hash(tiny_artifact) and params["backend"] == "ort-cuda"
    assert json.loads(params["runner_options"]) == {"use_tf32": True}
    assert "from ldm_deploy.serving.triton_model import TritonPythonModel" in (repo / "ldm" / "1" / "model.py").read_text()
    assert main(["triton-repo", str(tiny_artifact), "--out", str(repo), "-q"]) == 2          # exists: refuse
    # a benchmark lever is no runner option: refused when the repository is written, not at every instance load
    assert main(["triton-repo", str(tiny_artifact), "--out", str(repo.parent / "r2"), "--backend", "ort-cuda",
                 "--runner-options", '{"io_binding": false}', "-q"]) == 2
    assert not (repo.parent / "r2").exists()
    assert main(["triton-repo", str(tiny_artifact), "--out", str(repo), "--force", "--backend", "ort-cpu", "-q"]) == 0
    assert "kind: KIND_CPU" in (repo / "ldm" / "config.pbtxt").read_text()


def test_bad_options_are_usage_errors_and_write_nothing(tiny_artifact, tmp_path):  # noqa: F811
    for config, words in ((RepoConfig(max_batch=5), "outside the artifact's batch profile [1, 4]"),
                          (RepoConfig(instances=0), "instances must be an integer >= 1"),
                          (RepoConfig(backend="torch"), "unknown backend 'torch'"),
                          (RepoConfig(runner_options={"enable_cuda_graph": True, "max_cuda_graphs": 0}),
                           "max_cuda_graphs must be an integer >= 1")):
        with pytest.raises(UsageError, match=words.replace("[", r"\[").replace("]", r"\]")):
            write_repository(tiny_artifact, tmp_path / "repo", config)
    assert not (tmp_path / "repo").exists()


def test_ort_cuda_cuda_graphs_are_served(tiny_artifact, tmp_path):  # noqa: F811
    """ort-cuda keeps one CUDA graph per batch size the batcher forms (runners/ort.py), so triton-repo takes
    enable_cuda_graph (and a graph bound) for it and hands them to every runner."""
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_artifact), "--out", str(repo), "--backend", "ort-cuda", "--runner-options",
                 '{"enable_cuda_graph": true, "max_cuda_graphs": 4}', "-q"]) == 0
    params = read_parameters((repo / "ldm" / "config.pbtxt").read_text())
    assert json.loads(params["runner_options"]) == {"enable_cuda_graph": True, "max_cuda_graphs": 4}


def test_instance_loads_the_artifact_and_refuses_a_changed_one(tiny_artifact, tmp_path):  # noqa: F811
    copy = tmp_path / "art"
    shutil.copytree(tiny_artifact, copy)
    target = write_repository(copy, tmp_path / "repo", RepoConfig(backend="ort-cpu"))
    params = read_parameters((target / "config.pbtxt").read_text())
    sampler = open_sampler(params)
    assert sampler.max_batch == 4 and sampler.pipe.backend == "ort-cpu"
    manifest = copy / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format_version"', ' "format_version"', 1))
    with pytest.raises(LdmError, match="changed since the model repository was written"):
        open_sampler(params)


def test_runner_options_carry_the_instance_device():
    assert runner_options("ort-cuda", 3) == {"device_id": 3}
    assert runner_options("tensorrt", 2, {"cuda_graph": True}) == {"device": 2, "cuda_graph": True}
    assert runner_options("ort-cpu", 1) == {}


def test_finalize_closes_the_instance_runners(tiny_artifact):  # noqa: F811
    """Triton's finalize (model unload) closes the instance's pipeline now, not whenever it is collected."""
    from ldm_deploy.serving.triton_model import TritonPythonModel

    model = TritonPythonModel.__new__(TritonPythonModel)     # initialize() needs Triton's pb_utils
    model.sampler = open_sampler({"artifact": str(tiny_artifact), "backend": "ort-cpu"})
    runners = dict(model.sampler.pipe.runners)
    model.finalize()
    assert model.sampler is None
    assert all(getattr(r, "runner", r).session is None for r in runners.values())
    TritonPythonModel.__new__(TritonPythonModel).finalize()   # after a failed initialize: nothing to close
