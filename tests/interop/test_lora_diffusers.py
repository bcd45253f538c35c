"""LoRA files made by peft and diffusers, text encoders included, against diffusers' own `load_lora_weights` +
`fuse_lora(lora_scale=...)`: merged at export (`ldm-deploy export --lora FILE:SCALE`) and switched at run time
(`Pipeline.set_loras`), on a tiny SD 1.5-style and a tiny SDXL folder.

The reference side runs in the optimum venv (tests/interop/lora_side.py: transformers 4.57 accepts peft 0.21.2,
which the main venv's transformers 5.25 refuses, so there diffusers loads text-encoder LoRAs itself). It saves
the folders, writes the LoRA files (each holds U-Net and text encoder(s) adapters) and runs diffusers with
them: text encoder and U-Net outputs on fixed inputs, images from fixed latents. Files: `peft` (diffusers'
`save_lora_weights` with the adapter metadata, alpha != r), `base_layer` (the same tensors under
`<module>.base_layer.lora_A` names, no metadata), `kohya` (diffusers' `convert_state_dict_to_kohya`, LoCon).

Bounds: fp32 graphs against fp32 torch, so per component <= 1e-4 relative (summation order only), images
>= 48 dB PSNR on the same latents (4 steps; the bound of tests/export/test_lora_export.py).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from ldm_deploy.cli import main
from ldm_deploy.compare import assert_close
from ldm_deploy.runtime.pipeline import Pipeline
from tests.interop.conftest import ROOT, optimum_side
from tests.interop.lora_side import ENCODERS, GUIDANCE, NEGATIVE, PROMPTS, STEPS
from tests.runtime.tiny_model import psnr

pytestmark = pytest.mark.slow   # builds two folders and their LoRAs in the optimum venv, four tiny exports (~2 min)

SCHEDULER = {"sd1": "ddim", "sdxl": "euler"}
# case -> (our --lora FILE:SCALE list, diffusers' load + fuse list): scales != 1, and two files blended
CASES = {
    "base": ([], []),
    "peft": ([("peft", 0.8)], [("peft", 0.8)]),
    "base_layer": ([("base_layer", 1.2)], [("peft_alpha_r", 1.2)]),   # diffusers reads no base_layer names
    "kohya": ([("kohya", 1.0)], [("kohya", 1.0)]),
    "blend": ([("peft", 0.8), ("kohya", 0.5)], [("peft", 0.8), ("kohya", 0.5)]),
}


def _inputs(family: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20)
    ctx = 32 if family == "sd1" else 64            # cross-attention width (SDXL: both encoders concatenated)
    feeds = {"input_ids": rng.integers(0, 1000, (2, 77)).astype(np.int32),
             "sample": rng.standard_normal((4, 4, 4, 4), dtype=np.float32),
             "timestep": np.array([999, 999, 500, 500], np.float32),
             "encoder_hidden_states": rng.standard_normal((4, 77, ctx), dtype=np.float32),
             "latents": rng.standard_normal((2 if family == "sd1" else 1, 4, 4, 4), dtype=np.float32)}
    if family == "sdxl":
        feeds["text_embeds"] = rng.standard_normal((4, 32), dtype=np.float32)
        feeds["time_ids"] = np.tile(np.array([32, 32, 0, 0, 32, 32], np.float32), (4, 1))
    return feeds


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def case(request, tmp_path_factory) -> dict:
    """{family, model, loras (name -> file), reference (npz), inputs, merged, switchable (artifact paths)}."""
    family = request.param
    d = tmp_path_factory.mktemp(f"lora-diffusers-{family}")
    inputs = _inputs(family)
    np.savez(d / "inputs.npz", **inputs)
    (d / "cases.json").write_text(json.dumps({k: v[1] for k, v in CASES.items()}))
    optimum_side("--family", family, "--out", str(d), "--inputs", str(d / "inputs.npz"), "--cases",
                 str(d / "cases.json"), script=ROOT / "tests" / "interop" / "lora_side.py")
    ref = np.load(d / "reference.npz")
    loras = {n: d / "loras" / f"{n}.safetensors" for n in ("peft", "base_layer", "kohya")}
    components = ",".join((*ENCODERS[family], "unet", "vae_decoder"))
    batch = 2 if family == "sd1" else 1
    (d / "export.yaml").write_text(f"precision: fp32\nmeasure_runtime: false\nprofiles:\n"
                                   f"  batch: {{min: 1, opt: {batch}, max: {batch}}}\n"
                                   "  height: {min: 32, opt: 32, max: 32}\n  width: {min: 32, opt: 32, max: 32}\n")
    common = [str(d / "model"), "--config", str(d / "export.yaml"), "--components", components]
    merged = ["--lora", f"{loras['peft']}:0.8", "--lora", f"{loras['kohya']}:0.5"]   # CASES["blend"]
    assert main(["-q", "export", *common, "--out", str(d / "merged"), *merged]) == 0
    assert main(["-q", "export", *common, "--out", str(d / "switch"), "--lora-switchable", "all"]) == 0
    return {"family": family, "model": d / "model", "loras": loras, "inputs": inputs, "merged": d / "merged",
            "switchable": d / "switch", "reference": {k: ref[k] for k in ref.files}}


@pytest.fixture(scope="module")
def switch_pipe(case) -> Pipeline:
    return Pipeline.from_artifact(case["switchable"])


def _images(pipe: Pipeline, case: dict) -> np.ndarray:
    latents = case["inputs"]["latents"]
    prompts = PROMPTS[: latents.shape[0]]
    return pipe(prompts, negative_prompt=[NEGATIVE] * len(prompts), steps=STEPS, guidance=GUIDANCE[case["family"]],
                scheduler=SCHEDULER[case["family"]], latents=latents).images


def _check_components(runners: dict, case: dict, name: str) -> None:
    """Each text encoder on the fixed ids and the U-Net on the fixed feeds against diffusers' outputs for `name`."""
    inputs, ref = case["inputs"], case["reference"]
    for component in ENCODERS[case["family"]]:
        got = runners[component]({"input_ids": inputs["input_ids"]})
        keys = [k for k in ref if k.startswith(f"{name}/{component}/")]
        assert keys
        for key in keys:
            want = ref[key]
            # fp32 graph vs fp32 torch: per-component relative error within 1e-4 (summation order only)
            assert_close(got[key.rsplit("/", 1)[1]], want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), name=key)
    feeds = {k: inputs[k] for k in ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
             if k in inputs}
    want = ref[f"{name}/unet/noise_pred"]
    assert_close(runners["unet"](feeds)["noise_pred"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), name=f"{name}/unet")


def _ours(case: dict, name: str) -> list[str]:
    return [f"{case['loras'][f]}:{s}" for f, s in CASES[name][0]]


def test_the_files_are_the_layouts_named(case):
    """Each file holds U-Net and text-encoder modules, in the key forms the parity tests claim to cover."""
    from safetensors import safe_open

    keys = {}
    for name, path in case["loras"].items():
        with safe_open(str(path), framework="np") as f:
            keys[name] = list(f.keys())
    encoders = ENCODERS[case["family"]]
    for prefix in ("unet.", *(f"{e}." for e in encoders)):
        assert any(k.startswith(prefix) and ".lora_A." in k for k in keys["peft"]), prefix
    assert all(".base_layer.lora_" in k for k in keys["base_layer"])
    kohya_te = ("lora_te_",) if case["family"] == "sd1" else ("lora_te1_", "lora_te2_")
    for prefix in ("lora_unet_", *kohya_te):
        assert any(k.startswith(prefix) and k.endswith(".lora_down.weight") for k in keys["kohya"]), prefix
    with safe_open(str(case["loras"]["kohya"]), framework="np") as f:
        assert any(f.get_slice(k).get_shape()[-2:] == [3, 3] for k in keys["kohya"] if k.endswith("lora_down.weight"))
        assert {float(f.get_tensor(k)) for k in keys["kohya"] if k.endswith(".alpha")} == {3.0}


def test_the_loras_change_the_model(case):
    ref = case["reference"]
    assert ref["base/images"].std() > 10, "the tiny model should make images with structure"
    for name in ("peft", "base_layer", "kohya", "blend"):
        assert psnr(ref[f"{name}/images"], ref["base/images"]) < 40, name   # else the parity below proves nothing


def test_merged_export_matches_diffusers(case):
    from ldm_deploy.runtime.runners.ort import OrtCpuRunner

    loras = json.loads((case["merged"] / "manifest.json").read_text())["loras"]
    encoders = sorted(ENCODERS[case["family"]])
    assert [(r["layout"], r["scale"], r["components"]) for r in loras] == [
        ("peft", 0.8, sorted(["unet", *encoders])), ("kohya", 0.5, sorted(["unet", *encoders]))]
    runners = {c: OrtCpuRunner(case["merged"], c) for c in (*ENCODERS[case["family"]], "unet")}
    _check_components(runners, case, "blend")
    ours = _images(Pipeline.from_artifact(case["merged"]), case)
    assert psnr(ours, case["reference"]["blend/images"]) >= 48


@pytest.mark.parametrize("name", ["base", "peft", "base_layer", "kohya", "blend"])
def test_switched_matches_diffusers(case, switch_pipe, name):
    info = switch_pipe.set_loras(_ours(case, name))
    if name != "base":
        assert all(info["changed"].get(c, 0) > 0 for c in (*ENCODERS[case["family"]], "unet")), info["changed"]
    _check_components(switch_pipe.runners, case, name)
    assert psnr(_images(switch_pipe, case), case["reference"][f"{name}/images"]) >= 48


def test_switch_equals_merge_and_returns_to_the_base(case, switch_pipe):
    switch_pipe.set_loras(_ours(case, "blend"))
    switched = _images(switch_pipe, case)
    # switched on the fly vs merged before tracing: the same maths in another graph, float32 rounding only
    assert psnr(switched, _images(Pipeline.from_artifact(case["merged"]), case)) >= 48
    switch_pipe.set_loras([])
    assert np.array_equal(_images(switch_pipe, case), _images(Pipeline.from_artifact(case["switchable"]), case))
