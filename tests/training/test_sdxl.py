"""SDXL networks: our U-Net with text_time micro-conditioning and the folder loader, against diffusers.

Full-size base and refiner configs (the hub's, as presets) are compared on the meta device (parameter
counts, names, shapes); tiny folders saved by diffusers' own SDXL pipelines are compared numerically.
"""
from __future__ import annotations

import json

import pytest
import torch

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError
from training.checkpoint import default_parts, load_components, save_components
from training.models.attention import attention_backend
from training.models.config import UNetConfig
from training.models.presets import build_all, preset
from training.models.unet import UNet2DConditionModel

diffusers = pytest.importorskip("diffusers")


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name,unet_params,text_2_params", [
    ("sdxl", 2_567_463_684, 694_659_840),
    ("sdxl-refiner", 2_259_526_660, 694_659_840),
])
def test_full_size_sdxl_matches_diffusers_on_meta_device(name, unet_params, text_2_params):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    p = preset(name)
    built = build_all(p, device="meta")
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(p["unet"])
        ref_te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(p["text_encoder_2"]))
    assert _shapes(built["unet"]) == _shapes(ref)                       # diffusers' names and shapes, all of them
    assert _count(built["unet"]) == _count(ref) == unet_params
    assert _count(built["text_encoder_2"]) == _count(ref_te2) == text_2_params
    assert built["unet"].conv_in.weight.is_meta
    assert (built["text_encoder"] is None) == (name == "sdxl-refiner")
    cfg = UNetConfig.from_dict(p["unet"])
    assert cfg.text_time and cfg.has_attention[0] is False and cfg.upcast_attention is False
    assert UNetConfig.from_dict(dict(ref.config)) == cfg                  # every key diffusers writes is understood


def test_sdxl_presets_are_the_hub_configs():
    base, refiner = preset("sdxl"), preset("sdxl-refiner")
    assert base["unet"]["transformer_layers_per_block"] == [1, 2, 10] and base["unet"]["cross_attention_dim"] == 2048
    assert base["unet"]["projection_class_embeddings_input_dim"] == 1280 + 6 * 256
    assert refiner["unet"]["projection_class_embeddings_input_dim"] == 1280 + 5 * 256
    assert refiner["unet"]["cross_attention_dim"] == 1280 and refiner["text_encoder"] is None
    assert base["vae"]["scaling_factor"] == 0.13025 and base["vae"]["force_upcast"] is True
    assert base["text_encoder_2"]["num_hidden_layers"] == 32 and base["text_encoder_2"]["hidden_act"] == "gelu"
    assert (base["tokenizer"]["pad_token"], base["tokenizer_2"]["pad_token"]) == ("<|endoftext|>", "!")
    assert base["model_index"]["force_zeros_for_empty_prompt"] is True
    assert refiner["model_index"]["requires_aesthetics_score"] is True
    sched = diffusers.EulerDiscreteScheduler.from_config(base["scheduler"])
    assert sched.config.timestep_spacing == "leading"


def test_tiny_sdxl_presets_load_in_diffusers():
    for name in ("tiny-sdxl", "tiny-sdxl-refiner"):
        p = preset(name)
        built = build_all(p)
        ref = diffusers.UNet2DConditionModel.from_config(p["unet"])
        ref.load_state_dict(built["unet"].state_dict(), strict=True)


# ------------------------------------------------------------------ tiny folders saved by diffusers


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory):
    from tests.runtime.tiny_sdxl import make_tiny_sdxl, make_tiny_sdxl_refiner

    root = tmp_path_factory.mktemp("sdxl")
    return make_tiny_sdxl(root / "base"), make_tiny_sdxl_refiner(root / "refiner")


def _like_for_like(ref, backend: str):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    ref.set_attn_processor(AttnProcessor() if backend == "math" else AttnProcessor2_0())
    return ref


@pytest.mark.parametrize("layout", ["base", "refiner"])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_sdxl_unet_from_folder_matches_diffusers(sdxl_folders, layout, backend):
    folder = sdxl_folders[0 if layout == "base" else 1]
    ours = load_components(folder, parts=("unet",)).unet
    ref = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    cfg = ours.config
    n_ids = 6 if layout == "base" else 5                     # size, crop, target size | size, crop, aesthetic score
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 12, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024][:n_ids], [512.0, 768, 16, 8, 6.0, 0][:n_ids]])
    t = torch.tensor([999.0, 20.5])
    with torch.no_grad(), attention_backend(backend):
        expected = _like_for_like(ref, backend)(
            x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = ours(x, t, ctx, pooled, time_ids)
        other = ours(x, t, ctx, pooled, time_ids + 64)       # the micro-conditioning reaches the output
    # fp32 with identical op order except SDPA/baddbmm blocking: ~1e-6 of O(1) activations
    assert_close(got, expected, atol=1e-5, name=f"sdxl {layout} unet {backend}")
    assert (other - got).abs().max() > 1e-3


def test_sdxl_unet_needs_its_extra_inputs(sdxl_folders):
    unet = load_components(sdxl_folders[0], parts=("unet",)).unet
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    with pytest.raises(TypeError, match="text_embeds and time_ids"):
        unet(x, 1, ctx)
    plain = UNet2DConditionModel(UNetConfig.from_dict(preset("tiny")["unet"]))
    with pytest.raises(TypeError, match="only for SDXL"):
        plain(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 32), torch.randn(1, 32), torch.zeros(1, 6))


@pytest.mark.parametrize("bad", [
    {"addition_embed_type": "text"},                                     # Kandinsky: refused by name
    {"addition_time_embed_dim": None},                                  # text_time without its widths
    {"addition_embed_type": None},                                      # widths without text_time
])
def test_sdxl_config_errors_name_the_key(bad):
    cfg = {**preset("tiny-sdxl")["unet"], **bad}
    key = next(iter(bad)) if bad != {"addition_embed_type": None} else "addition_time_embed_dim"
    with pytest.raises(LdmError, match=key):
        UNetConfig.from_dict(cfg)


def test_sdxl_text_encoders_from_folder_match_transformers(sdxl_folders):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base, refiner = sdxl_folders
    comps = load_components(base)
    assert default_parts(base) == ("unet", "vae", "text_encoder", "text_encoder_2")
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    ref1 = CLIPTextModel.from_pretrained(str(base / "text_encoder")).eval()
    ref2 = CLIPTextModelWithProjection.from_pretrained(str(base / "text_encoder_2")).eval()
    with torch.no_grad():
        for ours, ref in ((comps.text_encoder, ref1), (comps.text_encoder_2, ref2)):
            a = ours(ids, output_hidden_states=True)
            b = ref(ids, output_hidden_states=True)
            assert_close(a.hidden_states[-2], b.hidden_states[-2], atol=0, name="penultimate hidden states")
        assert_close(comps.text_encoder_2(ids).text_embeds, ref2(ids).text_embeds, atol=0, name="pooled projection")
    ref_vae = diffusers.AutoencoderKL.from_pretrained(str(base / "vae"))
    assert all(torch.equal(v, ref_vae.state_dict()[k]) for k, v in comps.vae.state_dict().items())
    assert comps.tokenizer_dir == base / "tokenizer" and comps.tokenizer_2_dir == base / "tokenizer_2"

    r = load_components(refiner)
    assert r.text_encoder is None and r.tokenizer_dir is None and r.text_encoder_2 is not None
    assert r.is_sdxl and r.model_index["requires_aesthetics_score"] is True


def test_sdxl_folder_round_trips_through_save_components(sdxl_folders, tmp_path):
    for folder, name in zip(sdxl_folders, ("base", "refiner")):
        comps = load_components(folder)
        out = save_components(comps, tmp_path / name)
        index = json.loads((out / "model_index.json").read_text())
        want = json.loads((folder / "model_index.json").read_text())
        for key in ("_class_name", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                    "force_zeros_for_empty_prompt"):
            assert index[key] == want[key], key
        pipe_cls = diffusers.StableDiffusionXLPipeline if name == "base" else diffusers.StableDiffusionXLImg2ImgPipeline
        pipe = pipe_cls.from_pretrained(str(out))                 # diffusers reads what we write
        again = load_components(out)
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            a, b = getattr(comps, part), getattr(again, part)
            assert (a is None) == (b is None)
            if a is not None:
                assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items()), part
        assert pipe.unet.config.addition_embed_type == "text_time"
