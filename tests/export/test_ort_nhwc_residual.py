"""The VAE's NHWC residual stream (ldm_deploy/export/ort_nhwc_residual.py) on the tiny SD-like VAE decoder's real fused
graphs: what it removes and fuses, the graph it leaves valid, the same decode on ORT CPU (contrib ops stood in for
alike on both sides, tests/export/test_ort_fp16_norm.py `cpu_stand_ins`), and the cases it must leave alone. The GPU
run of both graphs: tests/runtime/test_ort_cuda_vae_layout.py."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ldm_deploy.export.ort_nhwc_residual import nhwc_residuals, vae_passes
from tests.export.test_ort_fp16_norm import cpu_stand_ins, fused, run_cpu  # noqa: F401  (module fixture)


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> dict[str, Path]:
    """The tiny SD-like VAE decoder: the traced fp32 graph, fused fp32 without the passes (the stand-ins run fp32)
    and the fp16 export's ort-cuda variant, which export now writes with them."""
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model
    from ldm_deploy.export.ort_optimize import optimize_for_ort_cuda
    from tests.export.test_ort_optimize import make_sd_like_folder

    root = tmp_path_factory.mktemp("vaelayout")
    folder = make_sd_like_folder(root / "model")
    traced = export_model(folder, root / "fp32", load_config("tiny").replace(
        components=("vae_decoder",), measure_runtime=False, optimize=False, precision="fp32")).path
    src = traced / "vae_decoder" / "model.onnx"
    fused = root / "vae.fp32.ort-cuda.onnx"
    optimize_for_ort_cuda(src, fused, "vae_decoder", float16=False, vae_layout=False)
    art = export_model(folder, root / "fp16", load_config("tiny").replace(
        components=("vae_decoder",), measure_runtime=False, precision="fp16", vae_precision="fp16",
        ort_cuda=True)).path
    return {"traced": src, "fused": fused, "artifact": art}


def counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def test_residual_stream_goes_nhwc_and_its_adds_into_skip_group_norms(vae):
    model = onnx.load(str(vae["fused"]))
    before = counts(model)
    stats = vae_passes(model)
    after = counts(model)
    onnx.checker.check_model(model, full_check=True)
    layout = stats["nhwc_residuals"]
    # tiny decoder: 2 mid + 3 x 2 up-block ResNets and the mid attention's residual; 3 upsamplers
    assert layout["resizes"] == before["Resize"] == 3
    assert layout["skip_group_norms"] == after["SkipGroupNorm"] == 8
    assert after["GroupNorm"] + after["SkipGroupNorm"] == before["GroupNorm"]
    assert layout["transposes"] == [before["Transpose"], after["Transpose"]]
    assert after["Transpose"] <= before["Transpose"] // 2
    assert stats["conv_bias_into_norm"]["moved"] == 7   # the 8th norm's X is the attention's output, no conv
    # what still reads NCHW: the latent in, the image out, the attention's reshapes
    resize_scales = [numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n.input[2]))
                     for n in model.graph.node if n.op_type == "Resize"]
    assert all(list(s) == [1, 2, 2, 1] for s in resize_scales)
    assert {i.name for i in model.graph.input} == {i.name for i in onnx.load(str(vae["fused"])).graph.input}


def test_passed_decoder_decodes_the_same_on_ort_cpu(vae):
    """Stand-ins alike on both sides: the passes move elements and reorder one sum per ResNet ((conv + bias) +
    residual -> (conv + residual) + bias), so the image agrees to float32 rounding carried through the decoder:
    within 1e-4 of its scale, the bound of the export's own fp32 checks (measured 2e-6 to 3e-6 here); likewise
    against the traced decoder, whose norms ORT CPU computes another way."""
    model = onnx.load(str(vae["fused"]))
    passed = onnx.load(str(vae["fused"]))
    vae_passes(passed)
    reference, candidate = cpu_stand_ins(model), cpu_stand_ins(passed)
    traced = onnx.load(str(vae["traced"]))
    for seed in (0, 1):
        latent = np.random.default_rng(seed).standard_normal((2, 4, 8, 8)).astype(np.float32)
        want, got = run_cpu(reference, {"latent": latent})["image"], run_cpu(candidate, {"latent": latent})["image"]
        scale = float(np.abs(want).max())
        assert np.isfinite(got).all() and scale > 0
        assert float(np.abs(got - want).max()) <= 1e-4 * scale
        # and both are the traced decoder's image
        assert float(np.abs(run_cpu(traced, {"latent": latent})["image"] - got).max()) <= 1e-4 * scale


def test_fp16_export_writes_the_passed_variant(vae):
    from ldm_deploy.artifact import Artifact

    entry = Artifact.open(vae["artifact"], verify=True).component("vae_decoder").variants["ort-cuda"]
    model = onnx.load(str(vae["artifact"] / entry.file))
    onnx.checker.check_model(model, full_check=True)
    assert counts(model)["SkipGroupNorm"] == 8 and entry.fused_ops["SkipGroupNorm"] == 8


def _graph(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    def vi(name, rank=4):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)

    graph = helper.make_graph(nodes, "g", [vi(n) for n in inputs], [vi(n) for n in outputs], list(inits))
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_linear_resize_and_unknown_rank_addends_stay_nchw():
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Transpose", ["a"], ["a_nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Resize", ["a_nchw", "", "scales"], ["up"], mode="linear"),
             helper.make_node("Add", ["a_nchw", "b"], ["s"]),        # b: a graph input, its rank unknown to the pass
             helper.make_node("Transpose", ["s"], ["s_nhwc"], perm=[0, 2, 3, 1])]
    model = _graph(nodes, ["a", "b"], ["up", "s_nhwc"], [scales])
    stats = nhwc_residuals(model)
    assert stats["adds"] == stats["resizes"] == stats["skip_group_norms"] == 0
    assert counts(model) == Counter(Transpose=2, Resize=1, Add=1)


def test_u_net_skip_connections_go_nhwc_exactly_on_ort_cpu(fused):
    """On the fused U-Net (after the fold of the transformer blocks' transposes) the pass carries the residual adds
    and the skip connections' channel Concats into NHWC: the same elements in the same places, so the output is
    bit for bit the same (stand-ins alike on both sides), at two seeds."""
    from ldm_deploy.export.ort_fp16_norm import fold_nhwc_transposes
    from tests.export.test_ort_fp16_norm import assert_same_u_net_on_cpu

    model = onnx.load(str(fused["fp32"]))
    fold_nhwc_transposes(model)
    passed = onnx.load(str(fused["fp32"]))
    fold_nhwc_transposes(passed)
    stats = nhwc_residuals(passed)
    onnx.checker.check_model(passed, full_check=True)
    assert stats["concats"] > 0 and stats["adds"] > 0
    assert stats["transposes"][1] <= stats["transposes"][0] - 2 * stats["concats"]
    assert_same_u_net_on_cpu(model, passed)


def test_ab_script_refuses_a_users_out_file_before_any_work(tmp_path):
    """scripts/vae_layout_ab.py (its timing needs a GPU) checks --out first: a file it did not write stays as it was
    and nothing is exported into --work."""
    import importlib.util

    from ldm_deploy.errors import UsageError

    path = Path(__file__).resolve().parents[2] / "scripts" / "vae_layout_ab.py"
    spec = importlib.util.spec_from_file_location("vae_layout_ab_cpu", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    mine = tmp_path / "ab.json"
    mine.write_text("mine")
    with pytest.raises(UsageError, match="refusing to replace"):
        script.main(["--model-dir", str(tmp_path / "none"), "--work", str(tmp_path / "work"), "--out", str(mine)])
    assert mine.read_text() == "mine" and not (tmp_path / "work").exists()
