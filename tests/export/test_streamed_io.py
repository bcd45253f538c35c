"""Graphs over protobuf's 2 GB limit are copied and converted to fp16 tensor by tensor (onnx_io.save_streamed).

The streamed files must be the ones the in-memory path writes: byte for byte for a copy, and for fp16 the
same nodes and bit-identical weights as converting the whole model in memory. The 2 GB limit is lowered
(monkeypatched PROTO_LIMIT) so tiny graphs take the over-the-limit path that the SDXL U-Net takes.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ldm_deploy.export import onnx_io
from ldm_deploy.export.fp16 import convert_to_fp16


def _graph(path, big_weights=True):
    """x (1, 64) -> MatMul W1 -> Add b -> LayerNormalization (kept fp32) -> MatMul W2 -> y; weights over 1 KiB
    go external, the bias and LayerNorm scale stay inline (under onnx's 1024-byte threshold)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32) * 1e-9, "b"),   # fp16-subnormal range
             numpy_helper.from_array(np.ones(64, np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32) * 1e5, "W2"),   # over fp16 max
             numpy_helper.from_array(np.arange(300, dtype=np.int64), "idx")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
             helper.make_node("LayerNormalization", ["hb", "g"], ["n"], name="ln", axis=-1),
             helper.make_node("MatMul", ["n", "W2"], ["m"], name="mm2"),
             helper.make_node("Gather", ["m", "idx"], ["y"], name="gather", axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 300])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True)
    onnx.save_model(model, str(path), save_as_external_data=big_weights, all_tensors_to_one_file=False,
                    size_threshold=1024)
    return path


@pytest.fixture
def limit(monkeypatch):
    monkeypatch.setattr(onnx_io, "PROTO_LIMIT", 4096)    # W1 alone (16 KiB) is over it


def test_copy_over_the_limit_is_byte_identical_to_save_model(tmp_path, limit):
    src = _graph(tmp_path / "src" / "model.onnx")
    assert len(list((tmp_path / "src").iterdir())) > 2          # one file per external tensor, as torch writes
    onnx_io.save_model(onnx.load(str(src)), tmp_path / "ref" / "model.onnx")
    data = onnx_io.copy_model(src, tmp_path / "new" / "model.onnx")
    assert data == tmp_path / "new" / "model.onnx.data"
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_copy_under_the_limit_is_inline_and_identical(tmp_path):
    src = _graph(tmp_path / "src" / "model.onnx")
    onnx_io.save_model(onnx.load(str(src)), tmp_path / "ref.onnx")
    assert onnx_io.copy_model(src, tmp_path / "new.onnx") is None
    assert (tmp_path / "new.onnx").read_bytes() == (tmp_path / "ref.onnx").read_bytes()


def test_streamed_fp16_matches_the_in_memory_conversion(tmp_path, monkeypatch):
    src = _graph(tmp_path / "src" / "model.onnx")
    convert_to_fp16(src, tmp_path / "mem" / "model.onnx", keep_ops=("LayerNormalization",))   # in memory
    monkeypatch.setattr(onnx_io, "PROTO_LIMIT", 4096)
    convert_to_fp16(src, tmp_path / "big" / "model.onnx", keep_ops=("LayerNormalization",))   # streamed
    assert (tmp_path / "big" / "model.onnx.data").is_file()
    assert not list((tmp_path / "src").glob("*.inferred.onnx"))
    mem, big = onnx.load(str(tmp_path / "mem" / "model.onnx")), onnx.load(str(tmp_path / "big" / "model.onnx"))
    assert [n.SerializeToString() for n in big.graph.node] == [n.SerializeToString() for n in mem.graph.node]
    got = {t.name: (t.data_type, numpy_helper.to_array(t)) for t in big.graph.initializer}
    want = {t.name: (t.data_type, numpy_helper.to_array(t)) for t in mem.graph.initializer}
    assert got.keys() == want.keys()
    for name, (dtype, array) in want.items():
        assert got[name][0] == dtype, name
        assert got[name][1].tobytes() == array.tobytes(), name
    assert got["W1"][0] == TensorProto.FLOAT16 and got["g"][0] == TensorProto.FLOAT   # g feeds only the kept op
    assert np.isfinite(got["W2"][1]).all()       # clipped to fp16's max, as the converter does
    onnx.checker.check_model(str(tmp_path / "big" / "model.onnx"), full_check=True)


def test_export_over_the_limit_runs_the_same_graph(tiny_folder, tmp_path, monkeypatch, caplog):
    """A whole fp16 export on the over-2-GB path (external data, streamed copy and conversion, no onnxslim,
    the ORT check unoptimized) gives the graphs the in-memory path gives: same outputs, bit for bit."""
    from ldm_deploy.export.config import ExportConfig, Range
    from ldm_deploy.export.exporter import export_model
    from ldm_deploy.export.optimize import time_ort

    cfg = ExportConfig(precision="fp16", optimize=False, components=("unet", "text_encoder"), batch=Range(1, 1, 2),
                       height=Range(64, 64, 64), width=Range(64, 64, 64), measure_runtime=False)
    small = export_model(tiny_folder, tmp_path / "small", cfg).artifact
    monkeypatch.setattr(onnx_io, "PROTO_LIMIT", 100_000)     # the tiny U-Net's and text encoder's weights are over it
    with caplog.at_level("DEBUG", logger="ldm_deploy.export.exporter"):
        big = export_model(tiny_folder, tmp_path / "big", cfg).artifact
    spilled = [r.getMessage() for r in caplog.records if "weights moved to a file" in r.getMessage()]
    assert [m.split(":")[0] for m in spilled] == ["unet", "text_encoder"]   # traced from file-backed weights
    for name in ("unet", "text_encoder"):
        entry = big.manifest["components"][name]
        assert entry["external_data"] == f"{name}/model.onnx.data"
        assert entry["export"]["ort_cpu_check"].startswith("graph optimizations off")
        assert small.manifest["components"][name]["external_data"] is None
        rng = np.random.default_rng(0)
        feeds = {i["name"]: (rng.integers(0, 1000, i["shape"]).astype(np.int32) if i["dtype"] == "int32"
                             else rng.standard_normal(i["shape"]).astype(np.float32))
                 for i in _static_inputs(entry)}
        _, want = time_ort(tmp_path / "small" / name / "model.onnx", feeds, runs=0)
        _, got = time_ort(tmp_path / "big" / name / "model.onnx", feeds, runs=0)
        for k in want:
            # same graph and weights; ORT runs the small one optimized (fused kernels), the big one not: the
            # fp16 results may differ by a few fp16 roundings (2^-10 relative each) of the largest value
            tol = 4 * 2.0**-10 * float(np.abs(want[k]).max())
            np.testing.assert_allclose(got[k].astype(np.float32), want[k].astype(np.float32), rtol=0, atol=tol,
                                       err_msg=f"{name} {k}")


def _static_inputs(entry):
    return [{"name": i["name"], "dtype": i["dtype"], "shape": entry["profile"][i["name"]]["opt"]}
            for i in entry["inputs"]]
