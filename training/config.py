"""Training configuration: frozen dataclasses with commented defaults, loaded from YAML.

A config file has the sections below; every key is optional (the default is used) and an
unknown key is an error. `--set unet.steps=100` style overrides are applied to the YAML tree
before it is checked, with the value parsed as YAML (`--set unet.lr=3e-4`, `--set data.kind=folder`).
The resolved config is written next to every checkpoint and result folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ldm_deploy.configfile import bounds, load, read_mapping, to_plain
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.limits import MAX_BATCH, MAX_IMAGE_SIDE


@dataclass(frozen=True)
class ModelConfig:
    preset: str | None = None       # training.models.presets name; the dicts below are merged over its parts
    unet: dict = field(default_factory=dict)            # diffusers UNet2DConditionModel config.json keys
    vae: dict = field(default_factory=dict)             # diffusers AutoencoderKL config.json keys
    text_encoder: dict = field(default_factory=dict)    # transformers CLIPTextConfig keys
    scheduler: dict = field(default_factory=dict)       # diffusers scheduler_config.json keys


@dataclass(frozen=True)
class DataConfig:
    kind: str = "shapes"            # "shapes": generated coloured shapes; "folder": images + .txt captions
    path: str | None = None         # folder datasets: the image directory
    resolution: int = field(default=64, metadata=bounds(8, MAX_IMAGE_SIDE))  # training images are resolution x resolution
    train_size: int = 20000         # shapes: how many training images to generate
    holdout_size: int = 200         # shapes: held-out prompts/images for evaluation (never trained on)
    seed: int = 0                   # dataset generation seed (independent of the training seed)
    num_workers: int = 0            # DataLoader workers for image stages (0 = in process)


@dataclass(frozen=True)
class TokenizerConfig:
    path: str | None = None         # reuse this tokenizer folder instead of training one
    vocab_size: int = 1000          # BPE vocabulary size, an upper bound (>= 515: 2 x 256 byte symbols + specials)
    pad: str = "eos"                # "eos" (SD 1.x: pad with <|endoftext|>) or "zero" (SD 2.x: pad with "!" = id 0)
    model_max_length: int = 77      # tokens per prompt, padded


@dataclass(frozen=True)
class StageConfig:
    """Optimisation settings shared by the VAE, text-encoder and U-Net stages."""

    steps: int = field(default=1000, metadata=bounds(0))  # optimizer steps
    batch_size: int = field(default=64, metadata=bounds(1, MAX_BATCH))  # per optimizer step, over all GPUs (micro-batch = batch / (world * accum))
    grad_accum: int = field(default=1, metadata=bounds(1))  # micro-batches per optimizer step
    lr: float = 1e-4                # AdamW peak learning rate
    lr_schedule: str = "cosine"     # "constant" or "cosine" (to lr_min_ratio * lr) after warmup
    lr_min_ratio: float = 0.1
    warmup_steps: int = 100         # linear warmup from 0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0          # max global grad norm (0 = off)
    ema_decay: float = 0.0          # 0 = no EMA; else e.g. 0.999 (EMA weights are exported)
    precision: str = "auto"         # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16", "fp16"
    compile: bool = False           # torch.compile the trained network (CUDA)
    save_every: int = 500           # checkpoint interval in steps (a kill loses at most this many)
    keep_checkpoints: int = 2       # how many recent checkpoints to keep
    log_every: int = 10             # loss CSV interval in steps


@dataclass(frozen=True)
class VAEStageConfig(StageConfig):
    path: str | None = None         # reuse this VAE folder (diffusers layout) instead of training one
    loss: str = "l1"                # reconstruction loss: "l1" or "l2"
    kl_weight: float = 1e-6         # weight of the KL term against N(0, I)
    foreground_balance: float = 0.0 # share of the reconstruction loss given to foreground pixels (0 = plain mean)
    foreground_threshold: float = 0.1   # foreground: a channel differs from the image's median colour by more
    lr: float = 2e-4
    eval_images: int = 64           # held-out images for the reconstruction-PSNR report


@dataclass(frozen=True)
class TextEncoderStageConfig(StageConfig):
    path: str | None = None         # reuse (and freeze) this text encoder folder instead of training one
    projection_dim: int = 128       # shared embedding size of the contrastive heads
    image_channels: tuple[int, ...] = (32, 64, 128, 256)   # the small CNN image encoder (one stride-2 stage each)
    lr: float = 3e-4


@dataclass(frozen=True)
class UNetStageConfig(StageConfig):
    prediction_type: str = "epsilon"   # "epsilon" or "v_prediction" (written to the scheduler config)
    caption_dropout: float = 0.1       # probability of training on the empty prompt (for CFG)
    cache_latents: str = "memory"      # "memory", "disk" (under out/cache, keyed by a hash) or "off"
    scaling_factor: float | None = None  # None: keep the VAE's, or estimate 1/std(latents) for a new VAE
    ema_decay: float = 0.999
    sample_every: int = 0              # write a sample grid every N steps (0 = only at the end)
    sample_steps: int = 25             # DDIM steps for sample grids
    guidance_scale: float = 5.0
    lr: float = 2e-4
    save_fp16: bool = False            # store the final model folder's weights in fp16 (half the size)


@dataclass(frozen=True)
class EvalConfig:
    prompts: int = 200              # held-out prompts to sample
    steps: int = 25                 # sampler steps
    guidance_scale: float = 5.0
    sampler: str = "ddim"
    batch_size: int = 50
    seed: int = 1234


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0                   # training seed (data order, noise, dropout)
    out: str = "runs/train"         # run directory: checkpoints, logs, samples, model/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    text_encoder: TextEncoderStageConfig = field(default_factory=TextEncoderStageConfig)
    unet: UNetStageConfig = field(default_factory=UNetStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return to_plain(self)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config, apply `section.key=value` overrides, and check every key."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            builtin = Path(__file__).parent / "configs" / f"{path.name.removesuffix('.yaml')}.yaml"
            if not builtin.is_file():
                raise LdmError(f"config file {path} not found", hint="pass a YAML file or a built-in name: shapes, tiny")
            path = builtin
        tree = read_mapping(path, "training config")
    for item in overrides:
        apply_override(tree, item)
    return load(TrainConfig, tree, f"training config {path}" if path is not None else "training config")


def apply_override(tree: dict, item: str) -> None:
    """`a.b.c=value` -> tree['a']['b']['c'] = yaml(value). Model dicts take nested keys too."""
    if "=" not in item:
        raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set unet.steps=100")
    key, value = item.split("=", 1)
    *parents, last = key.strip().split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UsageError(f"--set {item!r}: {p!r} is not a section")
    node[last] = yaml.safe_load(value)
