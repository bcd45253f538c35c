"""Upper bounds on the numbers ldm-deploy reads from flags and files, checked before anything is allocated.

A number in a `config.json`, `scheduler_config.json`, `manifest.json` or on the command line sizes
arrays, loops and modules; unchecked, one edited digit hangs the process or exhausts memory. Every
bound here is far above any Stable-Diffusion-family model (the SD 1.5 / SDXL value is in each comment)
and far below what one machine can hold. A value outside is one line (LdmError for a file, naming the
file and key; UsageError for a flag) and nothing is built. docs/DESIGN.md "Limits" lists them.

Torch-free: the runtime, `inspect` and the FLOP model (ldm_deploy/flops.py) use these checks too.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Mapping

from ldm_deploy.errors import LdmError, UsageError

MAX_TRAIN_TIMESTEPS = 100_000   # SD: 1000. Tables of T float64 (0.8 MB) and the cosine schedule's Python loop (~0.1 s)
MAX_IMAGE_SIDE = 8192           # pixels, a profile's height / width; SD 1.5: 512, SDXL: 1024
MAX_BATCH = 1024                # images per call, a profile's batch; an 8192^2 float32 image alone is 768 MiB
MAX_SEED = 2**63 - 1            # seeds are non-negative and recorded as JSON integers
THREADS_PER_CORE = 4            # --threads above 4 x os.cpu_count() only adds contention (and hangs at 1e5)
MAX_LORA_SCALE = 100.0          # |scale| of a LoRA (usually 0..1.5); beyond, merged fp16 weights overflow soon
MAX_PARAMETERS = 20e9           # estimated from a config before any module is built; SDXL U-Net: 2.6e9

# diffusers / transformers config.json sizes (U-Net, VAE, CLIP text encoder)
CONFIG_LIMITS: dict[str, int] = {
    "block_out_channels": 8192,        # each entry; SD: 320..1280
    "in_channels": 64, "out_channels": 64, "latent_channels": 64,  # SD: 4 (inpainting 9), VAE image 3
    "levels": 8,                       # len(block_out_channels); SD: 4
    "layers_per_block": 32,            # SD: 2
    "transformer_layers_per_block": 64,  # SDXL: 10
    "attention_head_dim": 1024,        # head count per level (diffusers' historic name); SD 1.5: 8
    "num_attention_heads": 1024,       # U-Net head count / CLIP heads; CLIP-L: 12
    "norm_num_groups": 1024,           # SD: 32
    "cross_attention_dim": 16384,      # SD 1.5: 768, SDXL: 2048
    "sample_size": 16384,              # U-Net latent side 64 / VAE image side 512
    "hidden_size": 16384,              # CLIP-L: 768, bigG: 1280
    "intermediate_size": 65536,        # CLIP-L: 3072
    "num_hidden_layers": 256,          # CLIP-L: 12, bigG: 32
    "vocab_size": 1_000_000,           # CLIP: 49408
    "max_position_embeddings": 8192,   # CLIP: 77
    "projection_dim": 16384,           # CLIP-L: 768
}


def _int_in(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and lo <= value <= hi


def check_model_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse (LdmError) a config whose sizes are outside CONFIG_LIMITS or whose parameter count, estimated
    from the config alone, exceeds MAX_PARAMETERS. `where` names the file for the message."""
    check_config_sizes(config, where)
    try:
        n = estimated_parameters(config)
    except (TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError):
        return   # a malformed config (a null block list, ...): the loader that reads it names the key
    if n > MAX_PARAMETERS:
        raise LdmError(f"{where} describes a network of ~{n:.2g} parameters, over ldm-deploy's limit of "
                       f"{MAX_PARAMETERS:.0e}", hint="the file is damaged or edited; restore it")


def check_config_sizes(config: Mapping[str, Any], where: str) -> None:
    """Each size key of CONFIG_LIMITS present in `config` is an integer (or a list of at most 8) in 1..limit."""
    if not isinstance(config, Mapping):
        raise LdmError(f"{where} is not a JSON object", hint="restore the file")
    for key, hi in CONFIG_LIMITS.items():
        if key == "levels" or key not in config or config[key] is None:
            continue
        value = config[key]
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if key == "sample_size" and isinstance(value, (list, tuple)) and len(items) != 2:
            items = [None]
        if not items or len(items) > CONFIG_LIMITS["levels"] or not all(_int_in(v, 1, hi) for v in items):
            many = f", at most {CONFIG_LIMITS['levels']} of them" if isinstance(value, (list, tuple)) else ""
            raise LdmError(f"{where}: {key} = {str(value)[:60]} is outside ldm-deploy's limit (integers 1..{hi}{many})",
                           hint="the file is damaged or edited; restore it; the limits are in docs/DESIGN.md, Limits")


def estimated_parameters(config: Mapping[str, Any]) -> float:
    """Weights of the conv / linear / embedding layers a config describes (biases and norms left out):
    the FLOP model at a 1x1 input counts 2 FLOPs per weight. Only call on a config within CONFIG_LIMITS."""
    from ldm_deploy import flops

    if "vocab_size" in config or "num_hidden_layers" in config:            # CLIP text encoder
        d = config.get("hidden_size", 512)
        return flops.text_encoder_flops(config, seq_len=1) / 2 + (config.get("vocab_size", 49408)
                                                                    + config.get("max_position_embeddings", 77)) * d
    if "latent_channels" in config:                                        # AutoencoderKL: both halves
        ch = list(config.get("block_out_channels", (128, 256, 512, 512)))
        layers = config.get("layers_per_block", 2)
        # 3x3 convs: per level, 2 per resnet (encoder `layers`, decoder `layers + 1` resnets) and a resample;
        # mid blocks: 2 resnets and an attention (4 c^2) in each half
        return float(sum(9 * c * c * (2 * layers + 2 * (layers + 1) + 2) for c in ch)
                     + 2 * (4 * 9 + 4) * ch[-1] ** 2)
    if "block_out_channels" in config:                                     # U-Net
        return flops.unet_flops(config, 1, 1, text_len=1) / 2
    return 0.0


def check_threads(value: Any, flag: str = "--threads") -> int:
    """1 <= threads <= THREADS_PER_CORE x os.cpu_count(); UsageError otherwise."""
    hi = THREADS_PER_CORE * (os.cpu_count() or 1)
    if not _int_in(value, 1, hi):
        raise UsageError(f"{flag} must be an integer from 1 to {hi} ({THREADS_PER_CORE} x the {os.cpu_count()} "
                         f"CPUs), got {value!r}", hint=f"omit {flag} for onnxruntime's default (one per core)")
    return int(value)


def check_seed(value: Any) -> int:
    if not _int_in(value, 0, MAX_SEED):
        raise UsageError(f"seed must be an integer from 0 to 2**63-1, got {value!r}")
    return int(value)


def check_train_timesteps(T: Any, where: str = "the scheduler config") -> int:
    if not _int_in(T, 2, MAX_TRAIN_TIMESTEPS):
        raise LdmError(f"{where} has num_train_timesteps = {str(T)[:40]}, outside 2..{MAX_TRAIN_TIMESTEPS}",
                       hint="SD models use 1000; restore the scheduler config")
    return int(T)


def check_scheduler_numbers(T: Any, beta_start: Any, beta_end: Any, where: str = "the scheduler config") -> None:
    """num_train_timesteps and the beta range: LdmError naming the key before any table is built."""
    check_train_timesteps(T, where)
    for key, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1 or math.isnan(value):
            raise LdmError(f"{where} has {key} = {str(value)[:40]}, not a number in (0, 1)",
                           hint="SD: beta_start 0.00085, beta_end 0.012")
    if beta_end < beta_start:
        raise LdmError(f"{where} has beta_end {beta_end} < beta_start {beta_start}",
                       hint="the betas must rise over the schedule; swap them")


def check_profile_range(what: str, lo: int, hi: int, where: str) -> None:
    top = MAX_BATCH if what == "batch" else MAX_IMAGE_SIDE
    if hi > top:
        raise LdmError(f"{where}: profiles.{what} max {hi} is over ldm-deploy's limit of {top}",
                       hint="re-run the export; never edit manifest.json by hand")
