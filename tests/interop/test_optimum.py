"""`ldm-deploy import` on folders Optimum really wrote, and the hint every other command gives for them.

Parity: the numpy pipeline over the imported graphs (ORT CPU) against diffusers' own PyTorch
StableDiffusionPipeline on the same diffusers folder, same initial latents, 4 steps, CFG 7.5, two prompts.
>= 48 dB: both sides are float32 and the adapters add only renames/casts/gathers, so what differs is
summation order in ORT vs torch kernels (the 40 dB bound of tests/runtime/test_e2e_parity.py is for
the exporter's own re-traced graphs; measured here: 79-inf dB).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from ldm_deploy.cli import main
from ldm_deploy.runtime.pipeline import Pipeline
from tests.interop.conftest import GUIDANCE, NEGATIVE, PROMPTS, STEPS
from tests.runtime.tiny_model import psnr

SCHEDULERS = ("ddim", "euler", "dpmpp-2m")
pytestmark = pytest.mark.slow   # the session fixture makes and exports two folders in the optimum venv (~1 min)


@pytest.fixture(scope="module")
def pipe(imported):
    return Pipeline.from_artifact(imported)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_imported_optimum_export_equals_diffusers(pipe, optimum_case, interop_inputs, scheduler):
    ref = optimum_case["reference"][scheduler]
    ours = pipe(PROMPTS, negative_prompt=[NEGATIVE] * 2, steps=STEPS, guidance=GUIDANCE, scheduler=scheduler,
                latents=interop_inputs["latents"]).images
    assert ref.std() > 10, "the tiny model should make images with structure"
    assert psnr(ours, ref) >= 48, (optimum_case["family"], scheduler, psnr(ours, ref))


def test_imported_manifest(imported, optimum_case):
    from ldm_deploy.artifact import Artifact

    art = Artifact.open(imported)
    m = art.manifest
    assert m["import"]["layout"] == "optimum" and set(art.components) == {"text_encoder", "unet", "vae_decoder",
                                                                          "vae_encoder"}
    assert art.prediction_type == ("v_prediction" if optimum_case["family"] == "sd2" else "epsilon")
    assert [(t.name, t.dtype) for t in art.component("text_encoder").inputs] == [("input_ids", "int32")]
    unet = art.component("unet")
    assert unet.input_names == ["sample", "timestep", "encoder_hidden_states"] and unet.output_names == ["noise_pred"]
    assert unet.inputs[1].shape == ("unet_batch",) and unet.batch_multiplier == 2
    assert art.component("vae_encoder").output_names == ["mean", "logvar"]
    assert art.component("vae_decoder").input_names == ["latent"] and art.component("vae_decoder").output_names == ["image"]
    # native size = sample_size 4 x VAE factor 8 = 32; dynamic graphs get native/2 .. 2 x native
    assert (art.profiles.height.min, art.profiles.height.opt, art.profiles.height.max) == (16, 32, 64)
    assert any("Cast" in line for line in m["components"]["text_encoder"]["import"]["added"])


def test_validate_imported_against_the_original_graphs(imported, optimum_case, capsys):
    assert main(["validate", str(optimum_case["optimum"]), str(imported)]) == 0
    out = capsys.readouterr().out
    assert "original graphs" in out and out.strip().endswith("PASS") and "vae_encoder" in out


def test_img2img_on_the_imported_vae_encoder(imported_sd1):
    pipe = Pipeline.from_artifact(imported_sd1)
    init = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    r = pipe("a red circle", image=init, strength=0.5, steps=4, seed=3)
    assert r.images.shape == (1, 32, 32, 3) and r.images.std() > 1


def test_generate_and_inspect_cli(imported_sd1, tmp_path, capsys):
    assert main(["generate", str(imported_sd1), "--prompt", "a red circle", "--out", str(tmp_path / "a.png"),
                 "--steps", "2"]) == 0
    assert (tmp_path / "a.png").is_file()
    assert main(["inspect", str(imported_sd1)]) == 0
    assert "imported from an ONNX folder (optimum layout" in capsys.readouterr().out


def test_import_is_cached_and_force_redoes_it(optimum_sd1, tmp_path):
    from ldm_deploy.interop.importer import import_onnx_folder

    first = import_onnx_folder(optimum_sd1["optimum"], tmp_path / "a", height=(32, 32, 32), width=(32, 32, 32))
    assert not first.cached and first.artifact.profiles.height.static
    assert import_onnx_folder(optimum_sd1["optimum"], tmp_path / "a", height=(32, 32, 32), width=(32, 32, 32)).cached
    assert not import_onnx_folder(optimum_sd1["optimum"], tmp_path / "a", height=(32, 32, 32),
                                  width=(32, 32, 32), force=True).cached


@pytest.mark.parametrize("argv", [
    ["generate", "{f}", "--prompt", "x", "--out", "{out}/a.png"],
    ["export", "{f}", "--out", "{out}"],
    ["build", "{f}", "--out", "{out}"],
    ["validate", "{model}", "{f}"],
    ["bench", "{f}", "--out", "{out}", "--sides", "ort-cpu"],
])
def test_other_commands_point_at_import(optimum_sd1, tmp_path, capsys, argv):
    argv = [a.format(f=optimum_sd1["optimum"], model=optimum_sd1["model"], out=tmp_path / "out") for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"ldm-deploy import {optimum_sd1['optimum']} --out ARTIFACT" in err, err
    assert not (tmp_path / "out").exists()


def test_inspect_names_the_folder_and_the_import_command(optimum_sd1, capsys):
    assert main(["inspect", str(optimum_sd1["optimum"])]) == 0
    out = capsys.readouterr().out
    assert "ONNX pipeline folder" in out and "ldm-deploy import" in out and "out_sample" in out
    assert main(["inspect", str(optimum_sd1["optimum"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "onnx-folder" and info["parameters"] > 0


def test_bad_input_is_one_line_and_writes_nothing(optimum_sd1, tmp_path, capsys):
    cases = [(tmp_path / "missing", "is not a folder"),
             (optimum_sd1["model"], "use `ldm-deploy export` instead")]
    partial = tmp_path / "partial"
    import shutil
    shutil.copytree(optimum_sd1["optimum"], partial)
    shutil.rmtree(partial / "unet")
    cases.append((partial, "lacks unet/model.onnx"))
    broken = tmp_path / "broken"
    shutil.copytree(optimum_sd1["optimum"], broken)
    (broken / "vae_decoder" / "model.onnx").write_bytes(b"not a protobuf")
    cases.append((broken, "vae_decoder"))
    for src, words in cases:
        assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 1, src
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()
    assert main(["import", str(optimum_sd1["optimum"]), "--out", str(tmp_path / "out"), "--height", "30"]) == 2
    assert "multiples of the VAE scale factor 8" in capsys.readouterr().err


# --- the other direction: `export --layout optimum` --------------------------------------------------------
@pytest.fixture(scope="module")
def optimum_layout(optimum_case, tmp_path_factory):
    """Our export of the diffusers folder, written in the Optimum / OnnxStableDiffusionPipeline layout."""
    out = tmp_path_factory.mktemp(f"layout-{optimum_case['family']}") / "sd-onnx"
    config = out.parent / "profile.yaml"
    config.write_text("precision: fp32\nprofiles:\n  batch: {min: 1, opt: 2, max: 2}\n"
                      "  height: {min: 32, opt: 32, max: 32}\n  width: {min: 32, opt: 32, max: 32}\n")
    assert main(["-q", "export", str(optimum_case["model"]), "--out", str(out), "--config", str(config),
                 "--layout", "optimum"]) == 0
    return out


def test_export_layout_optimum_runs_in_optimum_and_diffusers(optimum_layout, interop_inputs, tmp_path):
    from tests.interop.conftest import optimum_side

    optimum_side("run-onnx", "--folder", str(optimum_layout), "--latents", interop_inputs["latents_file"],
                 "--prompts", interop_inputs["prompts_file"], "--out", str(tmp_path / "onnx.npz"))
    theirs = np.load(tmp_path / "onnx.npz")
    ours = Pipeline.from_artifact(str(optimum_layout) + ".artifact")(
        PROMPTS, negative_prompt=[NEGATIVE] * 2, steps=STEPS, guidance=GUIDANCE, scheduler="ddim",
        latents=interop_inputs["latents"]).images
    assert set(theirs.files) == {"diffusers-onnx", "optimum"}
    for name in theirs.files:
        assert theirs[name].std() > 10
        assert psnr(theirs[name], ours) >= 48, (name, psnr(theirs[name], ours))


def test_hub_layout_folder_imports_back(optimum_layout, interop_inputs, tmp_path):
    """The folder `--layout optimum` writes is the Hub's OnnxStableDiffusionPipeline layout (timestep [1]):
    importing it gives our images back."""
    from ldm_deploy.interop.importer import import_onnx_folder

    art = import_onnx_folder(optimum_layout, tmp_path / "back").artifact
    assert art.manifest["import"]["layout"] == "onnx-pipeline"
    kw = dict(negative_prompt=[NEGATIVE] * 2, steps=STEPS, guidance=GUIDANCE, scheduler="euler",
              latents=interop_inputs["latents"])
    a = Pipeline.from_artifact(art.path)(PROMPTS, **kw).images
    b = Pipeline.from_artifact(str(optimum_layout) + ".artifact")(PROMPTS, **kw).images
    assert psnr(a, b) >= 48


def test_import_needs_no_torch(optimum_sd1, tmp_path):
    """`ldm-deploy import` and `generate` on the result with torch made unimportable."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from ldm_deploy.cli import main\n"
            f"assert main(['-q', 'import', {str(optimum_sd1['optimum'])!r}, '--out', {str(tmp_path / 'a')!r}]) == 0\n"
            f"assert main(['-q', 'generate', {str(tmp_path / 'a')!r}, '--prompt', 'x', '--steps', '2', "
            f"'--out', {str(tmp_path / 'x.png')!r}]) == 0\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_bench_on_an_imported_artifact(imported_sd1, tmp_path, capsys):
    assert main(["bench", str(imported_sd1), "--sides", "ort-cpu", "--batch", "1", "--steps", "2",
                 "--out", str(tmp_path / "bench.json")]) == 0
    assert "ort-cpu" in capsys.readouterr().out and (tmp_path / "bench.json").is_file()
    assert main(["bench", str(imported_sd1), "--out", str(tmp_path / "b2.json")]) == 2   # torch sides need the weights
    assert "--model-dir" in capsys.readouterr().err


def test_hub_style_external_weights_import(optimum_sd1, imported_sd1, interop_inputs, tmp_path):
    """The Hub's large-U-Net form: weights in `unet/weights.pb` beside the graph, OnnxStableDiffusionPipeline
    model_index; importing it gives the same images as the inline-weights folder."""
    import shutil

    import onnx

    src = tmp_path / "hub"
    shutil.copytree(optimum_sd1["optimum"], src)
    unet = onnx.load(str(src / "unet" / "model.onnx"))
    onnx.save_model(unet, str(src / "unet" / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.pb", size_threshold=0)
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "_class_name": "OnnxStableDiffusionPipeline"}))
    assert main(["-q", "import", str(src), "--out", str(tmp_path / "art")]) == 0
    kw = dict(negative_prompt=[NEGATIVE] * 2, steps=STEPS, guidance=GUIDANCE, scheduler="ddim",
              latents=interop_inputs["latents"])
    a = Pipeline.from_artifact(tmp_path / "art")(PROMPTS, **kw).images
    b = Pipeline.from_artifact(imported_sd1)(PROMPTS, **kw).images
    np.testing.assert_array_equal(a, b)
    (src / "unet" / "weights.pb").unlink()
    assert main(["import", str(src), "--out", str(tmp_path / "art2")]) == 1
    assert not (tmp_path / "art2").exists()


@pytest.mark.trt_build
def test_build_engines_from_an_imported_artifact(imported_sd1, tmp_path):
    """TensorRT (for RTX, which builds on CPU) parses the adapted graphs and builds their engines."""
    from ldm_deploy.engine.build import BuildConfig, build_engines
    from tests.engine.conftest import FAST

    report = build_engines(imported_sd1, tmp_path / "engines", BuildConfig(**FAST, components=("unet",)))
    assert report.built == ["unet"]
    sidecar = json.loads((tmp_path / "engines" / "unet.engine.json").read_text())
    assert sidecar["key"]["profile"]["timestep"]["max"] == [8]      # 2 x batch.max
