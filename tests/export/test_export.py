"""Export the tiny SD1-like and SD2-like models and hold every graph to PyTorch.

Three exports, each once per module: tiny fp32 (all components), tiny-sd2 fp16 (all components,
fp16 VAE, fp32 U-Net kept beside) and tiny fp16 (text encoder + U-Net). Each graph runs batch 1..4
(U-Net 2..8, the CFG batch) through one session and is compared with the torch module.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from ldm_deploy.artifact import Artifact
from ldm_deploy.cli import main as cli
from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError
from ldm_deploy.export.config import ExportConfig, Range
from ldm_deploy.export.exporter import export_model
from ldm_deploy.export.onnx_export import graph_module
from ldm_deploy.export.optimize import cast_inputs, ort_session
from ldm_deploy.export.source import load_source, math_attention
from ldm_deploy.export.validate import validate
from ldm_deploy.feeds import example_feeds

TINY = dict(batch=Range(1, 1, 4), height=Range(64, 64, 64), width=Range(64, 64, 64), measure_runtime=False)
RTOL = {"fp32": 1e-4, "fp16": 2e-2}


@pytest.fixture(scope="module")
def sd1_fp32(tiny_folder, tmp_path_factory):
    return export_model(tiny_folder, tmp_path_factory.mktemp("onnx") / "sd1-fp32", ExportConfig(name="t", **TINY))


@pytest.fixture(scope="module")
def sd2_fp16(tiny_sd2_folder, tmp_path_factory):
    cfg = ExportConfig(precision="fp16", vae_precision="fp16", keep_fp32_unet=True, **TINY)
    return export_model(tiny_sd2_folder, tmp_path_factory.mktemp("onnx") / "sd2-fp16", cfg)


@pytest.fixture(scope="module")
def sd1_fp16(tiny_folder, tmp_path_factory):
    cfg = ExportConfig(precision="fp16", components=("text_encoder", "unet"), optimize=False, **TINY)
    return export_model(tiny_folder, tmp_path_factory.mktemp("onnx") / "sd1-fp16", cfg)


def _check_against_torch(folder, art: Artifact, component: str, graph: str | None = None, rtol=None):
    source = load_source(folder, [component])
    module = graph_module(component, source, ExportConfig.from_dict(art.manifest["export_config"]))
    spec = art.component(component)
    path = art.path / (graph or spec.file)
    sess = ort_session(path)
    vocab = source.configs.get("text_encoder", {}).get("vocab_size", 1000)
    rtol = rtol or RTOL[spec.precision]
    for b in (1, 2, 3, 4):                                   # one graph, every batch in the profile
        inputs = example_feeds(art.component(component), b, seed=b, vocab_size=vocab, float_dtype=np.float32)
        with torch.no_grad(), math_attention(source.text_encoder):
            expected = module(*(torch.from_numpy(a) for a in inputs.values()))
        expected = expected if isinstance(expected, tuple) else (expected,)
        actual = sess.run(spec.output_names, cast_inputs(sess, inputs))
        for name, a, e in zip(spec.output_names, actual, expected):
            assert a.shape == tuple(e.shape), (component, name, b)
            assert_close(a.astype(np.float32), e.numpy(), rtol=rtol, name=f"{component}.{name}[B={b}]")


COMPONENTS = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]


@pytest.mark.parametrize("component", COMPONENTS)
def test_sd1_fp32_matches_torch(sd1_fp32, tiny_folder, component):
    _check_against_torch(tiny_folder, sd1_fp32.artifact, component)


@pytest.mark.parametrize("component", COMPONENTS)
def test_sd2_fp16_matches_torch(sd2_fp16, tiny_sd2_folder, component):
    _check_against_torch(tiny_sd2_folder, sd2_fp16.artifact, component)


def test_sd2_kept_fp32_unet_matches_torch(sd2_fp16, tiny_sd2_folder):
    entry = sd2_fp16.artifact.manifest["components"]["unet"]
    assert entry["fp32_file"] == "unet/model_fp32.onnx" and entry["fp32_file"] in sd2_fp16.artifact.manifest["files"]
    _check_against_torch(tiny_sd2_folder, sd2_fp16.artifact, "unet", graph=entry["fp32_file"], rtol=1e-4)


@pytest.mark.parametrize("component", ["text_encoder", "unet"])
def test_sd1_fp16_matches_torch(sd1_fp16, tiny_folder, component):
    _check_against_torch(tiny_folder, sd1_fp16.artifact, component)


def test_io_contract_and_manifest(sd1_fp32, sd2_fp16):
    for res, prec in ((sd1_fp32, "float32"), (sd2_fp16, "float16")):
        art, m = res.artifact, res.artifact.manifest
        unet = art.components["unet"]
        assert [(t.name, t.dtype, t.shape[0]) for t in unet.inputs] == [
            ("sample", prec, "unet_batch"), ("timestep", "float32", "unet_batch"),
            ("encoder_hidden_states", prec, "unet_batch")]
        assert unet.outputs[0].name == "noise_pred" and unet.batch_multiplier == 2
        assert unet.profile["sample"]["max"][0] == 8 and unet.profile["sample"]["min"][0] == 2
        te = art.components["text_encoder"]
        assert (te.inputs[0].name, te.inputs[0].dtype, te.inputs[0].shape) == ("input_ids", "int32", ("batch", 77))
        assert art.components["vae_decoder"].outputs[0].shape == ("batch", 3, 64, 64)
        assert [t.name for t in art.components["vae_encoder"].outputs] == ["mean", "logvar"]
        for c in art.components.values():
            graph = onnx.load(str(art.path / c.file), load_external_data=False)
            assert graph.opset_import[0].version >= 17
            dims = [d.dim_param for v in list(graph.graph.input) + list(graph.graph.output)
                    for d in v.type.tensor_type.shape.dim if d.dim_param]
            assert set(dims) <= {"batch", "unet_batch"}, dims    # static sizes, named batch axes
        assert m["scaling_factor"] > 0 and m["latent_channels"] == 4 and m["vae_scale_factor"] == 8
        assert set(m["model"]) == {"unet", "vae", "text_encoder"} and m["scheduler"]["_class_name"]
        assert (art.tokenizer_dir / "vocab.json").is_file() and (art.path / "export_config.yaml").is_file()
        assert all(k in m["tools"] for k in ("torch", "onnx", "onnxruntime"))
        assert m["components"]["unet"]["export"]["cleanup"]["nodes_after"] < m["components"]["unet"]["export"]["cleanup"]["nodes_before"]
    assert sd2_fp16.artifact.prediction_type == "v_prediction"
    assert sd2_fp16.artifact.manifest["tokenizer"]["pad_token"]


def test_cache_and_tamper(sd1_fp32, tiny_folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(sd1_fp32.path, out)
    cfg = ExportConfig(name="t", **TINY)
    again = export_model(tiny_folder, out, cfg)
    assert again.cached and again.seconds < 10
    with open(out / "unet" / "model.onnx", "r+b") as f:      # flip bytes inside the graph
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(LdmError, match=r"unet/model\.onnx .* does not match its sha256"):
        Artifact.open(out)
    assert not export_model(tiny_folder, out, cfg.replace(components=("text_encoder",))).cached


def test_validate_passes_then_fails_on_perturbed_weight(sd1_fp32, tiny_folder, tmp_path, capsys):
    report = validate(tiny_folder, sd1_fp32.path, components=["unet", "text_encoder"])
    assert report.passed, report.table()
    assert {c.case for c in report.checks} == {"min", "opt", "max"}
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    from safetensors.torch import load_file, save_file
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd["conv_out.bias"] = sd["conv_out.bias"] + 0.05
    save_file(sd, weights)
    code = cli(["validate", str(broken), str(sd1_fp32.path), "--components", "unet"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "differs from the folder" in out


@pytest.mark.slow
def test_dynamic_sizes_odd_case(tiny_folder, tmp_path):
    cfg = ExportConfig(components=("unet",), batch=Range(1, 1, 2), height=Range(64, 64, 96),
                       width=Range(64, 64, 64), measure_runtime=False, optimize=False)
    res = export_model(tiny_folder, tmp_path / "dyn", cfg)
    assert res.artifact.components["unet"].inputs[0].shape == ("unet_batch", 4, "latent_height", "latent_width")
    report = validate(tiny_folder, res.path)
    assert report.passed, report.table()
    assert any(c.case == "odd" and c.shape == "2x4x11x8" for c in report.checks), report.table()


def test_cli_export_reports_cache(tiny_folder, sd1_fp32, tmp_path, caplog):
    out = tmp_path / "cli"
    shutil.copytree(sd1_fp32.path, out)
    cfg = tmp_path / "t.yaml"
    cfg.write_text(json.dumps({"name": "t", "measure_runtime": False,
                               "profiles": {"batch": {"min": 1, "opt": 1, "max": 4}, "height": 64, "width": 64}}))
    caplog.set_level("INFO")
    assert cli(["export", str(tiny_folder), "--out", str(out), "--config", str(cfg)]) == 0
    assert "export (cached)" in caplog.text
    assert cli(["export", str(tiny_folder), "--out", str(out), "--config", str(tmp_path / "nope.yaml")]) == 1
