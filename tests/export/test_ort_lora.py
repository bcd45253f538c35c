"""The ORT CUDA fused variant of a lora_switchable export (export/ort_lora.py, `--lora-switchable --ort-cuda`): its
weight inputs, fed by the runtime's recipe from the numpy merge of a LoRA, are the very constants of a plain
`--ort-cuda` export with that LoRA merged at export (bit for bit, as a multiset of tensors, and the same fused
ops); on ONNX Runtime CPU (the CUDA-only contrib ops stood in for by tests/export/test_ort_fp16_norm.py's
`cpu_stand_ins`) the runner switching A -> B -> none equals the merged graphs; a fold the recipe cannot express
fails the export. The CUDA run is tests/runtime/test_lora_switch_fused_gpu.py (marker `gpu`)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from ldm_deploy.artifact import Artifact
from ldm_deploy.errors import LdmError
from ldm_deploy.export import ort_lora
from ldm_deploy.lora import load_lora, merge
from ldm_deploy.runtime import lora_switch
from tests.runtime.test_ort_cuda_runner import cpu_bound  # noqa: F401 (fixture)

pytest.importorskip("torch")
pytest.importorskip("peft")
pytestmark = pytest.mark.slow      # five tiny exports, two of them fused twice (the probe build)

HAS_ONNXSLIM = importlib.util.find_spec("onnxslim") is not None
COMPONENTS = ("text_encoder", "unet")
SCALE = 0.8
LORAS = {"peft": "unet", "kohya": "unet", "te": "text_encoder"}   # file -> the component it adapts


def _config(**kw):
    from ldm_deploy.export.config import load_config

    return load_config("tiny").replace(**{"components": COMPONENTS, "measure_runtime": False,
                                          "optimize": HAS_ONNXSLIM, **kw})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The SD-like tiny model exported switchable (`all`) with --ort-cuda, and plain --ort-cuda with each LoRA
    merged at export (and with none)."""
    from ldm_deploy.export.exporter import export_model
    from tests.export.test_ort_optimize import make_sd_like_folder
    from tests.lora_files import make_lora_files

    root = tmp_path_factory.mktemp("ortlora")
    folder = make_sd_like_folder(root / "model")
    files = make_lora_files(folder, root / "loras")
    arts = {"switch": export_model(folder, root / "switch", _config(lora_switchable="all", ort_cuda=True)).path}
    for name in (None, *LORAS):
        loras = [f"{files[name]}:{SCALE}"] if name else []
        only = {"components": (LORAS[name],)} if name else {}   # a merged LoRA changes only its component
        arts[name] = export_model(folder, root / f"merged-{name}", _config(ort_cuda=True, **only), loras=loras).path
    return arts, files, folder, root


def _digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    return hashlib.sha256(array.tobytes() + f"{array.dtype}{array.shape}".encode()).hexdigest()


def _unmatched(ours: list, want: list) -> tuple[list, list]:
    """The arrays of `ours` and of `want` left over once equal ones (bit for bit) are paired off."""
    def extra(xs, ys):
        count = Counter(_digest(x) for x in xs) - Counter(_digest(y) for y in ys)
        out = []
        for x in xs:
            if count[_digest(x)] > 0:
                count[_digest(x)] -= 1
                out.append(x)
        return out

    return extra(ours, want), extra(want, ours)


def _fused(art: Path, component: str) -> onnx.ModelProto:
    return onnx.load(str(art / component / "model.ort-cuda.onnx"))


def _readers(model: onnx.ModelProto) -> dict[str, set]:
    """name -> {(domain, op type)} of the nodes reading it."""
    out: dict[str, set] = {}
    for node in model.graph.node:
        for x in node.input:
            out.setdefault(x, set()).add((node.domain, node.op_type))
    return out


def _nchw_inputs(model: onnx.ModelProto, fused) -> set:
    """The fused inputs an NCHW Conv reads: the kernels of the NhwcConvs ort_lora._nchw_convs rewrote (ORT's CUDA
    EP runs NhwcConv only with a constant kernel)."""
    readers = _readers(model)
    return {name for name in fused if readers.get(name) == {("", "Conv")}}


def _as_plain(model: onnx.ModelProto, fed: dict) -> list:
    """The fed inputs in the plain export's layout: a rewritten conv's kernel OIHW -> the NhwcConv's OHWI."""
    nchw = _nchw_inputs(model, fed)
    return [np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if name in nchw else a for name, a in fed.items()]


def _plain_fused_ops(model: onnx.ModelProto, fused, fused_ops: dict) -> dict:
    """The switchable variant's fused-op counts as the plain export's would read: its rewritten convs were
    NhwcConvs there."""
    ops = dict(fused_ops)
    n = len(_nchw_inputs(model, fused))
    if n:
        ops["NhwcConv"] = ops.get("NhwcConv", 0) + n
    return dict(sorted(ops.items()))


def _merged_weights(art: Path, component: str, lora_path: Path | None) -> tuple[dict, dict]:
    """(the numpy merge of the base weights with the LoRA at SCALE, the variant's recipe), as Pipeline.set_loras
    computes them (ldm_deploy.lora.merge over lora_base.safetensors)."""
    spec = Artifact.open(art).component(component).variant("ort-cuda")
    base = lora_switch.load_base(Artifact.open(art), spec)
    shapes = {n: w.shape for n, w in base.items()}
    if lora_path is None:
        return base, spec.lora_weights["fused"]
    lora = load_lora(lora_path, {component: shapes})
    return merge(base, [(lora, SCALE)], component, shapes), spec.lora_weights["fused"]


def test_manifest_records_the_recipe(setup):
    """Every switchable weight feeds the fused graph (none was folded away) and the variant's inputs are the
    plain graph's, the weights listed under lora_weights.fused with the transforms the fusions made."""
    arts, *_ = setup
    art = Artifact.open(arts["switch"], verify=True)
    for component in COMPONENTS:
        plain, variant = art.component(component), art.component(component).variant("ort-cuda")
        fused = variant.lora_weights["fused"]
        assert {e["weight"] for e in fused.values()} == set(plain.lora_weights["inputs"])
        assert not set(variant.input_names) & (set(fused) | set(plain.lora_weights["inputs"]))
        model = _fused(arts["switch"], component)
        onnx.checker.check_model(model, full_check=True)
        graph_inputs = {i.name for i in model.graph.input}
        assert graph_inputs == set(variant.input_names) | set(fused)
        perms = Counter(tuple(e["perm"]) for e in fused.values())
        assert perms[(1, 0)] > 0, "Linear weights enter MatMul transposed (W^T)"
        assert not [n.name for n in model.graph.node if n.op_type == "NhwcConv" and n.input[1] in fused], \
            "ORT's CUDA EP places an NhwcConv only with a constant kernel"
        nchw = _nchw_inputs(model, fused)
        plain_fused = Artifact.open(arts[None]).component(component).variant("ort-cuda")
        if component == "unet":   # every conv kernel is switchable (`all`): each NhwcConv became an OIHW Conv
            assert len(nchw) == plain_fused.fused_ops["NhwcConv"] > 0 and "NhwcConv" not in variant.fused_ops
            assert {tuple(fused[name]["perm"]) for name in nchw} == {(0, 1, 2, 3)}, "conv kernels enter as stored"
        else:
            assert not nchw
        assert _plain_fused_ops(model, fused, variant.fused_ops) == plain_fused.fused_ops, \
            "the same fusions as a plain export"


@pytest.mark.parametrize("lora", [None, *LORAS])
def test_fed_weights_are_the_merged_exports_constants(setup, lora):
    """Fed with the LoRA switched on (numpy merge, then the recipe), the switchable variant's weight inputs and
    its remaining constants are, as a multiset of tensors, exactly the constants of the plain export's fused
    graph with the LoRA merged at export (torch adds the same float32 deltas to the same float32 base)."""
    arts, files, *_ = setup
    for component in COMPONENTS:
        adapted = lora is not None and LORAS[lora] == component
        merged = arts[lora] if adapted else arts[None]
        weights, recipe = _merged_weights(arts["switch"], component, files[lora] if adapted else None)
        fed = lora_switch.WeightFeeds(recipe)(weights)
        assert set(fed) == set(recipe)
        model = _fused(arts["switch"], component)
        ours = Counter(_digest(numpy_helper.to_array(t)) for t in ort_lora.constants(model.graph).values())
        ours.update(_digest(a) for a in _as_plain(model, fed))
        nchw = _nchw_inputs(model, fed)
        want = Counter(_digest(numpy_helper.to_array(t))
                       for t in ort_lora.constants(_fused(merged, component).graph).values())
        assert ours == want, f"{component} with {lora}: {sum((ours - want).values())} tensors differ"
        merged_ops = Counter(n.op_type for n in _fused(merged, component).graph.node)
        merged_ops.update({"NhwcConv": -len(nchw), "Conv": len(nchw), "Transpose": 2 * len(nchw)})
        assert Counter(n.op_type for n in model.graph.node) == +merged_ops


def _standin_file(src: Path, dst: Path) -> Path:
    from tests.export.test_ort_fp16_norm import cpu_stand_ins

    onnx.save(cpu_stand_ins(onnx.load(str(src))), str(dst))
    return dst


def test_switch_on_cpu_equals_the_merged_graphs(setup):
    """The fused fp32 U-Net (contrib ops stood in for, the same way for every graph) run by OrtRunner from the
    variant's manifest entry: base, then A, B, none through lora_switch.apply, each against the plain fused
    graph with that LoRA merged at export."""
    from ldm_deploy.runtime.runners.ort import OrtRunner, SessionFromArtifact
    from tests.export.test_ort_fp16_norm import run_cpu, unet_feeds

    arts, files, _, root = setup
    entry = json.loads((arts["switch"] / "manifest.json").read_text())["components"]["unet"]["variants"]["ort-cuda"]
    standin = _standin_file(arts["switch"] / "unet" / "model.ort-cuda.onnx", root / "switch-unet.standin.onnx")
    runner = OrtRunner(SessionFromArtifact(arts["switch"], "unet", graph=("ort-cuda", standin, entry))())
    assert runner.weight_feeds.recipe and set(runner.base_weights) == set(entry["lora_weights"]["inputs"])
    feeds = unet_feeds(_fused(arts[None], "unet"), 0)
    base = runner(feeds)["noise_pred"]
    seen = {}
    for name in (None, "peft", "kohya", None):
        lora_switch.apply({"unet": runner}, [(files[name], SCALE)] if name else [])
        got = runner(feeds)["noise_pred"]
        want = run_cpu(onnx.load(str(_standin_file(arts[name] / "unet" / "model.ort-cuda.onnx",
                                                   root / f"merged-{name}.standin.onnx"))), feeds)["noise_pred"]
        # the same float32 graph with the same values, once as inputs and once as initializers: ORT CPU picks
        # other kernels for constant weights (prepacked GEMM / conv), so the sums round differently (measured:
        # 8.7e-6 max abs, not bit-equal); bound: float32 dot products of K <= 1152 terms, K * 2^-24 ~ 7e-5
        # relative to the output's scale, taken as 1e-4 of max|want|
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()), err_msg=str(name))
        seen[name] = got
    assert np.array_equal(seen[None], base), "back to none: the base output bit for bit"
    assert not np.allclose(seen["peft"], base) and not np.allclose(seen["kohya"], seen["peft"])


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_bound_runner_rewrites_the_fused_inputs_in_place(setup, cpu_bound, cuda_graph):
    """OrtBoundRunner (the ort-cuda runner; here on CPU OrtValues and the CPU provider) over the stood-in fused
    U-Net: its device buffers are the fused inputs, a switch rewrites them in place (same addresses, never
    rebound), and each output equals the host-feeding OrtRunner's on the same graph bit for bit."""
    from ldm_deploy.runtime.runners.ort import OrtBoundRunner, OrtRunner, SessionFromArtifact
    from tests.export.test_ort_fp16_norm import unet_feeds

    arts, files, _, root = setup
    entry = json.loads((arts["switch"] / "manifest.json").read_text())["components"]["unet"]["variants"]["ort-cuda"]
    standin = _standin_file(arts["switch"] / "unet" / "model.ort-cuda.onnx", root / "switch-unet.standin.onnx")
    graph = ("ort-cuda", standin, entry)
    bound = OrtBoundRunner(SessionFromArtifact(arts["switch"], "unet", provider="cuda", graph=graph,
                                               enable_cuda_graph=cuda_graph)())
    host = OrtRunner(SessionFromArtifact(arts["switch"], "unet", graph=graph)())
    feeds = unet_feeds(_fused(arts[None], "unet"), 1)
    base = bound(feeds)["noise_pred"]
    fused = entry["lora_weights"]["fused"]
    assert set(bound._weights_dev) == set(fused), "the bound buffers are the fused graph's weight inputs"
    ptrs = {n: v.data_ptr() for n, v in bound._weights_dev.items()}
    for name in ("peft", "kohya", None):
        loras = [(files[name], SCALE)] if name else []
        info = lora_switch.apply({"unet": bound}, loras)
        lora_switch.apply({"unet": host}, loras)
        got = bound(feeds)["noise_pred"]
        np.testing.assert_array_equal(got, host(feeds)["noise_pred"], err_msg=str(name))
        assert name is None or not np.array_equal(got, base)
        assert info["changed"]["unet"] > 0
    assert np.array_equal(got, base), "back to none: the base output bit for bit"
    assert {n: v.data_ptr() for n, v in bound._weights_dev.items()} == ptrs, "rewritten in place, never rebound"


def test_add_variants_to_a_switchable_artifact(setup):
    """add_ort_cuda_variants on a switchable fp32 artifact exported without --ort-cuda writes the variant with
    every weight an input, and the same fusions as the same call on the plain export (both fuse the cleaned
    graph, not the traced one the export fuses)."""
    import shutil

    from ldm_deploy.export.exporter import export_model
    from ldm_deploy.export.ort_optimize import add_ort_cuda_variants

    arts, _, folder, root = setup
    art = export_model(folder, root / "switch-late", _config(lora_switchable="all")).path
    stats = add_ort_cuda_variants(art, ["unet"])
    made = Artifact.open(art, verify=True).component("unet")
    fused = made.variant("ort-cuda").lora_weights["fused"]
    assert fused == stats["unet"]["lora_fused"]
    assert {e["weight"] for e in fused.values()} == set(made.lora_weights["inputs"])
    plain = shutil.copytree(arts[None], root / "plain-late")
    add_ort_cuda_variants(plain, ["unet"])
    model = _fused(art, "unet")
    assert stats["unet"]["lora_nchw_convs"] == len(_nchw_inputs(model, fused)) > 0
    assert (_plain_fused_ops(model, fused, made.variant("ort-cuda").fused_ops)
            == Artifact.open(plain).component("unet").variant("ort-cuda").fused_ops)


def test_sdxl_follows_the_plain_rules(tmp_path_factory):
    """Tiny SDXL, fp16 (time_ids' fp32 sinusoid path, two text encoders): the U-Net's and first text encoder's
    fused variants take the weights as inputs, fed with the base weights bit-identical to a plain --ort-cuda
    export's constants with the same fused ops; text_encoder_2 stays switchable without a variant, as on a plain
    export (ort_optimize.DEFAULT_COMPONENTS)."""
    from ldm_deploy.export.config import ExportConfig, Range
    from ldm_deploy.export.exporter import export_model
    from tests.runtime.tiny_sdxl import make_tiny_sdxl

    root = tmp_path_factory.mktemp("ortlora-sdxl")
    folder = make_tiny_sdxl(root / "base")
    config = ExportConfig(name="tiny-sdxl", batch=Range(1, 1, 2), height=Range(32, 32, 32), width=Range(32, 32, 32),
                          measure_runtime=False, optimize=HAS_ONNXSLIM, precision="fp16", ort_cuda=True,
                          components=("text_encoder", "text_encoder_2", "unet"))
    switch = export_model(folder, root / "switch", config.replace(lora_switchable="all")).path
    plain = export_model(folder, root / "plain", config).path
    art = Artifact.open(switch, verify=True)
    assert art.component("text_encoder_2").lora_weights and not art.component("text_encoder_2").variants
    for component in ("text_encoder", "unet"):
        weights, recipe = _merged_weights(switch, component, None)
        assert {e["weight"] for e in recipe.values()} == set(weights)
        assert {e["dtype"] for e in recipe.values()} == {"float16"}
        model = _fused(switch, component)
        ours = [numpy_helper.to_array(t) for t in ort_lora.constants(model.graph).values()]
        ours += _as_plain(model, lora_switch.WeightFeeds(recipe)(weights))
        want = [numpy_helper.to_array(t) for t in ort_lora.constants(_fused(plain, component).graph).values()]
        left, right = _unmatched(ours, want)
        # fp16: the switchable base is stored rounded to fp16 (lora_base.safetensors), where ORT's converter, which
        # made the plain export's constants, raises nonzero magnitudes under 2^-25 to 2^-24 instead of 0
        tiny = np.float16(2.0 ** -24)
        for a in left:
            pair = next((b for b in right if b.shape == a.shape and b.dtype == a.dtype == np.float16
                         and np.all((a == b) | ((a == 0) & (np.abs(b) == tiny)))), None)
            assert pair is not None, f"{component}: a fed / kept tensor {a.shape} is no plain export constant"
            right = [b for b in right if b is not pair]
        assert not right, component
        assert (_plain_fused_ops(model, recipe, art.component(component).variant("ort-cuda").fused_ops)
                == Artifact.open(plain).component(component).variant("ort-cuda").fused_ops)


# --- the checks, on synthetic graphs -------------------------------------------------------------------------

def _graph(constants: dict) -> onnx.ModelProto:
    """Y = sum of MatMul(X, c) over the named constants (all 4x4)."""
    nodes, outs = [], []
    for name in constants:
        nodes.append(helper.make_node("MatMul", ["X", name], [f"{name}_y"]))
        outs.append(f"{name}_y")
    nodes.append(helper.make_node("Sum", outs, ["Y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [4, 4])],
                              [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in constants.items()])
    return helper.make_model(graph)


def test_a_weight_folded_with_arithmetic_fails_the_export():
    """A constant that changes with the weights but is no permutation of one (here 2 W, as a fold of a scale
    into a weight would be) cannot be fed from a switched weight: `check` refuses it in one line."""
    w = {"a.weight": np.arange(16, dtype=np.float32).reshape(4, 4) / 7, "b.weight": np.ones((4, 4), np.float32)}
    probe = ort_lora.probe_weights(w)
    recipe, reference = ort_lora.derive(_graph({"wt": probe["a.weight"].T, "folded": 2 * probe["b.weight"]}), probe)
    assert recipe == {"wt": {"weight": "a.weight", "perm": [1, 0], "shape": [4, 4], "dtype": "float32"}}
    assert set(reference) == {"folded"}
    real = _graph({"wt": w["a.weight"].T, "folded": 2 * w["b.weight"]})
    with pytest.raises(LdmError, match="folds a switchable weight into 'folded'") as e:
        ort_lora.check(real, recipe, reference, w, "unet")
    assert "\n" not in str(e.value)
    good = _graph({"wt": w["a.weight"].T, "folded": 2 * probe["b.weight"]})   # unchanged: independent of b
    ort_lora.check(good, recipe, reference, w, "unet")
    fused = ort_lora.expose(good, recipe)
    assert fused == {"a.weight.T": recipe["wt"]} and "a.weight.T" in {i.name for i in good.graph.input}
    assert ort_lora.unused(fused, w) == ["b.weight"]


def test_to_float16_is_ort_converters_cast():
    """The runtime's cast (no onnxruntime.transformers import) equals ORT's float16 converter bit for bit, at its
    clamps (tiny magnitudes, past 65504, inf, nan) and on random values."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    rng = np.random.default_rng(0)
    x = np.concatenate([np.array([0, -0.0, 1e-9, -1e-9, 5.9e-8, 5.96e-8, 6e-8, -3e-8, 7e4, -7e4, 65504, 65520,
                                  np.inf, -np.inf, np.nan], np.float32),
                        (rng.standard_normal(10000) * 1e-7).astype(np.float32),
                        (rng.standard_normal(10000) * 1e4).astype(np.float32)])
    want = convert_np_to_float16(x.copy())
    got = lora_switch.to_float16(x)
    assert got.dtype == np.float16 and np.array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("bias", [True, False])
def test_switchable_nhwc_kernel_becomes_an_nchw_conv(bias):
    """ONNX Runtime's CUDA EP places an NhwcConv only when its kernel is an initializer (NhwcConvNeedFallbackToCPU;
    on an H100 the fused switchable U-Net failed to load before this): `expose` rewrites an NhwcConv whose kernel
    becomes an input as Transpose -> Conv -> Transpose, the kernel fed OIHW (the weight as stored), the OHWI
    constant dropped, and the graph computes the same convolution."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)            # OIHW, as the weight is stored
    b = rng.standard_normal(4).astype(np.float32)
    k = np.ascontiguousarray(w.transpose(0, 2, 3, 1))                   # OHWI, NhwcConv's constant
    recipe = {"k": {"weight": "conv.weight", "perm": [0, 2, 3, 1], "shape": list(k.shape), "dtype": "float32"}}
    inits = [numpy_helper.from_array(k, "k")] + ([numpy_helper.from_array(b, "b")] if bias else [])
    node = helper.make_node("NhwcConv", ["X", "k", *(["b"] if bias else [])], ["Y"], name="conv",
                            domain="com.microsoft", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    vi = helper.make_tensor_value_info
    model = helper.make_model(
        helper.make_graph([node], "g", [vi("X", onnx.TensorProto.FLOAT, [1, 5, 5, 2])],
                          [vi("Y", onnx.TensorProto.FLOAT, [1, 3, 3, 4])], inits),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])

    fused = ort_lora.expose(model, recipe)
    assert fused == {"conv.weight": {"weight": "conv.weight", "perm": [0, 1, 2, 3], "shape": [4, 2, 3, 3],
                                     "dtype": "float32"}}
    assert [(n.op_type, n.domain) for n in model.graph.node] == [("Transpose", ""), ("Conv", ""), ("Transpose", "")]
    assert [t.name for t in model.graph.initializer] == (["b"] if bias else [])
    onnx.checker.check_model(model, full_check=True)

    x = rng.standard_normal((1, 5, 5, 2)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"X": x, "conv.weight": lora_switch.fused_tensor(w, fused["conv.weight"])})[0]
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros((1, 3, 3, 4))
    for i in range(3):
        for j in range(3):
            want[0, i, j] = np.einsum("hwc,ochw->o", xp[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3], w) + (b if bias else 0)
    # 18 float32 products per output: float32 rounding of sum |terms| bounds the error
    scale = max(np.einsum("hwc,ochw->o", np.abs(xp[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3]), np.abs(w)).max()
                for i in range(3) for j in range(3)) + np.abs(b).max()
    bound = 32 * np.finfo(np.float32).eps * scale
    assert got.shape == want.shape and np.abs(got - want).max() <= bound


@pytest.mark.parametrize("entry", [{"weight": "w", "perm": [0, 0], "shape": [2, 2], "dtype": "float16"},
                                   {"weight": "w", "perm": [1, 0], "shape": [2, 2], "dtype": "int8"},
                                   {"perm": [1, 0], "shape": [2, 2], "dtype": "float32"}, "w"])
def test_malformed_recipe_is_refused(entry):
    with pytest.raises(LdmError, match="fused weight input 'x' is malformed"):
        lora_switch.WeightFeeds({"x": entry})
