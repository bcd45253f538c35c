"""The import adapters on small hand-built graphs (no optimum venv needed): the added nodes do what
docs/interop.md says, checked by running the adapted graph on ONNX Runtime against the original."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ldm_deploy.errors import LdmError  # noqa: E402
from ldm_deploy.interop.adapt import adapt  # noqa: E402


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def _unet(t_type, t_shape):
    """out_sample = sample * float(timestep): shows which timestep value reached the graph."""
    nodes = [helper.make_node("Cast", ["timestep"], ["tf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["sample", "tf"], ["out_sample"])]
    if t_shape == ["n"]:      # per-row timesteps: broadcast over C, H, W
        nodes = [helper.make_node("Cast", ["timestep"], ["tf0"], to=TensorProto.FLOAT),
                 helper.make_node("Unsqueeze", ["tf0", "axes"], ["tf"]),
                 helper.make_node("Mul", ["sample", "tf"], ["out_sample"])]
    return _model(nodes, [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["n", 4, 2, 2]),
                          helper.make_tensor_value_info("timestep", t_type, t_shape),
                          helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["n", "s", 8])],
                  [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["n", 4, 2, 2])],
                  [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes")])


@pytest.mark.parametrize("t_type,t_shape", [(TensorProto.FLOAT, []), (TensorProto.INT64, []),
                                            (TensorProto.FLOAT, [1]), (TensorProto.FLOAT16, []),
                                            (TensorProto.FLOAT, ["n"])])
def test_unet_timestep_and_output_adapter(t_type, t_shape):
    a = adapt("unet", _unet(t_type, t_shape))
    onnx.checker.check_model(a.model, full_check=True)
    assert [i.name for i in a.model.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    sample = np.random.default_rng(0).standard_normal((2, 4, 2, 2)).astype(np.float32)
    t = np.full(2, 6.9999995 if t_type == TensorProto.INT64 else 7.0, np.float32)  # int graphs: rounded, not truncated
    out = _run(a.model, {"sample": sample, "timestep": t,
                         "encoder_hidden_states": np.zeros((2, 77, 8), np.float32)})
    assert list(out) == ["noise_pred"]
    np.testing.assert_array_equal(out["noise_pred"], sample * np.float32(7.0))


def test_text_encoder_int64_ids_and_extra_outputs():
    emb = numpy_helper.from_array(np.arange(100 * 4, dtype=np.float32).reshape(100, 4), "emb")
    m = _model([helper.make_node("Gather", ["emb", "input_ids"], ["last_hidden_state"]),
                helper.make_node("Identity", ["last_hidden_state"], ["hidden_states.0"])],
               [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
               [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", 4]),
                helper.make_tensor_value_info("hidden_states.0", TensorProto.FLOAT, ["b", "s", 4])], [emb])
    a = adapt("text_encoder", m)
    ids = np.random.default_rng(1).integers(0, 100, (2, 77)).astype(np.int32)
    out = _run(a.model, {"input_ids": ids})
    assert list(out) == ["last_hidden_state"]
    np.testing.assert_array_equal(out["last_hidden_state"], numpy_helper.to_array(emb)[ids])


def test_vae_encoder_moments_split_and_logvar_clamp():
    w = np.random.default_rng(2).standard_normal((8, 3, 8, 8)).astype(np.float32) * 3  # logvar beyond 20 somewhere
    m = _model([helper.make_node("Conv", ["sample", "w"], ["latent_parameters"], strides=[8, 8])],
               [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", 3, "h", "w"])],
               [helper.make_tensor_value_info("latent_parameters", TensorProto.FLOAT, ["b", 8, "h8", "w8"])],
               [numpy_helper.from_array(w, "w")])
    x = np.random.default_rng(3).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    moments = _run(m, {"sample": x})["latent_parameters"]
    assert np.abs(moments[:, 4:]).max() > 20, "the test needs logvar values outside [-30, 20]"
    out = _run(adapt("vae_encoder", m).model, {"image": x})
    np.testing.assert_array_equal(out["mean"], moments[:, :4])
    np.testing.assert_array_equal(out["logvar"], np.clip(moments[:, 4:], -30, 20))


def test_vae_encoder_that_samples_is_refused():
    m = _model([helper.make_node("Identity", ["sample"], ["latent_sample"])],
               [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", 4, "h", "w"])],
               [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["b", 4, "h", "w"])])
    with pytest.raises(LdmError, match="sampled latent"):
        adapt("vae_encoder", m)


def test_sdxl_style_unet_is_refused():
    m = _unet(TensorProto.FLOAT, [])
    m.graph.input.append(helper.make_tensor_value_info("time_ids", TensorProto.FLOAT, ["n", 6]))
    with pytest.raises(LdmError, match="time_ids"):
        adapt("unet", m)


def test_import_without_onnx_says_what_to_install(monkeypatch, tmp_path, capsys):
    import sys

    from ldm_deploy.cli import main

    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["import", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the onnx package" in err and "ldm-deploy[train]" in err
    assert not (tmp_path / "out").exists()
