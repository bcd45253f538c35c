"""The norm / layout passes on the fused U-Net (ldm_deploy/export/ort_fp16_norm.py): node counts on the tiny SD-like
U-Net's real fused graphs, a synthetic fp32-fed GroupNorm, and exactness on ONNX Runtime CPU.

ORT CPU has no kernel for NhwcConv / GroupNorm / SkipGroupNorm (CUDA only), so the exactness test runs both the
fused graph and its passed version with the same standard-op stand-ins for those three ops (`cpu_stand_ins`:
Transpose + Conv, a GroupNorm built from InstanceNormalization): the stand-ins are the same on both sides, the
pass is what differs, and the outputs must be equal bit for bit (the pass only moves the same elements).
The GPU run of both graphs is tests/runtime/test_ort_cuda_runner.py::test_norm_layout_levers_match_ort_cuda."""
from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ldm_deploy.export.ort_fp16_norm import (conv_bias_into_norm, drop_noop_casts, elem_types, fold_nhwc_transposes,
                                             fp16_group_norm, norm_layout_passes, write_norm_layout_graph)

HAS_ONNXSLIM = importlib.util.find_spec("onnxslim") is not None


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> dict[str, Path]:
    """The tiny SD-like U-Net fused for ort-cuda: the fp16 export's variant and an fp32 one from its kept fp32 graph
    (both CFG-folded, as `export --ort-cuda` writes them)."""
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model
    from ldm_deploy.export.ort_optimize import optimize_for_ort_cuda
    from tests.export.test_ort_optimize import make_sd_like_folder

    root = tmp_path_factory.mktemp("normlayout")
    folder = make_sd_like_folder(root / "model")
    config = load_config("tiny").replace(components=("text_encoder", "unet", "vae_decoder"), measure_runtime=False,
                                         optimize=HAS_ONNXSLIM, precision="fp16", keep_fp32_unet=True, ort_cuda=True)
    art = export_model(folder, root / "fp16", config).path
    fp32 = root / "unet-fp32.ort-cuda.onnx"
    optimize_for_ort_cuda(art / "unet" / "model_fp32.onnx", fp32, "unet", float16=False)
    return {"fp16": art / "unet" / "model.ort-cuda.onnx", "fp32": fp32, "artifact": art}


def counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def test_fp16_variant_casts_are_noops_and_go(fused):
    """The fp16 fused graph's GroupNorms already run fp16 (X fp16, gamma/beta float as the CUDA kernel reads them):
    the Casts after them are fp16 -> fp16 and the pass removes them, leaving the graph-input and output Casts."""
    model = onnx.load(str(fused["fp16"]))
    types = elem_types(model.graph)
    norms = [n for n in model.graph.node if n.op_type in ("GroupNorm", "SkipGroupNorm")]
    assert norms and all(types[n.input[0]] == TensorProto.FLOAT16 for n in norms)
    assert all(types[n.input[1]] == TensorProto.FLOAT for n in norms)
    noops = [n for n in model.graph.node if n.op_type == "Cast" and types.get(n.input[0]) == n.attribute[0].i]
    assert len(noops) >= len(norms), "the converter's Casts after the fused norms"
    before = counts(model)
    stats = norm_layout_passes(model, fold_transposes=False)
    assert stats["fp16_group_norm"] == {"rewired": 0, "already_fp16": len(norms), "kept": 0, "casts_removed": 0,
                                        "casts_added": 0}
    assert stats["noop_casts_removed"] == len(noops)
    after = counts(model)
    assert after["Cast"] == before["Cast"] - len(noops)
    types = elem_types(model.graph)
    assert not [n for n in model.graph.node if n.op_type == "Cast" and types.get(n.input[0]) == n.attribute[0].i]
    for n in model.graph.node:   # every NhwcConv still reads fp16
        if n.op_type == "NhwcConv":
            assert types[n.input[0]] == TensorProto.FLOAT16
    onnx.checker.check_model(model)


def test_fold_removes_four_transposes_per_transformer_block(fused):
    model = onnx.load(str(fused["fp16"]))
    before = counts(model)
    blocks = sum(1 for n in model.graph.node if n.op_type == "NhwcConv" and "proj_in" in n.name)
    stats = fold_nhwc_transposes(model)
    assert blocks > 0 and stats["entries"] == blocks and stats["exits"] == blocks
    after = counts(model)
    assert before["Transpose"] - after["Transpose"] == stats["transposes_removed"] >= 4 * blocks
    # no Transpose -> Reshape -> Transpose chain is left at any block's end
    prod = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "Transpose" and n.input[0] in prod and prod[n.input[0]].op_type == "Reshape":
            assert prod[prod[n.input[0]].input[0]].op_type != "Transpose", n.name
    onnx.checker.check_model(model)
    assert fold_nhwc_transposes(model) == {"entries": 0, "exits": 0, "transposes_removed": 0, "shapes_rewritten": 0}


def test_conv_bias_moves_into_the_skip_group_norm_reading_it(fused):
    """Each NhwcConv whose only reader is a SkipGroupNorm without a bias gives it its bias; the rest keep theirs.
    No norm gets two biases, nothing is added or dropped, and a second run finds nothing left to move."""
    model = onnx.load(str(fused["fp16"]))
    before = counts(model)
    biases = {n.output[0]: n.input[2] for n in model.graph.node if n.op_type == "NhwcConv" and len(n.input) > 2}
    stats = conv_bias_into_norm(model)
    assert stats["moved"] > 0 and stats["moved"] == stats["as_x"] + stats["as_skip"]
    assert stats["moved"] + stats["kept"] == len(biases)
    assert counts(model) == before
    convs = {n.output[0]: n for n in model.graph.node if n.op_type == "NhwcConv"}
    unbiased = {y for y, n in convs.items() if len(n.input) == 2}
    assert len(unbiased) == stats["moved"]
    given = 0
    for norm in model.graph.node:
        if norm.op_type != "SkipGroupNorm" or len(norm.input) < 5 or not norm.input[4]:
            continue
        fed = [name for name in (norm.input[0], norm.input[3]) if name in unbiased]
        assert len(fed) == 1 and norm.input[4] == biases[fed[0]], norm.name
        given += 1
    assert given == stats["moved"]
    onnx.checker.check_model(model)
    assert conv_bias_into_norm(model)["moved"] == 0


def test_conv_bias_stays_where_the_output_has_another_reader():
    """A biased convolution whose output a SkipGroupNorm and another node read keeps its bias (the other reader
    needs it), as does one whose norm already has a bias."""
    c = 4
    nodes = [helper.make_node("NhwcConv", ["x", "w", "b"], ["y"], domain="com.microsoft", kernel_shape=[1, 1]),
             helper.make_node("SkipGroupNorm", ["y", "gamma", "beta", "s"], ["n"], domain="com.microsoft", groups=2,
                              epsilon=1e-5, activation=0),
             helper.make_node("Relu", ["y"], ["r"]),
             helper.make_node("NhwcConv", ["x", "w", "b"], ["y2"], domain="com.microsoft", kernel_shape=[1, 1]),
             helper.make_node("SkipGroupNorm", ["y2", "gamma", "beta", "s", "b"], ["n2"], domain="com.microsoft",
                              groups=2, epsilon=1e-5, activation=0)]
    vi = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 2, c])  # noqa: E731
    inits = [numpy_helper.from_array(np.ones((c, 1, 1, c), np.float32), "w"),
             numpy_helper.from_array(np.ones(c, np.float32), "b"),
             numpy_helper.from_array(np.ones(c, np.float32), "gamma"), numpy_helper.from_array(np.zeros(c, np.float32), "beta")]
    graph = helper.make_graph(nodes, "cb", [vi("x"), vi("s")], [vi("n"), vi("r"), vi("n2")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    assert conv_bias_into_norm(model) == {"moved": 0, "as_x": 0, "as_skip": 0, "kept": 2}
    assert [len(n.input) for n in model.graph.node] == [3, 4, 1, 3, 5]


# --- exactness on ORT CPU ------------------------------------------------------------------------------------

def cpu_stand_ins(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the fused fp32 graph with NhwcConv / GroupNorm / SkipGroupNorm written in standard ops (ORT CPU
    has no kernels for them): NhwcConv = Transpose -> Conv (weights back to OIHW; a Transpose node for a kernel
    that is a graph input, as in a lora_switchable variant) -> Transpose; GroupNorm =
    NCHW InstanceNormalization over (B, groups, -1), then gamma / beta per channel and SiLU when `activation`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    nodes, k = [], 0

    def name(base):
        nonlocal k
        k += 1
        return f"standin_{base}_{k}"

    def const(values, dtype=np.int64):
        n = name("c")
        g.initializer.append(numpy_helper.from_array(np.asarray(values, dtype), n))
        return n

    def attr(node, key, default=None):
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == key), default)

    for node in g.node:
        if node.op_type == "NhwcConv":
            x, y = name("x"), name("y")
            if node.input[1] in inits:
                w = numpy_helper.to_array(inits[node.input[1]]).transpose(0, 3, 1, 2)
                wn = const(w, w.dtype)
            else:   # a graph input (a switchable weight's fused form, OHWI): transposed in the graph
                wn = name("w")
                nodes.append(helper.make_node("Transpose", [node.input[1]], [wn], perm=[0, 3, 1, 2]))
            nodes.append(helper.make_node("Transpose", [node.input[0]], [x], perm=[0, 3, 1, 2]))
            nodes.append(helper.make_node("Conv", [x, wn, *node.input[2:]], [y], **{
                a.name: helper.get_attribute_value(a) for a in node.attribute}))
            nodes.append(helper.make_node("Transpose", [y], node.output[:1], perm=[0, 2, 3, 1]))
        elif node.op_type in ("GroupNorm", "SkipGroupNorm"):
            x = node.input[0]
            if node.op_type == "SkipGroupNorm":
                s = name("s")
                skip = node.input[3]
                nodes.append(helper.make_node("Add", [x, skip], [s]))
                if len(node.input) > 4 and node.input[4]:
                    s2 = name("s")
                    nodes.append(helper.make_node("Add", [s, node.input[4]], [s2]))
                    s = s2
                if len(node.output) > 1 and node.output[1]:
                    nodes.append(helper.make_node("Identity", [s], [node.output[1]]))
                x = s
            groups, eps = attr(node, "groups"), attr(node, "epsilon", 1e-5)
            nchw, grouped, normed, back, scaled, shifted = (name(t) for t in ("nchw", "grp", "in", "back", "sc", "sh"))
            shape = name("shape")
            nodes.append(helper.make_node("Transpose", [x], [nchw], perm=[0, 3, 1, 2]))
            nodes.append(helper.make_node("Shape", [nchw], [shape]))
            nodes.append(helper.make_node("Reshape", [nchw, const([0, groups, -1])], [grouped]))
            nodes.append(helper.make_node("InstanceNormalization", [grouped, const(np.ones(groups), np.float32),
                                                                    const(np.zeros(groups), np.float32)],
                                          [normed], epsilon=eps))
            nodes.append(helper.make_node("Reshape", [normed, shape], [back]))
            gamma = numpy_helper.to_array(inits[node.input[1]]).reshape(-1, 1, 1)
            beta = numpy_helper.to_array(inits[node.input[2]]).reshape(-1, 1, 1)
            nodes.append(helper.make_node("Mul", [back, const(gamma, np.float32)], [scaled]))
            nodes.append(helper.make_node("Add", [scaled, const(beta, np.float32)], [shifted]))
            out = shifted
            if attr(node, "activation", 0):
                sig, silu = name("sig"), name("silu")
                nodes.append(helper.make_node("Sigmoid", [out], [sig]))
                nodes.append(helper.make_node("Mul", [out, sig], [silu]))
                out = silu
            nodes.append(helper.make_node("Transpose", [out], node.output[:1], perm=[0, 2, 3, 1]))
        else:
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return m


def run_cpu(model: onnx.ModelProto, feeds: dict) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def unet_feeds(model: onnx.ModelProto, seed: int) -> dict:
    """Folded-CFG U-Net feeds at the tiny preset's size: B=1 latent, 2 text rows, guidance 7.5."""
    rng = np.random.default_rng(seed)
    shapes = {"sample": (1, 4, 8, 8), "timestep": (1,), "encoder_hidden_states": (2, 77, 32),
              "guidance_scale": (1,), "guidance_rescale": (1,)}
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        shape = tuple(d if d else s for d, s in zip(dims, shapes[i.name])) if dims else shapes[i.name]
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    feeds["timestep"] = np.full(feeds["timestep"].shape, 400.0 + 100 * seed, np.float32)
    feeds["guidance_scale"][:] = 7.5
    feeds["guidance_rescale"][:] = 0.0
    return feeds


def assert_same_u_net_on_cpu(model: onnx.ModelProto, passed: onnx.ModelProto) -> None:
    """`passed` computes `model`'s outputs bit for bit on ORT CPU, contrib ops stood in for alike, at two seeds."""
    reference, candidate = cpu_stand_ins(model), cpu_stand_ins(passed)
    for seed in (0, 1):
        feeds = unet_feeds(model, seed)
        want, got = run_cpu(reference, feeds), run_cpu(candidate, feeds)
        for key, value in want.items():
            assert np.isfinite(value).all() and np.abs(value).max() > 0
            np.testing.assert_array_equal(got[key], value, err_msg=f"{key} seed {seed}")


def test_fold_is_exact_on_ort_cpu(fused):
    """The real fused U-Net (fp32, CFG folded) before and after the passes, contrib ops stood in for the same way
    on both sides: outputs equal bit for bit, at two seeds (the folds only move elements; nothing is recomputed)."""
    model = onnx.load(str(fused["fp32"]))
    passed = onnx.load(str(fused["fp32"]))
    stats = norm_layout_passes(passed)
    assert stats["fold_nhwc_transposes"]["entries"] > 0 and stats["transposes"][1] < stats["transposes"][0]
    assert_same_u_net_on_cpu(model, passed)


def test_conv_bias_move_computes_the_same_u_net_on_ort_cpu(fused):
    """The real fused fp32 U-Net with and without the biases moved, contrib ops stood in for alike: the sum is
    (conv + skip) + bias instead of (conv + bias) + skip, one float32 rounding apart per element, so the outputs
    agree to float32 rounding carried through the network: within 1e-4 of their scale, the bound of the export's
    own fp32 checks (measured 7.6e-6 here)."""
    model = onnx.load(str(fused["fp32"]))
    moved = onnx.load(str(fused["fp32"]))
    assert conv_bias_into_norm(moved)["moved"] > 0
    reference, candidate = cpu_stand_ins(model), cpu_stand_ins(moved)
    for seed in (0, 1):
        feeds = unet_feeds(model, seed)
        want, got = run_cpu(reference, feeds), run_cpu(candidate, feeds)
        for key, value in want.items():
            scale = float(np.abs(value).max())
            assert np.isfinite(value).all() and scale > 0
            err = float(np.abs(got[key].astype(np.float64) - value).max())
            assert err <= 1e-4 * scale, f"{key} seed {seed}: {err:.3g} against scale {scale:.3g}"


def test_passes_write_a_graph_beside_and_leave_the_source(fused, tmp_path):
    src = fused["fp16"]
    before = src.read_bytes()
    dst = tmp_path / "unet" / "model.tuning.onnx"
    dst.parent.mkdir()
    stats = write_norm_layout_graph(src, dst, fp16_norm=True, fold_transposes=True)
    assert src.read_bytes() == before and dst.is_file() and not list(dst.parent.glob(".*"))
    written = onnx.load(str(dst))
    assert counts(written)["Cast"] == stats["casts"][1] < stats["casts"][0]
    assert [i.name for i in written.graph.input] == [i.name for i in onnx.load(str(src)).graph.input]


# --- synthetic graphs ----------------------------------------------------------------------------------------

def _group_norm_graph(skip: bool, fp32_reader: bool) -> onnx.ModelProto:
    """x fp16 -> Cast fp32 -> (Skip)GroupNorm (fp32 gamma/beta) -> Cast fp16 -> y [, and an fp32 reader z]: a
    graph converted with GroupNorm kept in fp32."""
    c = 4
    nodes = [helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT)]
    ins = ["x32", "gamma", "beta"]
    if skip:
        nodes.append(helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.FLOAT))
        ins.append("s32")
    nodes.append(helper.make_node("SkipGroupNorm" if skip else "GroupNorm", ins, ["n32"], domain="com.microsoft",
                                  groups=2, epsilon=1e-5, activation=1))
    nodes.append(helper.make_node("Cast", ["n32"], ["n16"], to=TensorProto.FLOAT16))
    nodes.append(helper.make_node("Relu", ["n16"], ["y"]))      # the fp16 reader (a convolution in a U-Net)
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 2, 2, c])]
    if fp32_reader:
        nodes.append(helper.make_node("Sigmoid", ["n32"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 2, c]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 2, 2, c])]
    if skip:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT16, [1, 2, 2, c]))
    inits = [numpy_helper.from_array(np.ones(c, np.float32), "gamma"), numpy_helper.from_array(np.zeros(c, np.float32), "beta")]
    graph = helper.make_graph(nodes, "gn", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("skip", [False, True])
def test_fp32_fed_group_norm_runs_fp16(skip):
    model = _group_norm_graph(skip, fp32_reader=False)
    stats = fp16_group_norm(model)
    assert stats["rewired"] == 1 and stats["casts_added"] == 0
    assert stats["casts_removed"] == (3 if skip else 2)     # the input Casts and the output Cast
    (norm,) = [n for n in model.graph.node if n.domain == "com.microsoft"]
    types = elem_types(model.graph)
    assert types[norm.input[0]] == TensorProto.FLOAT16 and types[norm.input[1]] == TensorProto.FLOAT
    assert counts(model)["Cast"] == 0 and norm.output[0] != "n32"
    (relu,) = [n for n in model.graph.node if n.op_type == "Relu"]
    assert relu.input[0] == norm.output[0] and relu.output[0] == "y"
    onnx.checker.check_model(model)


def test_cast_writing_a_graph_output_is_kept_as_a_noop():
    model = _group_norm_graph(False, fp32_reader=False)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    model.graph.node.remove(relu)
    model.graph.output[0].name = "n16"
    stats = fp16_group_norm(model)
    assert stats["rewired"] == 1 and stats["casts_added"] == 0 and stats["casts_removed"] == 1
    (cast,) = [n for n in model.graph.node if n.op_type == "Cast"]
    assert cast.output[0] == "n16" and elem_types(model.graph)[cast.input[0]] == TensorProto.FLOAT16
    onnx.checker.check_model(model)


def test_fp32_reader_gets_a_cast_back():
    model = _group_norm_graph(False, fp32_reader=True)
    stats = fp16_group_norm(model)
    assert stats["rewired"] == 1 and stats["casts_added"] == 1
    types = elem_types(model.graph)
    (sig,) = [n for n in model.graph.node if n.op_type == "Sigmoid"]
    assert types[sig.input[0]] == TensorProto.FLOAT and sig.input[0] == "n32"
    onnx.checker.check_model(model)


def test_group_norm_fed_another_type_is_kept():
    model = _group_norm_graph(False, fp32_reader=False)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE    # Cast(double -> float): not ours
    assert fp16_group_norm(model)["kept"] == 1 and counts(model)["Cast"] == 2    # nothing changed


def test_noop_cast_writing_a_graph_output_stays():
    nodes = [helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT16),
             helper.make_node("Relu", ["a"], ["b"]), helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT16)]
    graph = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert drop_noop_casts(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Relu", "Cast"] and model.graph.node[0].input[0] == "x"
