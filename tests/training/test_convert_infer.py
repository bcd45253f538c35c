"""`convert` without --config: the architecture comes from the checkpoint's tensor shapes.

Tiny SD1-like and SD2-like pipelines are built with diffusers itself and saved by it, turned into
single-file checkpoints with the key map of diffusers' convert_diffusers_to_original_stable_diffusion.py
(tests/training/diffusers_to_original.py), and converted back with no config: every weight and every
config value must come back exactly. The tiny configs use the SD block layout that script hard-codes
(4 levels x 2 resnets, attention on levels 0-2) and the conventions for what shapes do not carry
(GroupNorm 32, heads: SD1 8 per level, SD2 and the text encoders head width 64).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_deploy.errors import LdmError
from training import checkpoint as ck
from training import convert_original as co
from training.models.config import UNetConfig, VAEConfig
from training.models.presets import preset
from tests.training import diffusers_to_original as d2o

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "clip_tokenizer"
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act", "layer_norm_eps")

SD_LAYOUT = {"layers_per_block": 2, "norm_num_groups": 32,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
FAMILIES = {
    "sd1": {"unet": {**SD_LAYOUT, "block_out_channels": [32, 32, 64, 64], "attention_head_dim": 8,
                     "cross_attention_dim": 64, "sample_size": 64},
            "text": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1, "hidden_act": "quick_gelu"},
            "base": "sd15"},
    "sd2": {"unet": {**SD_LAYOUT, "block_out_channels": [64, 64, 128, 128], "attention_head_dim": [1, 1, 2, 2],
                     "cross_attention_dim": 64, "sample_size": 96, "use_linear_projection": True,
                     "upcast_attention": True},
            "text": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1, "hidden_act": "gelu"},
            "base": "sd21"},
}
VAE = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 2, "norm_num_groups": 32, "latent_channels": 4,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def saved(request, tmp_path_factory):
    """(family, diffusers pipeline folder, single-file checkpoint made with the script's key map)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers import DDIMScheduler, PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    family = request.param
    fam = FAMILIES[family]
    base = preset(fam["base"])
    torch.manual_seed(11)
    unet = UNet2DConditionModel(**fam["unet"])
    vae = AutoencoderKL(**VAE, sample_size=fam["unet"]["sample_size"] * 8)
    text = CLIPTextModel(CLIPTextConfig(**{**base["text_encoder"], **fam["text"], "num_hidden_layers": 2}))
    with torch.no_grad():  # GroupNorm/LayerNorm init to ones/zeros: make every tensor distinct
        for p in [*unet.parameters(), *vae.parameters(), *text.parameters()]:
            p.add_(torch.randn_like(p) * 0.01)
    sched_cls = PNDMScheduler if family == "sd1" else DDIMScheduler
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, scheduler=sched_cls.from_config(base["scheduler"]),
        tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER), pad_token=base["tokenizer"]["pad_token"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    root = tmp_path_factory.mktemp(family)
    pipe.save_pretrained(str(root / "model"), safe_serialization=True)
    m = root / "model"
    te = {("text_model." + k if not k.startswith("text_model.") else k): v
          for k, v in load_file(str(m / "text_encoder" / "model.safetensors")).items()}
    sd = d2o.to_original(load_file(str(m / "unet" / "diffusion_pytorch_model.safetensors")),
                         load_file(str(m / "vae" / "diffusion_pytorch_model.safetensors")), te, v20=family == "sd2")
    path = root / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return family, m, path


def _config(folder: Path, part: str) -> dict:
    return json.loads((folder / part / "config.json").read_text())


def test_convert_infers_the_architecture_exactly(saved, tmp_path, caplog):
    family, model, path = saved
    kw = {"prediction_type": "v_prediction"} if family == "sd2" else {}
    with caplog.at_level("INFO", logger="training.convert_original"):
        out = co.convert_checkpoint(path, tmp_path / "back", tokenizer=model / "tokenizer", **kw)
    assert "heads are not in the tensor shapes" in caplog.text
    want = ck.load_components(model)
    got = ck.load_components(out)
    for part in ck.PARTS:
        w, g = getattr(want, part).state_dict(), getattr(got, part).state_dict()
        assert w.keys() == g.keys(), part
        bad = [k for k in w if not torch.equal(w[k], g[k])]
        assert not bad, f"{part}: {bad[:4]}"
    assert UNetConfig.from_dict(_config(out, "unet")).to_dict() == UNetConfig.from_dict(_config(model, "unet")).to_dict()
    assert VAEConfig.from_dict(_config(out, "vae")).to_dict() == VAEConfig.from_dict(_config(model, "vae")).to_dict()
    te_want, te_got = _config(model, "text_encoder"), _config(out, "text_encoder")
    assert {k: te_got[k] for k in TEXT_KEYS} == {k: te_want[k] for k in TEXT_KEYS}
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == ("v_prediction" if family == "sd2" else "epsilon")
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_diffusers_single_file_loader_reads_the_script_checkpoint(saved):
    """The reproduced key map is the real one: diffusers' own (pip) single-file converter reads the file back."""
    from diffusers.loaders import single_file_utils as sfu

    family, model, path = saved
    sd = ck.load_state_dict_file(path)
    unet = sfu.convert_ldm_unet_checkpoint(dict(sd), _config(model, "unet"))
    want = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert unet.keys() == want.keys() and all(torch.equal(unet[k], want[k]) for k in want)
    vae = sfu.convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if k.startswith("first_stage_model.")},
                                         _config(model, "vae"))
    want = load_file(str(model / "vae" / "diffusion_pytorch_model.safetensors"))
    assert vae.keys() == want.keys() and all(torch.equal(vae[k].reshape(want[k].shape), want[k]) for k in want)


@pytest.mark.parametrize("saved", ["sd2"], indirect=True)
def test_sd2_prediction_type_and_native_size_follow_the_file_or_the_user(saved, tmp_path):
    family, model, path = saved
    sd = ck.load_state_dict_file(path)
    cfg, _ = co.infer_config(sd, co.detect(sd, 875000))          # SD 2.x-base: epsilon, 512 px
    assert cfg["scheduler"]["prediction_type"] == "epsilon" and cfg["unet"]["sample_size"] == 64
    out = co.convert_checkpoint(path, tmp_path / "v", tokenizer=model / "tokenizer", prediction_type="v_prediction")
    assert _config(out, "unet")["sample_size"] == 96 and _config(out, "vae")["sample_size"] == 768


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "sd15", "sd21"])
def test_infer_config_reproduces_the_presets_shapes(name):
    """Our own inverse map on the presets (2-level tiny ones and the full-size ones on the meta device)."""
    p = preset(name)
    with torch.device("meta"):
        comps = ck.Components(**{part: ck.BUILDERS[part](p[part]) for part in ck.PARTS})
    sd = co.to_original_state_dict(comps)
    cfg, notes = co.infer_config(sd, co.detect(sd))
    a, b = UNetConfig.from_dict(cfg["unet"]), UNetConfig.from_dict(p["unet"])
    shape_fields = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                    "up_block_types", "transformer_layers_per_block", "cross_attention_dim", "use_linear_projection")
    assert {f: getattr(a, f) for f in shape_fields} == {f: getattr(b, f) for f in shape_fields}
    va, vb = VAEConfig.from_dict(cfg["vae"]), VAEConfig.from_dict(p["vae"])
    assert (va.block_out_channels, va.layers_per_block, va.latent_channels) == \
        (vb.block_out_channels, vb.layers_per_block, vb.latent_channels)
    te = p["text_encoder"]
    assert {k: cfg["text_encoder"][k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "max_position_embeddings", "hidden_act")} == \
        {k: te[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "max_position_embeddings", "hidden_act")}
    if name in ("sd15", "sd21"):  # the full-size models follow the conventions: everything is exact
        assert a.to_dict() == b.to_dict() and va.to_dict() == vb.to_dict()
        assert cfg["text_encoder"]["num_attention_heads"] == te["num_attention_heads"]


def _stub(keys: dict) -> dict:
    return {k: torch.zeros(*shape) for k, shape in keys.items()}


def test_sdxl_and_other_families_are_refused_in_one_line(tmp_path):
    sdxl = _stub({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                  "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                  "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (8, 4),
                  "first_stage_model.encoder.conv_in.weight": (4, 3, 3, 3)})
    path = tmp_path / "sdxl.safetensors"
    save_file(sdxl, str(path))
    with pytest.raises(LdmError) as e:
        co.convert_checkpoint(path, tmp_path / "out", tokenizer=TOKENIZER)
    # SDXL files go to training/convert_sdxl.py, which refuses this stub (no SDXL text encoders) in one line
    assert "SDXL" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(LdmError, match="SD 3 checkpoint"):
        co.detect(_stub({"model.diffusion_model.joint_blocks.0.x": (1,)}))
    stub = _stub({"model.diffusion_model.label_emb.0.0.weight": (4, 2), "first_stage_model.x": (1,),
                  "cond_stage_model.transformer.x": (1,)})   # a class-conditioned U-Net (SDXL's, without its encoders)
    with pytest.raises(LdmError, match="class-conditioned"):
        co.infer_config(stub, co.detect(stub))


def test_shapes_that_match_no_family_are_refused(tmp_path):
    """An SD1 file whose U-Net attends to a width the text encoder does not have."""
    p = preset("tiny")
    p["unet"]["cross_attention_dim"] = 48
    with torch.device("meta"):
        comps = ck.Components(**{part: ck.BUILDERS[part](p[part]) for part in ck.PARTS})
    sd = co.to_original_state_dict(comps)
    with pytest.raises(LdmError, match="attends to 48-wide text features but the text encoder is 32 wide"):
        co.infer_config(sd, co.detect(sd))
    sd = {k: v for k, v in sd.items() if ".proj_in." not in k}
    with pytest.raises(LdmError, match="no attention blocks"):
        co.infer_config(sd, co.detect(sd))
