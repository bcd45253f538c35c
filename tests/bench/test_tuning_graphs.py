"""The graph-tuning levers of `ldm-deploy bench --tuning` (spec.TUNING sides with a "graph" knob): their U-Net graphs
are the artifact's ort-cuda variant rewritten by ldm_deploy/export/ort_fp16_norm.py, written into the benchmark's
own folder (prepare.add_tuning_variants), run by the U-Net runner only. The GPU comparison of the graphs is
tests/runtime/test_ort_cuda_norm_layout.py."""
from __future__ import annotations

import hashlib
import json

import pytest

from ldm_deploy.bench.spec import TUNING, BenchSpec

GRAPH_SIDES = {side: t["graph"] for side, (_, t) in TUNING.items() if t.get("graph")}


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """The tiny model exported fp16 with the ort-cuda variant, and fp32 without it."""
    from ldm_deploy.bench.prepare import export_for_bench, random_model_folder

    work = tmp_path_factory.mktemp("tuning-graphs")
    model, _ = random_model_folder("tiny", work / "model", norm_bias_std=0.1)
    export_for_bench(model, work / "fused", precision="fp16", ort_cuda=True)
    export_for_bench(model, work / "plain", batch_max=1)
    return {"model": model, "fused": work / "fused", "plain": work / "plain"}


def _tree(root) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_graph_sides_are_tuning_levers_of_the_unet_only(arts):
    from ldm_deploy.bench.ort_side import _runner_options
    from ldm_deploy.bench.prepare import TUNING_GRAPHS

    from ldm_deploy.export.step_graph import LOOP_PASSES

    assert set(GRAPH_SIDES.values()) == set(TUNING_GRAPHS) and len(GRAPH_SIDES) == 8
    assert TUNING_GRAPHS["tuning-device-loop-nhwc"] == {**LOOP_PASSES, "device_loop": True}   # the export's loop graph
    spec = BenchSpec(artifact=str(arts["fused"]), sides=tuple(GRAPH_SIDES))
    for side, graph in GRAPH_SIDES.items():
        backend, opts, unet = _runner_options(spec, side)
        assert backend == "ort-cuda" and opts == {"enable_cuda_graph": True}      # text encoder / VAE as ort-cuda
        # the device-loop sides' U-Net: the loop runner over a step graph (runners/ort_loop.py)
        loop = {"device_loop": True} if TUNING_GRAPHS[graph].get("device_loop") else {}
        assert unet == {"graph": graph, "enable_cuda_graph": True, **loop}
        assert bool(loop) == side.startswith("ort-cuda-device-loop")


def test_cli_tuning_prepares_the_graphs_in_its_own_folder(arts, tmp_path, capsys):
    """`bench ARTIFACT --tuning --sides ...`: the pass graphs go to OUT.levers/ (registered, CFG-folded fp16 like the
    variant they come from), the artifact is byte-identical, a second run reuses them; the sides are skipped here
    (no CUDA) with the reason, and an artifact without the ort-cuda variant is refused in one line."""
    import onnxruntime as ort

    from ldm_deploy.bench.prepare import read_levers
    from ldm_deploy.cli import main

    art = arts["fused"]
    before = _tree(art)
    sides = ",".join(["ort-cuda", *GRAPH_SIDES])
    out = tmp_path / "t.json"
    for run in ("first", "again"):
        assert main(["bench", str(art), "--tuning", "--sides", sides, "--steps", "1", "--out", str(out), "-q"]) == 0
        assert _tree(art) == before, run
    registry = read_levers(tmp_path / "t.levers")
    graphs = registry["graphs"]
    assert set(graphs) == set(GRAPH_SIDES.values())
    for name, entry in graphs.items():
        assert (tmp_path / "t.levers" / entry["file"]).is_file() and entry["cfg_folded"] and entry["precision"] == "fp16"
        assert "guidance_scale" in [i["name"] for i in entry["inputs"]]
    assert graphs["tuning-fold-transposes"]["pass_stats"]["transposes"][1] < \
        graphs["tuning-fold-transposes"]["pass_stats"]["transposes"][0]
    assert graphs["tuning-fp16-norm"]["pass_stats"]["casts"][1] < graphs["tuning-fp16-norm"]["pass_stats"]["casts"][0]
    for name in ("tuning-conv-bias-norm", "tuning-all-passes", "tuning-device-loop-all-passes",
                 "tuning-device-loop-nhwc"):
        assert graphs[name]["pass_stats"]["conv_bias_into_norm"]["moved"] > 0, name
    nhwc = graphs["tuning-device-loop-nhwc"]["pass_stats"]
    assert nhwc["nhwc_residuals"]["concats"] > 0 and nhwc["transposes"][1] < \
        graphs["tuning-device-loop-all-passes"]["pass_stats"]["transposes"][1]
    for name in ("tuning-device-loop", "tuning-device-loop-all-passes", "tuning-device-loop-nhwc"):   # loop step graphs
        assert [o["name"] for o in graphs[name]["outputs"]] == ["latents_next", "step_next"], name
    results = json.loads(out.read_text())
    assert [r["side"] for r in results["results"]] == sides.split(",")
    assert results["spec"]["levers_dir"] == str(tmp_path / "t.levers")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert all(r["status"] == "skipped" for r in results["results"])
    capsys.readouterr()
    plain = arts["plain"]
    assert main(["bench", str(plain), "--tuning", "--sides", "ort-cuda-fold-transposes", "--out",
                 str(tmp_path / "x.json"), "-q"]) == 1
    assert "no ort-cuda U-Net variant" in capsys.readouterr().err
    assert not (tmp_path / "x.levers").exists()
    # the default --tuning sides on such an artifact: the graph levers are skipped (with the reason), not the run
    assert main(["bench", str(plain), "--tuning", "--steps", "1", "--out", str(tmp_path / "d.json"), "-q"]) == 0
    records = {r["side"]: r for r in json.loads((tmp_path / "d.json").read_text())["results"]}
    assert set(GRAPH_SIDES) <= set(records) and not (tmp_path / "d.levers").exists()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert all("no lever graph" in records[s]["reason"] for s in GRAPH_SIDES)


def test_tuning_graphs_refuse_the_artifact_folder(arts):
    from ldm_deploy.bench.prepare import add_tuning_variants
    from ldm_deploy.errors import UsageError

    with pytest.raises(UsageError, match="benchmark's own folder"):
        add_tuning_variants(arts["fused"], arts["fused"] / "levers")
    with pytest.raises(UsageError, match="unknown tuning graphs"):
        add_tuning_variants(arts["fused"], arts["fused"].parent / "w", ["tuning-nope"])
