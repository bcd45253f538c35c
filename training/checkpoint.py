"""Diffusers-format model folders: strict loading into our modules, atomic saving.

A folder looks like what `StableDiffusionPipeline.save_pretrained` writes:

    model_index.json
    unet/config.json            unet/diffusion_pytorch_model.safetensors   (or .fp16 / sharded .index.json)
    vae/config.json             vae/diffusion_pytorch_model.safetensors
    text_encoder/config.json    text_encoder/model.safetensors              (transformers CLIPTextModel)
    tokenizer/                  vocab.json, merges.txt, ...
    scheduler/scheduler_config.json

SDXL folders (`StableDiffusionXLPipeline` / `StableDiffusionXLImg2ImgPipeline`) add `text_encoder_2/`
(transformers CLIPTextModelWithProjection) and `tokenizer_2/`; the refiner has no `text_encoder/` and
`tokenizer/` (model_index.json says `[null, null]` for them). By default every part the folder's
model_index.json declares is loaded.

Loading is strict and never renames a key: every tensor in the file must be a parameter or buffer of
the module built from config.json, with the same shape, and every parameter must be in the file.
Anything else is one `LdmError` that lists the first offenders and the counts. Pickled weights
(`.bin`, `.ckpt`, `.pt`) are refused unless `allow_pickle=True`, and are then read with
`torch.load(weights_only=True)`, which refuses pickles holding anything but tensors and plain data.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm_deploy.errors import LdmError
from ldm_deploy.fileio import OutputKind, atomic_dir, check_free_space, check_out_dir, sha256_regular, write_json
from ldm_deploy.paths import check_tree, inside

log = logging.getLogger(__name__)

PARTS = ("unet", "vae", "text_encoder")
# save_components (convert, ldm-train) replaces an existing folder only when it wrote it (fileio.MARKER), or with force
MODEL_OUTPUT = OutputKind("model", "a model folder written by ldm-deploy (convert or ldm-train)")
ALL_PARTS = PARTS + ("text_encoder_2",)   # text_encoder_2: SDXL's OpenCLIP bigG (CLIPTextModelWithProjection)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
TEXT_MODEL_PREFIX = "text_model."  # on-disk CLIPTextModel keys carry it; transformers >= 5.6 modules don't
_SHOW = 5  # offending keys listed per kind in an error message

# File names tried in order, per weight stem. Safetensors first; pickles last (refused without opt-in).
_WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                 "text_encoder_2": "model"}
_PICKLE_NAMES = {"diffusion_pytorch_model": "diffusion_pytorch_model", "model": "pytorch_model"}


@dataclass
class Components:
    """What a model folder holds. Parts not loaded are None."""

    unet: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None          # transformers.CLIPTextModel
    tokenizer_dir: Path | None = None                    # folder with vocab.json, merges.txt, ...
    scheduler_config: dict = field(default_factory=dict)  # scheduler/scheduler_config.json
    model_index: dict = field(default_factory=dict)       # model_index.json
    unet_config: dict | None = None                      # the raw config.json dicts, as read
    vae_config: dict | None = None
    text_encoder_config: dict | None = None
    text_encoder_2: torch.nn.Module | None = None        # SDXL: transformers.CLIPTextModelWithProjection
    tokenizer_2_dir: Path | None = None                  # SDXL: tokenizer_2/ (pads with "!")
    text_encoder_2_config: dict | None = None

    @property
    def is_sdxl(self) -> bool:
        """An SDXL layout: a second text encoder (the base has both, the refiner only this one)."""
        return self.text_encoder_2 is not None or self.text_encoder_2_config is not None


# ----------------------------------------------------------------------------------------------------
# Reading weight files


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise LdmError(f"missing {path}", hint="is this a diffusers model folder? convert single-file checkpoints with `ldm-deploy convert`")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LdmError(f"{path} is not valid JSON: {e}") from None


def _check_safetensors_header(path: Path) -> None:
    """Fail with one clear line on truncated or non-safetensors files, before safetensors sees them."""
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    if size < 8:
        raise LdmError(f"{bad}: only {size} bytes", hint="the file is empty or truncated; re-download or re-save it")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise LdmError(
                f"{bad}: header claims {n} bytes but the file has {size} bytes",
                hint="the file is truncated or is not safetensors (a pickled .ckpt/.bin renamed?)",
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise LdmError(f"{bad}: its header is not JSON", hint="the file is corrupt or in another format") from None
    if not isinstance(header, dict):
        raise LdmError(f"{bad}: its header is not a JSON object")
    ends = []
    for k, v in header.items():
        if k == "__metadata__":
            continue
        offsets = v.get("data_offsets") if isinstance(v, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise LdmError(f"{bad}: tensor {str(k)[:60]!r} has no valid data_offsets",
                           hint="the file is corrupt or in another format")
        ends.append(offsets[1])
    data = size - 8 - n
    if ends and max(ends) > data:
        raise LdmError(
            f"{path} is truncated: tensors need {max(ends)} data bytes but the file holds {data}",
            hint="re-download or re-save the file",
        )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_safetensors_header(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LdmError(f"cannot read safetensors file {path}: {' '.join(str(e).split())}") from None


def load_pickle_file(path: Path, *, allow_pickle: bool) -> dict:
    """torch.load with weights_only=True (tensors and plain containers only), after an explicit opt-in."""
    if not allow_pickle:
        raise LdmError(
            f"{path} is a pickle file ({path.suffix}), which can run code when loaded; refusing it",
            hint="convert it to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust its source; "
            "it is then read with torch.load(weights_only=True)",
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LdmError(
            f"cannot load {path} with torch.load(weights_only=True): {first}",
            hint="the file is corrupt, or holds objects other than tensors; only plain weight files are accepted",
        ) from None
    if not isinstance(obj, dict):
        raise LdmError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def load_state_dict_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read one weight file (safetensors, sharded safetensors index, or opted-in pickle) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise LdmError(f"missing weight file {path}")
    name = path.name
    if name.endswith(".index.json"):
        return _load_sharded(path, allow_pickle=allow_pickle)
    if name.endswith(".safetensors"):
        return _load_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        sd = load_pickle_file(path, allow_pickle=allow_pickle)
        if "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise LdmError(f"{path} holds non-tensor entries: {', '.join(map(str, bad[:_SHOW]))}")
        return sd
    raise LdmError(f"unknown weight file type {path}", hint="expected .safetensors, .safetensors.index.json, .bin or .ckpt")


def _load_sharded(index: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LdmError(f"{index} has no weight_map")
    out: dict[str, torch.Tensor] = {}
    shards = set(weight_map.values())
    if not all(isinstance(s, str) for s in shards):
        raise LdmError(f"{index} has a weight_map whose values are not shard file names")
    for shard in sorted(shards):   # each shard must lie in the index's folder, links followed
        part = load_state_dict_file(inside(index.parent, shard, named_in=index), allow_pickle=allow_pickle)
        out.update(part)
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise LdmError(f"{index} lists {len(missing)} tensors its shards lack, e.g. {', '.join(missing[:_SHOW])}")
    return out


def find_weight_file(directory: Path, stem: str, *, variant: str | None = None) -> Path:
    """The weight file of a component folder: plain safetensors, sharded, fp16 variant, then pickles."""
    variants = [variant] if variant else [None, "fp16"]
    candidates = []
    for v in variants:
        mid = f".{v}" if v else ""
        candidates += [f"{stem}{mid}.safetensors", f"{stem}{mid}.safetensors.index.json"]
    pstem = _PICKLE_NAMES.get(stem, stem)
    for v in variants:
        mid = f".{v}" if v else ""
        candidates += [f"{pstem}{mid}.bin", f"{pstem}{mid}.bin.index.json", f"{pstem}{mid}.ckpt"]
    for name in candidates:
        if (directory / name).is_file():
            return inside(directory, name)   # a weight file linked from outside the folder is refused
    raise LdmError(
        f"no weights in {directory}",
        hint=f"expected one of {', '.join(candidates[:4])}",
    )


# ----------------------------------------------------------------------------------------------------
# Strict loading


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Load `state_dict` into `module` with no renaming; any mismatch is one LdmError listing all kinds."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [
        f"{k} {list(state_dict[k].shape)} vs model {list(own[k].shape)}"
        for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                more = f", ... {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:_SHOW])}{more})")
        raise LdmError(
            f"{what} does not match its config: {'; '.join(parts)}",
            hint="the weights belong to a different architecture or config.json was edited; "
            "re-export the folder or fix the config",
        )
    bad_dtype = [k for k, v in state_dict.items() if v.is_floating_point() != own[k].is_floating_point()]
    if bad_dtype:
        raise LdmError(f"{what}: tensors with the wrong kind of dtype: {', '.join(bad_dtype[:_SHOW])}")
    module.load_state_dict(state_dict, strict=True)


def _build_unet(config: dict) -> torch.nn.Module:
    from training.models.config import UNetConfig
    from training.models.unet import UNet2DConditionModel

    return UNet2DConditionModel(UNetConfig.from_dict(config))


def _build_vae(config: dict) -> torch.nn.Module:
    from training.models.config import VAEConfig
    from training.models.vae import AutoencoderKL

    return AutoencoderKL(VAEConfig.from_dict(config))


def _build_text_encoder(config: dict) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_deploy.limits import check_model_config

    check_model_config(config, "the text encoder config")   # a 1e9 vocabulary is refused before allocation
    try:
        return CLIPTextModel(CLIPTextConfig.from_dict(config))
    except (TypeError, ValueError) as e:
        raise LdmError(f"unsupported text encoder config: {e}") from None


def _build_text_encoder_2(config: dict) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    try:
        return CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config))
    except (TypeError, ValueError) as e:
        raise LdmError(f"unsupported text_encoder_2 config: {e}") from None


BUILDERS = {"unet": _build_unet, "vae": _build_vae, "text_encoder": _build_text_encoder,
            "text_encoder_2": _build_text_encoder_2}
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def _no_random_init():
    """Skip random initialisation (SD 1.5's U-Net + CLIP: ~20 s on one core) for modules a strict load fills."""
    try:
        from transformers.initialization import no_init_weights  # also skips CLIPTextModel's own init
    except ImportError:  # older transformers: torch-level init is what costs the time anyway
        no_init_weights = contextlib.nullcontext
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with no_init_weights():
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def build_for_loading(part: str, config: dict) -> torch.nn.Module:
    """The module of `part` built from its config with uninitialised weights; every one must then be loaded."""
    with _no_random_init():
        return BUILDERS[part](config)


def text_encoder_state_dict(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Match on-disk CLIPTextModel keys to the installed transformers' layout.

    Files carry `text_model.` (every hub checkpoint and transformers < 5.6); transformers >= 5.6 modules
    don't. This is a layout difference of transformers versions, not a rename of weights. The
    `position_ids` buffer is non-persistent in current transformers and is dropped (always arange).
    """
    own = module.state_dict()
    own_prefixed = any(k.startswith(TEXT_MODEL_PREFIX) for k in own)
    out = {}
    for k, v in sd.items():
        if k.endswith("embeddings.position_ids"):
            continue
        if k in own:        # already the module's name (CLIPTextModelWithProjection's text_projection.weight)
            out[k] = v
            continue
        bare = k[len(TEXT_MODEL_PREFIX):] if k.startswith(TEXT_MODEL_PREFIX) else k
        out[TEXT_MODEL_PREFIX + bare if own_prefixed else bare] = v
    return out


def _load_part(part: str, directory: Path, *, dtype: torch.dtype, allow_pickle: bool, variant: str | None):
    if not directory.is_dir():
        raise LdmError(f"missing {directory}", hint=f"a diffusers model folder needs a {directory.name}/ folder with config.json and weights")
    config = _read_json(inside(directory, "config.json"))
    module = build_for_loading(part, config)
    sd = load_state_dict_file(find_weight_file(directory, _WEIGHT_STEMS[part], variant=variant), allow_pickle=allow_pickle)
    if part in ("text_encoder", "text_encoder_2"):
        sd = text_encoder_state_dict(module, sd)
    load_strict(module, sd, f"{part} weights in {directory}")
    return module.to(dtype).eval(), config


def load_unet(directory, *, dtype=torch.float32, allow_pickle=False, variant=None):
    return _load_part("unet", Path(directory), dtype=dtype, allow_pickle=allow_pickle, variant=variant)[0]


def load_vae(directory, *, dtype=torch.float32, allow_pickle=False, variant=None):
    return _load_part("vae", Path(directory), dtype=dtype, allow_pickle=allow_pickle, variant=variant)[0]


def load_text_encoder(directory, *, dtype=torch.float32, allow_pickle=False, variant=None):
    return _load_part("text_encoder", Path(directory), dtype=dtype, allow_pickle=allow_pickle, variant=variant)[0]


def _declared(model_index: dict, name: str) -> bool | None:
    """model_index.json's word on a part: True (a class is named), False ([null, null]), None (not listed)."""
    entry = model_index.get(name)
    if not isinstance(entry, (list, tuple)):
        return None
    return any(v is not None for v in entry)


def default_parts(folder: str | os.PathLike, model_index: dict | None = None) -> tuple[str, ...]:
    """The parts a folder holds: unet, vae, text_encoder unless model_index.json says [null, null] for them
    (the SDXL refiner has no text_encoder), text_encoder_2 when model_index.json names it or the folder exists."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json") if model_index is None else model_index
    parts = [p for p in PARTS if _declared(index, p) is not False]
    if _declared(index, "text_encoder_2") or (_declared(index, "text_encoder_2") is None
                                              and (folder / "text_encoder_2").is_dir()):
        parts.append("text_encoder_2")
    return tuple(parts)


def load_components(
    folder: str | os.PathLike,
    *,
    parts: tuple[str, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    use_ema: bool = False,
    variant: str | None = None,
) -> Components:
    """Load a diffusers-format folder strictly into our modules.

    `parts=None` loads what the folder declares (`default_parts`: SDXL folders add text_encoder_2).
    `use_ema=True` reads the U-Net from `unet_ema/` (where training saves the EMA copy) instead of `unet/`.
    `variant="fp16"` picks `*.fp16.safetensors`; by default the plain file, else the fp16 one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LdmError(f"model folder {folder} does not exist")
    comps = Components(model_index=_read_json(inside(folder, "model_index.json")))
    if parts is None:
        parts = default_parts(folder, comps.model_index)
    unknown = set(parts) - set(ALL_PARTS)
    if unknown:
        raise LdmError(f"unknown model parts {sorted(unknown)}", hint=f"choose from {', '.join(ALL_PARTS)}")
    sched = inside(folder, "scheduler/scheduler_config.json")
    comps.scheduler_config = _read_json(sched)
    tok = inside(folder, "tokenizer")
    if _declared(comps.model_index, "tokenizer") is not False:   # the SDXL refiner has only tokenizer_2/
        if not tok.is_dir():
            raise LdmError(f"missing {tok}", hint="a model folder needs tokenizer/ with vocab.json and merges.txt")
        check_tree(tok, root=folder)
        comps.tokenizer_dir = tok
    tok2 = inside(folder, "tokenizer_2")
    if _declared(comps.model_index, "tokenizer_2") and not tok2.is_dir():
        raise LdmError(f"missing {tok2}", hint="model_index.json names a tokenizer_2; an SDXL folder needs tokenizer_2/")
    if tok2.is_dir():
        check_tree(tok2, root=folder)
    comps.tokenizer_2_dir = tok2 if tok2.is_dir() else None
    cfg2 = inside(folder, "text_encoder_2/config.json")
    if cfg2.is_file() and "text_encoder_2" not in parts:
        comps.text_encoder_2_config = _read_json(cfg2)      # recorded (SDXL-ness) even when not loaded
    for part in parts:
        sub = "unet_ema" if part == "unet" and use_ema else part
        if sub == "unet_ema" and not (folder / sub).is_dir():
            raise LdmError(f"use_ema: {folder / sub} does not exist", hint="this folder has no EMA U-Net; load without EMA")
        module, config = _load_part(part, inside(folder, sub), dtype=dtype, allow_pickle=allow_pickle, variant=variant)
        setattr(comps, part, module)
        setattr(comps, f"{part}_config", config)
    return comps


# ----------------------------------------------------------------------------------------------------
# The model description the numpy pipeline runs with (the same ModelInfo an artifact's manifest gives)


def model_info(folder: str | os.PathLike, *, profiles=None):
    """`ldm_deploy.artifact.ModelInfo` of a diffusers model folder: what its export writes into the manifest
    (sizes, prediction type, scheduler config; SDXL's conditioning when it has a text_encoder_2)."""
    folder = Path(folder)
    configs = {part: _read_json(folder / part / "config.json") for part in ALL_PARTS
               if (folder / part / "config.json").is_file()}
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    return info_from_configs(configs, _read_json(folder / "scheduler" / "scheduler_config.json"), index,
                             profiles=profiles)


def module_info(modules, scheduler_config: dict, *, scaling_factor: float | None = None):
    """`ModelInfo` of in-memory modules ({"unet", "vae", ...}, ours or diffusers'): their configs as a saved
    folder would hold them; `scaling_factor` overrides the VAE config's (training may measure its own)."""
    configs = {part: module_config_dict(modules[part]) for part in ALL_PARTS if modules.get(part) is not None}
    if scaling_factor is not None:
        configs["vae"] = {**configs.get("vae", {}), "scaling_factor": float(scaling_factor)}
    return info_from_configs(configs, scheduler_config)


def info_from_configs(configs: dict, scheduler_config: dict, model_index: dict | None = None, *, profiles=None):
    """part -> config.json dict, the scheduler config and model_index.json -> `ModelInfo` (one formula for the
    sizes: `ModelInfo.from_configs`; SDXL's entry as export/sdxl.py's `manifest_block` writes it)."""
    from ldm_deploy.artifact import ModelInfo, SDXLInfo

    sdxl = None
    if configs.get("text_encoder_2") is not None:
        from ldm_deploy.export.sdxl import pooled_dim, time_ids_count

        index = model_index or {}
        sdxl = SDXLInfo.from_dict({
            "text_encoders": [c for c in ("text_encoder", "text_encoder_2") if configs.get(c) is not None],
            "pooled_dim": pooled_dim(configs), "time_ids": time_ids_count(configs),
            "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False)),
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))})
    return ModelInfo.from_configs(configs.get("unet"), configs.get("vae"), scheduler_config, profiles=profiles,
                                  sdxl=sdxl)


# ----------------------------------------------------------------------------------------------------
# Saving


def _diffusers_version() -> str:
    from training.models.config import DIFFUSERS_VERSION  # the version our configs claim; any later one reads them

    return DIFFUSERS_VERSION


def module_config_dict(module: torch.nn.Module) -> dict:
    cfg = module.config
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def model_index(scheduler_class: str) -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


# SDXL pipeline flags model_index.json carries (diffusers reads them as pipeline config).
SDXL_FLAGS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score", "add_watermarker")


def sdxl_model_index(scheduler_class: str, *, base: bool, flags: dict | None = None) -> dict:
    """model_index.json of an SDXL base (both text encoders) or refiner (text_encoder_2 only) folder.

    Flags default to the hub's: the base zeroes the negative embeddings of empty negative prompts, the
    refiner conditions on aesthetic scores instead of the target size.
    """
    none = [None, None]
    index = {
        "_class_name": "StableDiffusionXLPipeline" if base else "StableDiffusionXLImg2ImgPipeline",
        "_diffusers_version": _diffusers_version(),
        "force_zeros_for_empty_prompt": base,
        "requires_aesthetics_score": not base,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"] if base else none,
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if base else none,
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    index.update({k: v for k, v in (flags or {}).items() if k in SDXL_FLAGS})
    if not base:
        index.pop("add_watermarker", None)
    return index


def _save_text_encoder(te: torch.nn.Module, directory: Path, architecture: str, fp16: bool) -> None:
    directory.mkdir()
    te_cfg = te.config.to_dict()
    te_cfg["architectures"] = [architecture]
    write_json(directory / "config.json", te_cfg)
    # `text_model.`-prefixed keys: what every transformers version and the hub layout read.
    te_sd = {k if k.startswith(TEXT_MODEL_PREFIX) or k == "text_projection.weight" else TEXT_MODEL_PREFIX + k: v
             for k, v in te.state_dict().items() if not k.endswith("position_ids")}
    _save_weights(te_sd, directory / "model.safetensors", fp16)


def _save_weights(sd: dict[str, torch.Tensor], path: Path, fp16: bool) -> None:
    from safetensors.torch import save_file

    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu")
        if fp16 and v.is_floating_point():
            v = v.half()
        out[k] = v.contiguous()
    save_file(out, str(path), metadata={"format": "pt"})


def save_components(components: Components, folder: str | os.PathLike, *, fp16: bool = False,
                    force: bool = False, inputs=()) -> Path:
    """Write the diffusers layout atomically: a crash leaves the old folder (if any) or the complete new one.

    An existing `folder` is replaced only when ldm-deploy wrote it (or it is empty), or with `force`;
    never when it is, holds or lies inside the tokenizer folder or one of `inputs` (fileio.check_out_dir)."""
    folder = Path(folder)
    c = components
    sdxl = c.text_encoder_2 is not None
    required = ("unet", "vae", "text_encoder_2") if sdxl else PARTS   # the SDXL refiner has no text_encoder
    for part in required:
        if getattr(c, part) is None:
            raise LdmError(f"cannot save {folder}: components.{part} is not loaded")
    parts = [p for p in ALL_PARTS if getattr(c, p) is not None]
    tokenizers = [("tokenizer", c.tokenizer_dir)] if c.text_encoder is not None else []
    if sdxl:
        tokenizers.append(("tokenizer_2", c.tokenizer_2_dir))
    for name, directory in tokenizers:
        if directory is None or not Path(directory).is_dir():
            raise LdmError(f"cannot save {folder}: no {name} folder", hint=f"set components.{name}_dir")
    inputs = [d for _, d in tokenizers] + list(inputs)
    check_out_dir(folder, MODEL_OUTPUT, inputs=inputs, force=force)
    for _, directory in tokenizers:
        check_tree(directory)   # copied below: no link out of it is followed
    need = sum(t.numel() * (2 if fp16 and t.is_floating_point() else t.element_size())
               for part in parts for t in getattr(c, part).state_dict().values())
    check_free_space(folder, need + (64 << 20), f"writing {folder}")
    scheduler = dict(c.scheduler_config)
    scheduler.setdefault("_class_name", "PNDMScheduler")
    scheduler.setdefault("_diffusers_version", _diffusers_version())
    with atomic_dir(folder, MODEL_OUTPUT, inputs=inputs, force=force) as tmp:
        for part in ("unet", "vae"):
            module = getattr(c, part)
            (tmp / part).mkdir()
            write_json(tmp / part / "config.json", module_config_dict(module))
            _save_weights(module.state_dict(), tmp / part / "diffusion_pytorch_model.safetensors", fp16)
        if c.text_encoder is not None:
            _save_text_encoder(c.text_encoder, tmp / "text_encoder", "CLIPTextModel", fp16)
        if sdxl:
            _save_text_encoder(c.text_encoder_2, tmp / "text_encoder_2", "CLIPTextModelWithProjection", fp16)
        for name, directory in tokenizers:
            shutil.copytree(directory, tmp / name)
        (tmp / "scheduler").mkdir()
        write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
        index = (sdxl_model_index(scheduler["_class_name"], base=c.text_encoder is not None, flags=c.model_index)
                 if sdxl else model_index(scheduler["_class_name"]))
        write_json(tmp / "model_index.json", index)
    log.info("wrote %s", folder)
    return folder


def folder_hash(folder: str | os.PathLike) -> str:
    """sha256 over (relative path, file sha256) for every file, sorted: a model folder's identity.

    Links are not followed: a symbolic link leading out of the folder (or a FIFO, device or socket in
    it) is refused (LdmError); a link inside it counts as its target's relative path, and each regular
    file is read up to its size (fileio.sha256_regular)."""
    folder = Path(folder)
    check_tree(folder)
    entries = []
    for dirpath, dirnames, filenames in os.walk(folder):     # followlinks=False
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                entries.append((rel, "link:" + os.path.relpath(path.resolve(), folder.resolve())))
            elif path.is_file():
                entries.append((rel, sha256_regular(path)))
    h = hashlib.sha256()
    for rel, digest in sorted(entries, key=lambda e: e[0].split("/")):  # Path order, as before
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()
