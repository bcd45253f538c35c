"""debug-precision on a tiny SD-shaped model made to overflow fp16 in a known place, and on a clean one.

The fault overflows only at large timesteps. The slowest sinusoid of the timestep embedding,
sin(t * 1.78e-4) (index 31 of the 32-wide `[cos, sin]` embedding), is routed alone through
time_embedding.linear_1 row 0 (x100), linear_2 row 0 (x100) and down_blocks.0.resnets.0.time_emb_proj
row 0 (x63.5): that channel's time offset is ~113 t (SiLU is ~identity there), so the Gemm output is
~85,000 at t=751 (> 65504, the largest fp16), ~57,000 at t=501 (within the 0.5 margin), ~28,000 at
t=251. The resnet's Add carries it on and norm2 (GroupNorm) normalises it back, so the fp32 model
works while the fp16 conversion makes inf -> NaN at early steps only. (ONNX Runtime CPU computes the
Gemm in fp32 behind casts; the Cast of its output to fp16 is where inf appears, as on a GPU.)
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from ldm_deploy.cli import main
from tests.runtime.tiny_model import PROFILES, make_tiny_folder

FAULT = (("time_embedding.linear_1", 31, 100.0), ("time_embedding.linear_2", 0, 100.0),
         ("down_blocks.0.resnets.0.time_emb_proj", 0, 63.5))     # (layer, input column, weight) of row 0
FAULT_NODE = "/unet/down_blocks.0/resnets.0/time_emb_proj/Gemm"
FAST = ["--no-timing", "-q"]


def faulty_copy(folder: Path, dst: Path, part: str, edit) -> Path:
    """A copy of the model folder `folder` at `dst` whose `part` (unet, vae) weights `edit(state_dict)` changed
    in place: the known fault of a precision test (tests/export/test_precision_sdxl.py uses it too)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dst)
    weights = dst / part / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    edit(sd)
    save_file(sd, str(weights))
    return dst


def _route_the_slow_sinusoid(sd) -> None:
    for layer, column, weight in FAULT:
        sd[f"{layer}.weight"][0] = 0.0
        sd[f"{layer}.weight"][0, column] = weight
        sd[f"{layer}.bias"][0] = 0.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    clean = make_tiny_folder(root / "clean")
    bad = faulty_copy(clean, root / "bad", "unet", _route_the_slow_sinusoid)
    config = root / "tiny.yaml"
    config.write_text(json.dumps({"profiles": PROFILES, "components": ["text_encoder", "unet", "vae_decoder"]}))
    return clean, bad, config


@pytest.mark.slow   # ~35 s on 2 shared cores: fp32 export, trajectories, two per-layer comparisons, fp16 export
def test_finds_the_overflow_and_the_written_config_fixes_it(folders, tmp_path):
    from ldm_deploy.errors import LdmError
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model
    from ldm_deploy.export.validate import validate
    from ldm_deploy.runtime.pipeline import Pipeline

    _, bad, config = folders
    fix, report = tmp_path / "fixed.yaml", tmp_path / "report.json"
    rc = main(["debug-precision", str(bad), "--component", "unet", "--config", str(config), "--inputs", "4",
               "--steps", "4", "--write-config", str(fix), "--json", str(report), "-q"])   # timed: the cost
    assert rc == 0
    r = json.loads(report.read_text())
    cost = r["cost"]   # the fix's price: nodes it keeps fp32, and the three graphs' latency on --device
    assert cost["keep_nodes_added"] == len(r["keep_nodes"]) > 0
    assert all(cost[k] > 0 for k in ("ms_fp32_cpu", "ms_fp16_cpu", "ms_fp16_fixed_cpu"))
    assert r["first_failure"]["node"] == FAULT_NODE and r["first_failure"]["op"] == "Gemm"
    over = {o["node"]: o for o in r["overflows"]}
    assert FAULT_NODE in over and over[FAULT_NODE]["fp32_max"] > 65504
    # only the early, large-t inputs overflow; t ~ 500 is flagged by the 0.5 margin; late steps are clean
    ts = [float(re.search(r"t=([0-9.]+)", d).group(1)) for d in r["inputs"]]
    assert over[FAULT_NODE]["overflow_inputs"] == [i for i, t in enumerate(ts) if t > 700] != []
    assert over[FAULT_NODE]["near_inputs"] == [i for i, t in enumerate(ts) if t > 400]
    assert any(t < 300 for t in ts)
    assert r["outputs_before"]["noise_pred"]["nonfinite"] > 0     # the unfixed fp16 U-Net makes NaN
    assert FAULT_NODE in r["keep_nodes"] and len(r["keep_nodes"]) <= 6   # the region, not the graph
    assert r["outputs_after"]["noise_pred"]["passed"]

    # today's fp16 export either refuses the model (its own finite check, when its random example
    # timestep is large) or makes NaN at the first sampling steps; the written config exports and validates
    base = load_config(config)
    try:
        plain = export_model(bad, tmp_path / "plain", base.replace(precision="fp16")).path
    except LdmError as e:
        assert "non-finite" in str(e)
    else:
        with pytest.raises(LdmError, match="unet produced .* non-finite"):
            Pipeline.from_artifact(plain)("a red circle", steps=3, seed=0)
    fixed = load_config(fix)
    assert fixed.precision == "fp16" and FAULT_NODE in fixed.fp16_keep_nodes["unet"]
    art = export_model(bad, tmp_path / "fixed", fixed).path
    check = validate(bad, art, components=["unet"])
    assert check.passed, check.table()
    images = Pipeline.from_artifact(art)("a red circle", steps=3, seed=0).images
    assert images.std() > 1.0             # not NaN (the pipeline would raise), not black or flat


@pytest.mark.slow   # ~35 s on 2 shared cores
def test_clean_model_gets_a_clean_report(folders, tmp_path):
    clean, _, config = folders
    report = tmp_path / "report.json"
    assert main(["debug-precision", str(clean), "--config", str(config), "--json", str(report), "--inputs", "2",
                 "--steps", "2", *FAST]) == 0
    r = json.loads(report.read_text())
    assert r["clean"] and r["keep_nodes"] == [] and r["first_failure"] is None and r["overflows"] == []
    # fp16 rounding only: each layer's error is a few fp16 ulps of its scale (2^-11 ~ 4.9e-4 per rounding)
    assert max(layer["max_rel"] for layer in r["layers"]) < 2e-2


def test_timestep_island_stays_fp32(folders, tmp_path):
    """The converter's fp32 -> fp16 -> fp32 round trips between kept nodes are gone: the sinusoid's
    argument (t * freq, up to ~1000 rad) reaches Cos/Sin in fp32."""
    import onnx

    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model

    clean, _, config = folders
    art = export_model(clean, tmp_path / "a", load_config(config).replace(precision="fp16", components=("unet",)))
    model = onnx.load(str(art.path / "unet" / "model.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    cos = next(n for n in model.graph.node if n.op_type == "Cos")
    assert producer[cos.input[0]].op_type == "Mul"
    # the fp32 `timestep` input is read as is, not rounded through fp16 first (fractional t from
    # Karras-style schedules would lose up to 0.25 near t = 999)
    readers = [n for n in model.graph.node if "timestep" in n.input]
    assert readers and all(n.op_type != "Cast" for n in readers)
    # ... and multiplied by the frequency table in fp32: a table rounded to fp16 (rel 4.9e-4) moves t * freq by
    # up to 0.49 rad at t = 999 (debug-precision found cos off by 0.15 at t = 901 on SD 1.5)
    fp32 = onnx.load(str(export_model(clean, tmp_path / "b", load_config(config).replace(
        precision="fp32", components=("unet",))).path / "unet" / "model.onnx"))

    def freq_table(m):
        prod = {o: n for n in m.graph.node for o in n.output}
        inits = {i.name: i for i in m.graph.initializer}
        mul = prod[next(n for n in m.graph.node if n.op_type == "Cos").input[0]]
        tables = []
        for x in mul.input:
            node = prod.get(x)
            if x in inits:
                tables.append(onnx.numpy_helper.to_array(inits[x]))
            elif node is not None and node.op_type == "Constant":
                tables.append(onnx.numpy_helper.to_array(node.attribute[0].t))
        assert len(tables) == 1, [x for x in mul.input]
        return tables[0]

    half, full = freq_table(model), freq_table(fp32)
    assert half.dtype == np.float32 and np.array_equal(half, full)


def _sinusoid(path: Path, t: float) -> dict[str, np.ndarray]:
    """The timestep sinusoid's argument (t * freq), cos and sin, marked as outputs of the graph at `path`."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    cos = next(n for n in model.graph.node if n.op_type == "Cos")
    sin = next(n for n in model.graph.node if n.op_type == "Sin")
    names = [cos.input[0], cos.output[0], sin.output[0]]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    # a batch of 2, 4x4 latents (32 px, inside the tiny profile); sample and text are zeros: the sinusoid reads only t
    feeds = {i.name: np.zeros([2, *(d if isinstance(d, int) else 4 for d in i.shape[1:])], types[i.type])
             for i in session.get_inputs() if i.name != "timestep"}
    feeds["timestep"] = np.full(2, t, np.float32)
    return dict(zip(("arg", "cos", "sin"), session.run(names, feeds)))


@pytest.mark.parametrize("graph", ["not cleaned up", "over the proto limit"])
def test_sinusoid_of_an_uncleaned_fp16_graph_equals_fp32(folders, tmp_path, monkeypatch, graph):
    """Without onnxslim (`optimize: false`, or a graph over protobuf's 2 GB limit such as the SD 1.5 U-Net's, where
    it cannot run before the conversion), the sinusoid's frequency table is a `Constant` node, which the float16
    converter made fp16 and cast back in front of the fp32 Mul: t * freq was off by 0.19 rad (bound 0.44), and
    debug-precision found /unet/Cos 0.150 and /unet/Sin 0.124 off at t = 901 on SD 1.5 (0.12 / 0.08 here)."""
    from ldm_deploy.export import onnx_io
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model

    clean, _, config = folders
    cfg = load_config(config).replace(precision="fp16", components=("unet",), keep_fp32_unet=True,
                                      measure_runtime=False)
    if graph == "not cleaned up":
        cfg = cfg.replace(optimize=False)
    else:
        monkeypatch.setattr(onnx_io, "PROTO_LIMIT", 100_000)     # the tiny U-Net's weights are over it
    art = export_model(clean, tmp_path / "a", cfg).path
    for t in (901.0, 643.7):    # an SD 1.5 trajectory's first step, and a fractional t (Karras-style schedules)
        full, half = _sinusoid(art / "unet" / "model_fp32.onnx", t), _sinusoid(art / "unet" / "model.onnx", t)
        assert all(half[k].dtype == np.float32 for k in half)
        # both graphs multiply the same float32 t by the same float32 table, each product rounded once
        # (0.5 ulp), and cos/sin of it carry ~1 ulp: 8 float32 ulps of the argument's scale (8.6e-4 at
        # t = 901) bounds any difference of kernels; an fp16-rounded table misses it by 100x
        bound = 8 * np.finfo(np.float32).eps * float(np.abs(full["arg"]).max())
        for k in ("arg", "cos", "sin"):
            assert np.abs(half[k] - full[k]).max() <= bound, (k, t, np.abs(half[k] - full[k]).max())


def test_unknown_keep_node_and_bf16_are_refused(folders, tmp_path):
    from ldm_deploy.errors import LdmError
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model

    clean, _, config = folders
    bad_config = load_config(config).replace(precision="fp16", components=("unet",),
                                             fp16_keep_nodes={"unet": ["/unet/no_such/Conv"]})
    with pytest.raises(LdmError, match="fp16_keep_nodes names 1 nodes"):
        export_model(clean, tmp_path / "x", bad_config)
    assert not (tmp_path / "x").exists()
    assert main(["debug-precision", str(clean), "--precision", "bf16", "-q"]) == 2


def test_layer_report_orders_and_flags():
    from ldm_deploy.export.layers import LayerReport, LayerStat

    layers = [LayerStat(0, "a", "A", "Conv", "float16", ref_max=40000.0, input_max=[40000.0]),
              LayerStat(1, "b", "B", "Add", "float16", ref_max=70000.0, max_rel=1.0, passed=False,
                        input_max=[1.0, 70000.0]),
              LayerStat(2, "c", "C", "Mul", "float32", ref_max=1e6, input_max=[1e6])]
    report = LayerReport("fp32", "fp16", 2e-2, ["i0", "i1"], ["c"], layers)
    assert report.first_failure().node == "B"
    assert [s.node for s in report.overflows(0.5)] == ["A", "B"]      # C is fp32 in the test graph
    assert [s.node for s in report.overflows(1.0)] == ["B"] and layers[1].over(65504) == [1]


def test_clean_summary_names_inner_layers_over_tolerance():
    """Outputs within tolerance and no overflow is "clean", but the summary must not then claim that no layer
    exceeded the tolerance when one did (the SD 1.5 CPU run: Cos off by 0.15, outputs at 4e-3)."""
    from ldm_deploy.export.config import ExportConfig
    from ldm_deploy.export.layers import LayerReport, LayerStat
    from ldm_deploy.export.precision import PrecisionReport

    def report(inner_passed: bool) -> PrecisionReport:
        layers = [LayerStat(0, "cos", "/unet/Cos", "Cos", "float32", ref_max=1.0, max_abs=0.15, max_rel=0.15,
                            passed=inner_passed, input_max=[1.0]),
                  LayerStat(1, "out", "/unet/conv_out/Conv", "Conv", "float16", ref_max=3.0, max_rel=4e-3,
                            input_max=[3.0])]
        before = LayerReport("fp32", "fp16", 2e-2, ["i0"], ["out"], layers)
        return PrecisionReport("unet", "fp16", 2e-2, 0.5, before, [], None, ExportConfig())

    flagged, quiet = report(False), report(True)
    assert flagged.clean and quiet.clean
    assert "1 inner tensor(s) exceed the tolerance" in flagged.summary()
    assert "no layer over tolerance" not in flagged.summary() and "no layer over tolerance" in quiet.summary()


@pytest.mark.slow   # ~35 s on 2 shared cores
def test_validate_layers_per_layer_view(folders, tmp_path, capsys):
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model

    clean, _, config = folders
    cfg = load_config(config).replace(precision="fp16", components=("unet",), measure_runtime=False)
    art = export_model(clean, tmp_path / "a", cfg).path
    assert main(["validate", str(clean), str(art), "--layers", "-q"]) == 0
    out = capsys.readouterr().out
    assert "unet: fp32-ort-cpu: model.onnx vs fp16-ort-cpu: model.onnx" in out
    assert "first node over tolerance: none" in out and "/unet/" in out


@pytest.mark.tensorrt
def test_validate_layers_against_a_tensorrt_engine(folders, tmp_path):
    pytest.importorskip("tensorrt")
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model
    from ldm_deploy.export.validate_layers import validate_layers

    clean, _, config = folders
    cfg = load_config(config).replace(precision="fp16", components=("unet",), measure_runtime=False)
    art = export_model(clean, tmp_path / "a", cfg).path
    report = validate_layers(clean, art, "tensorrt")["unet"]
    assert report.layers and report.passed, report.table()


def test_mask_sentinels_are_not_overflows():
    """CLIP's causal mask holds finfo(float32).min; fp16 stores -inf / -65504 with the same Softmax."""
    from ldm_deploy.export.layers import LayerReport, LayerStat

    mask = LayerStat(0, "m", "/text_encoder/Where_1", "Where", "float16", ref_max=3.4028235e38, max_rel=1.0,
                     passed=False, input_max=[3.4028235e38])
    report = LayerReport("fp32", "fp16", 2e-2, ["i0"], ["out"], [mask])
    assert report.first_failure() is None and report.overflows(0.5) == [] and report.sentinels() == [mask]


def test_artifact_source_needs_fp32_graphs(folders, tmp_path):
    """An fp32 artifact is debugged directly (no re-export); an fp16 one is refused with the way out."""
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model

    clean, _, config = folders
    base = load_config(config).replace(measure_runtime=False)
    fp16 = export_model(clean, tmp_path / "fp16", base.replace(precision="fp16", components=("unet",))).path
    assert main(["debug-precision", str(fp16), "-q"]) == 2
    fp32 = export_model(clean, tmp_path / "fp32", base).path
    assert main(["debug-precision", str(fp32), "--component", "text_encoder_2", "-q"]) == 2   # SDXL's only
    report = tmp_path / "r.json"
    assert main(["debug-precision", str(fp32), "--component", "text_encoder", "--inputs", "2", "--steps", "1",
                 "--json", str(report), *FAST]) == 0
    r = json.loads(report.read_text())
    assert r["clean"] and len(r["inputs"]) == 2 and r["mask_sentinels"]   # CLIP's causal mask, not an overflow
    # the encoder's calls (prompt, then the empty negative, per prompt), first and last: labelled by their token ids
    assert r["inputs"] == ["prompt 0: 'a photograph of an astronaut riding a ho'", "prompt 1 negative (empty)"]


def test_bad_limits_and_foreign_write_config_are_refused_first(tmp_path, capsys):
    """--steps / --inputs are bounded (every step's inputs are held in memory), and --write-config never
    replaces a file debug-precision did not write; both refused (exit 2, one line) before any work."""
    for flags in (["--steps", "100000"], ["--inputs", "5000"]):
        assert main(["-q", "debug-precision", str(tmp_path / "none"), *flags]) == 2
        assert "at most 1000" in capsys.readouterr().err
    mine = tmp_path / "sd15.yaml"
    mine.write_text("# my config\nprecision: fp16\n")
    assert main(["-q", "debug-precision", str(tmp_path / "none"), "--write-config", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was not written by debug-precision" in err[0]
    assert mine.read_text() == "# my config\nprecision: fp16\n"


def test_layer_reference_runs_on_the_cpu_whatever_the_test_side(tmp_path, monkeypatch):
    """On CUDA ONNX Runtime's default TF32 would round the fp32 reference's products to 10 mantissa bits, below
    fp16's 11: the reference graph always runs on the CPU provider, the graph under test on the ones asked for."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ldm_deploy.export import layers

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                               helper.make_node("Relu", ["h"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    seen, original = [], layers.ort_runner
    monkeypatch.setattr(layers, "ort_runner", lambda p, name, providers=("cpu",): (
        seen.append((name, tuple(providers))), original(p, name, ("cpu",)))[1])
    report = layers.compare_layers(path, path, [{"x": np.ones((2, 4), np.float32)}], tolerance=1e-4,
                                   providers=("cuda", "cpu"))
    assert seen == [("fp32", ("cpu",)), ("fp16", ("cuda", "cpu"))]
    assert report.passed and {s.tensor for s in report.layers} >= {"h", "y"}
