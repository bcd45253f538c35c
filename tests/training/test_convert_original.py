"""Original single-file SD checkpoints: the explicit key maps, both directions, cross-checked with diffusers."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ldm_deploy.errors import LdmError
from training import checkpoint as ck
from training import convert_original as co
from tests.training.test_checkpoint import (
    assert_outputs_equal, inputs, make_tokenizer_dir, our_components, outputs, tiny_config,
)

SCHEDULE = {"betas": torch.linspace(1e-4, 2e-2, 1000), "alphas_cumprod": torch.rand(1000), "logvar": torch.zeros(1000)}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok") / "tokenizer")


def _ema_keys(sd: dict, bump: float) -> dict:
    """LitEma copies: `model_ema.` + the dotless name, here shifted by `bump` so they are told apart."""
    return {co.EMA + k[len("model."):].replace(".", ""): v + bump for k, v in sd.items() if k.startswith(co.UNET)}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def original(request, tmp_path_factory, tokenizer_dir):
    """(kind, config, our components, path of an original-layout .safetensors made by the inverse map)."""
    cfg = tiny_config(request.param)
    comps = our_components(cfg, tokenizer_dir, seed=3)
    sd = co.to_original_state_dict(comps)
    sd.update(SCHEDULE)
    sd.update(_ema_keys(sd, bump=0.5))
    if request.param == "sd1":  # a buffer some checkpoints store (even as floats); it must be dropped, not loaded
        sd[co.CLIP + "text_model.embeddings.position_ids"] = torch.arange(77.0)[None] + 0.3
    path = tmp_path_factory.mktemp("ckpt") / f"tiny-{request.param}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return request.param, cfg, comps, path


def test_inverse_map_has_the_original_layout(original):
    kind, cfg, comps, path = original
    sd = ck.load_state_dict_file(path)
    u = co.UNET
    # 3 levels x 2 resnets (SD1-like): conv_in, 2 blocks, down, 2 blocks, down, 2 blocks = input_blocks 0..8
    if kind == "sd1":
        assert f"{u}input_blocks.3.0.op.weight" in sd and f"{u}input_blocks.6.0.op.weight" in sd
        assert f"{u}input_blocks.4.0.skip_connection.weight" not in sd  # 32 -> 32: no shortcut
        assert f"{u}input_blocks.7.0.skip_connection.weight" in sd      # 32 -> 64
        assert f"{u}output_blocks.2.1.conv.weight" in sd                 # up 0 has no attention
        assert f"{u}output_blocks.5.2.conv.weight" in sd                 # up 1 has attention
        assert f"{u}output_blocks.8.1.proj_in.weight" in sd and sd[f"{u}output_blocks.8.1.proj_in.weight"].ndim == 4
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd
    else:
        assert f"{u}input_blocks.1.1.proj_in.weight" in sd and sd[f"{u}input_blocks.1.1.proj_in.weight"].ndim == 2
        assert f"{u}output_blocks.1.1.conv.weight" in sd
        width = cfg["text_encoder"]["hidden_size"]
        assert sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
        assert "cond_stage_model.model.transformer.resblocks.2.ln_1.weight" in sd  # the unused last block
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "first_stage_model.decoder.up.0.block.1.conv1.weight" in sd   # decoder: L+1 resnets per level
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in sd
    assert co.EMA + "diffusion_modelinput_blocks00weight" in sd


def test_conversion_round_trip_is_exact(original, tmp_path):
    kind, cfg, comps, path = original
    out = co.convert_checkpoint(path, tmp_path / "model", config=cfg, tokenizer=comps.tokenizer_dir)
    back = ck.load_components(out)
    for part in ck.PARTS:
        want, got = getattr(comps, part).state_dict(), getattr(back, part).state_dict()
        assert want.keys() == got.keys(), part
        for k in want:
            assert torch.equal(want[k], got[k]), f"{part}.{k}"
    x = inputs(cfg, seed=4)
    assert_outputs_equal(outputs(back.unet, back.vae, back.text_encoder, x),
                         outputs(comps.unet, comps.vae, comps.text_encoder, x), atol=0.0)
    assert back.scheduler_config["prediction_type"] == cfg["scheduler"]["prediction_type"]
    assert (out / "tokenizer" / "vocab.json").is_file()
    assert back.unet.config.upcast_attention == (kind == "sd2")


def test_extract_ema_picks_the_ema_weights(original, tmp_path):
    _, cfg, comps, path = original
    out = co.convert_checkpoint(path, tmp_path / "ema", config=cfg, tokenizer=comps.tokenizer_dir, extract_ema=True)
    back = ck.load_components(out, parts=("unet", "vae"))
    for k, v in comps.unet.state_dict().items():
        assert torch.equal(back.unet.state_dict()[k], v + 0.5), k
    assert torch.equal(back.vae.encoder.conv_in.weight, comps.vae.encoder.conv_in.weight)  # EMA is U-Net only


def test_diffusers_own_converter_agrees_with_our_key_maps(original):
    """diffusers' single-file converters turn our original-layout file back into the same diffusers tensors."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    kind, cfg, comps, path = original
    sd = ck.load_state_dict_file(path)
    unet = sfu.convert_ldm_unet_checkpoint(dict(sd), cfg["unet"])
    want = comps.unet.state_dict()
    assert unet.keys() == want.keys()
    assert all(torch.equal(unet[k], want[k]) for k in want)
    vae = sfu.convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if k.startswith("first_stage_model.")}, cfg["vae"])
    want = comps.vae.state_dict()
    assert vae.keys() == want.keys()
    assert all(torch.equal(vae[k].reshape(want[k].shape), want[k]) for k in want)
    if kind == "sd2":
        text = sfu.convert_open_clip_checkpoint(CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])), dict(sd))
        want = {k: v for k, v in comps.text_encoder.state_dict().items()}
        got = {co._bare(k): v for k, v in text.items() if not k.endswith("position_ids")}
        # diffusers drops the unused last block by a list hard-coded for ViT-H (resblocks.23); here it is block n
        n = cfg["text_encoder"]["num_hidden_layers"]
        assert {k for k in got.keys() - want.keys() if not k.startswith(f"encoder.layers.{n}.")} == set()
        assert want.keys() <= got.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_tiny_presets_convert(tmp_path, tokenizer_dir):
    presets = pytest.importorskip("training.models.presets")
    for name in ("tiny", "tiny-sd2"):
        cfg = presets.preset(name)
        comps = our_components(cfg, tokenizer_dir, seed=5)
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in co.to_original_state_dict(comps).items()}, str(path))
        back = ck.load_components(co.convert_checkpoint(path, tmp_path / name, config=name, tokenizer=tokenizer_dir))
        for k, v in comps.unet.state_dict().items():
            assert torch.equal(back.unet.state_dict()[k], v), f"{name}: {k}"


# ----------------------------------------------------------------------------------------------------
# Detection and errors


def _write(path, sd):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def sd1(tokenizer_dir):
    cfg = tiny_config("sd1")
    comps = our_components(cfg, tokenizer_dir, seed=6)
    return cfg, comps, co.to_original_state_dict(comps)


def _convert_error(path, tmp_path, **kw) -> str:
    with pytest.raises(LdmError) as e:
        co.convert_checkpoint(path, tmp_path / "out", **kw)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    return str(e.value)


def test_unmatched_key_is_an_error_listing_it(sd1, tmp_path, tokenizer_dir):
    cfg, _, sd = sd1
    path = _write(tmp_path / "x.safetensors", {**sd, "model.diffusion_model.label_emb.0.weight": torch.zeros(2)})
    msg = _convert_error(path, tmp_path, config=cfg, tokenizer=tokenizer_dir)
    assert "1 checkpoint tensors match no part of the model" in msg and "label_emb.0.weight" in msg


def test_missing_key_is_an_error_listing_it(sd1, tmp_path, tokenizer_dir):
    cfg, _, sd = sd1
    sd = {k: v for k, v in sd.items() if k != "first_stage_model.decoder.norm_out.bias"}
    msg = _convert_error(_write(tmp_path / "x.safetensors", sd), tmp_path, config=cfg, tokenizer=tokenizer_dir)
    assert "lacks 1 tensors" in msg and "first_stage_model.decoder.norm_out.bias" in msg


def test_wrong_config_is_an_error(sd1, tmp_path, tokenizer_dir):
    _, _, sd = sd1
    path = _write(tmp_path / "x.safetensors", sd)
    msg = _convert_error(path, tmp_path, config=tiny_config("sd2"), tokenizer=tokenizer_dir)
    assert "pass the matching --config" in msg


def test_tokenizer_is_required(sd1, tmp_path):
    path = _write(tmp_path / "x.safetensors", sd1[2])
    assert "--tokenizer DIR" in _convert_error(path, tmp_path, config=sd1[0])
    assert "not a CLIP tokenizer folder" in _convert_error(path, tmp_path, config=sd1[0], tokenizer=tmp_path)


def test_extract_ema_without_ema_weights_is_an_error(sd1, tmp_path, tokenizer_dir):
    path = _write(tmp_path / "x.safetensors", sd1[2])
    assert "no EMA weights" in _convert_error(path, tmp_path, config=sd1[0], tokenizer=tokenizer_dir, extract_ema=True)


def test_ckpt_needs_opt_in_and_loads_weights_only(sd1, tmp_path, tokenizer_dir):
    cfg, comps, sd = sd1
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 875000, "epoch": 3}, path)
    msg = _convert_error(path, tmp_path, config=cfg, tokenizer=tokenizer_dir)
    assert "is a pickle file" in msg and "--allow-pickle" in msg
    out = co.convert_checkpoint(path, tmp_path / "m", config=cfg, tokenizer=tokenizer_dir, allow_pickle=True)
    back = ck.load_components(out, parts=("text_encoder",))
    for k, v in comps.text_encoder.state_dict().items():
        assert torch.equal(back.text_encoder.state_dict()[k], v), k


def test_detection_rules():
    sd1 = {co.UNET + "x": torch.zeros(1), "first_stage_model.x": torch.zeros(1), co.CLIP + "x": torch.zeros(1)}
    assert co.detect(sd1)["family"] == "sd1" and co.detect(sd1)["prediction_type"] == "epsilon"
    sd2 = {co.UNET + "x": torch.zeros(1), "vae.x": torch.zeros(1), co.OPENCLIP + "x": torch.zeros(1)}
    assert co.detect(sd2)["prediction_type"] == "v_prediction" and co.detect(sd2)["vae_prefix"] == "vae."
    assert co.detect(sd2)["upcast_attention"] is True          # unknown step: maybe 2.1-v, upcast is safe
    assert co.detect(sd2, 875000)["prediction_type"] == "epsilon"
    assert co.detect(sd2, 875000)["upcast_attention"] is False
    assert co.detect(sd2, 110000)["upcast_attention"] is True
    with pytest.raises(LdmError, match="no text encoder"):
        co.detect({co.UNET + "x": torch.zeros(1)})


def test_prediction_type_override(sd1, tmp_path, tokenizer_dir):
    path = _write(tmp_path / "x.safetensors", sd1[2])
    out = co.convert_checkpoint(path, tmp_path / "v", config=sd1[0], tokenizer=tokenizer_dir, prediction_type="v_prediction")
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_cli_convert(sd1, tmp_path, tokenizer_dir, capsys):
    from ldm_deploy.cli import main

    path = _write(tmp_path / "x.safetensors", sd1[2])
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(sd1[0]))
    assert main(["convert", str(path), "--out", str(tmp_path / "m"), "--tokenizer", str(tokenizer_dir),
                 "--config", str(cfg_file)]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert main(["convert", str(path), "--out", str(tmp_path / "m2"), "--config", str(cfg_file)]) == 1
    assert "--tokenizer DIR" in capsys.readouterr().err


def test_auto_config_infers_full_size_models():
    """No --config: SD 1.5 (here as an inpainting U-Net, 9 input channels) and SD 2.x-base from their shapes."""
    presets = pytest.importorskip("training.models.presets")
    from training.checkpoint import BUILDERS

    def original(p):
        with torch.device("meta"):
            return co.to_original_state_dict(ck.Components(**{part: BUILDERS[part](p[part]) for part in ck.PARTS}))

    p = presets.preset("sd15")
    p["unet"]["in_channels"] = 9
    sd = original(p)
    cfg = co._resolve_config(None, co.detect(sd), sd)
    assert cfg["unet"]["cross_attention_dim"] == 768 and cfg["unet"]["in_channels"] == 9
    sd2 = original(presets.preset("sd21"))
    cfg2 = co._resolve_config(None, co.detect(sd2, 875000), sd2)
    assert cfg2["unet"]["cross_attention_dim"] == 1024 and cfg2["unet"]["attention_head_dim"] == [5, 10, 20, 20]
    assert cfg2["scheduler"]["prediction_type"] == "epsilon" and cfg2["unet"]["upcast_attention"] is False
    assert cfg2["unet"]["sample_size"] == 64  # SD 2.x-base is a 512-px model
    from training.models.presets import preset
    assert preset("sd21")["scheduler"]["prediction_type"] == "v_prediction"  # the resolved copy, not the preset, changed


def test_schedule_and_pad_token_mismatches_warn(tmp_path, tokenizer_dir, caplog):
    presets = pytest.importorskip("training.models.presets")
    cfg = presets.preset("tiny-sd2")
    comps = our_components(cfg, tokenizer_dir, seed=7)
    sd = co.to_original_state_dict(comps)
    sd["betas"] = torch.linspace(1e-4, 2e-2, 1000)
    path = _write(tmp_path / "x.safetensors", sd)
    with caplog.at_level("WARNING", logger="training.convert_original"):
        co.convert_checkpoint(path, tmp_path / "m", config="tiny-sd2", tokenizer=tokenizer_dir)
    text = caplog.text
    assert "other betas" in text
    assert ("pads with '<|endoftext|>'" in text) == (cfg["tokenizer"].get("pad_token") not in (None, "<|endoftext|>"))
    caplog.clear()
    sd["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64).pow(2).float()
    with caplog.at_level("WARNING", logger="training.convert_original"):
        co.convert_checkpoint(_write(tmp_path / "y.safetensors", sd), tmp_path / "m", config="tiny-sd2",
                              tokenizer=make_tokenizer_dir(tmp_path / "tok2", pad_token="!"))
    assert "other betas" not in caplog.text and "pads with" not in caplog.text


def test_full_size_key_maps_match_the_reference():
    """SD 1.5 / 2.1 layouts built on the meta device: key counts and the reference's §2.2 examples."""
    presets = pytest.importorskip("training.models.presets")
    from training.checkpoint import BUILDERS

    with torch.device("meta"):
        unet = BUILDERS["unet"](presets.preset("sd15")["unet"])
        vae = BUILDERS["vae"](presets.preset("sd15")["vae"])
        te2 = BUILDERS["text_encoder"](presets.preset("sd21")["text_encoder"])
    umap = co.unet_key_map(unet.config, unet.state_dict())
    assert len(umap) == 686 and len(set(umap.values())) == 686
    for dif, ldm in [("down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
                     ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
                     ("down_blocks.2.downsamplers.0.conv.weight", "input_blocks.9.0.op.weight"),
                     ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
                     ("up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.2.conv.weight"),
                     ("mid_block.resnets.1.time_emb_proj.weight", "middle_block.2.emb_layers.1.weight"),
                     ("up_blocks.3.attentions.2.proj_out.bias", "output_blocks.11.1.proj_out.bias"),
                     ("time_embedding.linear_2.weight", "time_embed.2.weight"), ("conv_out.bias", "out.2.bias")]:
        assert umap[dif] == ldm
    vmap = co.vae_key_map(4, vae.state_dict())
    assert len(vmap) == 248 and len(set(vmap.values())) == 248
    assert vmap["decoder.up_blocks.0.upsamplers.0.conv.weight"] == "decoder.up.3.upsample.conv.weight"
    assert vmap["decoder.mid_block.attentions.0.to_out.0.weight"] == "decoder.mid.attn_1.proj_out.weight"
    assert vmap["encoder.conv_norm_out.bias"] == "encoder.norm_out.bias"
    tmap = co.openclip_key_map([co._bare(k) for k in te2.state_dict()])
    assert len(tmap) == 372
    assert tmap["encoder.layers.22.self_attn.k_proj.weight"] == ("transformer.resblocks.22.attn.in_proj_weight", 1)
    assert tmap["encoder.layers.0.mlp.fc2.bias"] == "transformer.resblocks.0.mlp.c_proj.bias"
