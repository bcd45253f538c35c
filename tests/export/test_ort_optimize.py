"""ONNX Runtime CUDA fused variants: made at export (--ort-cuda) or afterwards (add_ort_cuda_variants),
recorded in the manifest with hashes, the SD fusions present for an SD-like tiny U-Net, picked by
OrtCudaRunner(variant="auto") only. Executing the fused graphs needs CUDA (tests/runtime/test_ort_cuda*.py)."""
from __future__ import annotations

import json
import importlib.util
from pathlib import Path

import pytest

from ldm_deploy.artifact import Artifact
from ldm_deploy.errors import LdmError
from ldm_deploy.export.config import ExportConfig, load_config
from ldm_deploy.export.exporter import export_model
from ldm_deploy.export.ort_optimize import FILE_NAME, VARIANT, add_ort_cuda_variants

COMPONENTS = ("text_encoder", "unet", "vae_decoder")

# GPU images may lack onnxslim (the plain graphs' cleanup): export uncleaned there
HAS_ONNXSLIM = importlib.util.find_spec("onnxslim") is not None


def make_sd_like_folder(folder: Path) -> Path:
    """The `tiny` preset (with the real CLIP vocabulary) with non-zero norm biases, as any trained model has (a
    zero beta lets the exporter's cleanup drop the Add that ORT's GroupNorm matcher needs)."""
    from ldm_deploy.bench.prepare import random_model_folder

    return random_model_folder("tiny", folder, norm_bias_std=0.1)[0]


@pytest.fixture(scope="module")
def sd_like_folder(tmp_path_factory) -> Path:
    return make_sd_like_folder(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def fp32_fused(sd_like_folder, tmp_path_factory) -> Path:
    config = load_config("tiny").replace(components=COMPONENTS, measure_runtime=False, optimize=HAS_ONNXSLIM,
                                         ort_cuda=True)
    return export_model(sd_like_folder, tmp_path_factory.mktemp("art") / "fp32", config).path


@pytest.fixture(scope="module")
def fp16_plain(sd_like_folder, tmp_path_factory) -> Path:
    config = load_config("tiny").replace(components=COMPONENTS, measure_runtime=False, optimize=HAS_ONNXSLIM,
                                         precision="fp16",
                                         keep_fp32_unet=True)
    return export_model(sd_like_folder, tmp_path_factory.mktemp("art") / "fp16", config).path


def test_export_writes_variants_with_hashes(fp32_fused):
    art = Artifact.open(fp32_fused, verify=True)
    m = art.manifest
    for name in COMPONENTS:
        v = m["components"][name]["variants"][VARIANT]
        assert v["file"] == f"{name}/{FILE_NAME}" and (fp32_fused / v["file"]).is_file()
        assert m["files"][v["file"]], "the variant's sha256 is in the manifest's file list"
        assert v["precision"] == "fp32"
        assert v["nodes_before"] > 0 and v["nodes_after"] > 0
        # the U-Net variant has CFG folded in: two more inputs (guidance_scale, guidance_rescale)
        extra = ["guidance_scale", "guidance_rescale"] if name == "unet" else []
        assert v["cfg_folded"] is (name == "unet")
        assert [i["name"] for i in v["inputs"]] == [i["name"] for i in m["components"][name]["inputs"]] + extra
        assert [o["name"] for o in v["outputs"]] == [o["name"] for o in m["components"][name]["outputs"]]
    assert m["export_config"]["ort_cuda"] is True


def test_unet_variant_has_the_sd_fusions(fp32_fused):
    """The tiny U-Net gets the fusions whose CUDA kernels take its sizes; BiasSplitGelu (GEGLU width 256,
    the kernel takes 2560..12288) and BiasAdd (32/64 channels, the kernel takes 320/640/1280) are
    declined and recorded: on the GPU they failed at run time."""
    variant = json.loads((fp32_fused / "manifest.json").read_text())["components"]["unet"]["variants"][VARIANT]
    fused = variant["fused_ops"]
    for op in ("MultiHeadAttention", "GroupNorm", "NhwcConv"):
        assert fused.get(op, 0) > 0, f"{op} not fused: {fused}"
    assert "BiasSplitGelu" not in fused and "BiasAdd" not in fused
    assert "256" in variant["declined_fusions"]["BiasSplitGelu"] and "BiasAdd" in variant["declined_fusions"]
    import onnx
    g = onnx.load(str(fp32_fused / "unet" / FILE_NAME)).graph
    assert any(n.domain == "com.microsoft" for n in g.node)


def test_add_variants_afterwards_fp16(fp16_plain, caplog):
    import logging

    ours = logging.getLogger("ldm_deploy.export.ort_optimize")
    # our logger's own level, whatever an earlier in-process test left on "ldm_deploy" (one CI run missed the
    # line with root-level capture only: the record never reached the root handler)
    with caplog.at_level("INFO", logger="ldm_deploy.export.ort_optimize"):
        stats = add_ort_cuda_variants(fp16_plain)
    # the fp16 text encoder has no fp32 graph kept: skipped with a log line; the VAE stays fp32
    assert set(stats) == {"unet", "vae_decoder"}
    state = (f"effective level {ours.getEffectiveLevel()}, disabled {ours.disabled}, "
             f"ldm_deploy propagate {logging.getLogger('ldm_deploy').propagate}")
    assert "text_encoder" in caplog.text and "skipped" in caplog.text, state
    art = Artifact.open(fp16_plain, verify=True)        # hashes of the rewritten manifest hold
    unet = art.manifest["components"]["unet"]["variants"][VARIANT]
    assert unet["precision"] == "fp16" and stats["unet"]["precision"] == "fp16"
    dtypes = {i["name"]: i["dtype"] for i in unet["inputs"]}
    # CFG folded: the latents come in float32 (cast in the graph), the guided prediction leaves float32
    assert dtypes == {"sample": "float32", "timestep": "float32", "encoder_hidden_states": "float16",
                      "guidance_scale": "float32", "guidance_rescale": "float32"}
    assert unet["outputs"][0]["dtype"] == "float32"
    add_ort_cuda_variants(fp16_plain, ["unet"], fold_guidance=False)
    unet = Artifact.open(fp16_plain, verify=True).manifest["components"]["unet"]["variants"][VARIANT]
    assert not unet["cfg_folded"] and [i["dtype"] for i in unet["inputs"]] == ["float16", "float32", "float16"]
    assert unet["outputs"][0]["dtype"] == "float16"
    assert art.manifest["components"]["vae_decoder"]["variants"][VARIANT]["precision"] == "fp32"
    assert "variants" not in art.manifest["components"]["text_encoder"]
    # running it again replaces the variant and keeps the manifest consistent
    add_ort_cuda_variants(fp16_plain, ["unet"], float16=False)
    art = Artifact.open(fp16_plain, verify=True)
    assert art.manifest["components"]["unet"]["variants"][VARIANT]["precision"] == "fp32"


def test_tampered_variant_is_refused(fp16_plain):
    add_ort_cuda_variants(fp16_plain, ["vae_decoder"])
    path = fp16_plain / "vae_decoder" / FILE_NAME
    data = path.read_bytes()
    try:
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        with pytest.raises(LdmError, match="sha256"):
            Artifact.open(fp16_plain, verify=True)
        with pytest.raises(LdmError, match="sha256"):
            add_ort_cuda_variants(fp16_plain, ["vae_decoder"])
    finally:
        path.write_bytes(data)


def test_cpu_runner_never_picks_the_variant(fp32_fused):
    from ldm_deploy.runtime.runners.ort import OrtCpuRunner

    r = OrtCpuRunner(fp32_fused, "unet")
    assert r.variant is None and r.model_path.name == "model.onnx"


def test_cuda_runner_variant_choice(fp32_fused, fp16_plain, monkeypatch):
    """variant="auto" picks the fused file when listed; None forces the plain graph; a missing one is an
    error. (The CUDA provider is faked as available so only the choice is tested; the session is CPU.)"""
    import onnxruntime as ort

    from ldm_deploy.runtime.runners.ort import OrtCudaRunner, SessionFromArtifact, component_spec

    path, spec = component_spec(fp16_plain, "text_encoder")
    assert path.name == "model.onnx"
    with pytest.raises(LdmError, match="no 'ort-cuda' variant"):
        component_spec(fp16_plain, "text_encoder", VARIANT)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(SessionFromArtifact, "_providers", lambda self, options: ["CPUExecutionProvider"])
    monkeypatch.setattr(SessionFromArtifact, "_check_provider", lambda self, session, path: None)
    plain = OrtCudaRunner(fp32_fused, "unet", variant=None)
    assert plain.variant is None and plain.model_path.name == "model.onnx"
    te = OrtCudaRunner(fp16_plain, "text_encoder")         # auto, none there: the plain graph
    assert te.variant is None
    try:   # the fused U-Net has CUDA-only contrib ops: the CPU session may refuse it, after the choice
        fused = OrtCudaRunner(fp32_fused, "unet")
    except LdmError as e:
        assert FILE_NAME in str(e)
    else:
        assert fused.variant == VARIANT and fused.model_path.name == FILE_NAME


def test_config_key_without_ort_cuda_is_unchanged():
    """Artifacts exported before `ort_cuda` existed stay cached: the key leaves the default out."""
    assert "ort_cuda" not in json.loads(ExportConfig().key())
    assert json.loads(ExportConfig(ort_cuda=True).key())["ort_cuda"] is True


def test_attention_fusion_is_exact_on_cpu(fp32_fused):
    """fuse_attention alone (MultiHeadAttention has a CPU kernel in fp32) gives the plain graph's output."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from ldm_deploy.compare import assert_close
    from ldm_deploy.export.attention_fusion import fuse_attention

    plain = fp32_fused / "unet" / "model.onnx"
    model = onnx.load(str(plain))
    assert fuse_attention(model) == 4 * 2        # tiny preset: 4 transformer blocks, self + cross each
    assert not any(n.op_type == "Softmax" for n in model.graph.node)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), np.float32), "timestep": np.array([999.0, 3.5], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), np.float32)}
    cpu = ["CPUExecutionProvider"]
    want = ort.InferenceSession(str(plain), providers=cpu).run(None, feeds)[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=cpu).run(None, feeds)[0]
    assert_close(got, want, atol=1e-5, name="MultiHeadAttention-fused U-Net")


@pytest.fixture(scope="module")
def fp16_fused(sd_like_folder, tmp_path_factory) -> Path:
    config = load_config("tiny").replace(components=COMPONENTS, measure_runtime=False, optimize=HAS_ONNXSLIM,
                                         precision="fp16", ort_cuda=True)
    return export_model(sd_like_folder, tmp_path_factory.mktemp("art") / "fp16-fused", config).path


@pytest.fixture(scope="module")
def fp16_vae_fused(sd_like_folder, tmp_path_factory) -> Path:
    """fp16 with the VAE in fp16 too (bench preset sd15-gpu): its decoder's upsampling Resize keeps fp32 scales."""
    config = load_config("tiny").replace(components=COMPONENTS, measure_runtime=False, optimize=HAS_ONNXSLIM,
                                         precision="fp16", vae_precision="fp16", ort_cuda=True)
    return export_model(sd_like_folder, tmp_path_factory.mktemp("art") / "fp16-vae-fused", config).path


def assert_loadable(path: Path) -> None:
    """The ONNX checker (full), unique node names, one writer per tensor, and an ORT CPU session: it may
    lack CPU kernels for the CUDA-only contrib ops, but must get past loading and resolving the graph
    (where a duplicate node name is refused)."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    names = Counter(n.name for n in graph.node if n.name)
    assert not [n for n, k in names.items() if k > 1], f"{path}: duplicate node names"
    writers = Counter(o for n in graph.node for o in n.output if o)
    assert not [o for o, k in writers.items() if k > 1], f"{path}: a tensor with several writers"
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:   # only a missing CPU kernel is acceptable
        assert "implementation" in str(e) or "NOT_IMPLEMENTED" in str(e), f"{path}: {str(e).splitlines()[0]}"


@pytest.mark.parametrize("precision", ["fp32", "fp16", "fp16-vae"])
def test_every_written_variant_loads(precision, fp32_fused, fp16_fused, fp16_vae_fused):
    root = {"fp32": fp32_fused, "fp16": fp16_fused, "fp16-vae": fp16_vae_fused}[precision]
    manifest = Artifact.open(root, verify=True).manifest
    for name in COMPONENTS:
        variant = manifest["components"][name]["variants"][VARIANT]
        fp32 = precision == "fp32" or (name == "vae_decoder" and precision == "fp16")
        assert variant["precision"] == ("fp32" if fp32 else "fp16")
        assert_loadable(root / variant["file"])


def test_float_only_constants_become_initializers():
    """ORT's float16 converter keeps a Resize's scales fp32 when they are an initializer, not a Constant node."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ldm_deploy.export.ort_optimize import float_constants_as_initializers

    scales = helper.make_node("Constant", [], ["scales"], value=numpy_helper.from_array(
        np.array([1, 1, 2, 2], np.float32)))
    other = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([2.0], np.float32)))
    resize = helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="nearest")
    mul = helper.make_node("Mul", ["r", "k"], ["y"])
    graph = helper.make_graph([scales, other, resize, mul], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    assert float_constants_as_initializers(graph) == 1
    assert [i.name for i in graph.initializer] == ["scales"] and [n.op_type for n in graph.node] == ["Constant",
                                                                                                      "Resize", "Mul"]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(model, keep_io_types=False)
    onnx.checker.check_model(half, full_check=True)   # the fp16 scales were refused here before the fix


def _contrib_model(op: str, bias_len: int, groups: int | None = None):
    import onnx
    from onnx import TensorProto, helper

    attrs = {} if groups is None else {"groups": groups, "activation": 0, "epsilon": 1e-5, "channels_last": 1}
    inputs = ["x", "w", "b"] if groups is not None else ["x", "w"]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [bias_len], [0.0] * bias_len) for n in inputs[1:]]
    node = helper.make_node(op, inputs, ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("op, size, groups, ok", [
    ("BiasSplitGelu", 2560, None, True), ("BiasSplitGelu", 10240, None, True), ("BiasSplitGelu", 256, None, False),
    ("BiasAdd", 640, None, True), ("BiasAdd", 64, None, False),
    ("GroupNorm", 320, 32, True), ("GroupNorm", 32, 8, True), ("SkipGroupNorm", 2560, 32, True),
    ("GroupNorm", 24, 8, False),        # 3 channels per group: odd
    ("GroupNorm", 2048, 2, False),      # 1024 per group: over the kernel's 512
])
def test_unsupported_fusions_follow_the_cuda_kernels(op, size, groups, ok):
    from ldm_deploy.export.ort_optimize import unsupported_fusions

    refused = unsupported_fusions(_contrib_model(op, size, groups))
    assert (op not in refused) == ok, refused


def test_converter_duplicates_are_repaired():
    """onnxruntime <= 1.31's float16 converter writes one `<t>_cast_to_fp32_node` Cast per fp32-kept
    consumer of `t`, all alike: the GPU run refused the fp16 text encoder ("two nodes with same node
    name"). The repair drops the copies, renames other clashes and keeps the graph loadable."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ldm_deploy.export.ort_optimize import repair_converted_graph

    cast = helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT, name="h_cast_to_fp32_node")
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("Sigmoid", ["h32"], ["a"], name="same"),
             helper.make_node("Tanh", ["h32"], ["b"], name="same"),          # a clash that is not a copy
             helper.make_node("Add", ["a", "b"], ["y"], name="add"),
             cast, onnx.NodeProto()]
    nodes[-1].CopyFrom(cast)                                               # the converter's duplicate
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert repair_converted_graph(model.graph) == {"duplicate_nodes_dropped": 1, "nodes_renamed": 1}
    onnx.checker.check_model(model, full_check=True)
    x = np.array([-1.0, 2.0], np.float16)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    h = np.maximum(x, 0).astype(np.float32)
    from ldm_deploy.compare import assert_close
    assert_close(y, 1 / (1 + np.exp(-h)) + np.tanh(h), atol=1e-6, name="repaired graph")


@pytest.fixture(scope="module")
def lever_artifact(sd_like_folder, tmp_path_factory) -> tuple[Path, Path]:
    """fp16, fp32 U-Net kept, traced graphs (optimize off), ort-cuda variants at export: what --levers exports;
    and the benchmark's folder the lever graphs were written into."""
    from ldm_deploy.bench.prepare import add_lever_variants

    config = load_config("tiny").replace(components=COMPONENTS, measure_runtime=False, optimize=False,
                                         ort_cuda=True, precision="fp16", keep_fp32_unet=True)
    root = tmp_path_factory.mktemp("levers")
    out = export_model(sd_like_folder, root / "a", config).path
    done = add_lever_variants(out, root / "bench-levers")
    assert done["fused_ops_match"], done
    return out, root / "bench-levers"


def test_lever_variants_add_one_lever_each(lever_artifact):
    """The benchmark's lever ladder: fp32 plain graph, fused NCHW, fused NHWC (no CFG fold), then ort-cuda. The
    lever graphs live in the benchmark's folder; the artifact keeps only what its export wrote."""
    from ldm_deploy.bench.prepare import LEVER_VARIANTS, lever_graph, read_levers
    from ldm_deploy.bench.spec import LEVERS

    art, work = lever_artifact
    artifact = Artifact.open(art, verify=True)     # untouched: every hash still matches
    unet = artifact.manifest["components"]["unet"]
    assert set(unet["variants"]) == {VARIANT}
    variants = {**read_levers(work)["graphs"], VARIANT: unet["variants"][VARIANT]}
    assert set(LEVER_VARIANTS) | {VARIANT} == set(variants)
    # every graph a lever side asks for exists
    assert {o["graph"] for _, o in LEVERS.values() if o.get("graph")} <= set(variants)
    fp32 = variants["lever-fp32"]
    assert fp32["file"] == unet["fp32_file"] and fp32["precision"] == "fp32"
    assert lever_graph(work, "lever-fp32")[1] == art / unet["fp32_file"]
    assert {i["dtype"] for i in fp32["inputs"]} == {"float32"}
    nchw, nhwc, full = variants["lever-fused-nchw"], variants["lever-fused"], variants[VARIANT]
    assert "NhwcConv" not in nchw["fused_ops"] and not nchw["nhwc_conv"]
    assert nhwc["fused_ops"]["NhwcConv"] == full["fused_ops"]["NhwcConv"] > 0 and nhwc["nhwc_conv"]
    # the same fusions in all three, so each row's gain is its lever's
    drop = lambda ops: {k: v for k, v in ops.items() if k != "NhwcConv"}  # noqa: E731
    assert drop(nchw["fused_ops"]) == drop(nhwc["fused_ops"]) == drop(full["fused_ops"])
    assert {"MultiHeadAttention", "GroupNorm", "SkipGroupNorm"} <= set(nchw["fused_ops"])
    names = lambda v: [i["name"] for i in v["inputs"]]  # noqa: E731
    assert names(nchw) == names(nhwc) == ["sample", "timestep", "encoder_hidden_states"]
    assert "guidance_scale" in names(full) and full["cfg_folded"] and not nhwc["cfg_folded"]
    for name in ("lever-fused-nchw", "lever-fused"):
        assert (work / variants[name]["file"]).is_file() and lever_graph(work, name)[1].parent.parent == work
        assert not (art / variants[name]["file"]).exists()


def test_lever_variants_are_kept_on_a_second_call(lever_artifact):
    from ldm_deploy.bench.prepare import LEVERS_FILE, add_lever_variants

    art, work = lever_artifact
    before = (work / LEVERS_FILE).read_bytes(), (art / "manifest.json").read_bytes()
    done = add_lever_variants(art, work)
    assert set(done) == {"ort-cuda", "fused_ops_match"} and done["fused_ops_match"]
    assert ((work / LEVERS_FILE).read_bytes(), (art / "manifest.json").read_bytes()) == before


def test_lever_graphs_never_go_into_the_artifact(lever_artifact):
    from ldm_deploy.bench.prepare import add_lever_variants
    from ldm_deploy.errors import UsageError

    art, _ = lever_artifact
    for inside in (art, art / "levers"):
        with pytest.raises(UsageError, match="not into the artifact"):
            add_lever_variants(art, inside)
    assert not (art / "levers").exists()


def test_lever_variants_need_the_fp32_unet(tmp_path, sd_like_folder):
    from ldm_deploy.bench.prepare import add_lever_variants

    config = load_config("tiny").replace(components=COMPONENTS, measure_runtime=False, optimize=False,
                                         precision="fp16", keep_fp32_unet=False)
    out = export_model(sd_like_folder, tmp_path / "a", config).path
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(LdmError, match="keep_fp32_unet"):
        add_lever_variants(out, tmp_path / "levers")
    assert (out / "manifest.json").read_bytes() == before      # refused before any variant is written
    assert not (tmp_path / "levers").exists()


def test_fp32_source_stays_inside_the_artifact(tmp_path):
    """`fp32_file` / `file` come from the manifest (bench's lever ladder reads them): no path out of it."""
    from types import SimpleNamespace

    from ldm_deploy.errors import LdmError
    from ldm_deploy.export.ort_optimize import fp32_source

    (tmp_path / "art" / "unet").mkdir(parents=True)
    (tmp_path / "outside.onnx").write_bytes(b"x")
    (tmp_path / "art" / "unet" / "model.onnx").write_bytes(b"x")
    def spec(**kw):   # the artifact.ComponentSpec fields fp32_source reads
        return SimpleNamespace(**{"fp32_file": None, "precision": "fp16", "file": "unet/model.onnx", **kw})

    assert fp32_source(tmp_path / "art", spec(precision="fp32", file="unet/model.onnx")) == \
        tmp_path / "art" / "unet" / "model.onnx"
    for entry in (spec(fp32_file="../outside.onnx"), spec(precision="fp32", file=str(tmp_path / "outside.onnx"))):
        with pytest.raises(LdmError, match="not inside"):
            fp32_source(tmp_path / "art", entry)


@pytest.mark.parametrize("float16", [False, True])
def test_lean_shape_inference_fuses_the_same_graph(fp16_plain, tmp_path, monkeypatch, float16):
    """ORT's symbolic shape inference inside the optimizer runs on copies without the large float weights' data
    (ort_optimize._lean_shape_inference; with full copies the SD 1.5 U-Net's `--ort-cuda` export was OOM-killed on
    a 24 GiB machine). With every float initializer of 16 elements or more left out of those copies, the fused
    U-Net is byte for byte the one fused with full copies."""
    import contextlib

    from ldm_deploy.export import ort_optimize as oo

    art = Artifact.open(fp16_plain)
    src = oo.fp32_source(art.path, art.component("unet"))
    real, copies = oo._lean_copy, []

    def counted(model):
        lean, left_out = real(model)
        copies.append(sum(1 for t in lean.graph.initializer if t.name in left_out and not t.raw_data))
        return lean, left_out

    monkeypatch.setattr(oo, "LEAN_SHAPE_INFERENCE_MIN", 16)
    monkeypatch.setattr(oo, "_lean_copy", counted)
    oo.optimize_for_ort_cuda(src, tmp_path / "lean.onnx", "unet", float16=float16)
    assert copies and min(copies) > 0, "shape inference ran on lean copies, weights left out"
    monkeypatch.setattr(oo, "_lean_shape_inference", contextlib.nullcontext)
    oo.optimize_for_ort_cuda(src, tmp_path / "full.onnx", "unet", float16=float16)
    assert (tmp_path / "lean.onnx").read_bytes() == (tmp_path / "full.onnx").read_bytes()


def test_the_optimizer_leaves_nothing_behind(fp16_plain, tmp_path):
    """optimize_for_ort_cuda collects what ORT's optimizer held before it returns. Its symbolic shape inference
    objects refer to themselves (a dispatch table of bound methods) and keep their copies of the model, and a failed
    inference's traceback keeps its frames: without a collection those graphs outlive the call. On the SDXL U-Net
    that was 16 GB, and the export's next step was OOM-killed on a 24 GiB machine."""
    import gc

    import onnx

    from ldm_deploy.export import ort_optimize as oo

    def alive() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, onnx.ModelProto))

    art = Artifact.open(fp16_plain)
    src = oo.fp32_source(art.path, art.component("unet"))
    gc.collect()
    before = alive()
    gc.disable()     # no automatic collection in between: only the function's own may free the cycles
    try:
        oo.optimize_for_ort_cuda(src, tmp_path / "fused.onnx", "unet", float16=True)
        left = alive() - before
    finally:
        gc.enable()
    assert left <= 0, f"{left} models of the optimizer still alive after it returned"
