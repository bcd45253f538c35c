"""Runner contract: names and dtypes from the manifest, input casting, float32 outputs; ORT CPU equals the
PyTorch modules (TorchRunner) per component; ORT CUDA (IO binding, CUDA graphs) equals CPU (gpu marker)."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime.runners import open_runner
from tests.runtime.tiny_model import export_tiny_artifact, tiny_artifact, tiny_folder  # noqa: F401 (fixtures)


def inputs_for(component: str, batch: int = 2, size: int = 32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    h = size // 8
    if component == "text_encoder":
        ids = rng.integers(0, 49406, (batch, 77)).astype(np.int64)  # int64 on purpose: the runner casts
        ids[:, 0], ids[:, 20:] = 49406, 49407
        return {"input_ids": ids}
    if component == "unet":
        return {"sample": rng.standard_normal((2 * batch, 4, h, h)).astype(np.float32),
                "timestep": np.array([999.0, 500.5, 999.0, 500.5][: 2 * batch], np.float32),
                "encoder_hidden_states": rng.standard_normal((2 * batch, 77, 32)).astype(np.float32)}
    if component == "vae_decoder":
        return {"latent": rng.standard_normal((batch, 4, h, h)).astype(np.float32)}
    return {"image": rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)}


COMPONENTS = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
TOL = {"text_encoder": 1e-4, "unet": 1e-4, "vae_decoder": 1e-4, "vae_encoder": 1e-4}


@pytest.mark.parametrize("component", COMPONENTS)
def test_ort_cpu_equals_torch_runner(tiny_artifact, tiny_folder, component):
    ort = open_runner("ort-cpu", tiny_artifact, component, intra_op_threads=1)
    ref = open_runner("torch", tiny_folder, component)
    assert ort.input_names == ref.input_names and ort.output_names == ref.output_names
    x = inputs_for(component)
    a, b = ort(x), ref(x)
    for name in ort.output_names:
        assert a[name].dtype == np.float32
        assert_close(a[name], b[name], atol=TOL[component], rtol=1e-4, name=f"{component}.{name}")


def test_runner_options_and_errors(tiny_artifact):
    r = open_runner("ort-cpu", tiny_artifact, "vae_decoder", graph_optimization_level="basic", output_dtype=None)
    assert r({"latent": np.zeros((1, 4, 4, 4), np.float64)})["image"].dtype == np.float32  # manifest dtype
    with pytest.raises(UsageError, match="graph_optimization_level"):
        open_runner("ort-cpu", tiny_artifact, "unet", graph_optimization_level="max")
    with pytest.raises(UsageError, match="unknown backend"):
        open_runner("onnx-gpu", tiny_artifact, "unet")
    with pytest.raises(LdmError, match="without inputs"):
        r({"z": np.zeros(1)})


def test_fp16_graph_gets_cast_inputs_and_float32_outputs(tmp_path):
    from tests.engine.tiny_artifact import make_tiny_artifact

    art = make_tiny_artifact(tmp_path / "fp16", precision="fp16")
    r = open_runner("ort-cpu", art, "unet")
    assert r.input_dtypes["sample"] == np.float16
    x = {"sample": np.ones((2, 4, 8, 8), np.float32), "timestep": np.array([1.0, 2.0], np.float32),
         "encoder_hidden_states": np.zeros((2, 77, 32), np.float32)}
    assert r(x)["noise_pred"].dtype == np.float32
    raw = open_runner("ort-cpu", art, "unet", output_dtype=None)(x)["noise_pred"]
    assert raw.dtype == np.float16


def test_missing_component_is_clear(tmp_path):
    from tests.engine.tiny_artifact import make_tiny_artifact
    import json

    art = make_tiny_artifact(tmp_path / "a", precision="fp32")
    m = json.loads((art / "manifest.json").read_text())
    del m["components"]["vae_encoder"]
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LdmError, match="no 'vae_encoder' component"):
        open_runner("ort-cpu", art, "vae_encoder")


# --- GPU: ONNX Runtime CUDA, fp16, IO binding and CUDA graphs ------------------------------------------
# Built from training.models.presets, not diffusers (absent on GPU images), and exported without onnxslim
# where it is missing.

@pytest.fixture(scope="module")
def fp16_artifact(tmp_path_factory):
    import importlib.util

    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model
    from tests.export.test_ort_optimize import make_sd_like_folder

    root = tmp_path_factory.mktemp("fp16")
    config = load_config("tiny").replace(components=("text_encoder", "unet", "vae_decoder"), precision="fp16",
                                         measure_runtime=False,
                                         optimize=importlib.util.find_spec("onnxslim") is not None)
    return export_model(make_sd_like_folder(root / "model"), root / "onnx", config).path


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_ort_cuda_fp16_unet_equals_cpu(fp16_artifact, cuda_graph):
    cpu = open_runner("ort-cpu", fp16_artifact, "unet")
    gpu = open_runner("ort-cuda", fp16_artifact, "unet", enable_cuda_graph=cuda_graph)
    emb = inputs_for("unet", batch=1, size=64)["encoder_hidden_states"]
    for step in range(3):  # buffers reused across steps; the graph is captured and then replayed
        # the same embeddings object every step: not uploaded again
        x = dict(inputs_for("unet", batch=1, size=64, seed=step), encoder_hidden_states=emb)
        out = gpu(x)["noise_pred"]
        assert out.dtype == np.float32
        assert_close(out, cpu(x)["noise_pred"], atol=2e-2, rtol=2e-2, name=f"unet step {step}")
    if cuda_graph:   # another batch shape gets a CUDA graph of its own (one per shape), then batch 1 replays again
        for batch in (2, 1):
            x = dict(inputs_for("unet", batch=batch, size=64, seed=9))
            assert_close(gpu(x)["noise_pred"], cpu(x)["noise_pred"], atol=2e-2, rtol=2e-2, name=f"unet batch {batch}")


@pytest.mark.gpu
def test_ort_cuda_fp16_pipeline_equals_cpu(fp16_artifact):
    from ldm_deploy.runtime.pipeline import Pipeline
    from tests.runtime.tiny_model import psnr

    z = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    cpu = Pipeline.from_artifact(fp16_artifact, backend="ort-cpu")("a red circle", steps=4, latents=z)
    gpu_pipe = Pipeline.from_artifact(fp16_artifact, backend="ort-cuda", enable_cuda_graph=True)
    a = gpu_pipe("a red circle", steps=4, latents=z)
    b = gpu_pipe("a red circle", steps=4, latents=z)  # second run replays the captured graphs
    assert np.array_equal(a.images, b.images)
    assert_close(a.latents, cpu.latents, atol=5e-2, rtol=5e-2, name="fp16 latents cuda vs cpu")
    assert psnr(a.images, cpu.images) >= 30
