"""Stage outputs: one component per diffusers sub-folder (stages/vae, stages/text_encoder), saved and loaded."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ldm_deploy.errors import LdmError
from ldm_deploy.fileio import atomic_dir, check_free_space, write_json

WEIGHT_FILE = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
               "text_encoder": "model.safetensors"}


def save_part(part: str, module: nn.Module, folder: Path, report: dict | None = None) -> Path:
    """Write one component in the diffusers sub-folder layout, atomically (same files as save_components)."""
    from safetensors.torch import save_file

    from training.checkpoint import TEXT_MODEL_PREFIX, module_config_dict

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if not k.endswith("position_ids")}
    if part == "text_encoder":
        config = module.config.to_dict()
        config["architectures"] = ["CLIPTextModel"]
        state = {k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k: v for k, v in state.items()}
    else:
        config = module_config_dict(module)
    check_free_space(folder, sum(v.numel() * v.element_size() for v in state.values()) + (16 << 20),
                     f"the trained {part}")
    with atomic_dir(folder) as tmp:
        write_json(tmp / "config.json", config)
        save_file(state, str(tmp / WEIGHT_FILE[part]), metadata={"format": "pt"})
        if report is not None:
            write_json(tmp / "report.json", report)
    return folder


def load_part(part: str, folder: Path) -> nn.Module:
    from training import checkpoint

    loader = {"unet": checkpoint.load_unet, "vae": checkpoint.load_vae, "text_encoder": checkpoint.load_text_encoder}
    if not (folder / "config.json").is_file():
        raise LdmError(f"no trained {part} at {folder}",
                       hint=f"run `ldm-train {part.replace('_', '-')}` first, or set {part}.path to an existing folder")
    return loader[part](folder)


def frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
