"""The harness end to end on a tiny random model on CPU: subprocess per side, JSON schema, fail-soft sides."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ldm_deploy.errors import LdmError

from ldm_deploy.bench.harness import run_bench, run_side
from ldm_deploy.bench.report import markdown_table
from ldm_deploy.bench.spec import BenchSpec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ldm_deploy.bench.prepare import export_for_bench, random_model_folder

    work = tmp_path_factory.mktemp("bench")
    model, _ = random_model_folder("tiny", work / "model")
    export = export_for_bench(model, work / "onnx", batch_max=1)
    return model, work / "onnx", export


def test_run_bench_writes_every_side(tiny, tmp_path):
    model, artifact, export = tiny
    spec = BenchSpec(model_dir=str(model), artifact=str(artifact), steps=2, batches=(1,), warmup=0, repeats=1,
                     component_warmup=0, component_repeats=1, device="cpu", threads=1,
                     sides=("ort-cpu", "torch-eager-fp32", "torch-eager-fp16", "ort-cuda"))
    out = tmp_path / "r.json"
    results = run_bench(spec, out, export=export, log=lambda m: None)
    assert json.loads(out.read_text()) == results
    assert results["format"] == "ldm-deploy-bench" and results["format_version"] == 1
    assert results["model"]["height"] == 64 and results["flops"]["1"]["unet_step"] > 0
    assert results["export"]["artifact"] == str(artifact)
    by = {r["side"]: r for r in results["results"]}
    assert list(by) == list(spec.sides)

    for side in ("ort-cpu", "torch-eager-fp32"):
        rec = by[side]
        assert rec["status"] == "ok", rec
        for stage in ("text_encoder", "unet_step", "vae_decoder"):
            assert rec["components_ms"][stage]["median_ms"] > 0
        assert rec["end_to_end"]["repeats"] == 1
        assert rec["images_per_s"] == pytest.approx(1e3 / rec["end_to_end"]["median_ms"], rel=1e-3)
        assert rec["images_shape"] == [1, 64, 64, 3] and rec["dtype"] == "fp32"
        assert rec["peak_rss_mib"] > 10
        # both loops' stages, timed inside the end-to-end runs: together within that run's time
        stages = rec["stages_ms"]
        assert set(stages) >= {"text_encoder", "denoise", "vae_decoder"} and stages["denoise"] > 0, side
        parts = stages["text_encoder"] + stages["denoise"] + stages["vae_decoder"]
        assert parts <= rec["end_to_end"]["median_ms"] * 1.001 + 0.01, (side, stages)
    assert by["ort-cpu"]["model_files"]["unet"].endswith("unet/model.onnx")
    assert 0 <= by["ort-cpu"]["scheduler_overhead"]["fraction_of_step"] < 5
    assert by["torch-eager-fp16"]["status"] == "skipped" and "CUDA" in by["torch-eager-fp16"]["reason"]
    assert by["ort-cuda"]["status"] == "skipped"
    assert "ort-cpu" in markdown_table([results])


def test_a_failing_side_is_recorded_and_the_rest_run(tiny, tmp_path):
    _, artifact, _ = tiny
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    (broken / "unet" / "model.onnx").write_bytes(b"not an onnx graph")
    spec = BenchSpec(artifact=str(broken), steps=2, warmup=0, repeats=1, component_warmup=0, component_repeats=1,
                     threads=1, sides=("ort-cpu", "tensorrt"))
    results = run_bench(spec, tmp_path / "r.json", log=lambda m: None)
    failed, trt = results["results"]
    assert failed["status"] == "error" and "could not load" in failed["error"], failed
    assert trt["status"] == "skipped" and trt["reason"]


def test_a_compile_past_its_budget_is_recorded_as_a_timeout(tiny, tmp_path):
    """torch-compile with a compile budget no compile can meet (1 ms; tracing the tiny U-Net alone takes
    ~1000x that): the worker records status timeout with what it was doing, the harness gets that record
    (not a crash) and the next side runs."""
    model, artifact, _ = tiny
    spec = BenchSpec(model_dir=str(model), artifact=str(artifact), steps=2, warmup=0, repeats=1, component_warmup=0,
                     component_repeats=1, device="cpu", threads=1, compile_budget_s=0.001,
                     sides=("torch-compile", "ort-cpu"))
    results = run_bench(spec, tmp_path / "r.json", log=lambda m: None)
    by = {r["side"]: r for r in results["results"]}
    rec = by["torch-compile"]
    assert rec["status"] == "timeout", rec
    assert rec["error"] == "torch.compile mode=default did not finish within 0.001 s (timeout after 0.001 s)"
    assert rec["compile"]["mode"] == "default" and rec["compile"]["budget_s"] == 0.001
    assert rec["attention"]["used"] and rec["side"] == "torch-compile" and rec["batch"] == 1
    assert by["ort-cpu"]["status"] == "ok"


def test_a_compile_side_ended_by_its_time_limit_is_a_timeout():
    """A side its time limit ends before it writes a record: a torch.compile side is a timeout with its recipe (the
    H100 run's max-autotune side was cut at 104 s by the part's time limit, below its 200 s compile budget);
    another side stays an error."""
    from ldm_deploy.bench.harness import timeout_record

    rec = timeout_record("torch-compile-max-autotune", 1, 104.0, 104.3)
    assert rec["status"] == "timeout" and rec["compile"] == {"mode": "max-autotune", "channels_last": True}
    assert "time limit (104 s)" in rec["error"] and "mode=max-autotune" in rec["error"] and rec["wall_s"] == 104.3
    assert timeout_record("ort-cuda", 4, 60.0, 60.0) == {"side": "ort-cuda", "batch": 4, "status": "error",
                                                          "error": "timed out after 60 s", "wall_s": 60.0}


def test_a_crashing_worker_is_recorded(tmp_path):
    case = {"spec": {"sides": ["ort-cpu"], "no_such_key": 1}, "side": "ort-cpu", "batch": 1, "height": 64, "width": 64}
    rec = run_side(case, 60, print)
    assert rec["status"] == "error" and "exited with code" in rec["error"]
    assert "no_such_key" in rec["error"]


def test_time_budget_skips_the_rest(tiny, tmp_path):
    _, artifact, _ = tiny
    spec = BenchSpec(artifact=str(artifact), sides=("ort-cpu", "ort-cuda"), batches=(1,), total_budget_s=-1.0)
    results = run_bench(spec, tmp_path / "r.json", log=lambda m: None)
    assert [r["status"] for r in results["results"]] == ["skipped", "skipped"]
    assert "budget" in results["results"][0]["reason"]


class _NoGraphRunner:
    """Stands in for OrtCudaRunner on CPU: refuses CUDA graphs the way ORT does for unsupported graphs."""

    def __new__(cls, artifact, component, *, enable_cuda_graph=False, **opts):
        from ldm_deploy.runtime.runners.ort import OrtCpuRunner

        if enable_cuda_graph:
            raise RuntimeError("This session cannot use the CUDA Graph feature as requested by the user")
        return OrtCpuRunner(artifact, component, **opts)


def test_a_refused_cuda_graph_falls_back_and_says_so(tiny, monkeypatch):
    import sys
    import types

    from ldm_deploy.bench.ort_side import _open_pipeline
    from ldm_deploy.runtime.runners import base

    module = types.ModuleType("h1_fake_runner")
    module.Runner = _NoGraphRunner
    monkeypatch.setitem(sys.modules, "h1_fake_runner", module)
    monkeypatch.setitem(base.BACKENDS, "ort-cuda", "h1_fake_runner:Runner")
    record = {}
    pipe = _open_pipeline(str(tiny[1]), "ort-cuda", {"enable_cuda_graph": True}, record, lambda m: None)
    assert record["cuda_graph"] is False and "CUDA Graph" in record["cuda_graph_error"]
    out = pipe("a red circle", steps=2, guidance=7.5, scheduler="ddim", seed=0)
    assert out.images.shape == (1, 64, 64, 3)
    record = {}
    _open_pipeline(str(tiny[1]), "ort-cuda", {"enable_cuda_graph": False}, record, lambda m: None)
    assert record == {"cuda_graph": False, "cuda_graph_components": []}


def _record_runners(monkeypatch) -> dict:
    """Replace the bench's runner opener with one that records each component's options and opens ort-cpu."""
    from ldm_deploy.bench import ort_side
    from ldm_deploy.runtime.runners.ort import OrtCpuRunner

    seen = {}

    def recorder(backend, artifact, component, opts, levers_dir=None):
        seen[component] = dict(opts)
        return OrtCpuRunner(artifact, component)

    monkeypatch.setattr(ort_side, "_open_runner", recorder)
    return seen


def test_lever_sides_set_the_unet_runner_only(tiny, monkeypatch):
    """A lever side's options (spec.LEVERS) go to the U-Net runner; the text encoder and VAE run as ort-cuda."""
    from ldm_deploy.bench.ort_side import _open_pipeline, _runner_options
    from ldm_deploy.bench.spec import LEVERS

    seen = _record_runners(monkeypatch)
    spec = BenchSpec(artifact=str(tiny[1]), sides=tuple(LEVERS))
    for side, (_, unet_opts) in LEVERS.items():
        backend, opts, extra = _runner_options(spec, side)
        assert backend == "ort-cuda" and extra == unet_opts
        record = {}
        _open_pipeline(str(tiny[1]), backend, opts, record, lambda m: None, extra)
        assert seen["unet"] == unet_opts and seen["text_encoder"] == {}
        assert seen["vae_decoder"] == {"output_dtype": None}   # as the pipeline opens it (component_options)
        assert record["cuda_graph"] == unet_opts["enable_cuda_graph"]
    assert _runner_options(spec.replace(sides=("ort-cuda",)), "ort-cuda")[2] == {}


def test_tuning_sides_pass_provider_options_to_every_runner(tiny, monkeypatch):
    """A profile lever (spec.TUNING) is ort-cuda plus one CUDA provider option on all three runners, a bench knob
    the session loader takes; ort-cuda-graph-all puts the CUDA graph on the text encoder and VAE too."""
    from ldm_deploy.bench.ort_side import _open_pipeline, _runner_options
    from ldm_deploy.bench.spec import TUNING

    seen = _record_runners(monkeypatch)
    spec = BenchSpec(artifact=str(tiny[1]), sides=tuple(TUNING))
    assert {"ort-cuda-conv-heuristic", "ort-cuda-attn-flash", "ort-cuda-graph-all"} <= set(TUNING)
    for side, (_, tuning) in TUNING.items():
        if tuning.get("graph"):   # the U-Net graph levers: tests/bench/test_tuning_graphs.py
            continue
        backend, opts, extra = _runner_options(spec, side)
        assert backend == "ort-cuda" and extra == {}
        seen.clear()
        _open_pipeline(str(tiny[1]), backend, opts, {}, lambda m: None, extra, graph_all=bool(tuning.get("graph_all")))
        assert seen["unet"]["enable_cuda_graph"] is True
        for component in ("unet", "text_encoder", "vae_decoder"):
            assert seen[component].get("provider_options") == tuning.get("provider_options")
        graphs = {c: bool(seen[c].get("enable_cuda_graph")) for c in ("text_encoder", "vae_decoder")}
        assert graphs == {"text_encoder": side == "ort-cuda-graph-all", "vae_decoder": side == "ort-cuda-graph-all"}
    assert TUNING["ort-cuda-attn-flash"][1]["provider_options"] == {"sdpa_kernel": "1"}


def test_lever_knobs_are_assembled_from_the_loader(tiny, monkeypatch, tmp_path):
    """The bench's opener: no lever knob -> the production runner (open_runner); io_binding False -> OrtRunner
    over a CUDA session; provider_options -> the session's CUDA provider options; graph -> the lever graph from
    the benchmark's folder. (CUDA faked as available, sessions on the CPU provider; everything else real.)"""
    import onnxruntime as ort

    from ldm_deploy.bench.ort_side import _open_runner
    from ldm_deploy.bench.prepare import LEVERS_FILE
    from ldm_deploy.compare import assert_close
    from ldm_deploy.fileio import write_json
    from ldm_deploy.runtime.runners.base import open_runner
    from ldm_deploy.runtime.runners.ort import OrtBoundRunner, OrtCudaRunner, OrtRunner, SessionFromArtifact

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(SessionFromArtifact, "_providers", lambda self, options: ["CPUExecutionProvider"])
    monkeypatch.setattr(SessionFromArtifact, "_check_provider", lambda self, session, path: None)
    monkeypatch.setattr(OrtBoundRunner, "_device_value", lambda self, shape, dtype:
                        ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype), "cpu", 0))
    art = tiny[1]
    manifest = json.loads((art / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    write_json(tmp_path / LEVERS_FILE, {"artifact": str(art), "graphs": {"lever-x": {
        "file": unet["file"], "in_artifact": True, "inputs": unet["inputs"], "outputs": unet["outputs"]}}})
    cpu = open_runner("ort-cpu", art, "unet")
    x = {"sample": np.ones((2, 4, 8, 8), np.float32), "timestep": np.array([999.0, 999.0], np.float32),
         "encoder_hidden_states": np.zeros((2, 77, 32), np.float32)}
    want = cpu(x)["noise_pred"]

    with _open_runner("ort-cuda", art, "unet", {"enable_cuda_graph": False}) as prod:
        assert type(prod) is OrtCudaRunner
    with _open_runner("ort-cuda", art, "unet", {"variant": None, "io_binding": False}) as unbound:
        assert type(unbound) is OrtRunner and unbound.device_id == 0 and not unbound.io_binding
        assert_close(unbound(x)["noise_pred"], want, name="no IO binding")
    with _open_runner("ort-cuda", art, "unet", {"enable_cuda_graph": True,
                                                "provider_options": {"cudnn_conv_algo_search": "HEURISTIC"}}) as tuned:
        assert type(tuned) is OrtBoundRunner and tuned.cuda_options["cudnn_conv_algo_search"] == "HEURISTIC"
    with _open_runner("ort-cuda", art, "vae_decoder", {"output_dtype": None, "provider_options": {}}) as vae:
        assert type(vae) is OrtBoundRunner and vae.output_dtype is None   # the runner's option, not the loader's
    with _open_runner("ort-cuda", art, "unet", {"graph": "lever-x", "enable_cuda_graph": False}, tmp_path) as lever:
        assert lever.variant == "lever-x" and lever.model_path == art / unet["file"]
        assert_close(lever(x)["noise_pred"], want, name="lever graph")
    with pytest.raises(LdmError, match="no lever graph 'lever-y'"):
        _open_runner("ort-cuda", art, "unet", {"graph": "lever-y"}, tmp_path)


def test_ort_cuda_side_records_the_unet_call_split(tiny, monkeypatch):
    """The ort-cuda side records where its U-Net calls' time goes, isolated (component timing) and inside the
    pipeline, with the number of calls each, and its CUDA-graph slots. (CUDA faked as available, sessions on
    the CPU provider, "device" buffers on the CPU; the side's code runs for real.)"""
    import onnxruntime as ort

    from ldm_deploy.bench import ort_side
    from ldm_deploy.runtime.runners.ort import OrtBoundRunner, SessionFromArtifact

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(SessionFromArtifact, "_providers", lambda self, options: ["CPUExecutionProvider"])
    monkeypatch.setattr(SessionFromArtifact, "_check_provider", lambda self, session, path: None)
    monkeypatch.setattr(OrtBoundRunner, "_device_value", lambda self, shape, dtype:
                        ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype), "cpu", 0))
    spec = BenchSpec(artifact=str(tiny[1]), sides=("ort-cuda",), steps=3, warmup=0, repeats=1,
                     component_warmup=0, component_repeats=2)
    record = ort_side.run(spec, "ort-cuda", 1, 64, 64, lambda m: None)
    split = record["unet_call_split_ms"]
    # component timing: window 0 (no warm-up, 2 calls), window 1 (1 warm-up + 2); the pipeline: 1 run of 3 steps
    assert split["isolated"]["calls"] == 5 and split["pipeline"]["calls"] == 3
    for part in split.values():
        assert part["run"] > 0 and part["prepare"] >= 0 and part["fetch"] >= 0
    assert record["unet_cuda_graph_slots"] == 1 and record["unet_ungraphed_calls"] == 0


def _tree(root) -> dict:
    """relative path -> sha256 of every file under root."""
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_levers_adds_the_variants_and_prints_the_ladder(tiny, tmp_path, capsys):
    """`ldm-deploy bench MODEL_DIR --levers`: an fp16 export keeping the traced fp32 U-Net, the lever graphs
    written into the benchmark's folder (OUT.levers/), one record per ladder side (skipped here: no CUDA), the
    lever table printed; an fp32 artifact is refused in one line."""
    import onnxruntime as ort

    from ldm_deploy.cli import main
    from ldm_deploy.bench.prepare import read_levers
    from ldm_deploy.bench.spec import LEVERS

    model, fp32_artifact, _ = tiny
    out = tmp_path / "levers.json"
    sides = ",".join([*LEVERS, "ort-cuda"])
    assert main(["bench", str(model), "--levers", "--sides", sides, "--steps", "1", "--out", str(out),
                 "--work", str(tmp_path / "art")]) == 0
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert set(manifest["components"]["unet"]["variants"]) == {"ort-cuda"}      # the export's own product only
    assert {"lever-fp32", "lever-fused-nchw", "lever-fused"} <= set(read_levers(tmp_path / "levers.levers")["graphs"])
    results = json.loads(out.read_text())
    assert [r["side"] for r in results["results"]] == sides.split(",")
    assert results["export"]["lever_variants"]["fused_ops_match"]
    assert results["spec"]["levers_dir"] == str(tmp_path / "levers.levers")
    printed = capsys.readouterr().out
    assert "(= ort-cuda)" in printed and "+ NHWC convolutions" in printed
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert all(r["status"] == "skipped" for r in results["results"])
    before = (fp32_artifact / "manifest.json").read_bytes()
    assert main(["bench", str(fp32_artifact), "--levers", "--out", str(tmp_path / "x.json")]) != 0
    assert "needs an fp16 export" in capsys.readouterr().err
    assert (fp32_artifact / "manifest.json").read_bytes() == before      # refused before anything is written
    assert not (tmp_path / "x.levers").exists()


def test_bench_levers_leave_the_users_artifact_byte_identical(tiny, tmp_path):
    """`ldm-deploy bench ARTIFACT --levers` on a user's artifact: every file of it (list and sha256) is the same
    afterwards; the lever graphs are in --levers-dir; a second run reuses them."""
    from ldm_deploy.bench.prepare import export_for_bench, read_levers
    from ldm_deploy.bench.spec import LEVERS
    from ldm_deploy.cli import main

    art = tmp_path / "users-artifact"
    export_for_bench(tiny[0], art, precision="fp16", keep_fp32_unet=True, optimize=False, ort_cuda=True)
    before = _tree(art)
    for run in ("first", "again"):
        assert main(["bench", str(art), "--levers", "--sides", ",".join(LEVERS), "--steps", "1", "--out",
                     str(tmp_path / f"{run}.json"), "--levers-dir", str(tmp_path / "bench-work"), "-q"]) == 0
        assert _tree(art) == before, run
    assert set(read_levers(tmp_path / "bench-work")["graphs"]) == {"lever-fp32", "lever-fused-nchw", "lever-fused"}
    assert main(["bench", str(art), "--levers-dir", str(tmp_path / "w"), "--out", str(tmp_path / "x.json"),
                 "-q"]) == 2


@pytest.mark.gpu
def test_cuda_graphs_on_all_components_gpu(tiny, tmp_path):
    """On a GPU: ort-cuda keeps its graph on the U-Net; ort-cuda-graph-all captures the text encoder and the VAE
    decoder too, and both add up (timing_check)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and an NVIDIA GPU")
    model, artifact, _ = tiny
    spec = BenchSpec(model_dir=str(model), artifact=str(artifact), steps=3, warmup=1, repeats=2, component_warmup=2,
                     component_repeats=3, sides=("ort-cuda", "ort-cuda-graph-all"))
    results = run_bench(spec, tmp_path / "r.json", log=lambda m: None)
    by = {r["side"]: r for r in results["results"]}
    assert all(r["status"] == "ok" for r in by.values()), by
    assert by["ort-cuda"]["cuda_graph_components"] == ["unet"]
    assert sorted(by["ort-cuda-graph-all"]["cuda_graph_components"]) == ["text_encoder", "unet", "vae_decoder"]
    assert all(r["timing_check"]["ok"] for r in by.values())
