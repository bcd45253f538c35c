"""The denoising loop on the device (runtime/device_loop.py, export/step_graph.py, runners/ort_loop.py), on CPU:
the per-step tables reproduce the numpy samplers; the loop step graph run by OrtLoopRunner on ORT CPU gives the
pipeline's host-loop latents; the pipeline takes the device loop only where it may (ddim / euler, no callback,
no eta); a graph that is not a step graph is refused in one line. The CUDA capture: test_ort_cuda_device_loop.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from ldm_deploy.errors import LdmError
from ldm_deploy.runtime import device_loop as dl
from ldm_deploy.runtime import schedulers as sch

ort = pytest.importorskip("onnxruntime")

SD_CONFIG = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False,
             "set_alpha_to_one": False}


def _model(x_in, t):
    """A smooth non-linear stand-in for the U-Net: the tables must hold for any model output."""
    return np.tanh(x_in * 0.7 + np.float32(t) * 1e-3) * np.float32(0.9) + np.float32(0.05)


@pytest.mark.parametrize("sampler", dl.LOOP_SAMPLERS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_tables_reproduce_the_numpy_sampler(sampler, prediction_type):
    config = {**SD_CONFIG, "prediction_type": prediction_type}
    schedule = sch.make_schedule(sampler, config, 12)
    x = sch.start_latent(schedule, np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32))
    want = sch.sample(sampler, _model, x.copy(), schedule)
    got = dl.reference_loop(dl.loop_tables(sampler, schedule), _model, x.copy())
    # float32 rounding of the coefficients and of the two products, compounded over 12 steps
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() <= 1e-5 * scale, (sampler, prediction_type)


def test_samplers_that_cannot_loop_on_the_device_are_named():
    ddim = sch.make_schedule("ddim", SD_CONFIG, 5)
    assert dl.why_not("ddim", ddim) is None
    assert "eta" in dl.why_not("ddim", ddim, eta=0.5)
    assert "clip" in dl.why_not("ddim", sch.make_schedule("ddim", {**SD_CONFIG, "clip_sample": True}, 5))
    ancestral = sch.make_schedule("euler-ancestral", SD_CONFIG, 5)
    assert "noise" in dl.why_not("euler-ancestral", ancestral)
    with pytest.raises(LdmError, match="cannot run on the device: .*eta"):
        dl.loop_tables("ddim", ddim, eta=1.0)


def test_single_step_tables_return_the_model_output_exactly():
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)
    got = dl.reference_loop(dl.single_step_tables(321.0), _model, x)
    assert np.array_equal(got, _model(x, 321.0))


# --- the step graph on ORT CPU -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from ldm_deploy.bench.prepare import random_model_folder
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model

    root = tmp_path_factory.mktemp("devloop")
    folder = random_model_folder("tiny", root / "model")[0]
    config = load_config("tiny").replace(components=("text_encoder", "unet", "vae_decoder"), measure_runtime=False)
    return export_model(folder, root / "art", config).path


@pytest.fixture(scope="module")
def step_graph(artifact, tmp_path_factory):
    """(name, path, entry) of the tiny U-Net folded and wrapped into the loop step graph, outside the artifact."""
    from ldm_deploy.export import onnx_io
    from ldm_deploy.export.cfg_fold import fold_cfg, is_folded
    from ldm_deploy.export.ort_optimize import variant_entry
    from ldm_deploy.export.step_graph import add_loop_step

    model = onnx.load(str(artifact / "unet" / "model.onnx"))
    if not is_folded(model.graph):
        fold_cfg(model)
    add_loop_step(model)
    onnx.checker.check_model(model)
    work = tmp_path_factory.mktemp("loopgraph")
    path = work / "unet" / "model.loop.onnx"
    onnx_io.save_model(model, path)
    return "loop", path, variant_entry(work, path, {"precision": "fp32", "fused_ops": {}, "nodes_before": 0,
                                                    "nodes_after": 0, "seconds": 0, "cfg_folded": True})


def _loop_runner(artifact, step_graph):
    from ldm_deploy.runtime.runners.ort import SessionFromArtifact
    from ldm_deploy.runtime.runners.ort_loop import OrtLoopRunner

    return OrtLoopRunner(SessionFromArtifact(artifact, "unet", graph=step_graph))


def _pipeline(artifact, unet):
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.runtime.pipeline import Pipeline
    from ldm_deploy.runtime.runners.ort import OrtCpuRunner
    from ldm_deploy.runtime.tokenizer import ClipTokenizer

    art = Artifact.open(artifact)
    runners = {c: OrtCpuRunner(art, c) for c in ("text_encoder", "vae_decoder")}
    runners["unet"] = unet
    return Pipeline(ClipTokenizer.from_dir(art.tokenizer_dir), runners, art.info, backend="ort-cpu")


def test_step_graph_io(step_graph):
    from ldm_deploy.export.step_graph import PREFIX, add_loop_step, is_step_graph

    _, path, entry = step_graph
    model = onnx.load(str(path))
    assert is_step_graph(model.graph)
    assert [o["name"] for o in entry["outputs"]] == [dl.LATENTS_NEXT, dl.STEP_NEXT]
    names = [i["name"] for i in entry["inputs"]]
    assert names[:6] == [dl.LATENTS, dl.STEP, *dl.TABLES] and "guidance_scale" in names and "sample" not in names
    # the wrapper adds no shape arithmetic: ORT would put it on the CPU and the CUDA capture would fail
    added = {n.op_type for n in model.graph.node if n.name.startswith(PREFIX)}
    assert added and not {"Shape", "Size", "Expand", "Reshape"} & added
    with pytest.raises(LdmError, match="already a loop step graph"):
        add_loop_step(model)


def test_a_graph_that_is_not_folded_is_refused(artifact):
    from ldm_deploy.export.cfg_fold import is_folded
    from ldm_deploy.export.step_graph import add_loop_step

    model = onnx.load(str(artifact / "unet" / "model.onnx"))
    if is_folded(model.graph):
        pytest.skip("this export folds CFG into its plain graph")
    with pytest.raises(LdmError, match="wraps a CFG-folded U-Net"):
        add_loop_step(model)


def test_loop_runner_refuses_a_graph_that_is_not_a_step_graph(artifact):
    from ldm_deploy.runtime.runners.ort import SessionFromArtifact
    from ldm_deploy.runtime.runners.ort_loop import OrtLoopRunner

    with pytest.raises(LdmError, match="is not a loop step graph") as e:
        OrtLoopRunner(SessionFromArtifact(artifact, "unet"))
    assert "\n" not in str(e.value)


def test_loop_runner_call_is_one_folded_unet_evaluation(artifact, step_graph):
    from ldm_deploy.export.cfg_fold import fold_cfg, folded_inputs, is_folded, symmetric_unet_inputs
    from ldm_deploy.runtime import guidance as g

    model = onnx.load(str(artifact / "unet" / "model.onnx"))
    folded = ort.InferenceSession((model if is_folded(model.graph) else fold_cfg(model)).SerializeToString(),
                                  providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    d = next(i.shape[2] for i in folded.get_inputs() if i.name == g.CONTEXT)
    plain = {g.SAMPLE: rng.standard_normal((4, 4, 8, 8), dtype=np.float32), g.TIMESTEP: np.full(4, 301.0, np.float32),
             g.CONTEXT: rng.standard_normal((4, 77, d), dtype=np.float32)}
    feeds = folded_inputs(symmetric_unet_inputs(plain), 7.5)
    with _loop_runner(artifact, step_graph) as unet:
        assert unet.input_names[:2] == [g.SAMPLE, g.TIMESTEP] and unet.output_names == [g.OUTPUT]
        got = unet(feeds)[g.OUTPUT]
    want = folded.run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_bench_times_a_loop_step_of_a_device_loop_runner(artifact, step_graph):
    """bench/ort_side.isolated_step: for the loop runner, one step of its loop (captured on CUDA), which returns the
    U-Net's output as the runner's own call does; any other runner is called as it is."""
    from ldm_deploy.bench.ort_side import isolated_step
    from ldm_deploy.export.cfg_fold import folded_inputs, symmetric_unet_inputs
    from ldm_deploy.runtime import guidance as g
    from ldm_deploy.runtime.runners.ort import OrtCpuRunner

    rng = np.random.default_rng(4)
    with _loop_runner(artifact, step_graph) as unet, OrtCpuRunner(artifact, "unet") as plain:
        d = next(i.shape[2] for i in unet.spec.inputs if i.name == g.CONTEXT)
        feeds = folded_inputs(symmetric_unet_inputs({
            g.SAMPLE: rng.standard_normal((2, 4, 8, 8), dtype=np.float32), g.TIMESTEP: np.full(2, 611.0, np.float32),
            g.CONTEXT: rng.standard_normal((2, 77, d), dtype=np.float32)}), 7.5)
        np.testing.assert_array_equal(isolated_step(unet, feeds)(), unet(feeds)[g.OUTPUT])
        plain_feeds = symmetric_unet_inputs({g.SAMPLE: feeds[g.SAMPLE].repeat(2, 0), g.TIMESTEP: np.full(2, 611.0,
                                             np.float32), g.CONTEXT: feeds[g.CONTEXT]})
        np.testing.assert_array_equal(isolated_step(plain, plain_feeds)()[g.OUTPUT], plain(plain_feeds)[g.OUTPUT])


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_device_loop_pipeline_equals_the_host_loop(artifact, step_graph, scheduler):
    from ldm_deploy.runtime.runners.ort import OrtCpuRunner

    kwargs = dict(steps=6, guidance=7.5, scheduler=scheduler, seed=1, num_images=2)
    with _pipeline(artifact, OrtCpuRunner(artifact, "unet")) as host, \
            _pipeline(artifact, _loop_runner(artifact, step_graph)) as device:
        latents = {}
        for name, pipe in (("host", host), ("device", device)):
            # the decoder sees the final latents: keep them
            decode, kept = pipe.decode, []
            pipe.decode = lambda x, decode=decode, kept=kept: kept.append(x.copy()) or decode(x)
            result = pipe("a red cube", **kwargs)
            latents[name] = kept[0]
            assert result.timings["unet_calls"] == 6
            assert bool(result.timings.get("device_loop")) == (name == "device")
    want = latents["host"]
    # the same graph ops and float32 update order: only ORT's own scheduling of the sums may differ
    assert np.abs(latents["device"] - want).max() <= 1e-5 * float(np.abs(want).max())


def test_pipeline_keeps_the_host_loop_where_the_device_loop_cannot_run(artifact, step_graph, caplog, monkeypatch):
    from ldm_deploy.runtime import pipeline

    monkeypatch.setattr(pipeline, "_LOOP_DECLINED", set())
    with _pipeline(artifact, _loop_runner(artifact, step_graph)) as pipe:
        steps = []
        result = pipe("a red cube", steps=3, guidance=7.5, scheduler="ddim", seed=1,
                      callback=lambda i, n, x: steps.append(i))
        assert steps == [0, 1, 2] and "device_loop" not in result.timings   # a callback sees every step
        assert result.timings["device_loop_declined"] == 1
        for _ in range(2):   # the reason is logged once, not per request
            result = pipe("a red cube", steps=3, guidance=7.5, scheduler="euler-ancestral", seed=1)
            assert "device_loop" not in result.timings and result.timings["unet_calls"] == 3
    said = [r.getMessage() for r in caplog.records if "device loop is not used" in r.getMessage()]
    assert len(said) == 2 and "callback" in said[0] and "noise" in said[1]


# --- the product path: `export --ort-cuda --device-loop`, `Pipeline.from_artifact(device_loop=True)`, generate --

@pytest.fixture(scope="module")
def loop_artifact(tmp_path_factory) -> Path:
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model
    from tests.export.test_ort_optimize import make_sd_like_folder

    root = tmp_path_factory.mktemp("looped")
    config = load_config("tiny").replace(components=("text_encoder", "unet", "vae_decoder"), measure_runtime=False,
                                         precision="fp16", ort_cuda=True, ort_cuda_device_loop=True)
    return export_model(make_sd_like_folder(root / "model"), root / "art", config).path


def test_export_writes_the_device_loop_variant(loop_artifact):
    from ldm_deploy.artifact import ORT_CUDA_LOOP_VARIANT, ORT_CUDA_VARIANT, Artifact
    from ldm_deploy.export.step_graph import is_step_graph
    from tests.export.test_ort_optimize import assert_loadable

    unet = Artifact.open(loop_artifact, verify=True).manifest["components"]["unet"]   # hashes cover the new file
    loop, fused = unet["variants"][ORT_CUDA_LOOP_VARIANT], unet["variants"][ORT_CUDA_VARIANT]
    assert loop["file"] == "unet/model.ort-cuda-loop.onnx" and loop["device_loop"] and loop["cfg_folded"]
    assert loop["precision"] == fused["precision"] == "fp16"
    assert [i["name"] for i in loop["inputs"]][:2] == [dl.LATENTS, dl.STEP]
    assert loop["nodes_before"] == fused["nodes_after"]
    assert_loadable(loop_artifact / loop["file"])
    graph = onnx.load(str(loop_artifact / loop["file"])).graph
    assert is_step_graph(graph)
    # the U-Net inside went through the graph passes (export/step_graph.py LOOP_PASSES): the bench's best side
    from collections import Counter

    from ldm_deploy.export.step_graph import LOOP_PASSES

    assert loop["graph_passes"] == LOOP_PASSES
    ops, plain = Counter(n.op_type for n in graph.node), Counter(
        n.op_type for n in onnx.load(str(loop_artifact / fused["file"])).graph.node)
    assert ops["Transpose"] < plain["Transpose"] and ops["Cast"] < plain["Cast"]
    assert loop["fused_ops"] == {op: ops[op] for op in fused["fused_ops"]}


def test_device_loop_export_settings_are_checked():
    from ldm_deploy.errors import UsageError
    from ldm_deploy.export.config import load_config

    tiny = load_config("tiny")
    assert "ort_cuda_device_loop" not in tiny.key()   # artifacts exported before the key stay cached
    for bad in ({"ort_cuda": False}, {"ort_cuda": True, "ort_cuda_fold_cfg": False},
                {"ort_cuda": True, "components": ("text_encoder", "vae_decoder")},
                {"ort_cuda": True, "lora_switchable": "linear"}):
        with pytest.raises(UsageError) as e:
            tiny.replace(ort_cuda_device_loop=True, **bad)
        assert "\n" not in str(e.value)


def test_pipeline_device_loop_is_refused_before_anything_opens(artifact, loop_artifact):
    from ldm_deploy.errors import UsageError
    from ldm_deploy.runtime.pipeline import Pipeline

    with pytest.raises(UsageError, match="runs on the ort-cuda backend"):
        Pipeline.from_artifact(loop_artifact, backend="ort-cpu", device_loop=True)
    # an artifact without the variant: named with the export that makes it (no CUDA needed to refuse)
    with pytest.raises(LdmError, match="no device-loop U-Net") as e:
        Pipeline.from_artifact(artifact, backend="ort-cuda", device_loop=True)
    assert "--device-loop" in str(e.value)


def test_generate_device_loop_needs_ort_cuda(loop_artifact, tmp_path, capsys):
    from ldm_deploy.cli import main

    out = tmp_path / "a.png"
    assert main(["generate", str(loop_artifact), "--prompt", "x", "--device-loop", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "device loop runs on the ort-cuda backend" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_generate_device_loop_runs_the_loop_on_the_device(artifact, step_graph, tmp_path, monkeypatch):
    """The CLI's wiring: `generate --device-loop` must not pass its progress callback (which would make the pipeline
    decline the device loop). The pipeline is the real one over the loop runner on ORT CPU (no CUDA here): only the
    opening is replaced, since `device_loop=True` refuses the CPU backend."""
    from ldm_deploy.cli import main
    from ldm_deploy.runtime.pipeline import Pipeline
    from ldm_deploy.runtime.runners.ort_loop import OrtLoopRunner

    loops = []
    real = OrtLoopRunner.sample_loop
    monkeypatch.setattr(OrtLoopRunner, "sample_loop", lambda self, x, tables, cond, **kw:
                        loops.append(tables.steps) or real(self, x, tables, cond, **kw))
    monkeypatch.setattr(Pipeline, "from_artifact", classmethod(
        lambda cls, path, backend="ort-cpu", device_loop=False, **opts:
        _pipeline(artifact, _loop_runner(artifact, step_graph))))
    out = tmp_path / "a.png"
    assert main(["generate", str(artifact), "--prompt", "x", "--steps", "4", "--backend", "ort-cuda", "--device-loop",
                 "--scheduler", "ddim", "-q", "--out", str(out)]) == 0
    assert loops == [4] and out.is_file()
