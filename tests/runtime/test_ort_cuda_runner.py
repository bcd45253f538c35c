"""OrtCudaRunner's buffer logic (IO binding, preallocated outputs, input reuse, CUDA-graph shape rules)
run for real with CPU "device" buffers; on a GPU (marker `gpu`) the plain and fused graphs, with and
without CUDA graphs, against ort-cpu."""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ldm_deploy.artifact import Artifact
from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError
from ldm_deploy.export.config import load_config
from ldm_deploy.export.exporter import export_model
from ldm_deploy.feeds import example_feeds
from ldm_deploy.runtime.runners.base import open_runner, takes_guidance
from tests.export.test_ort_optimize import make_sd_like_folder

# GPU images may lack onnxslim (the plain graphs' cleanup): export uncleaned there
HAS_ONNXSLIM = importlib.util.find_spec("onnxslim") is not None


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ortcuda")
    folder = make_sd_like_folder(root / "model")
    base = load_config("tiny").replace(components=("text_encoder", "unet", "vae_decoder"), measure_runtime=False,
                                       optimize=HAS_ONNXSLIM,
                                       ort_cuda=True)
    arts = {p: export_model(folder, root / p, base.replace(precision=p, keep_fp32_unet=p == "fp16")).path
            for p in ("fp32", "fp16")}
    fp32 = Artifact.open(arts["fp32"])
    SPECS.update({c: fp32.component(c) for c in fp32.components})
    return arts


SPECS: dict = {}   # component -> the fp32 artifact's ComponentSpec (filled by `artifacts`, which every user takes)


def feeds(component: str, batch: int = 1, seed: int = 0) -> dict:
    """float32 feeds at the profile's opt size; U-Net latents / timesteps repeat over the CFG halves, as the
    pipeline feeds them."""
    from ldm_deploy.export.cfg_fold import symmetric_unet_inputs

    x = example_feeds(SPECS[component], batch, seed, vocab_size=999, float_dtype=np.float32)
    return symmetric_unet_inputs(x) if component == "unet" else x


@pytest.fixture
def cpu_bound(monkeypatch):
    """OrtCudaRunner with CPU OrtValues and the CPU provider: everything but CUDA runs for real."""
    import onnxruntime as ort

    from ldm_deploy.runtime.runners.ort import OrtBoundRunner, OrtCudaRunner, SessionFromArtifact

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(SessionFromArtifact, "_providers", lambda self, options: ["CPUExecutionProvider"])
    monkeypatch.setattr(SessionFromArtifact, "_check_provider", lambda self, session, path: None)
    monkeypatch.setattr(OrtBoundRunner, "_device_value", lambda self, shape, dtype:
                        ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype), "cpu", 0))
    return OrtCudaRunner


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_bound_buffers_equal_plain_run(artifacts, cpu_bound, precision, component):
    cpu = open_runner("ort-cpu", artifacts[precision], component)
    runner = cpu_bound(artifacts[precision], component, variant=None, enable_cuda_graph=True)
    first = runner(feeds(component))
    for seed in (1, 2):   # new values go into the same buffers; outputs never alias the previous call's
        out = runner(feeds(component, seed=seed))
        for k, v in cpu(feeds(component, seed=seed)).items():
            assert_close(out[k], v, name=f"{component} {k} seed {seed}")
    assert not np.array_equal(first[runner.output_names[0]], out[runner.output_names[0]])
    # the output buffers were preallocated before the first run (the CUDA graph capture needs that)
    assert set(runner.last_slot.outputs) == set(runner.output_names)


def test_call_split_accounts_for_every_call(artifacts, cpu_bound):
    """`call_split` sums, per part of a call (binding / uploading the inputs, the run, the outputs to host),
    the seconds of every call, and the parts of a call lie within its wall time."""
    import time

    runner = cpu_bound(artifacts["fp32"], "unet", variant=None, enable_cuda_graph=True)
    assert runner.call_split == {"prepare": 0.0, "run": 0.0, "fetch": 0.0, "calls": 0}
    wall = 0.0
    for seed in range(3):
        x = feeds("unet", seed=seed)
        start = time.perf_counter()
        runner(x)
        wall += time.perf_counter() - start
    split = runner.call_split
    assert split["calls"] == 3
    assert all(split[k] >= 0 for k in ("prepare", "run", "fetch")) and split["run"] > 0
    assert split["prepare"] + split["run"] + split["fetch"] <= wall


def test_reused_input_is_not_stale(artifacts, cpu_bound):
    """The same array object mutated in place between calls is uploaded again."""
    runner = cpu_bound(artifacts["fp32"], "unet", variant=None)
    cpu = open_runner("ort-cpu", artifacts["fp32"], "unet")
    x = feeds("unet")
    runner(x)
    x["encoder_hidden_states"] *= 2.0                  # same object, new values
    assert_close(runner(x)["noise_pred"], cpu(x)["noise_pred"], name="after in-place change")


def test_read_only_input_passed_again_is_skipped_by_identity(artifacts, cpu_bound, monkeypatch):
    """The pipeline freezes the text embeddings: the runner then neither casts nor compares them per
    step; a different read-only array, or a writable one, is still checked and uploaded."""
    runner = cpu_bound(artifacts["fp16"], "unet", variant=None)
    cpu = open_runner("ort-cpu", artifacts["fp16"], "unet")
    x = feeds("unet")
    x["encoder_hidden_states"].setflags(write=False)
    runner(x)
    compared = []
    real = np.array_equal
    monkeypatch.setattr(np, "array_equal", lambda a, b: compared.append(np.shape(a)) or real(a, b))
    x["sample"] = x["sample"] * 0.5
    assert_close(runner(x)["noise_pred"], cpu(x)["noise_pred"], name="frozen embeddings reused")
    assert (2, 77, 32) not in compared and (2, 4, 8, 8) in compared
    y = dict(x, encoder_hidden_states=x["encoder_hidden_states"] * 2.0)     # new values, new object
    y["encoder_hidden_states"].setflags(write=False)
    assert_close(runner(y)["noise_pred"], cpu(y)["noise_pred"], name="new frozen embeddings uploaded")
    # the next request: equal values in a new read-only array (the pipeline encodes the prompt again). Compared
    # once, then skipped by identity on its later steps
    z = dict(y, encoder_hidden_states=y["encoder_hidden_states"].copy())
    z["encoder_hidden_states"].setflags(write=False)
    compared.clear()
    for _ in range(3):
        z = dict(z, sample=z["sample"] + 0.25)
        assert_close(runner(z)["noise_pred"], cpu(z)["noise_pred"], name="equal embeddings, new array")
    assert compared.count((2, 77, 32)) == 1


def test_input_new_every_call_stops_being_compared(artifacts, cpu_bound, monkeypatch):
    """The latents change every step: after VOLATILE_AFTER calls in a row with new values the runner
    uploads them without comparing or keeping a host copy; the results stay right, and an input that
    stays the same is still skipped."""
    from ldm_deploy.runtime.runners.ort import VOLATILE_AFTER

    runner = cpu_bound(artifacts["fp32"], "unet", variant=None)
    cpu = open_runner("ort-cpu", artifacts["fp32"], "unet")
    x = feeds("unet")
    compared = []
    real = np.array_equal
    monkeypatch.setattr(np, "array_equal", lambda a, b: compared.append(np.shape(a)) or real(a, b))
    for i in range(VOLATILE_AFTER + 3):
        x = dict(x, sample=x["sample"] + 0.25)
        assert_close(runner(x)["noise_pred"], cpu(x)["noise_pred"], name=f"call {i}")
    assert "sample" in runner.last_slot.volatile and "sample" not in runner.last_slot.in_host
    assert compared.count((2, 4, 8, 8)) == VOLATILE_AFTER      # calls 2..VOLATILE_AFTER+1 compared, then none
    assert "encoder_hidden_states" not in runner.last_slot.volatile and "encoder_hidden_states" in runner.last_slot.in_host


def _graph_ids_passed(runner) -> list:
    """Record the `gpu_graph_id` of every run the runner makes (the real run still happens)."""
    seen, real = [], runner.session.run_with_iobinding

    def run_with_iobinding(binding, options=None):
        seen.append(None if options is None else options.get_run_config_entry("gpu_graph_id"))
        return real(binding, options)

    runner.session.run_with_iobinding = run_with_iobinding
    return seen


def _key(runner, x) -> tuple:
    return tuple((n, tuple(np.shape(x[n]))) for n in runner.input_names)


def test_cuda_graph_slot_per_shape(artifacts, cpu_bound):
    """Under CUDA graphs each input-shape set gets its own binding, buffers and graph id (1, 2, ... in order of
    first use; ORT reserves 0), kept while other shapes run: alternating batches equal ort-cpu, each run passes
    its shape's id, and a shape seen again runs in the very buffers it had (what its captured graph recorded)."""
    runner = cpu_bound(artifacts["fp32"], "unet", variant=None, enable_cuda_graph=True)
    cpu = open_runner("ort-cpu", artifacts["fp32"], "unet")
    seen = _graph_ids_passed(runner)
    buffers = {}
    for i, batch in enumerate((1, 2, 1, 4, 2, 4, 1)):
        x = feeds("unet", batch=batch, seed=i)
        assert_close(runner(x)["noise_pred"], cpu(x)["noise_pred"], name=f"call {i} batch {batch}")
        held = {n: v.data_ptr() for n, v in (*runner.last_slot.inputs.items(), *runner.last_slot.outputs.items())}
        assert buffers.setdefault(batch, held) == held, f"batch {batch} was re-bound"
    keys = {b: _key(runner, feeds("unet", batch=b)) for b in (1, 2, 4)}
    assert runner.cuda_graphs == {keys[1]: 1, keys[2]: 2, keys[4]: 3}
    assert seen == ["1", "2", "1", "3", "2", "3", "1"] and runner.ungraphed_calls == 0
    assert len({id(s.binding) for s in runner._slots.values()}) == 3
    free = cpu_bound(artifacts["fp32"], "unet", variant=None)       # without graphs: one binding, re-bound
    seen = _graph_ids_passed(free)
    for batch in (2, 1, 2):
        assert free(feeds("unet", batch=batch))["noise_pred"].shape == (2 * batch, 4, 8, 8)
    assert not free._slots and free.cuda_graphs == {} and seen == [None, None, None]


def test_cuda_graph_bound(artifacts, cpu_bound):
    """Past `max_cuda_graphs` shapes run without a graph (gpu_graph_id -1) in one shared, re-bound binding, and
    are right; the shapes that have a graph keep it. The default bound covers the artifact's batch range."""
    from ldm_deploy.errors import UsageError
    from ldm_deploy.runtime.runners.ort import MAX_CUDA_GRAPHS

    runner = cpu_bound(artifacts["fp32"], "unet", variant=None, enable_cuda_graph=True, max_cuda_graphs=2)
    cpu = open_runner("ort-cpu", artifacts["fp32"], "unet")
    seen = _graph_ids_passed(runner)
    for i, batch in enumerate((1, 2, 4, 3, 1, 4)):
        x = feeds("unet", batch=batch, seed=i)
        assert_close(runner(x)["noise_pred"], cpu(x)["noise_pred"], name=f"call {i} batch {batch}")
    assert seen == ["1", "2", "-1", "-1", "1", "-1"] and runner.ungraphed_calls == 3
    assert sorted(runner.cuda_graphs.values()) == [1, 2]
    art = Artifact.open(artifacts["fp32"])
    wide = max(MAX_CUDA_GRAPHS, art.profiles.batch.max - art.profiles.batch.min + 1)
    assert cpu_bound(artifacts["fp32"], "unet", variant=None, enable_cuda_graph=True).max_cuda_graphs == wide
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UsageError, match="max_cuda_graphs must be an integer >= 1"):
            cpu_bound(artifacts["fp32"], "unet", variant=None, enable_cuda_graph=True, max_cuda_graphs=bad)


def test_cuda_graph_slots_keep_input_reuse_apart(artifacts, cpu_bound, monkeypatch):
    """The upload-skipping state is per slot: frozen embeddings at batch 1 stay skipped while batch 2 runs in
    between, and a batch-2 call never takes batch 1's device copy for its own."""
    runner = cpu_bound(artifacts["fp32"], "unet", variant=None, enable_cuda_graph=True)
    cpu = open_runner("ort-cpu", artifacts["fp32"], "unet")
    one, two = feeds("unet", batch=1), feeds("unet", batch=2, seed=5)
    for x in (one, two):
        x["encoder_hidden_states"].setflags(write=False)
    runner(one)
    runner(two)
    compared = []
    real = np.array_equal
    monkeypatch.setattr(np, "array_equal", lambda a, b: compared.append(np.shape(a)) or real(a, b))
    for i in range(3):
        for x in (one, two):
            x = dict(x, sample=x["sample"] + 0.5 * (i + 1))
            assert_close(runner(x)["noise_pred"], cpu(x)["noise_pred"], name=f"round {i}")
    assert (2, 77, 32) not in compared and (4, 77, 32) not in compared    # skipped by identity, per slot
    slots = list(runner._slots.values())
    # each slot counted its own latents' changes (VOLATILE_AFTER = 3 in a row) and froze its own embeddings
    assert all("encoder_hidden_states" in s.in_frozen and "sample" in s.volatile for s in slots)


def test_pipeline_passes_variant_through(artifacts, cpu_bound):
    from ldm_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline.from_artifact(artifacts["fp16"], backend="ort-cuda", variant=None, enable_cuda_graph=True)
    assert all(r.variant is None and r.model_path.name == "model.onnx" for r in pipe.runners.values())


# --- on a GPU --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
@pytest.mark.parametrize("variant", [None, "ort-cuda"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_ort_cuda_equals_cpu(artifacts, precision, component, variant, cuda_graph):
    cpu = open_runner("ort-cpu", artifacts[precision], component)
    gpu = open_runner("ort-cuda", artifacts[precision], component, variant=variant, enable_cuda_graph=cuda_graph)
    assert gpu.variant == variant
    half = "float16" in {str(d) for d in gpu.input_dtypes.values()} or gpu.spec.precision == "fp16"
    # fp32 graphs: TF32 is off for an fp32 export (strict 1e-3); an fp16 export's fp32 VAE runs on TF32
    # (10-bit mantissa, unit roundoff 2^-11 ~ 4.9e-4 per product): an H200 measured 1.3e-3 / 2.1e-3 there
    assert gpu.use_tf32 == (precision == "fp16")
    tol = 3e-2 if half else (5e-3 if gpu.use_tf32 else 1e-3)
    folded = takes_guidance(gpu)                         # the fused U-Net has CFG folded in (cfg_fold.py)
    assert folded == (component == "unet" and variant == "ort-cuda")
    for seed in (0, 1, 2):      # run 1 captures (with graphs), 2 and 3 replay with new inputs
        x = feeds(component, seed=seed)
        expected = cpu(x)
        if folded:
            from ldm_deploy.export.cfg_fold import folded_inputs, reference_cfg

            x = folded_inputs(x, 7.5)
            expected = {"noise_pred": reference_cfg(expected["noise_pred"], 1, 7.5)}
        for k, v in expected.items():
            assert_close(gpu(x)[k], v, atol=(2 if folded else 1) * tol * float(np.abs(v).max()),
                         name=f"{component} {k} {variant}")


@pytest.mark.gpu
def test_ort_cuda_pipeline_fused_equals_cpu(artifacts):
    from ldm_deploy.runtime.pipeline import Pipeline

    cpu = Pipeline.from_artifact(artifacts["fp16"], backend="ort-cpu")("a cat", steps=6, seed=0)
    pipe = Pipeline.from_artifact(artifacts["fp16"], backend="ort-cuda", enable_cuda_graph=True)
    assert pipe.runners["unet"].variant == "ort-cuda" and "guidance_scale" in pipe.runners["unet"].input_names
    pipe("a cat", steps=2, seed=1)
    gpu = pipe("a cat", steps=6, seed=0)
    assert_close(gpu.latents, cpu.latents, atol=5e-2, rtol=5e-2, name="fused fp16 latents vs cpu")


def test_unsized_outputs_are_probed_once_then_bound(artifacts, cpu_bound):
    """Output dims the manifest cannot size (an export without onnxslim names them oddly): the first call
    runs with ORT-allocated outputs (gpu_graph_id -1 under CUDA graphs: no capture), later calls use
    preallocated buffers."""
    runner = cpu_bound(artifacts["fp32"], "text_encoder", variant=None, enable_cuda_graph=True)
    runner.spec = replace(runner.spec, outputs=tuple(replace(o, shape=("batch", "odd_dim_1", "odd_dim_2"))
                                                     for o in runner.spec.outputs))
    cpu = open_runner("ort-cpu", artifacts["fp32"], "text_encoder")
    for seed in (0, 1, 2):
        x = feeds("text_encoder", seed=seed)
        assert_close(runner(x)["last_hidden_state"], cpu(x)["last_hidden_state"], name=f"seed {seed}")
        assert set(runner.last_slot.outputs) == set(runner.output_names)
    seen = _graph_ids_passed(runner)      # a new shape is probed in its own slot, then captured under its id
    for seed, batch in enumerate((2, 2, 1, 2), start=3):
        x = feeds("text_encoder", batch=batch, seed=seed)
        assert_close(runner(x)["last_hidden_state"], cpu(x)["last_hidden_state"], name=f"batch {batch}")
    assert seen == ["-1", "2", "1", "2"]


def test_without_io_binding_runs_session_run(artifacts, cpu_bound, monkeypatch):
    """A CUDA session run by OrtRunner (the benchmark's "no IO binding" rung): plain session.run with host
    arrays, the same outputs, no binding; a CUDA-graph session needs the binding."""
    from ldm_deploy.errors import UsageError
    from ldm_deploy.runtime.runners.ort import OrtRunner, SessionFromArtifact

    cpu = open_runner("ort-cpu", artifacts["fp32"], "unet")
    runner = OrtRunner(SessionFromArtifact(artifacts["fp32"], "unet", provider="cuda")())
    assert runner.device_id == 0 and not runner.io_binding and not hasattr(runner, "binding")
    for seed in (0, 1):
        x = feeds("unet", seed=seed)
        assert_close(runner(x)["noise_pred"], cpu(x)["noise_pred"], name=f"seed {seed}")
    with pytest.raises(UsageError, match="IO binding"):
        OrtRunner(SessionFromArtifact(artifacts["fp32"], "unet", provider="cuda", enable_cuda_graph=True)())


def test_production_runner_refuses_bench_levers(artifacts, cpu_bound):
    """The levers (IO binding off, provider option pass-through) are not production options: one line."""
    from ldm_deploy.errors import UsageError

    for lever in ({"io_binding": False}, {"cuda_options": {"cudnn_conv_algo_search": "HEURISTIC"}},
                  {"reuse_unchanged_inputs": False}):
        with pytest.raises(UsageError, match=f"unknown ort-cuda runner option {next(iter(lever))}"):
            open_runner("ort-cuda", artifacts["fp32"], "unet", **lever)


def test_runners_close(artifacts, cpu_bound):
    """close() (or leaving a `with` block) frees the session and the bound device buffers; a call after it
    is a one-line error; closing twice is harmless. No runner relies on __del__."""
    import inspect

    from ldm_deploy.runtime.runners import ort as ort_runners, tensorrt

    with cpu_bound(artifacts["fp32"], "unet", variant=None) as bound:
        bound(feeds("unet"))
        assert bound.last_slot.inputs and bound.last_slot.outputs
    assert bound.session is None and bound.last_slot.binding is None and not bound.last_slot.inputs and not bound.last_slot.outputs
    with pytest.raises(LdmError, match="unet runner is closed"):
        bound(feeds("unet"))
    bound.close()
    cpu = open_runner("ort-cpu", artifacts["fp32"], "vae_decoder")
    cpu.close()
    with pytest.raises(LdmError, match="closed"):
        cpu(feeds("vae_decoder"))
    for module in (ort_runners, tensorrt):
        assert "__del__" not in inspect.getsource(module)


@pytest.mark.gpu
def test_lever_variants_equal_cpu(artifacts, tmp_path):
    """Every U-Net the lever ladder runs (`ldm-deploy bench --levers`) computes what ORT CPU computes on the plain
    graph, with the runner the bench assembles for its row; the artifact is left as it was."""
    from ldm_deploy.bench.ort_side import _open_runner
    from ldm_deploy.bench.prepare import add_lever_variants
    from ldm_deploy.bench.spec import LEVERS

    manifest = (artifacts["fp16"] / "manifest.json").read_bytes()
    add_lever_variants(artifacts["fp16"], tmp_path / "levers")
    assert (artifacts["fp16"] / "manifest.json").read_bytes() == manifest
    cpu = open_runner("ort-cpu", artifacts["fp16"], "unet")
    for side, (_, opts) in LEVERS.items():
        gpu = _open_runner("ort-cuda", artifacts["fp16"], "unet", opts, tmp_path / "levers")
        assert gpu.variant == opts.get("graph", opts.get("variant")) and gpu.io_binding == opts.get("io_binding", True)
        for seed in (0, 1, 2):
            x = feeds("unet", seed=seed)
            v = cpu(x)["noise_pred"]
            assert_close(gpu(x)["noise_pred"], v, atol=3e-2 * float(np.abs(v).max()), name=f"{side} seed {seed}")
        gpu.close()


def test_tf32_default_follows_the_export_precision(artifacts, cpu_bound):
    """use_tf32=None: off for an fp32 export, ORT's default (on) for an fp16 one; explicit values win."""
    plain = {"variant": None}   # the fused graphs' contrib ops have no CPU kernels
    assert cpu_bound(artifacts["fp32"], "vae_decoder", **plain).cuda_options["use_tf32"] == "0"
    fp16_vae = cpu_bound(artifacts["fp16"], "vae_decoder", **plain)
    assert fp16_vae.use_tf32 and fp16_vae.cuda_options["use_tf32"] == "1"
    assert cpu_bound(artifacts["fp32"], "vae_decoder", use_tf32=True, **plain).use_tf32
    from ldm_deploy.runtime.runners.ort import SessionFromArtifact   # an explicit provider option wins (bench)

    assert not SessionFromArtifact(artifacts["fp16"], "vae_decoder", provider="cuda",
                                   provider_options={"use_tf32": 0})().use_tf32


@pytest.mark.parametrize("cores, spinning", [(2, "0"), (64, "1")])
def test_spinning_default_follows_the_core_count(artifacts, monkeypatch, cores, spinning):
    """allow_spinning=None: intra-op spinning off on a machine of at most FEW_CORES cores (three
    sessions' pools share them); explicit arguments and session_options keys win."""
    from ldm_deploy.runtime.runners import ort as ort_runners

    monkeypatch.setattr(ort_runners.os, "cpu_count", lambda: cores)
    runner = open_runner("ort-cpu", artifacts["fp32"], "text_encoder")
    key = ort_runners.SPINNING_KEY
    assert runner.session.get_session_options().get_session_config_entry(key) == spinning
    assert runner.allow_spinning == (spinning == "1")
    assert open_runner("ort-cpu", artifacts["fp32"], "text_encoder", allow_spinning=True).allow_spinning
    from ldm_deploy.runtime.runners.ort import OrtRunner, SessionFromArtifact

    forced = OrtRunner(SessionFromArtifact(artifacts["fp32"], "text_encoder", allow_spinning=True,
                                           session_options={key: "0"})())
    assert not forced.allow_spinning
    assert forced.session.get_session_options().get_session_config_entry(key) == "0"


def test_artifact_with_old_lever_variants_keeps_working(artifacts, cpu_bound, tmp_path):
    """An artifact an older ldm-deploy's `bench --levers` wrote `lever-*` variants into (the manifest format is
    public): it still verifies and generates; "auto" still runs "ort-cuda" only, a lever variant runs when named."""
    import json
    import shutil

    from ldm_deploy.artifact import Artifact
    from ldm_deploy.fileio import write_json
    from ldm_deploy.runtime.pipeline import Pipeline

    art = tmp_path / "old"
    shutil.copytree(artifacts["fp16"], art)
    manifest = json.loads((art / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    unet["variants"]["lever-fp32"] = {   # as the old add_lever_variants wrote it: the kept fp32 graph, no new file
        "file": unet["fp32_file"], "external_data": None, "precision": "fp32", "inputs": [
            {**i, "dtype": "float32"} for i in unet["inputs"]], "outputs": [
            {**o, "dtype": "float32"} for o in unet["outputs"]], "fused_ops": {}, "cfg_folded": False,
        "nhwc_conv": False}
    write_json(art / "manifest.json", manifest)
    from ldm_deploy.runtime.runners.ort import SessionFromArtifact

    loader = SessionFromArtifact(art, "unet", provider="cuda", variant="auto")
    assert loader.choose_variant(Artifact.open(art, verify=True)) == "ort-cuda"
    lever = cpu_bound(art, "unet", variant="lever-fp32")
    assert lever.variant == "lever-fp32" and lever.model_path == art / unet["fp32_file"]
    x = feeds("unet")
    v = open_runner("ort-cpu", art, "unet")(x)["noise_pred"]
    # fp32 graph against the fp16 export's plain graph: fp16 rounding (unit roundoff 2^-11) through the tiny U-Net
    assert_close(lever(x)["noise_pred"], v, atol=3e-2 * float(np.abs(v).max()), name="old lever-fp32 variant")
    with Pipeline.from_artifact(art, backend="ort-cpu") as pipe:
        assert pipe("a cat", steps=2, seed=0).images.shape[0] == 1
