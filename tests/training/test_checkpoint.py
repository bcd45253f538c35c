"""Diffusers folders: strict loading into our modules, saving that diffusers reads back, clear errors."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError
from ldm_deploy.runtime.tokenizer import bytes_to_unicode
from tests.runtime.tiny_model import tiny_artifact, tiny_folder  # noqa: F401 (fixtures)
from training import checkpoint as ck

# ----------------------------------------------------------------------------------------------------
# Tiny fixtures shared with test_convert_original.py

# SD1-like, 3 levels with 2 resnets each (exercises the index arithmetic of the original layout), attention
# only on the two outer levels, conv proj_in.
UNET_SD1 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 32, 64], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8, use_linear_projection=False,
)
# SD2-like: linear proj, per-level head counts, upcast attention, 2 levels, 1 resnet each.
UNET_SD2 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=48, attention_head_dim=[2, 4], norm_num_groups=8, use_linear_projection=True,
    upcast_attention=True,
)
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[16, 32], layers_per_block=1, latent_channels=4,
    norm_num_groups=8, sample_size=16,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
)
TEXT_SD1 = dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
TEXT_SD2 = dict(TEXT_SD1, hidden_size=48, intermediate_size=96, num_attention_heads=4, hidden_act="gelu")
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}


def tiny_config(kind: str = "sd1") -> dict:
    """A preset-style dict {unet, vae, text_encoder, scheduler} of diffusers/transformers config dicts."""
    sd2 = kind == "sd2"
    return {"unet": dict(UNET_SD2 if sd2 else UNET_SD1), "vae": dict(VAE), "text_encoder": dict(TEXT_SD2 if sd2 else TEXT_SD1),
            "scheduler": dict(SCHEDULER, prediction_type="v_prediction" if sd2 else "epsilon")}


def _bytes_to_unicode() -> list[str]:
    return list(bytes_to_unicode().values())


def make_tokenizer_dir(path: Path, pad_token: str = "<|endoftext|>") -> Path:
    """A minimal CLIP BPE tokenizer (byte symbols, a few merges, the two specials) that CLIPTokenizer loads."""
    symbols = _bytes_to_unicode()
    merges = ["a t</w>", "c at</w>", "o g</w>", "d og</w>"]
    vocab = symbols + [s + "</w>" for s in symbols] + ["at</w>", "cat</w>", "og</w>", "dog</w>"]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer"}))
    return path


def seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights of a visible scale everywhere (norms too), so a wrongly mapped tensor changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.1 if p.ndim > 1 else 0.05
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))
    return module.eval()


def diffusers_modules(cfg: dict, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return {"unet": seeded(UNet2DConditionModel(**cfg["unet"]), seed),
            "vae": seeded(AutoencoderKL(**cfg["vae"]), seed + 1),
            "text_encoder": seeded(CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])), seed + 2)}


def our_components(cfg: dict, tokenizer_dir: Path, seed: int = 0) -> ck.Components:
    mods = {part: seeded(ck.BUILDERS[part](cfg[part]), seed + i) for i, part in enumerate(ck.PARTS)}
    return ck.Components(**mods, tokenizer_dir=tokenizer_dir, scheduler_config=dict(cfg["scheduler"]),
                         unet_config=cfg["unet"], vae_config=cfg["vae"], text_encoder_config=cfg["text_encoder"])


def inputs(cfg: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    u, v, t = cfg["unet"], cfg["vae"], cfg["text_encoder"]
    return {
        "sample": torch.randn(2, u["in_channels"], 8, 8, generator=g),
        "timestep": torch.tensor([10.0, 999.0]),
        "context": torch.randn(2, 77, u["cross_attention_dim"], generator=g),
        "image": torch.rand(1, v["in_channels"], 16, 16, generator=g) * 2 - 1,
        "latent": torch.randn(1, v["latent_channels"], 4, 4, generator=g),
        "ids": torch.randint(0, t["vocab_size"], (2, 77), generator=g),
    }


@torch.no_grad()
def outputs(unet, vae, text_encoder, x: dict) -> dict:
    """The same five outputs from our modules or diffusers' (whose forward methods return output objects)."""
    eps = unet(x["sample"], x["timestep"], x["context"])
    eps = eps.sample if hasattr(eps, "sample") else eps
    post = vae.encode(x["image"])
    post = post.latent_dist if hasattr(post, "latent_dist") else post
    img = vae.decode(x["latent"])
    img = img.sample if hasattr(img, "sample") else img
    return {"unet": eps, "vae_mean": post.mean, "vae_logvar": post.logvar, "vae_decode": img,
            "text": text_encoder(x["ids"]).last_hidden_state}


def assert_outputs_equal(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    for name in expected:
        assert_close(actual[name].numpy(), expected[name].numpy(), atol=atol, rtol=atol, name=name)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory, tokenizer_dir) -> tuple[Path, dict, dict]:
    """A tiny SD1-like pipeline saved by diffusers itself, plus its modules and config."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    cfg = tiny_config("sd1")
    mods = diffusers_modules(cfg)
    pipe = StableDiffusionPipeline(
        **mods, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        scheduler=PNDMScheduler.from_config({k: v for k, v in cfg["scheduler"].items() if not k.startswith("_")}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("pipe") / "model"
    pipe.save_pretrained(folder)
    return folder, mods, cfg


# ----------------------------------------------------------------------------------------------------
# Loading and saving


def test_tokenizer_fixture_is_a_working_clip_tokenizer(tokenizer_dir):
    from transformers import CLIPTokenizer

    ids = CLIPTokenizer.from_pretrained(tokenizer_dir)("a cat", padding="max_length", max_length=77).input_ids
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    assert ids[:4] == [vocab["<|startoftext|>"], vocab["a</w>"], vocab["cat</w>"], vocab["<|endoftext|>"]]
    assert len(ids) == 77


def test_load_diffusers_folder_strictly_matches_diffusers(diffusers_folder):
    folder, mods, cfg = diffusers_folder
    comps = ck.load_components(folder)
    from training.models.unet import UNet2DConditionModel

    assert isinstance(comps.unet, UNet2DConditionModel)
    assert comps.model_index["_class_name"] == "StableDiffusionPipeline"
    assert comps.scheduler_config["_class_name"] == "PNDMScheduler"
    assert (comps.tokenizer_dir / "tokenizer_config.json").is_file()  # transformers 5 writes tokenizer.json only
    assert comps.unet_config["block_out_channels"] == [32, 32, 64]
    x = inputs(cfg)
    assert_outputs_equal(outputs(comps.unet, comps.vae, comps.text_encoder, x), outputs(**mods, x=x))


def test_load_parts_and_dtype(diffusers_folder):
    folder, _, _ = diffusers_folder
    comps = ck.load_components(folder, parts=("vae",), dtype=torch.float16)
    assert comps.unet is None and comps.text_encoder is None
    assert next(comps.vae.parameters()).dtype == torch.float16
    with pytest.raises(LdmError, match="unknown model parts"):
        ck.load_components(folder, parts=("unet", "controlnet"))


def test_saved_folder_loads_in_diffusers_with_identical_outputs(diffusers_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder, _, cfg = diffusers_folder
    comps = ck.load_components(folder)
    out = ck.save_components(comps, tmp_path / "saved")
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind

    pipe = StableDiffusionPipeline.from_pretrained(out)
    x = inputs(cfg, seed=1)
    ours = outputs(comps.unet, comps.vae, comps.text_encoder, x)
    assert_outputs_equal(outputs(pipe.unet, pipe.vae, pipe.text_encoder, x), ours)
    # ... and back into ours, unchanged
    again = ck.load_components(out)
    assert_outputs_equal(outputs(again.unet, again.vae, again.text_encoder, x), ours, atol=0.0)


def test_save_fp16_halves_weights_and_loads_back(diffusers_folder, tmp_path):
    folder, _, _ = diffusers_folder
    comps = ck.load_components(folder)
    out = ck.save_components(comps, tmp_path / "half", fp16=True)
    sd = ck.load_state_dict_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in sd.values()} == {torch.float16}
    back = ck.load_components(out, parts=("unet",))
    w0, w1 = comps.unet.conv_in.weight, back.unet.conv_in.weight
    assert back.unet.conv_in.weight.dtype == torch.float32
    assert_close(w1.detach().numpy(), w0.detach().numpy(), atol=1e-3, name="fp16 round trip")


def test_fp16_variant_and_sharded_weights_load(diffusers_folder, tmp_path):
    folder, mods, _ = diffusers_folder
    variant = tmp_path / "variant"
    mods["unet"].save_pretrained(variant, variant="fp16")
    assert (variant / "diffusion_pytorch_model.fp16.safetensors").is_file()
    unet = ck.load_unet(variant)
    assert torch.equal(unet.conv_in.weight, mods["unet"].conv_in.weight)

    sharded = tmp_path / "sharded"
    mods["unet"].save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    unet = ck.load_unet(sharded)
    for k, v in mods["unet"].state_dict().items():
        assert torch.equal(unet.state_dict()[k], v), k


def test_use_ema_reads_unet_ema(diffusers_folder, tmp_path):
    folder, mods, _ = diffusers_folder
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    with pytest.raises(LdmError, match="unet_ema"):
        ck.load_components(copy, use_ema=True)
    ema = ck.load_unet(folder / "unet")
    with torch.no_grad():
        ema.conv_in.weight.add_(1.0)
    ema_sd = ema.state_dict()
    shutil.copytree(folder / "unet", copy / "unet_ema")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ema_sd.items()}, str(copy / "unet_ema" / "diffusion_pytorch_model.safetensors"))
    comps = ck.load_components(copy, parts=("unet",), use_ema=True)
    assert torch.equal(comps.unet.conv_in.weight, ema.conv_in.weight)


def test_folder_hash_is_stable_and_sensitive(diffusers_folder, tmp_path):
    folder, _, _ = diffusers_folder
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    h = ck.folder_hash(folder)
    assert len(h) == 64 and h == ck.folder_hash(copy)
    (copy / "scheduler" / "scheduler_config.json").write_text("{}")
    assert ck.folder_hash(copy) != h
    shutil.copytree(folder, tmp_path / "copy2")
    os.rename(tmp_path / "copy2" / "tokenizer" / "tokenizer.json", tmp_path / "copy2" / "tokenizer" / "tokenizer2.json")
    assert ck.folder_hash(tmp_path / "copy2") != h  # names count, not just contents


# ----------------------------------------------------------------------------------------------------
# Loading errors: one clear line each


@pytest.fixture
def folder_copy(diffusers_folder, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(diffusers_folder[0], copy)
    return copy


def _unet_file(folder: Path) -> Path:
    return folder / "unet" / "diffusion_pytorch_model.safetensors"


def _rewrite_unet(folder: Path, edit) -> None:
    from safetensors.torch import save_file

    sd = ck.load_state_dict_file(_unet_file(folder))
    edit(sd)
    save_file(sd, str(_unet_file(folder)))


def _one_line_error(fn) -> str:
    with pytest.raises(LdmError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_truncated_file_is_a_clear_error(folder_copy):
    f = _unet_file(folder_copy)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = _one_line_error(lambda: ck.load_components(folder_copy))
    assert "is truncated" in msg and "diffusion_pytorch_model.safetensors" in msg


def test_random_bytes_are_a_clear_error(folder_copy):
    _unet_file(folder_copy).write_bytes(os.urandom(4096))
    msg = _one_line_error(lambda: ck.load_components(folder_copy))
    assert "not a valid safetensors file" in msg


def test_garbage_header_is_a_clear_error(folder_copy):
    _unet_file(folder_copy).write_bytes((20).to_bytes(8, "little") + b"x" * 40)
    assert "header is not JSON" in _one_line_error(lambda: ck.load_components(folder_copy))


def test_wrong_shape_key_is_reported(folder_copy):
    _rewrite_unet(folder_copy, lambda sd: sd.__setitem__("conv_in.bias", torch.zeros(7)))
    msg = _one_line_error(lambda: ck.load_components(folder_copy))
    assert "1 mis-shaped (conv_in.bias [7] vs model [32])" in msg


def test_missing_and_unexpected_keys_are_reported_together(folder_copy):
    def edit(sd):
        del sd["conv_out.weight"]
        del sd["conv_in.bias"]
        sd["extra.weight"] = torch.zeros(1)
    _rewrite_unet(folder_copy, edit)
    msg = _one_line_error(lambda: ck.load_components(folder_copy))
    assert "2 missing (" in msg and "conv_out.weight" in msg and "conv_in.bias" in msg
    assert "1 unexpected (extra.weight)" in msg


def test_many_missing_keys_are_counted_not_all_listed(folder_copy):
    _rewrite_unet(folder_copy, lambda sd: [sd.pop(k) for k in [k for k in sd if k.startswith("down_blocks")]])
    msg = _one_line_error(lambda: ck.load_components(folder_copy))
    assert "more)" in msg and len(msg) < 1000


def test_pickle_without_opt_in_is_refused(folder_copy):
    f = _unet_file(folder_copy)
    torch.save(ck.load_state_dict_file(f), folder_copy / "unet" / "diffusion_pytorch_model.bin")
    f.unlink()
    msg = _one_line_error(lambda: ck.load_components(folder_copy))
    assert "is a pickle file" in msg and "--allow-pickle" in msg
    assert "refusing" in _one_line_error(lambda: ck.load_state_dict_file(folder_copy / "unet" / "diffusion_pytorch_model.bin"))


def test_pickle_with_opt_in_loads_weights_only(folder_copy, diffusers_folder):
    f = _unet_file(folder_copy)
    torch.save(ck.load_state_dict_file(f), folder_copy / "unet" / "diffusion_pytorch_model.bin")
    f.unlink()
    comps = ck.load_components(folder_copy, parts=("unet",), allow_pickle=True)
    assert torch.equal(comps.unet.conv_in.weight, diffusers_folder[1]["unet"].conv_in.weight)


class NotATensor:  # a pickled instance of this is what weights_only refuses
    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_pickle_with_code_is_rejected_even_with_opt_in(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": NotATensor()}, path)
    msg = _one_line_error(lambda: ck.load_state_dict_file(path, allow_pickle=True))
    assert "weights_only=True" in msg


def test_missing_folder_parts_name_the_path(folder_copy, tmp_path):
    shutil.rmtree(folder_copy / "vae")
    msg = _one_line_error(lambda: ck.load_components(folder_copy))
    assert f"missing {folder_copy / 'vae'}" in msg
    assert "model_index.json" in _one_line_error(lambda: ck.load_components(tmp_path))
    (folder_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert "no weights in" in _one_line_error(lambda: ck.load_components(folder_copy, parts=("unet",)))


def test_failed_save_leaves_the_old_folder_untouched(diffusers_folder, tmp_path, monkeypatch):
    comps = ck.load_components(diffusers_folder[0])
    target = ck.save_components(comps, tmp_path / "model")
    before = ck.folder_hash(target)
    calls = []

    def failing(sd, path, fp16):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(sd, path, fp16)

    real = ck._save_weights
    monkeypatch.setattr(ck, "_save_weights", failing)
    with torch.no_grad():
        comps.unet.conv_in.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        ck.save_components(comps, target)
    assert ck.folder_hash(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_model_info_of_a_folder_is_what_its_export_records(tiny_folder, tiny_artifact):  # noqa: F811
    """One model description: the folder's ModelInfo (the PyTorch reference's) equals the one the exported
    manifest gives (the deployed pipeline's), field for field, and in-memory modules give it too."""
    from ldm_deploy.artifact import Artifact

    deployed = Artifact(tiny_artifact).info
    folder = ck.model_info(tiny_folder, profiles=deployed.profiles)
    assert folder == deployed
    comps = ck.load_components(tiny_folder)
    modules = ck.module_info({"unet": comps.unet, "vae": comps.vae}, comps.scheduler_config)
    assert (modules.scaling_factor, modules.latent_channels, modules.vae_scale_factor, modules.prediction_type) == \
        (deployed.scaling_factor, deployed.latent_channels, deployed.vae_scale_factor, deployed.prediction_type)
    assert dict(modules.scheduler_config) == dict(deployed.scheduler_config) and modules.profiles is None
