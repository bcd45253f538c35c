"""Engines executed on a GPU TensorRT can run on (skipped elsewhere): outputs equal ONNX Runtime's
on the same graphs, across shapes in the profile, with and without CUDA graphs."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import UsageError
from tests.engine.conftest import FAST
from tests.engine.tiny_artifact import VOCAB, make_tiny_artifact

pytestmark = pytest.mark.tensorrt


@pytest.fixture(scope="module")
def fp32_engines(tmp_path_factory):
    from ldm_deploy.engine.build import BuildConfig, build_engines
    root = tmp_path_factory.mktemp("tiny32")
    artifact = make_tiny_artifact(root / "onnx", precision="fp32")
    build_engines(artifact, root / "engines", BuildConfig(**FAST))
    return artifact, root / "engines"


def _ort(artifact, component, inputs):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(artifact / component / "model.onnx"), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs)))


def _unet_inputs(rng, b, w):
    return {"sample": rng.standard_normal((b, 4, 8, w)).astype(np.float32),
            "timestep": rng.uniform(0, 999, b).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((b, 77, 32)).astype(np.float32)}


def test_every_component_matches_onnxruntime(fp32_engines):
    from ldm_deploy.runtime.runners.tensorrt import TensorRTRunner
    artifact, engines = fp32_engines
    rng = np.random.default_rng(0)
    cases = {
        "text_encoder": {"input_ids": rng.integers(0, VOCAB, (2, 77)).astype(np.int32)},
        "unet": _unet_inputs(rng, 4, 16),
        "vae_decoder": {"latent": rng.standard_normal((2, 4, 8, 12)).astype(np.float32)},
        "vae_encoder": {"image": rng.uniform(-1, 1, (1, 3, 64, 128)).astype(np.float32)},
    }
    for component, inputs in cases.items():
        runner = TensorRTRunner(artifact, component, engine_dir=engines)
        got, want = runner(inputs), _ort(artifact, component, inputs)
        assert sorted(got) == sorted(want)
        for name in want:
            assert got[name].dtype == np.float32
            assert_close(got[name], want[name], atol=1e-3, rtol=1e-3, name=f"{component}.{name}")


def test_buffers_are_reused_across_shapes(fp32_engines):
    from ldm_deploy.runtime.runners.tensorrt import TensorRTRunner
    artifact, engines = fp32_engines
    runner = TensorRTRunner(engines, "unet")
    rng = np.random.default_rng(1)
    small, large = _unet_inputs(rng, 1, 8), _unet_inputs(rng, 4, 16)
    first = runner(small)["noise_pred"]
    runner(large)
    again = runner(small)["noise_pred"]
    assert first.shape == (1, 4, 8, 8)
    assert_close(again, first, atol=0, rtol=0)
    assert_close(first, _ort(artifact, "unet", small)["noise_pred"], atol=1e-3, rtol=1e-3)


def test_cuda_graph_replays_equal_plain_runs(fp32_engines):
    from ldm_deploy.runtime.runners.tensorrt import TensorRTRunner
    artifact, engines = fp32_engines
    plain, graphed = TensorRTRunner(engines, "unet"), TensorRTRunner(engines, "unet", cuda_graph=True)
    rng = np.random.default_rng(2)
    for _ in range(3):  # first call captures, later calls replay with new inputs
        x = _unet_inputs(rng, 2, 8)
        assert_close(graphed(x)["noise_pred"], plain(x)["noise_pred"], atol=0, rtol=0)


def test_shape_outside_the_profile_is_refused(fp32_engines):
    from ldm_deploy.runtime.runners.base import open_runner
    artifact, engines = fp32_engines
    runner = open_runner("tensorrt", artifact, "unet", engine_dir=engines)
    with pytest.raises(UsageError, match=r"dim 0 = 5 not in 1..4.*profile: sample \(1,4,8,8\)..\(4,4,8,16\)"):
        runner(_unet_inputs(np.random.default_rng(3), 5, 8))


def test_fp16_engines_accept_float32_inputs(tiny_engines):
    from ldm_deploy.runtime.runners.tensorrt import TensorRTRunner
    artifact, engines, _ = tiny_engines
    runner = TensorRTRunner(artifact, "vae_decoder", engine_dir=engines)
    latent = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    out = runner({"latent": latent})["image"]
    want = _ort(artifact, "vae_decoder", {"latent": latent.astype(np.float16)})["image"].astype(np.float32)
    assert out.dtype == np.float32 and out.shape == (1, 3, 64, 64)
    assert_close(out, want, atol=2e-2, rtol=2e-2)


def test_closed_runner_frees_and_a_new_one_runs(fp32_engines):
    """`with` closes the runner (graphs, buffers, stream, context, engine); a runner opened after it on the
    same engines computes the same outputs, and the loader + from_engine path equals the constructor."""
    from ldm_deploy.errors import LdmError
    from ldm_deploy.runtime.runners.tensorrt import EngineFromSidecar, TensorRTRunner
    artifact, engines = fp32_engines
    x = _unet_inputs(np.random.default_rng(3), 2, 8)
    with TensorRTRunner(engines, "unet", cuda_graph=True) as runner:
        runner(x)
        first = runner(x)["noise_pred"]
    assert runner.context is None and runner.stream is None
    with pytest.raises(LdmError, match="closed"):
        runner(x)
    with TensorRTRunner.from_engine(EngineFromSidecar(engines, "unet", check_onnx=False)(), "unet") as again:
        assert_close(again(x)["noise_pred"], first, atol=0, rtol=0)
