"""Original single-file SDXL checkpoints: our key map against diffusers' own single-file converter.

The peer is `diffusers.loaders.single_file_utils` (what `from_single_file` runs): our diffusers -> original
map, then diffusers' original -> diffusers converters, must give back every weight of the diffusers
modules exactly. Then a full conversion of that original file through `ldm-deploy convert`'s function
gives a folder diffusers loads with the same weights.
"""
from __future__ import annotations

import json

import pytest
import torch

from ldm_deploy.errors import LdmError
from training.checkpoint import load_components
from training.convert_original import convert_checkpoint
from training.convert_sdxl import BASE_OPENCLIP, REFINER_OPENCLIP, detect_sdxl, to_original_state_dict

diffusers = pytest.importorskip("diffusers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.runtime.tiny_sdxl import make_tiny_sdxl, make_tiny_sdxl_refiner

    root = tmp_path_factory.mktemp("sdxl-convert")
    return {"base": make_tiny_sdxl(root / "base"), "refiner": make_tiny_sdxl_refiner(root / "refiner")}


def folder_config(folder) -> dict:
    """The preset-style config dict of a model folder (what `--config FILE` passes for a non-hub architecture)."""
    cfg = {"model_index": json.loads((folder / "model_index.json").read_text()),
           "scheduler": json.loads((folder / "scheduler" / "scheduler_config.json").read_text()), "text_encoder": None}
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if (folder / part / "config.json").is_file():
            cfg[part] = json.loads((folder / part / "config.json").read_text())
    return cfg


def _assert_same(got: dict, module, what: str) -> None:
    want = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
    got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
    assert sorted(got) == sorted(want), f"{what}: {sorted(set(got) ^ set(want))[:5]}"
    bad = [k for k in want if not torch.equal(got[k].reshape(want[k].shape), want[k])]
    assert not bad, f"{what}: {bad[:5]}"


@pytest.mark.parametrize("layout", ["base", "refiner"])
def test_our_original_layout_is_what_diffusers_single_file_reads(folders, layout):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = folders[layout]
    original = to_original_state_dict(load_components(folder))
    assert detect_sdxl(original) == ("sdxl" if layout == "base" else "sdxl-refiner")
    # (diffusers' model-type detection looks for bigG block 9, which a 3-block tiny tower lacks; its
    # converters below take the layout as given)

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    _assert_same(sfu.convert_ldm_unet_checkpoint(original, dict(unet.config)), unet, "unet")
    vae = diffusers.AutoencoderKL.from_pretrained(str(folder / "vae"))
    _assert_same(sfu.convert_ldm_vae_checkpoint(original, dict(vae.config)), vae, "vae")
    te2 = CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2"))
    prefix = BASE_OPENCLIP if layout == "base" else REFINER_OPENCLIP
    _assert_same(sfu.convert_open_clip_checkpoint(te2, original, prefix=prefix), te2, "text_encoder_2")
    if layout == "base":
        te1 = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
        got = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(original).items()}
        _assert_same(got, te1, "text_encoder")


@pytest.mark.parametrize("layout", ["base", "refiner"])
def test_sdxl_checkpoint_converts_to_a_folder_diffusers_loads(folders, layout, tmp_path):
    from safetensors.torch import save_file

    folder = folders[layout]
    original = to_original_state_dict(load_components(folder))
    original["conditioner.embedders.%d.model.logit_scale" % (1 if layout == "base" else 0)] = torch.tensor(4.6)
    ckpt = tmp_path / "sdxl.safetensors"
    save_file(original, str(ckpt))
    out = convert_checkpoint(ckpt, tmp_path / "out", tokenizer=folder.parent / "base" / "tokenizer",
                             config=folder_config(folder))
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if layout == "base" else "StableDiffusionXLImg2ImgPipeline")
    cls = diffusers.StableDiffusionXLPipeline if layout == "base" else diffusers.StableDiffusionXLImg2ImgPipeline
    pipe, ref = cls.from_pretrained(str(out)), cls.from_pretrained(str(folder))
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, part), getattr(ref, part)
        assert (a is None) == (b is None), part
        if a is not None:
            _assert_same(a.state_dict(), b, part)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2.pad_token_id == 0
    if layout == "base":
        assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.vae.config.scaling_factor == 0.13025


def test_sdxl_checkpoint_with_a_stray_or_missing_tensor_fails(folders, tmp_path):
    from safetensors.torch import save_file

    original = to_original_state_dict(load_components(folders["base"]))
    tok = folders["base"] / "tokenizer"
    stray = dict(original, **{"model.diffusion_model.extra.weight": torch.zeros(1)})
    save_file(stray, str(tmp_path / "stray.safetensors"))
    cfg = folder_config(folders["base"])
    with pytest.raises(LdmError, match="match no part of the SDXL model.*extra.weight"):
        convert_checkpoint(tmp_path / "stray.safetensors", tmp_path / "a", tokenizer=tok, config=cfg)
    short = {k: v for k, v in original.items() if "label_emb.0.2" not in k}
    save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(LdmError, match="lacks 2 tensors.*label_emb.0.2"):
        convert_checkpoint(tmp_path / "short.safetensors", tmp_path / "b", tokenizer=tok, config=cfg)
    with pytest.raises(LdmError, match="sdxl checkpoint but the config is not"):
        save_file(original, str(tmp_path / "ok.safetensors"))
        convert_checkpoint(tmp_path / "ok.safetensors", tmp_path / "c", tokenizer=tok, config="tiny-sdxl-refiner")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_convert_cli_takes_a_second_tokenizer(folders, tmp_path):
    from safetensors.torch import save_file

    from ldm_deploy.cli import main

    save_file(to_original_state_dict(load_components(folders["refiner"])), str(tmp_path / "r.safetensors"))
    cfg = tmp_path / "refiner.json"
    cfg.write_text(json.dumps(folder_config(folders["refiner"])))
    rc = main(["convert", str(tmp_path / "r.safetensors"), "--out", str(tmp_path / "out"), "--config", str(cfg),
               "--tokenizer", str(folders["base"] / "tokenizer"), "--tokenizer-2",
               str(folders["refiner"] / "tokenizer_2")])
    assert rc == 0
    comps = load_components(tmp_path / "out")
    assert comps.text_encoder is None and comps.tokenizer_dir is None
    assert json.loads((tmp_path / "out" / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"
