"""Kohya SDXL LoRA files (`lora_unet_*` under SDXL's original block names, `lora_te1_*`, `lora_te2_*`) on a tiny
SDXL folder: merged at export and switched at run time.

Reference: the U-Net LoRA through diffusers' `load_lora_weights` + `fuse_lora(lora_scale=...)` (which maps the
original SGM block names itself); the text-encoder LoRAs against a direct computation, W + scale * (alpha / r)
* up @ down, on the tiny encoders (diffusers cannot load text-encoder LoRAs in this environment: transformers 5.25 refuses
peft 0.21; tests/interop/test_lora_diffusers.py checks them against diffusers in the optimum environment). Same bounds as SD 1.5 (tests/export/test_lora_export.py): <= 1e-4 relative per component (fp32),
>= 48 dB end to end on the same latents.
"""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.runtime.pipeline import Pipeline
from tests.runtime.tiny_model import psnr

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = pytest.mark.slow      # two tiny SDXL exports: ~1-2 min on 2 loaded cores

SIZE, STEPS, PROMPT = 32, 4, "a red circle on a blue square"
SCALES = {"unet": 0.6, "te": 0.9}
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
UNET_TARGETS = ["to_q", "to_v", "to_out.0", "ff.net.2", "proj_in", "conv1", "conv2"]
TE_TARGETS = {"text_encoder": ("q_proj.weight", "fc1.weight"), "text_encoder_2": ("v_proj.weight", "out_proj.weight")}
TE_PREFIX = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.runtime.tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl-lora") / "base")


@pytest.fixture(scope="module")
def files(folder, tmp_path_factory):
    """unet: a peft adapter on the tiny SDXL U-Net written the way kohya's sd-scripts names SDXL modules
    (original block names, `lora_unet_input_blocks_3_1_...`); te: lora_te1_ / lora_te2_ keys."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch

    from ldm_deploy.lora import _sgm_names

    out = tmp_path_factory.mktemp("sdxl-lora-files")
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").eval()
    modules = [n for n, _ in unet.named_modules()]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=3, target_modules=UNET_TARGETS, init_lora_weights="gaussian"))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()})
    sgm = {m.replace(".", "_"): s.replace(".", "_") for m, s in _sgm_names(modules).items()}
    renamed = {}
    for key, value in kohya.items():
        module, _, part = key.removeprefix("lora_unet_").partition(".")
        renamed[f"lora_unet_{sgm[module]}.{part}"] = value.contiguous()
    # the tiny layout (layers_per_block 1): down_blocks.1.attentions.0 is input_blocks.3.1, the first up level's
    # second attention output_blocks.1.1, the mid block's attention middle_block.1, a resnet conv in_layers.2
    for key in ("input_blocks_3_1_transformer_blocks_0_attn1_to_q", "output_blocks_1_1_proj_in",
                "middle_block_1_transformer_blocks_1_ff_net_2", "input_blocks_1_0_in_layers_2",
                "output_blocks_3_0_out_layers_3"):
        assert f"lora_unet_{key}.lora_down.weight" in renamed, key
    save_torch(renamed, str(out / "unet.safetensors"))

    rng = np.random.default_rng(9)
    te = {}
    for component, ends in TE_TARGETS.items():
        cls = "CLIPTextModel" if component == "text_encoder" else "CLIPTextModelWithProjection"
        import transformers

        model = getattr(transformers, cls).from_pretrained(str(folder), subfolder=component)
        for name, p in model.named_parameters():
            if name.endswith(ends):
                key = TE_PREFIX[component] + name.removeprefix("text_model.")[: -len(".weight")].replace(".", "_")
                key = TE_PREFIX[component] + "text_model_" + key[len(TE_PREFIX[component]):]   # kohya's names
                te[f"{key}.lora_down.weight"] = (rng.standard_normal((2, p.shape[1])) * 0.3).astype(np.float32)
                te[f"{key}.lora_up.weight"] = (rng.standard_normal((p.shape[0], 2)) * 0.3).astype(np.float32)
                te[f"{key}.alpha"] = np.array(1.5, np.float32)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in te)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_2_self_attn_out_proj") for k in te)
    save_file(te, str(out / "te.safetensors"))
    return {"unet": out / "unet.safetensors", "te": out / "te.safetensors"}


def specs(files, names=("unet", "te")):
    return [f"{files[n]}:{SCALES[n]}" for n in names]


def _config(**kw):
    from ldm_deploy.export.config import ExportConfig, Range

    return ExportConfig(name="tiny-sdxl", batch=Range(1, 1, 2), height=Range(SIZE, SIZE, SIZE),
                        width=Range(SIZE, SIZE, SIZE), measure_runtime=False, components=COMPONENTS, **kw)


@pytest.fixture(scope="module")
def merged(folder, files, tmp_path_factory):
    from ldm_deploy.export.exporter import export_model

    return export_model(folder, tmp_path_factory.mktemp("sdxl-lora-art") / "merged", _config(),
                        loras=specs(files)).path


@pytest.fixture(scope="module")
def reference(folder, files):
    """diffusers' SDXL pipeline, the U-Net LoRA fused by diffusers, the text-encoder LoRAs added directly."""
    from safetensors.numpy import load_file

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(files["unet"]))
    pipe.fuse_lora(lora_scale=SCALES["unet"])
    pipe.unload_lora_weights()
    te = load_file(str(files["te"]))
    with torch.no_grad():
        for component, prefix in TE_PREFIX.items():
            params = dict(getattr(pipe, component).named_parameters())
            for key in [k for k in te if k.startswith(prefix) and k.endswith(".lora_down.weight")]:
                module = key[len(prefix):-len(".lora_down.weight")]
                name = next(n for n in params if n.endswith(".weight")   # transformers 5 may drop text_model.
                            and n[:-7].replace(".", "_").removeprefix("text_model_") == module.removeprefix("text_model_"))
                down, up = te[key], te[key.replace("lora_down", "lora_up")]
                alpha = float(te[key.replace("lora_down.weight", "alpha")])
                params[name] += torch.from_numpy(SCALES["te"] * (alpha / down.shape[0]) * (up @ down))
    return pipe


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(3).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)


def _ours(pipe, latents):
    return pipe(PROMPT, negative_prompt="blurry", steps=STEPS, guidance=5.0, scheduler="euler", latents=latents)


def test_manifest_records_the_files_and_components(merged, files):
    import json

    loras = json.loads((merged / "manifest.json").read_text())["loras"]
    assert [(r["layout"], r["scale"], r["components"]) for r in loras] == [
        ("kohya", SCALES["unet"], ["unet"]), ("kohya", SCALES["te"], ["text_encoder", "text_encoder_2"])]


def test_merged_sdxl_export_matches_diffusers_per_component(merged, reference):
    from ldm_deploy.runtime.runners.ort import OrtCpuRunner

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (2, 77)).astype(np.int32)
    hidden = []
    for component in ("text_encoder", "text_encoder_2"):
        got = OrtCpuRunner(merged, component)({"input_ids": ids})
        with torch.no_grad():
            ref = getattr(reference, component)(torch.from_numpy(ids).long(), output_hidden_states=True)
        want = ref.hidden_states[-2].numpy()
        # fp32 graph vs fp32 torch: per-component relative error within 1e-4 (summation order only)
        assert_close(got["penultimate_hidden_state"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), name=component)
        hidden.append(want)
        if component == "text_encoder_2":
            pooled = ref.text_embeds.numpy()
            assert_close(got["text_embeds"], pooled, rtol=1e-4, atol=1e-4 * np.abs(pooled).max(), name="pooled")
    ctx = np.concatenate(hidden, axis=-1)
    feeds = {"sample": rng.standard_normal((4, 4, 4, 4), dtype=np.float32),
             "timestep": np.array([999, 999, 500, 500], np.float32),
             "encoder_hidden_states": ctx[[0, 1, 0, 1]], "text_embeds": pooled[[0, 1, 0, 1]],
             "time_ids": np.tile(np.array([32, 32, 0, 0, 32, 32], np.float32), (4, 1))}
    unet = OrtCpuRunner(merged, "unet")(feeds)["noise_pred"]
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        want = reference.unet(t["sample"], t["timestep"], t["encoder_hidden_states"],
                              added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}).sample.numpy()
    assert_close(unet, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), name="unet")


def test_merged_sdxl_export_matches_diffusers_end_to_end(merged, reference, latents):
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    with torch.no_grad():
        ref = reference(PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=5.0,
                        latents=torch.from_numpy(latents), height=SIZE, width=SIZE, output_type="np").images
    ref = np.round(np.asarray(ref) * 255).astype(np.uint8)
    assert ref.std() > 10
    assert psnr(_ours(Pipeline.from_artifact(merged), latents).images, ref) >= 48


def test_switch_on_sdxl_equals_merge_and_restores_the_base(folder, files, merged, latents, tmp_path_factory):
    from ldm_deploy.export.exporter import export_model

    switchable = export_model(folder, tmp_path_factory.mktemp("sdxl-lora-art") / "switch",
                              _config(lora_switchable="all")).path
    pipe = Pipeline.from_artifact(switchable)
    base = _ours(pipe, latents)
    info = pipe.set_loras(specs(files))
    assert all(info["changed"][c] > 0 for c in ("unet", "text_encoder", "text_encoder_2")), info["changed"]
    # switched on the fly vs merged before tracing: same maths, a different graph, float32 rounding only
    switched = _ours(pipe, latents).images
    assert psnr(switched, _ours(Pipeline.from_artifact(merged), latents).images) >= 48
    assert psnr(switched, base.images) < 40                  # the LoRAs do change the image
    pipe.set_loras([])
    after = _ours(pipe, latents)
    assert np.array_equal(after.latents, base.latents) and np.array_equal(after.images, base.images)
