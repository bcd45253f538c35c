"""The export's source: a diffusers-format model folder loaded as PyTorch modules.

Loading is `training.checkpoint.load_components` (our U-Net / VAE with diffusers parameter names,
transformers' CLIPTextModel). `math_attention()` switches every attention op to plain
matmul-softmax for tracing, the pattern ONNX Runtime's transformer optimizer and TensorRT fuse.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_deploy.errors import LdmError
from ldm_deploy.export.onnx_io import trim_heap

# export component -> model folder part
PARTS = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae",
         "text_encoder_2": "text_encoder_2"}


@dataclass
class Source:
    folder: Path
    sha256: str                         # identity of the folder's files (training.checkpoint.folder_hash)
    unet: torch.nn.Module | None
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    configs: dict                       # part -> the folder's config.json dict
    scheduler_config: dict
    tokenizer_dir: Path | None          # None for the SDXL refiner (tokenizer_2 only)
    text_encoder_2: torch.nn.Module | None = None    # SDXL: CLIPTextModelWithProjection
    tokenizer_2_dir: Path | None = None
    model_index: dict | None = None

    def load(self, part: str) -> None:
        """Load `part` (a PARTS value) in float32 and eval mode when `load_source(..., lazy=True)` left it out."""
        if getattr(self, part) is None:
            from training.checkpoint import load_components

            module = getattr(load_components(self.folder, parts=(part,), dtype=torch.float32), part)
            setattr(self, part, module.eval().requires_grad_(False))

    def spill(self, part: str, path: Path) -> int:
        """Move the weights of `part` into a file at `path` and map them back from it (torch.load mmap).

        The module then computes the same, but its weights are file pages the kernel can drop and re-read,
        not anonymous memory: while the TorchScript exporter holds the module AND its constant-folded copies
        (every Linear applied to a sequence becomes a transposed copy, about 1x the module again), only the
        copies need RAM. Returns the bytes written (the caller removes the file once the module is released)."""
        module = getattr(self, part)
        torch.save(module.state_dict(), path)          # storage by storage, no copy in memory
        module.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
        gc.collect()
        trim_heap()
        return path.stat().st_size

    def release(self, part: str) -> None:
        """Drop the module of `part` and give its memory back to the system (the fp32 SDXL U-Net is 10.3 GB)."""
        setattr(self, part, None)
        gc.collect()
        trim_heap()

    @property
    def sdxl(self) -> bool:
        from ldm_deploy.export.sdxl import configs_are_sdxl

        return configs_are_sdxl(self.configs)

    def text_module(self, component: str):
        """The transformers text encoder behind `component`, or None (for math_attention)."""
        return getattr(self, component) if component in ("text_encoder", "text_encoder_2") else None

    @property
    def info(self):
        """The model description the manifest records (ldm_deploy.artifact.ModelInfo, one set of formulas)."""
        from ldm_deploy.artifact import ModelInfo

        return ModelInfo.from_configs(self.configs.get("unet"), self.configs.get("vae"), self.scheduler_config)

    @property
    def vae_scale_factor(self) -> int:
        return self.info.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.info.latent_channels


def folder_sha256(folder: Path) -> str:
    from training.checkpoint import folder_hash

    return folder_hash(folder)


def load_source(folder, components, *, lazy: bool = False) -> Source:
    """Load the parts of `folder` that `components` need, in float32 and eval mode.

    `lazy`: load none of the modules yet (configs, tokenizers and the folder's hash only); `Source.load`
    then loads one part at a time, so an export holds one component's weights, not the whole model's."""
    from training.checkpoint import _read_json, load_components

    folder = Path(folder)
    parts = () if lazy else tuple(dict.fromkeys(PARTS[c] for c in components))
    comps = load_components(folder, parts=parts, dtype=torch.float32)
    configs = {}
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        cfg = getattr(comps, f"{part}_config", None)
        if cfg is None and (folder / part / "config.json").is_file():
            cfg = _read_json(folder / part / "config.json")   # recorded even when not exported (one error line)
        if cfg is not None:
            configs[part] = cfg
    for module in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
        if module is not None:
            module.eval().requires_grad_(False)
    if (comps.tokenizer_dir is None or not Path(comps.tokenizer_dir).is_dir()) and comps.tokenizer_2_dir is None:
        raise LdmError(f"{folder} has no tokenizer/ folder", hint="the artifact needs the tokenizer files")
    return Source(folder=folder, sha256=folder_sha256(folder), unet=comps.unet, vae=comps.vae,
                  text_encoder=comps.text_encoder, configs=configs, scheduler_config=dict(comps.scheduler_config),
                  tokenizer_dir=Path(comps.tokenizer_dir) if comps.tokenizer_dir else None,
                  text_encoder_2=comps.text_encoder_2, tokenizer_2_dir=comps.tokenizer_2_dir,
                  model_index=dict(comps.model_index))


@contextlib.contextmanager
def math_attention(text_encoder=None):
    """Trace attention as plain matmul-softmax (our models' "math" backend, CLIP's "eager")."""
    from training.models.attention import attention_backend

    previous = None
    if text_encoder is not None:
        previous = text_encoder.config._attn_implementation
        text_encoder.config._attn_implementation = "eager"
    try:
        with attention_backend("math"):
            yield
    finally:
        if text_encoder is not None:
            text_encoder.config._attn_implementation = previous
