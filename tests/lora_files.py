"""Real LoRA files for tests, made by peft and diffusers on the tiny model folder (tests/runtime/tiny_model.py).

- `peft`: `unet.add_adapter(LoraConfig)` + `get_peft_model_state_dict` + `StableDiffusionPipeline.save_lora_weights`
  with the adapter metadata (r=4, lora_alpha=8): attention, feed-forward, 1x1 proj_in and 3x3 resnet convs (LoCon).
- `kohya`: another such adapter through diffusers' own `convert_state_dict_to_kohya` (lora_unet_*, lora_down/up,
  alpha; alphas then set to 3 so alpha/r matters).
- `te`: a text-encoder adapter injected by peft itself (transformers 5.25's `add_adapter` refuses peft < 0.22),
  saved with diffusers' `text_encoder.` prefix; `te_peer` is peft's merged weight for each adapted layer.
"""
from __future__ import annotations

from pathlib import Path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "conv1", "conv2"]
TE_TARGETS = ["q_proj", "v_proj", "fc1"]


def peft_adapter(model, r: int, alpha: float, targets: list[str], seed: int):
    """peft's own injection (`add_adapter`: diffusers' ModelMixin / transformers' PeftAdapterMixin) with both
    halves random (lora_B starts at zero), and its state dict as peft saves it."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    model.add_adapter(config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return get_peft_model_state_dict(model), config


def _unet_adapter(folder, seed, r, alpha, targets):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").eval()
    return peft_adapter(unet, r, alpha, targets, seed)


def make_lora_files(folder: Path, out: Path) -> dict[str, Path]:
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    sd, config = _unet_adapter(folder, 1, 4, 8, UNET_TARGETS)
    StableDiffusionPipeline.save_lora_weights(out / "peft", unet_lora_layers=sd, unet_lora_adapter_metadata=config.to_dict())
    files["peft"] = out / "peft" / "pytorch_lora_weights.safetensors"

    sd, _ = _unet_adapter(folder, 2, 2, 2, ["to_q", "to_v", "conv2"])
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in sd.items()})
    kohya = {k: (torch.tensor(3.0) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
    save_file(kohya, str(out / "kohya.safetensors"))
    files["kohya"] = out / "kohya.safetensors"

    te = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").eval()
    tcfg = LoraConfig(r=2, lora_alpha=5, target_modules=TE_TARGETS, init_lora_weights="gaussian")
    te = inject_adapter_in_model(tcfg, te)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in te.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    te_sd = {k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous()   # transformers-4 names,
             for k, v in get_peft_model_state_dict(te).items()}                            # as files in the wild
    StableDiffusionPipeline.save_lora_weights(out / "te", text_encoder_lora_layers=te_sd,
                                              text_encoder_lora_adapter_metadata=tcfg.to_dict())
    files["te"] = out / "te" / "pytorch_lora_weights.safetensors"
    return files


def te_peer(folder: Path, te_file: Path, scale: float) -> dict:
    """peft's own merge of the `te` file into the text encoder: {our parameter name: merged weight}."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").eval()
    te = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=5, target_modules=TE_TARGETS), te)
    sd = {k.removeprefix("text_encoder.").removeprefix("text_model."): v for k, v in load_file(str(te_file)).items()}
    set_peft_model_state_dict(te, sd)
    out = {}
    with torch.no_grad():
        for name, m in te.named_modules():
            if isinstance(m, LoraLayer):
                m.scale_layer(scale)
                m.merge()
                out[f"{name}.weight"] = m.get_base_layer().weight.detach().clone()
    return out
