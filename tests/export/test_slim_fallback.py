"""onnxslim cannot serialize an fp32 graph over 2 GB (the full-size SD 1.5 U-Net): fp16 exports then slim
the fp16 graph instead. Simulated on the tiny U-Net by making onnxslim refuse any graph with fp32 weights."""
from __future__ import annotations

import onnx
import pytest

onnxslim = pytest.importorskip("onnxslim")   # a test extra; GPU images may lack it

from ldm_deploy.export.config import ExportConfig, Range
from ldm_deploy.export.exporter import export_model

TINY = dict(batch=Range(1, 1, 2), height=Range(64, 64, 64), width=Range(64, 64, 64), measure_runtime=False)


def test_fp16_export_slims_the_fp16_graph_when_fp32_is_too_big(tiny_folder, tmp_path, monkeypatch):
    real = onnxslim.slim

    def slim(model, *args, **kwargs):
        if any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1 for t in model.graph.initializer):
            raise ValueError("Failed to serialize proto")  # what onnxslim says for a > 2 GB graph
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnxslim, "slim", slim)
    cfg = ExportConfig(precision="fp16", components=("unet",), keep_fp32_unet=True, **TINY)
    art = export_model(tiny_folder, tmp_path / "a", cfg).artifact
    clean = art.manifest["components"]["unet"]["export"]["cleanup"]
    assert clean["applied"] is False and "serialize" in clean["error"]
    assert clean["fp16"]["applied"] is True
    assert clean["fp16"]["nodes_after"] < clean["fp16"]["nodes_before"]
    final = onnx.load(str(tmp_path / "a" / "unet" / "model.onnx"))
    assert len(final.graph.node) == clean["fp16"]["nodes_after"]
    onnx.checker.check_model(final)


def test_fp32_failure_keeps_the_traced_graph(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(onnxslim, "slim", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    cfg = ExportConfig(precision="fp32", components=("unet",), **TINY)
    clean = export_model(tiny_folder, tmp_path / "b", cfg).artifact.manifest["components"]["unet"]["export"]["cleanup"]
    assert clean["applied"] is False and "fp16" not in clean
    assert clean["nodes_after"] == clean["nodes_before"]
