"""OrtCudaRunner's buffer logic (IO binding, preallocated outputs, input reuse, CUDA-graph shape rules)
run for real with CPU "device" buffers; on a GPU (marker `gpu`) the plain and fused graphs, with and
without CUDA graphs, against ort-cpu."""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError
from ldm_deploy.export.config import load_config
from ldm_deploy.export.exporter import export_model
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
    return {p: export_model(folder, root / p, base.replace(precision=p, keep_fp32_unet=p == "fp16")).path
            for p in ("fp32", "fp16")}


def feeds(component: str, batch: int = 1, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    if component == "text_encoder":
        ids = rng.integers(0, 999, (batch, 77)).astype(np.int32)
        return {"input_ids": ids}
    if component == "unet":   # latents / timesteps repeat over the CFG halves, as the pipeline feeds them
        from ldm_deploy.export.cfg_fold import symmetric_unet_inputs

        return symmetric_unet_inputs({"sample": rng.standard_normal((2 * batch, 4, 8, 8), np.float32),
                                      "timestep": np.linspace(999, 0.5, 2 * batch).astype(np.float32),
                                      "encoder_hidden_states": rng.standard_normal((2 * batch, 77, 32), np.float32)})
    return {"latent": rng.standard_normal((batch, 4, 8, 8), np.float32)}


@pytest.fixture
def cpu_bound(monkeypatch):
    """OrtCudaRunner with CPU OrtValues and the CPU provider: everything but CUDA runs for real."""
    import onnxruntime as ort

    from ldm_deploy.runtime.runners.ort import OrtCudaRunner

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(OrtCudaRunner, "_providers", lambda self: ["CPUExecutionProvider"])
    monkeypatch.setattr(OrtCudaRunner, "_check_provider", lambda self: None)
    monkeypatch.setattr(OrtCudaRunner, "_device_value", lambda self, shape, dtype:
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
    assert set(runner._out) == set(runner.output_names)


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
    assert "sample" in runner._volatile and "sample" not in runner._in_host
    assert compared.count((2, 4, 8, 8)) == VOLATILE_AFTER      # calls 2..VOLATILE_AFTER+1 compared, then none
    assert "encoder_hidden_states" not in runner._volatile and "encoder_hidden_states" in runner._in_host


def test_cuda_graph_shape_change_is_an_error(artifacts, cpu_bound):
    runner = cpu_bound(artifacts["fp32"], "unet", variant=None, enable_cuda_graph=True)
    runner(feeds("unet", batch=1))
    with pytest.raises(LdmError, match="CUDA graph"):
        runner(feeds("unet", batch=2))
    free = cpu_bound(artifacts["fp32"], "unet", variant=None)       # without graphs any batch goes
    assert free(feeds("unet", batch=2))["noise_pred"].shape == (4, 4, 8, 8)
    assert free(feeds("unet", batch=1))["noise_pred"].shape == (2, 4, 8, 8)


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
        assert set(runner._out) == set(runner.output_names)


def test_without_io_binding_runs_session_run(artifacts, cpu_bound, monkeypatch):
    """io_binding=False (the benchmark's "no IO binding" lever): plain session.run with host arrays, the same
    outputs, the binding never used; a CUDA graph needs the binding."""
    from ldm_deploy.errors import UsageError

    cpu = open_runner("ort-cpu", artifacts["fp32"], "unet")
    runner = cpu_bound(artifacts["fp32"], "unet", variant=None, io_binding=False)
    monkeypatch.setattr(runner, "_run", lambda *a, **k: pytest.fail("the IO binding ran"))
    for seed in (0, 1):
        x = feeds("unet", seed=seed)
        assert_close(runner(x)["noise_pred"], cpu(x)["noise_pred"], name=f"seed {seed}")
    assert not runner._in and not runner._out
    with pytest.raises(UsageError, match="io_binding"):
        cpu_bound(artifacts["fp32"], "unet", variant=None, io_binding=False, enable_cuda_graph=True)


@pytest.mark.gpu
def test_lever_variants_equal_cpu(artifacts, tmp_path):
    """Every U-Net the lever ladder runs (scripts/bench_sd15.py --levers) computes what ORT CPU computes on
    the plain graph, with the runner options of its row."""
    import shutil

    from ldm_deploy.bench.prepare import add_lever_variants
    from ldm_deploy.bench.spec import LEVERS

    art = tmp_path / "a"
    shutil.copytree(artifacts["fp16"], art)
    add_lever_variants(art)
    cpu = open_runner("ort-cpu", art, "unet")
    for side, (_, opts) in LEVERS.items():
        gpu = open_runner("ort-cuda", art, "unet", **opts)
        assert gpu.variant == opts["variant"] and gpu.io_binding == opts.get("io_binding", True)
        for seed in (0, 1, 2):
            x = feeds("unet", seed=seed)
            v = cpu(x)["noise_pred"]
            assert_close(gpu(x)["noise_pred"], v, atol=3e-2 * float(np.abs(v).max()), name=f"{side} seed {seed}")


def test_tf32_default_follows_the_export_precision(artifacts, cpu_bound):
    """use_tf32=None: off for an fp32 export, ORT's default (on) for an fp16 one; explicit values win."""
    plain = {"variant": None}   # the fused graphs' contrib ops have no CPU kernels
    assert cpu_bound(artifacts["fp32"], "vae_decoder", **plain).cuda_options["use_tf32"] == "0"
    fp16_vae = cpu_bound(artifacts["fp16"], "vae_decoder", **plain)
    assert fp16_vae.use_tf32 and fp16_vae.cuda_options["use_tf32"] == "1"
    assert cpu_bound(artifacts["fp32"], "vae_decoder", use_tf32=True, **plain).use_tf32
    assert not cpu_bound(artifacts["fp16"], "vae_decoder", cuda_options={"use_tf32": 0}, **plain).use_tf32


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
    forced = open_runner("ort-cpu", artifacts["fp32"], "text_encoder", session_options={key: "0"})
    assert forced.session.get_session_options().get_session_config_entry(key) == "0"
