"""ldm_deploy/lora.py: real kohya and diffusers/peft files (built by peft + diffusers, tests/lora_files.py)
read into deltas that equal diffusers' `load_lora_weights` + `fuse_lora(lora_scale=...)` (U-Net) and peft's
own merge (text encoder: transformers 5.25 refuses peft 0.21 for diffusers' text-encoder path here;
tests/interop/test_lora_diffusers.py compares with diffusers in the optimum environment)."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.lora import LoraSpec, load_lora, merge
from tests.runtime.tiny_model import tiny_folder  # noqa: F401 (fixture)

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

SCALE = 0.7


@pytest.fixture(scope="session")
def lora_files(tiny_folder, tmp_path_factory):
    from tests.lora_files import make_lora_files

    return make_lora_files(tiny_folder, tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def model(tiny_folder):
    from training.checkpoint import load_components

    return load_components(tiny_folder)


@pytest.fixture(scope="module")
def targets(model):
    from ldm_deploy.lora import torch_targets

    return torch_targets({"unet": model.unet, "text_encoder": model.text_encoder})


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_unet_deltas_equal_diffusers_fuse_lora(tiny_folder, lora_files, targets, model, layout):
    import diffusers

    lora = load_lora(lora_files[layout], targets)
    assert lora.layout == layout and lora.components() == {"unet"}
    convs = [m for m in lora.modules if m.down.ndim == 4 and m.down.shape[-1] == 3]
    assert convs, "the file should hold 3x3 LoCon modules"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_folder), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_files[layout]))
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()
    fused = {k: v.numpy() for k, v in pipe.unet.state_dict().items()}
    base = {k: v.numpy() for k, v in model.unet.state_dict().items()}
    deltas = lora.deltas("unet", targets["unet"], SCALE)
    changed = {k for k in fused if not np.array_equal(fused[k], base[k])}
    assert changed == set(deltas), "the same layers change"
    ours = merge(base, [(lora, SCALE)], "unet", targets["unet"])
    for name in deltas:   # both compute W + s * (alpha/r) * B @ A in float32: only summation order differs
        assert_close(ours[name], fused[name], rtol=1e-5, atol=1e-6, name=name)


def test_text_encoder_deltas_equal_peft_merge(tiny_folder, lora_files, targets, model):
    from tests.lora_files import te_peer

    lora = load_lora(lora_files["te"], targets)
    assert lora.components() == {"text_encoder"}
    peer = te_peer(tiny_folder, lora_files["te"], SCALE)
    base = {k: v.numpy() for k, v in model.text_encoder.state_dict().items()}
    deltas = lora.deltas("text_encoder", targets["text_encoder"], SCALE)
    assert set(deltas) == set(peer)
    ours = merge(base, [(lora, SCALE)], "text_encoder", targets["text_encoder"])
    for name in deltas:
        assert_close(ours[name], peer[name].numpy(), rtol=1e-5, atol=1e-6, name=name)


def test_unknown_and_unmatched_keys_are_one_error(lora_files, targets, tmp_path):
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(lora_files["kohya"]))
    sd["lora_unet_not_a_layer.lora_down.weight"] = np.zeros((2, 4), np.float32)
    sd["lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a"] = np.zeros((2, 4), np.float32)   # LoHa
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LdmError, match=r"2 of \d+ keys .*lora_unet_not_a_layer"):
        load_lora(tmp_path / "bad.safetensors", targets)
    sd = load_file(str(lora_files["peft"]))
    sd.pop(next(k for k in sd if k.endswith("lora_B.weight")))
    save_file(sd, str(tmp_path / "half.safetensors"))
    with pytest.raises(LdmError, match="lack their down/A or up/B half"):
        load_lora(tmp_path / "half.safetensors", targets)


def test_wrong_model_shapes_and_no_pickle(lora_files, targets, tmp_path):
    narrow = {c: {n: (s[0] // 2, *s[1:]) for n, s in t.items()} for c, t in targets.items()}
    with pytest.raises(LdmError, match="does not fit the weight"):
        load_lora(lora_files["peft"], narrow)
    (tmp_path / "x.pt").write_bytes(b"\x80\x04")
    with pytest.raises(UsageError, match="safetensors only"):
        load_lora(tmp_path / "x.pt", targets)


def test_base_layer_names_and_spec_parsing(lora_files, targets, tmp_path):
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(lora_files["peft"]))
    renamed = {k.replace(".to_q.", ".to_q.base_layer.") if ".to_q." in k else k: v for k, v in sd.items()}
    save_file(renamed, str(tmp_path / "bl.safetensors"))
    a = load_lora(lora_files["peft"], targets)
    b = load_lora(tmp_path / "bl.safetensors", targets)   # no metadata: alpha = r (diffusers' default)
    assert [m.param for m in a.modules] == [m.param for m in b.modules]
    assert {m.alpha for m in a.modules} == {8.0} and {m.alpha for m in b.modules} == {None}
    assert LoraSpec.parse("x.safetensors:0.5") == LoraSpec(tmp_path.parent / "x.safetensors", 0.5).__class__(
        LoraSpec.parse("x.safetensors").path, 0.5)
    assert LoraSpec.parse("C:/a/x.safetensors").scale == 1.0
    with pytest.raises(UsageError):
        LoraSpec.parse("x.safetensors:much")


def test_merge_never_drifts(lora_files, targets, model):
    base = {k: v.numpy() for k, v in model.unet.state_dict().items()}
    lora = load_lora(lora_files["peft"], targets)
    once = merge(base, [(lora, 1.0)], "unet", targets["unet"])
    none = merge(base, [], "unet", targets["unet"])
    assert all(none[k] is base[k] for k in base)
    assert any(not np.array_equal(once[k], base[k]) for k in base)


def test_kohya_text_encoder_names(tiny_folder, lora_files, targets, model, tmp_path):
    """lora_te(1)_text_model_encoder_layers_... (kohya) from diffusers' own converter == peft's merge."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    from tests.lora_files import te_peer

    sd = load_file(str(lora_files["te"]))          # text_encoder.text_model.encoder...lora_A.weight
    kohya = convert_state_dict_to_kohya(sd)
    kohya = {k: (torch.tensor(5.0) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in kohya)
    save_file(kohya, str(tmp_path / "te_kohya.safetensors"))
    lora = load_lora(tmp_path / "te_kohya.safetensors", targets)
    assert lora.layout == "kohya" and lora.components() == {"text_encoder"}
    peer = te_peer(tiny_folder, lora_files["te"], SCALE)
    base = {k: v.numpy() for k, v in model.text_encoder.state_dict().items()}
    ours = merge(base, [(lora, SCALE)], "text_encoder", targets["text_encoder"])
    for name, w in peer.items():
        assert_close(ours[name], w.numpy(), rtol=1e-5, atol=1e-6, name=name)


def test_peft_save_pretrained_folder_alpha_from_adapter_config(lora_files, targets, tmp_path):
    """peft's save_pretrained layout: base_model.model.<module>.lora_A.weight + adapter_config.json."""
    import json

    from safetensors.numpy import load_file, save_file

    sd = {k.replace("unet.", "base_model.model.", 1): v for k, v in load_file(str(lora_files["peft"])).items()}
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "alpha_pattern": {"conv2": 2}}))
    lora = load_lora(tmp_path / "adapter_model.safetensors", targets)
    alphas = {m.param: m.alpha for m in lora.modules}
    assert lora.components() == {"unet"}
    assert {a for p, a in alphas.items() if ".conv2." in p} == {2.0}
    assert {a for p, a in alphas.items() if ".conv2." not in p} == {8.0}


def test_scale_is_bounded_on_every_way_in():
    """A NaN, infinite or huge scale (limits.MAX_LORA_SCALE) is one UsageError whether it comes from --lora,
    a LoraSpec, or a (path, scale) tuple given to the runtime switch (which used float() unchecked)."""
    from ldm_deploy.runtime.lora_switch import _spec

    for text in ("x.safetensors:nan", "x.safetensors:inf", "x.safetensors:1e30"):
        with pytest.raises(UsageError, match="scale"):
            LoraSpec.parse(text)
    for scale in (float("nan"), 1e30, -1e3):
        with pytest.raises(UsageError, match="scale"):
            _spec(("x.safetensors", scale))
    assert LoraSpec.parse("x.safetensors:-1.5").scale == -1.5 and LoraSpec("x", np.float32(0.5)).scale == 0.5


def test_sdxl_original_block_names_equal_diffusers_converter():
    """Every Linear / Conv2d of the full-size SDXL U-Net (meta device): our original-name (SGM) table, fed
    through diffusers' own kohya-SDXL conversion, lands on the module it was made from (tests/export/
    test_lora_sdxl.py checks the numbers on a tiny SDXL folder)."""
    import re

    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)

    from ldm_deploy.lora import _sgm_names, torch_targets

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
            attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    modules = [p[: -len(".weight")] for p in torch_targets({"unet": unet})["unet"]]
    sgm = _sgm_names(modules)
    assert len(sgm) == len(modules) == 794
    assert sgm["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"] == \
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k"
    assert sgm["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert sgm["mid_block.resnets.1.time_emb_proj"] == "middle_block.2.emb_layers.1"
    one = torch.zeros(1, 1)
    sd = {f"lora_unet_{s.replace('.', '_')}.{part}": one for s in sgm.values()
          for part in ("lora_down.weight", "lora_up.weight")}
    converted = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(sd, unet.config))
    converted = converted[0] if isinstance(converted, tuple) else converted

    def module_of(key):   # diffusers' names for attention LoRAs: `attn1.processor.to_q_lora.down.weight`
        key = re.sub(r"\.processor\.(to_[qkv])_lora\..*", r".\1", key.removeprefix("unet."))
        return re.sub(r"\.processor\.to_out_lora\..*", ".to_out.0", key).split(".lora")[0]

    assert {module_of(k) for k in converted if k.startswith("unet.")} == set(sgm)


def test_sdxl_text_encoder_2_keys_in_both_layouts(tmp_path):
    """`lora_te2_` (kohya) and `text_encoder_2.` (diffusers) reach text_encoder_2, never text_encoder (whose
    module names are the same); on a one-encoder model a `lora_te2_` key is one clear error."""
    from safetensors.numpy import save_file

    q = "encoder.layers.0.self_attn.q_proj.weight"
    targets = {"text_encoder": {q: (4, 3)}, "text_encoder_2": {q: (4, 3)}}
    down, up = np.full((1, 3), 0.5, np.float32), np.full((4, 1), 2.0, np.float32)
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha": np.array(2.0, np.float32)},
              str(tmp_path / "kohya.safetensors"))
    save_file({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,
               "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": up},
              str(tmp_path / "peft.safetensors"))
    for name, alpha in (("kohya", 2.0), ("peft", 1.0)):       # peft without metadata: alpha = rank
        lora = load_lora(tmp_path / f"{name}.safetensors", targets)
        assert lora.components() == {"text_encoder_2"}
        assert_close(lora.deltas("text_encoder_2", targets["text_encoder_2"], 0.5)[q], 0.5 * alpha * (up @ down),
                     rtol=0, atol=0, name=name)
    with pytest.raises(LdmError, match="3 of 3 keys are not LoRA weights"):
        load_lora(tmp_path / "kohya.safetensors", {"text_encoder": {q: (4, 3)}})
