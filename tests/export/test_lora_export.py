"""LoRA through the exporter: merged (`export --lora`) and switchable (`lora_switchable`, Pipeline.set_loras).

Reference: diffusers' `load_lora_weights` + `fuse_lora(lora_scale=...)` for the U-Net LoRAs (peft and kohya
layouts), peft's own merge for the text-encoder LoRA (diffusers cannot load it in this environment: transformers 5.25
refuses peft 0.21; tests/interop/test_lora_diffusers.py checks it against diffusers in the optimum
environment), on the same latents. fp32 export.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError
from ldm_deploy.runtime.pipeline import Pipeline
from tests.runtime.tiny_model import export_config, make_tiny_folder, psnr

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytestmark = pytest.mark.slow      # two exports of the tiny model: ~1 min on 2 loaded cores

SCALES = {"peft": 0.7, "kohya": 0.5, "te": 0.8}
PROMPTS, STEPS = ["a red circle on a blue square", "a green triangle"], 4
COMPONENTS = ("text_encoder", "unet", "vae_decoder")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("lora-model") / "model")


@pytest.fixture(scope="module")
def files(sd_folder, tmp_path_factory):
    from tests.lora_files import make_lora_files

    return make_lora_files(sd_folder, tmp_path_factory.mktemp("lora-files"))


def specs(files, names=("peft", "kohya", "te")):
    return [f"{files[n]}:{SCALES[n]}" for n in names]


def _config(**kw):
    return export_config().replace(components=COMPONENTS, measure_runtime=False, **kw)


@pytest.fixture(scope="module")
def merged(sd_folder, files, tmp_path_factory):
    from ldm_deploy.export.exporter import export_model

    return export_model(sd_folder, tmp_path_factory.mktemp("lora-art") / "merged", _config(), loras=specs(files)).path


@pytest.fixture(scope="module")
def switchable(sd_folder, tmp_path_factory):
    from ldm_deploy.export.exporter import export_model

    return export_model(sd_folder, tmp_path_factory.mktemp("lora-art") / "switch", _config(lora_switchable="all")).path


@pytest.fixture(scope="module")
def reference(sd_folder, files):
    """diffusers' pipeline with the U-Net LoRAs fused by diffusers and the text-encoder LoRA merged by peft."""
    import diffusers

    from tests.lora_files import te_peer

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for name in ("peft", "kohya"):
        pipe.load_lora_weights(str(files[name]))
        pipe.fuse_lora(lora_scale=SCALES[name])
        pipe.unload_lora_weights()
    merged_te = te_peer(sd_folder, files["te"], SCALES["te"])
    with torch.no_grad():
        params = dict(pipe.text_encoder.named_parameters())
        for name, w in merged_te.items():
            params[name].copy_(w)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(7).standard_normal((2, 4, 4, 4), dtype=np.float32)


def _ours(pipe, latents):
    return pipe(PROMPTS, steps=STEPS, guidance=7.5, scheduler="ddim", latents=latents)


def test_manifest_records_hash_and_scale(merged, files):
    from ldm_deploy.fileio import sha256_file

    loras = json.loads((merged / "manifest.json").read_text())["loras"]
    assert [(r["sha256"], r["scale"]) for r in loras] == [(sha256_file(files[n]), SCALES[n]) for n in SCALES]
    assert [r["components"] for r in loras] == [["unet"], ["unet"], ["text_encoder"]]


def test_merged_export_matches_diffusers(merged, reference, latents):
    from ldm_deploy.runtime.runners.ort import OrtCpuRunner

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (2, 77)).astype(np.int32)
    te = OrtCpuRunner(merged, "text_encoder")({"input_ids": ids})["last_hidden_state"]
    with torch.no_grad():
        te_ref = reference.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    # fp32 graph vs fp32 torch: per-component relative error within 1e-4 (summation order only)
    assert_close(te, te_ref, rtol=1e-4, atol=1e-4 * np.abs(te_ref).max(), name="text_encoder")
    feeds = {"sample": rng.standard_normal((4, 4, 4, 4), dtype=np.float32),
             "timestep": np.array([999, 999, 500, 500], np.float32),
             "encoder_hidden_states": te_ref[[0, 1, 0, 1]]}
    unet = OrtCpuRunner(merged, "unet")(feeds)["noise_pred"]
    with torch.no_grad():
        unet_ref = reference.unet(*(torch.from_numpy(v) for v in feeds.values())).sample.numpy()
    assert_close(unet, unet_ref, rtol=1e-4, atol=1e-4 * np.abs(unet_ref).max(), name="unet")

    with torch.no_grad():
        ref = reference(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, latents=torch.from_numpy(latents),
                        height=32, width=32, output_type="np").images
    ref = np.round(np.asarray(ref) * 255).astype(np.uint8)
    ours = _ours(Pipeline.from_artifact(merged), latents).images
    assert ref.std() > 10
    assert psnr(ours, ref) >= 48


def test_export_cache_knows_the_loras(sd_folder, merged, files):
    from ldm_deploy.export.exporter import export_model

    again = export_model(sd_folder, merged, _config(), loras=specs(files))
    assert again.cached
    from ldm_deploy.export import lora as lora_export
    from ldm_deploy.lora import LoraSpec

    key = lora_export.cache_key([LoraSpec.parse(s) for s in specs(files, ("peft",))])
    assert lora_export.cache_key_of(again.artifact.manifest) != key   # another set would re-export


def test_switch_equals_merge_and_never_drifts(switchable, merged, files, latents):
    pipe = Pipeline.from_artifact(switchable)
    base = _ours(pipe, latents).images
    info = pipe.set_loras(specs(files))
    assert info["changed"]["unet"] > 0 and info["changed"]["text_encoder"] > 0
    with_a = _ours(pipe, latents)
    assert with_a.params["loras"][0]["scale"] == SCALES["peft"]
    # switched on the fly vs merged before tracing: same maths, different graph (W as an input: an explicit
    # Transpose before MatMul instead of a folded constant), so float32 rounding only
    assert psnr(with_a.images, _ours(Pipeline.from_artifact(merged), latents).images) >= 48
    pipe.set_loras(specs(files, ("kohya",)))
    with_b = _ours(pipe, latents).images
    assert not np.array_equal(with_b, with_a.images) and not np.array_equal(with_b, base)
    pipe.set_loras([])
    after = _ours(pipe, latents)
    assert np.array_equal(after.images, base) and "loras" not in after.params
    fresh = _ours(Pipeline.from_artifact(switchable), latents)
    assert np.array_equal(after.latents, fresh.latents)          # bit-identical: recomputed from the stored base


def test_generate_cli_lora(switchable, merged, files, tmp_path):
    from ldm_deploy.cli import main

    out = tmp_path / "a.png"
    assert main(["generate", str(switchable), "--prompt", "a red circle", "--steps", "2", "--seed", "1",
                 "--lora", specs(files, ("peft",))[0], "--out", str(out)]) == 0
    assert out.is_file()
    with pytest.raises(LdmError, match="not exported with switchable weights"):
        Pipeline.from_artifact(merged).set_loras(specs(files, ("peft",)))
