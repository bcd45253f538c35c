"""CFG folded into the U-Net graph (ldm_deploy/export/cfg_fold.py): on ONNX Runtime CPU the folded graph
gives what the plain graph + numpy CFG give, with and without CFG and with the rescale; the pipeline
uses it when its U-Net runner takes `guidance_scale`, and the images match the unfolded pipeline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from ldm_deploy.errors import LdmError
from ldm_deploy.export.cfg_fold import fold_cfg, is_folded, reference_cfg
from ldm_deploy.export.config import load_config
from ldm_deploy.export.exporter import export_model

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from ldm_deploy.bench.prepare import random_model_folder

    return random_model_folder("tiny", tmp_path_factory.mktemp("models") / "tiny")[0]   # the real CLIP vocabulary


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def artifact(request, model_folder, tmp_path_factory) -> Path:
    config = load_config("tiny").replace(components=("text_encoder", "unet", "vae_decoder"), measure_runtime=False,
                                         precision=request.param)
    return export_model(model_folder, tmp_path_factory.mktemp("art") / request.param, config).path


def _sessions(artifact: Path):
    path = artifact / "unet" / "model.onnx"
    plain = onnx.load(str(path))
    folded = fold_cfg(onnx.load(str(path)))
    onnx.checker.check_model(folded)
    return (ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]),
            ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]), plain)


def _dtype(session, name):
    kind = next(i.type for i in session.get_inputs() if i.name == name)
    return np.float16 if "float16" in kind else np.float32


@pytest.mark.parametrize("batch,cfg,guidance,rescale", [(1, True, 7.5, 0.0), (2, True, 5.0, 0.0),
                                                         (2, True, 7.5, 0.7), (2, False, 1.0, 0.0)])
def test_folded_graph_equals_plain_graph_plus_numpy_cfg(artifact, batch, cfg, guidance, rescale):
    plain, folded, model = _sessions(artifact)
    rng = np.random.default_rng(batch)
    d = next(i.shape[2] for i in plain.get_inputs() if i.name == "encoder_hidden_states")
    shape = next(i.shape for i in plain.get_inputs() if i.name == "sample")
    hw = tuple(n if isinstance(n, int) else 8 for n in shape[2:])
    x = rng.standard_normal((batch, 4, *hw), dtype=np.float32)
    ehs = rng.standard_normal((2 * batch, 77, d), dtype=np.float32).astype(_dtype(plain, "encoder_hidden_states"))
    if not cfg:   # what the pipeline passes without guidance: the cond rows twice, g = 1
        ehs[:batch] = ehs[batch:]
    t = np.full((batch,), 421.0, np.float32).astype(_dtype(plain, "timestep"))
    ref_rows = plain.run(None, {"sample": np.concatenate([x, x]).astype(_dtype(plain, "sample")),
                                "timestep": np.concatenate([t, t]), "encoder_hidden_states": ehs})[0]
    expected = reference_cfg(ref_rows, batch, guidance, rescale) if cfg else ref_rows[batch:].astype(np.float32)
    got = folded.run(None, {"sample": x, "timestep": t, "encoder_hidden_states": ehs,
                            "guidance_scale": np.array([guidance], np.float32),
                            "guidance_rescale": np.array([rescale], np.float32)})[0]
    assert got.dtype == np.float32 and got.shape == (batch, 4, *hw)
    if _dtype(plain, "sample") == np.float32:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    else:   # ORT CPU optimises the two fp16 graphs differently: a few fp16 ulps of the largest value, times g
        scale = float(np.abs(expected).max())
        assert np.abs(got - expected).max() <= 4e-3 * max(guidance, 1.0) * scale
        assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9999


def test_folded_io_and_refusals(artifact):
    model = fold_cfg(onnx.load(str(artifact / "unet" / "model.onnx")))
    assert is_folded(model.graph)
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert ins["sample"][0] == "batch" and ins["timestep"] == ["batch"]
    ops = {n.op_type for n in model.graph.node if n.name.startswith("cfg/")}
    assert not ops & {"Shape", "Gather", "Tile", "Slice"}, "shape arithmetic runs on the CPU: no CUDA graph"
    assert ins["encoder_hidden_states"][0] == "unet_batch" and ins["guidance_scale"] == [1]
    out = model.graph.output[0]
    assert out.name == "noise_pred" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    with pytest.raises(LdmError, match="already has CFG folded"):
        fold_cfg(model)
    vae = onnx.load(str(artifact / "vae_decoder" / "model.onnx"))
    with pytest.raises(LdmError, match="no 'sample' input"):
        fold_cfg(vae)


class _FoldedRunner:
    """An ORT CPU session over the folded graph, shaped as a runner (what OrtCudaRunner gives on a GPU)."""

    def __init__(self, model):
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.dtypes = {i.name: _dtype(self.session, i.name) for i in self.session.get_inputs()}
        self.calls = []

    def __call__(self, feeds):
        self.calls.append({k: np.shape(v) for k, v in feeds.items()})
        out = self.session.run(None, {k: np.asarray(feeds[k], self.dtypes[k]) for k in self.input_names})[0]
        return {"noise_pred": out}


@pytest.mark.parametrize("guidance,rescale", [(7.5, 0.0), (5.0, 0.5), (1.0, 0.0)])
def test_pipeline_uses_the_folded_unet_and_matches(artifact, guidance, rescale):
    from ldm_deploy.runtime.pipeline import Pipeline

    plain = Pipeline.from_artifact(artifact, backend="ort-cpu")
    runner = _FoldedRunner(fold_cfg(onnx.load(str(artifact / "unet" / "model.onnx"))))
    folded = Pipeline(plain.tokenizer, {**plain.runners, "unet": runner}, plain.info)
    kwargs = dict(steps=4, seed=3, guidance=guidance, guidance_rescale=rescale, num_images=2)
    a = plain("a red square", **kwargs)
    b = folded("a red square", **kwargs)
    assert runner.calls[0]["sample"][0] == 2 and runner.calls[0]["encoder_hidden_states"][0] == 4
    fp32 = plain.runners["unet"].input_dtypes["sample"] == np.float32
    scale = float(np.abs(a.latents).max())
    assert np.abs(b.latents - a.latents).max() <= (1e-4 if fp32 else 5e-3) * scale
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= (1 if fp32 else 4)
    assert b.timings["unet_calls"] == len(runner.calls) == a.timings["unet_calls"]


def test_validate_checks_a_folded_unet_against_torch(artifact, model_folder, monkeypatch):
    """`ldm-deploy validate` on a backend whose U-Net has CFG folded in (ORT CUDA's variant) feeds it B
    latents + guidance and compares with the PyTorch U-Net's guided output; here the folded graph runs on
    ORT CPU in place of the CUDA runner."""
    from ldm_deploy.export.validate import validate
    from ldm_deploy.runtime.runners import base

    real = base.open_runner

    def open_runner(backend, art, component, **opts):
        if component == "unet":
            return _FoldedRunner(fold_cfg(onnx.load(str(artifact / "unet" / "model.onnx"))))
        return real(backend, art, component, **opts)

    monkeypatch.setattr(base, "open_runner", open_runner)
    report = validate(model_folder, artifact, components=["unet"])
    assert report.checks and all(c.component == "unet" for c in report.checks)
    assert report.passed, report.table()
