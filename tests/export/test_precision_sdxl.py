"""debug-precision on SDXL: tiny random base and refiner folders saved by diffusers (tests/runtime/tiny_sdxl.py).

The fault is SDXL's textbook one, in the VAE decoder: the conv1 of the first resnet of the last (full-resolution)
up block has its weight and bias scaled by 1e5, so its output (max |x| ~ 3 on the clean model) reaches ~3e5,
beyond fp16's 65504, on every input. norm2 (GroupNorm: Reshape -> InstanceNormalization) follows it and is
invariant to that scale (its eps, 1e-6, is nothing next to a variance of ~1e10), so the fp32 model decodes
as before while the fp16 conversion makes inf -> NaN there.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from ldm_deploy.cli import main
from tests.export.test_precision import faulty_copy
from tests.runtime.tiny_sdxl import sdxl_folders  # noqa: F401 (fixture)

pytest.importorskip("diffusers")

FAULT_LAYER, FAULT_SCALE = "decoder.up_blocks.3.resnets.0.conv1", 1e5
FAULT_NODE = "/decoder/up_blocks.3/resnets.0/conv1/Conv"
FAST = ["--no-timing", "-q"]


def _scale_the_last_up_blocks_conv(sd) -> None:
    for key in ("weight", "bias"):
        sd[f"{FAULT_LAYER}.{key}"] *= FAULT_SCALE


@pytest.fixture(scope="module")
def bad_vae(sdxl_folders, tmp_path_factory):
    return faulty_copy(sdxl_folders[0], tmp_path_factory.mktemp("sdxl-precision") / "bad", "vae",
                       _scale_the_last_up_blocks_conv)


def test_sdxl_vae_overflow_is_found_and_the_written_config_fixes_it(bad_vae, tmp_path):
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.errors import LdmError
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model
    from ldm_deploy.runtime.pipeline import Pipeline

    fix, report = tmp_path / "fixed.yaml", tmp_path / "report.json"
    # no --config: the bundled `sdxl` config (fp16 U-Net and text encoders, fp32 VAE) at the model's native size
    assert main(["debug-precision", str(bad_vae), "--component", "vae_decoder", "--inputs", "2", "--steps", "2",
                 "--write-config", str(fix), "--json", str(report), *FAST]) == 0
    r = json.loads(report.read_text())
    assert r["first_failure"]["node"] == FAULT_NODE and r["first_failure"]["op"] == "Conv"
    over = {o["node"]: o for o in r["overflows"]}
    assert over[FAULT_NODE]["fp32_max"] > 65504 and over[FAULT_NODE]["overflow_inputs"] == [0, 1]
    assert r["outputs_before"]["image"]["nonfinite"] > 0                  # the fp16 decoder makes NaN
    assert FAULT_NODE in r["keep_nodes"] and len(r["keep_nodes"]) <= 4    # conv1, norm2's Reshape and norm
    assert r["outputs_after"]["image"]["passed"]

    fixed = load_config(fix)
    assert fix.read_text().startswith("# written by `ldm-deploy debug-precision")
    assert (fixed.precision, fixed.vae_precision, fixed.vae_fp16_safe) == ("fp16", "fp16", True)
    assert fixed.fp16_keep_nodes == {"vae_decoder": tuple(r["keep_nodes"])} and fixed.name == "sdxl"
    # without the kept nodes the fp16 decoder overflows on the export's own random latents
    with pytest.raises(LdmError, match="non-finite"):
        export_model(bad_vae, tmp_path / "plain", fixed.replace(fp16_keep_nodes={}, components=("vae_decoder",)))
    art = tmp_path / "fixed"
    assert main(["export", str(bad_vae), "--out", str(art), "--config", str(fix), "-q"]) == 0
    assert main(["validate", str(bad_vae), str(art), "-q"]) == 0          # every component, vae_encoder included
    assert Artifact.open(art).component("vae_decoder").precision == "fp16"
    with Pipeline.from_artifact(art) as pipe:
        images = pipe("a red circle", steps=3, seed=0).images     # NaN would raise (check_finite)
    assert images.std() > 1.0                                     # not black or flat


def test_sdxl_vae_of_the_unmodified_model_is_clean(sdxl_folders, tmp_path):
    report = tmp_path / "report.json"
    assert main(["debug-precision", str(sdxl_folders[0]), "--component", "vae_decoder", "--inputs", "2", "--steps",
                 "2", "--json", str(report), *FAST]) == 0
    r = json.loads(report.read_text())
    assert r["clean"] and r["keep_nodes"] == [] and r["first_failure"] is None and r["overflows"] == []
    # fp16 rounding only: a few fp16 ulps (2^-11 ~ 4.9e-4) of each tensor's scale
    assert r["outputs_before"]["image"]["max_rel"] < 2e-2


def test_sdxl_unet_compares_with_time_ids_kept_fp32(sdxl_folders, tmp_path):
    """The U-Net's recorded feeds carry SDXL's pooled text_embeds and time_ids, and the candidate fp16 graph keeps
    the time_ids sinusoid in fp32 as the exporter does (size x freq reaches 1024 rad: fp16's spacing there is 1)."""
    import onnx

    from ldm_deploy.artifact import Artifact
    from ldm_deploy.export.precision import (PrecisionDebugConfig, debug_precision, representative_inputs,
                                             txt2img_graphs)

    config = PrecisionDebugConfig(str(sdxl_folders[0]), component="unet", inputs=2, steps=2, measure=False)
    report = debug_precision(config, work_dir=tmp_path)
    assert report.fixed and all("t=" in d for d in report.before.inputs)

    feeds, _ = representative_inputs(Artifact.open(tmp_path / "fp32"), config, txt2img_graphs(True, True))
    feed = feeds[0]
    assert set(feed) == {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"}
    # CFG rows [negative, positive]: the base's empty negative is zeros (force_zeros_for_empty_prompt);
    # time_ids = original size, crop top-left, target size of the 32 px native size
    assert np.array_equal(feed["time_ids"], np.tile(np.float32([32, 32, 0, 0, 32, 32]), (2, 1)))
    assert not feed["text_embeds"][0].any() and feed["text_embeds"][1].any()

    candidate = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "fp16" / "model.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in [*candidate.graph.value_info, *candidate.graph.input]}
    consumers: dict[str, list] = {}
    for node in candidate.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    path, frontier = [], ["time_ids"]                  # from time_ids up to add_embedding's first Gemm / MatMul
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type not in ("Gemm", "MatMul") and node not in path:
                path.append(node)
                frontier.extend(node.output)
    assert {"Cos", "Sin"} <= {n.op_type for n in path}
    assert types["time_ids"] == onnx.TensorProto.FLOAT
    # fp32 all the way (the Mul's argument, Cos / Sin, the Concat with text_embeds) to the Cast into the fp16 Gemm
    into_linear = [n for n in path if n.op_type == "Cast" and all(
        c.op_type in ("Gemm", "MatMul") for o in n.output for c in consumers.get(o, []))]
    halves = [n.name for n in path for o in n.output
              if types.get(o) == onnx.TensorProto.FLOAT16 and n not in into_linear]
    assert halves == [] and len(into_linear) == 1, halves


def test_sdxl_text_encoder_2_of_an_fp32_artifact(sdxl_folders, tmp_path):
    from ldm_deploy.export.config import ExportConfig, Range
    from ldm_deploy.export.exporter import export_model

    cfg = ExportConfig(name="tiny-sdxl", batch=Range(1, 1, 2), height=Range(32, 32, 32), width=Range(32, 32, 32),
                       components=("text_encoder", "text_encoder_2", "unet", "vae_decoder"), measure_runtime=False)
    art = export_model(sdxl_folders[0], tmp_path / "fp32", cfg).path
    report = tmp_path / "r.json"
    assert main(["debug-precision", str(art), "--component", "text_encoder_2", "--inputs", "2", "--steps", "1",
                 "--json", str(report), *FAST]) == 0
    r = json.loads(report.read_text())
    assert r["component"] == "text_encoder_2" and r["clean"]
    # the base encodes each prompt (its empty negative is zeros, no encoder call)
    assert [d.split(":")[0] for d in r["inputs"]] == ["prompt 0", "prompt 1"]
    assert set(r["outputs_before"]) == {"penultimate_hidden_state", "text_embeds"}


def test_refiner_has_no_text_encoder(sdxl_folders, tmp_path, capsys):
    refiner = sdxl_folders[1]
    before = sorted(p.name for p in refiner.iterdir())
    assert main(["-q", "debug-precision", str(refiner), "--component", "text_encoder",
                 "--write-config", str(tmp_path / "fix.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no text_encoder" in err[0] and "text_encoder_2, unet, vae_decoder" in err[0]
    assert sorted(p.name for p in refiner.iterdir()) == before and not (tmp_path / "fix.yaml").exists()


@pytest.mark.gpu
def test_sdxl_vae_overflow_on_cuda(bad_vae, tmp_path):
    """The same fault compared on ONNX Runtime CUDA, whose fp16 Conv computes in fp16 (the CPU casts around it),
    and the cost of the fix timed there. On an H100 with onnxruntime-gpu:

        python -m pytest -m gpu -p no:xdist tests/export/test_precision_sdxl.py
    """
    report = tmp_path / "report.json"
    assert main(["debug-precision", str(bad_vae), "--component", "vae_decoder", "--inputs", "2", "--steps", "2",
                 "--device", "cuda", "--json", str(report), "-q"]) == 0
    r = json.loads(report.read_text())
    assert FAULT_NODE in r["keep_nodes"] and r["outputs_before"]["image"]["nonfinite"] > 0
    assert r["outputs_after"]["image"]["passed"]
    assert {"ms_fp32_cuda", "ms_fp16_cuda", "ms_fp16_fixed_cuda"} <= set(r["cost"])
