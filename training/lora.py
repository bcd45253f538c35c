"""Train a LoRA on a finished model folder: a concept the model never saw (a new shapes colour or shape),
saved in the diffusers / peft layout that `ldm-deploy export --lora` and `Pipeline.set_loras` read.

    ldm-train lora --base models/shapes-demo --config training/configs/lora-semicircle.yaml --out outputs/lora-semicircle

The base weights stay frozen; rank-r adapters `W x + (alpha / r) * B A x` (B starts at zero, so step 0 is
the base model) wrap the U-Net's attention, feed-forward and proj_in/proj_out layers, and optionally the
text encoder's attention. Training images come from the shapes generator: `concept_fraction` of them show
the concept (training/data/shapes.NEW_COLOURS / NEW_SHAPES), the rest drawn as the base model was trained,
so the other colours and shapes are kept. For the concept, the (shape, position) pairs of a colour, or the
(colour, position) pairs of a shape, with `(7 * i + p) % 5 == 0` are never drawn: the evaluation prompts use
exactly those (held-out compositions).

The VAE is frozen too, so no LoRA gets past what it reproduces: before training, `vae_ceiling` reads the
held-out concept images after the VAE's round trip, and a ceiling below `min_vae_ceiling` is refused.

Output `<out>/`: `pytorch_lora_weights.safetensors` (`unet.<module>.lora_A.weight` / `lora_B.weight`,
`text_encoder.<module>...`, with diffusers' `lora_adapter_metadata`: r, lora_alpha, target_modules),
`lora_config.json` (the resolved config), `report.json` (losses, time, evaluation, the VAE ceiling).
Evaluation (`evaluate_lora`): held-out concept prompts at scale 1 (colour, shape and both read right by
the analyser with the concept colours and shapes) and the base's held-out prompts at scale 0.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm_deploy import configfile
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.flops import vae_scale_factor

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_OUT_FILES = {WEIGHTS_NAME, "lora_config.json", "report.json"}


def _is_older_lora_dir(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    return WEIGHTS_NAME in names and names <= _OUT_FILES


def _lora_output():
    from ldm_deploy.fileio import OutputKind

    return OutputKind("lora-run", "a LoRA folder written by `ldm-train lora`", _is_older_lora_dir)


@dataclass(frozen=True)
class LoraTrainConfig:
    concept: str = "brown"                  # a training.data.shapes.NEW_COLOURS or NEW_SHAPES name
    concept_fraction: float = 0.5           # share of training images in the concept colour
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                "ff.net.2")          # U-Net module name suffixes (Linear / 1x1 conv)
    text_encoder: bool = False              # also adapt the text encoder (helps a word the tokenizer splits)
    te_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    caption_dropout: float = 0.1            # as the base was trained (unconditional rows for CFG)
    seed: int = 0
    log_every: int = 50
    eval_prompts: int = 50                  # held-out concept prompts (and as many base prompts); 0: no eval
    eval_steps: int = 25
    guidance: float = 5.0
    min_vae_ceiling: float = 0.8            # refuse to train when the frozen VAE itself reproduces the concept in
                                            # fewer held-out images (vae_ceiling); 0: report only
    device: str = "auto"                    # auto | cpu | cuda

    def __post_init__(self):
        from training.data.shapes import NEW_COLOURS, NEW_SHAPES

        if self.concept not in NEW_COLOURS and self.concept not in NEW_SHAPES:
            raise UsageError(f"unknown concept {self.concept!r}; choose one of {', '.join([*NEW_COLOURS, *NEW_SHAPES])}")
        if not 0 < self.concept_fraction <= 1 or self.rank < 1 or self.steps < 1 or self.batch_size < 1:
            raise UsageError("lora config: concept_fraction in (0, 1], rank, steps and batch_size >= 1")
        if not 0 <= self.min_vae_ceiling <= 1:
            raise UsageError(f"lora config: min_vae_ceiling must be in [0, 1], got {self.min_vae_ceiling}")

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> "LoraTrainConfig":
        data = configfile.read_mapping(path, "LoRA config") if path else {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return configfile.load(cls, data, str(path) if path else "", error=UsageError)


# --- the adapters --------------------------------------------------------------------------------
class LoraLayer(nn.Module):
    """`base(x) + (alpha / r) * up(down(x))` for a Linear or Conv2d `base` (frozen)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))    # peft's init: A random, B zero
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x)) * self.scale


def inject(module: nn.Module, suffixes, rank: int, alpha: float) -> dict[str, LoraLayer]:
    """Wrap every Linear / Conv2d whose name ends with one of `suffixes`; returns name -> LoraLayer."""
    found = {}
    for name, child in list(module.named_modules()):
        if isinstance(child, (nn.Linear, nn.Conv2d)) and any(name == s or name.endswith("." + s) for s in suffixes):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            layer = LoraLayer(child, rank, alpha).to(next(child.parameters()).device)
            setattr(parent, attr, layer)
            found[name] = layer
    if not found:
        raise UsageError(f"no Linear/Conv2d layer matches the targets {list(suffixes)}")
    return found


def save_lora(path: Path, layers: dict[str, dict[str, LoraLayer]], config: LoraTrainConfig) -> Path:
    """The diffusers / peft layout with diffusers' adapter metadata (atomic write)."""
    from ldm_deploy.fileio import atomic_file

    tensors, meta = {}, {}
    for component, found in layers.items():
        for name, layer in found.items():
            tensors[f"{component}.{name}.lora_A.weight"] = layer.down.weight.detach().float().cpu().contiguous()
            tensors[f"{component}.{name}.lora_B.weight"] = layer.up.weight.detach().float().cpu().contiguous()
        meta.update({f"{component}.r": config.rank, f"{component}.lora_alpha": config.alpha,
                     f"{component}.target_modules": sorted(found)})
    data = _serialize(tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    with atomic_file(path) as f:
        f.write(data)
    return path


def _serialize(tensors, metadata) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


# --- data ----------------------------------------------------------------------------------------
def concept_held_out(shape_index: int, position_index: int) -> bool:
    """Held-out (shape, position) pairs of a colour concept; (colour, position) pairs of a shape concept."""
    return (7 * shape_index + position_index) % 5 == 0


def _concept_axis(config: LoraTrainConfig) -> tuple[str, str, tuple]:
    """(the attribute the concept sets, the attribute it is paired with, that attribute's values)."""
    from training.data.shapes import COLOUR_NAMES, NEW_COLOURS, SHAPES

    return ("colour", "shape", SHAPES) if config.concept in NEW_COLOURS else ("shape", "colour", COLOUR_NAMES)


def _concept_attrs(config: LoraTrainConfig, other: str, position: str, size: str, rng) -> dict:
    from training.data.shapes import BACKGROUNDS

    key, other_key, _ = _concept_axis(config)
    attrs = {key: config.concept, other_key: other, "position": position, "size": size}
    backgrounds = [b for b in BACKGROUNDS if b != attrs["colour"]]
    return attrs | {"background": backgrounds[rng.integers(len(backgrounds))]}


def training_attrs(rng: np.random.Generator, config: LoraTrainConfig) -> dict:
    from training.data.shapes import POSITIONS, sample_attrs

    attrs = sample_attrs(rng, "train")
    if rng.random() < config.concept_fraction:
        _, _, others = _concept_axis(config)
        while True:
            s, p = int(rng.integers(len(others))), int(rng.integers(len(POSITIONS)))
            if not concept_held_out(s, p):
                break
        attrs = _concept_attrs(config, others[s], POSITIONS[p], attrs["size"], rng)
    return attrs


def concept_prompts(n: int, config: LoraTrainConfig, seed: int = 0) -> list[tuple[str, dict]]:
    """`n` prompts over the concept's held-out (shape or colour, position) pairs, seeded sizes and backgrounds."""
    from training.data.shapes import POSITIONS, SIZES, caption

    _, _, others = _concept_axis(config)
    pairs = [(s, p) for s in range(len(others)) for p in range(len(POSITIONS)) if concept_held_out(s, p)]
    rng = np.random.default_rng([seed, 11])
    out = []
    while len(out) < n:
        for k in rng.permutation(len(pairs)):
            s, p = pairs[k]
            attrs = _concept_attrs(config, others[s], POSITIONS[p], tuple(SIZES)[rng.integers(len(SIZES))], rng)
            out.append((caption(attrs), attrs))
            if len(out) == n:
                break
    return out


# --- training ------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_lora(base: str | Path, out: str | Path, config: LoraTrainConfig, *, force: bool = False) -> dict:
    """Train, save `<out>/pytorch_lora_weights.safetensors`, evaluate; returns the report. `out` is written
    whole at the end (fileio.atomic_dir); an existing folder that is not a LoRA folder we wrote is refused
    before training unless `force`, and one that is, holds or lies inside `base` always."""
    from ldm_deploy.fileio import atomic_dir, check_out_dir, write_json
    from training.checkpoint import load_components
    from training.noise import NoiseSchedule
    from training.stages.text import encode_text, load_tokenizer, tokenize
    from training.stages.unet import DiffusionObjective

    base, out = Path(base), Path(out)
    if not (base / "model_index.json").is_file():
        raise UsageError(f"{base} is not a model folder (no model_index.json)", hint="pass --base MODEL_DIR")
    kind = _lora_output()
    check_out_dir(out, kind, inputs=[base], force=force)      # before any training
    device = _device(config.device)
    comps = load_components(base)
    unet, vae, te = comps.unet.to(device), comps.vae.to(device), comps.text_encoder.to(device)
    for m in (unet, vae, te):
        m.requires_grad_(False).eval()
    tokenizer = load_tokenizer(Path(comps.tokenizer_dir))
    resolution = int(comps.unet_config["sample_size"]) * vae_scale_factor(comps.vae_config)
    ceiling = _check_vae_ceiling(vae, config, resolution) if config.eval_prompts > 0 else None
    torch.manual_seed(config.seed)
    layers = _inject_layers(unet, te, config)
    params = [p for found in layers.values() for layer in found.values() for p in (layer.down.weight, layer.up.weight)]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    with torch.no_grad():
        empty = encode_text(te, tokenize(tokenizer, [""]).to(device))
    objective = DiffusionObjective(unet, NoiseSchedule.from_config(dict(comps.scheduler_config)),
                                   comps.scheduler_config.get("prediction_type", "epsilon"),
                                   float(vae.config.scaling_factor), config.caption_dropout, empty, vae)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 3])
    unet.train()
    losses, start = [], time.perf_counter()
    for step in range(1, config.steps + 1):
        x, captions = _draw_batch(rng, config, resolution, device)
        context = _context(te, tokenize(tokenizer, captions).to(device), trained=config.text_encoder)
        loss, _ = objective((x, context), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not math.isfinite(loss.item()):
            raise LdmError(f"LoRA training diverged at step {step} (loss {loss.item()})", hint="lower lr")
        if step % config.log_every == 0 or step == config.steps:
            losses.append((step, round(loss.item(), 5)))
            print(f"[lora] step {step}/{config.steps} loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - start
    with atomic_dir(out, kind, inputs=[base], force=force) as tmp:
        path = save_lora(tmp / WEIGHTS_NAME, layers, config)
        write_json(tmp / "lora_config.json", {"base": str(base), **dataclasses.asdict(config)})
        report = {"weights": str(out / WEIGHTS_NAME), "steps": config.steps, "seconds": round(seconds, 1),
                  "losses": losses, "device": str(device), "resolution": resolution,
                  "modules": {c: len(v) for c, v in layers.items()}}
        if config.eval_prompts > 0:
            report["eval"] = evaluate_lora(base, path, config)
            report["eval"]["vae_ceiling"] = ceiling
        write_json(tmp / "report.json", report)
    return report


def _check_vae_ceiling(vae: nn.Module, config: LoraTrainConfig, resolution: int) -> dict:
    """Before any training: can the frozen VAE carry the concept at all? Refuses one under min_vae_ceiling."""
    ceiling = vae_ceiling(vae, config, resolution)
    print(f"[lora] vae ceiling: the base's VAE round trip of {config.eval_prompts} rendered held-out concept "
          f"images reads colour {ceiling['colour']:.0%}, shape {ceiling['shape']:.0%}", flush=True)
    if ceiling["colour_and_shape"] < config.min_vae_ceiling:
        raise LdmError(f"the base model's VAE reproduces the concept {config.concept!r} in only "
                       f"{ceiling['colour_and_shape']:.0%} of the rendered held-out images (colour and shape read "
                       f"right after encode + decode; min_vae_ceiling {config.min_vae_ceiling:.0%}): a U-Net / "
                       f"text-encoder LoRA cannot go beyond that",
                       hint="pick a concept the VAE reproduces, or set min_vae_ceiling: 0 to train anyway")
    return ceiling


def _inject_layers(unet: nn.Module, te: nn.Module, config: LoraTrainConfig) -> dict:
    """{"unet": {name: LoraLayer}, "text_encoder": {...} when it is trained too}."""
    layers = {"unet": inject(unet, config.targets, config.rank, config.alpha)}
    if config.text_encoder:
        layers["text_encoder"] = inject(te, config.te_targets, config.rank, config.alpha)
    return layers


def _draw_batch(rng: np.random.Generator, config: LoraTrainConfig, resolution: int, device) -> tuple[torch.Tensor, list]:
    """A batch of the concept: (B, 3, H, W) float images in [-1, 1] on `device`, and their captions."""
    from training.data.shapes import caption, render

    attrs = [training_attrs(rng, config) for _ in range(config.batch_size)]
    images = np.stack([render(a, resolution, rng) for a in attrs])                  # (B, H, W, 3) uint8
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, [caption(a) for a in attrs]


def _context(te: nn.Module, ids: torch.Tensor, trained: bool) -> torch.Tensor:
    """Text embeddings (B, 77, D): with gradients when the text encoder carries LoRA layers too."""
    from training.stages.text import encode_text

    if trained:
        return te(input_ids=ids.long()).last_hidden_state
    with torch.no_grad():
        return encode_text(te, ids)


# --- evaluation ----------------------------------------------------------------------------------
def _rates(scores: list[dict]) -> dict:
    n = max(len(scores), 1)
    return ({k: round(sum(r[k] for r in scores) / n, 4) for k in ("colour", "shape", "position")}
            | {"colour_and_shape": round(sum(r["colour"] and r["shape"] for r in scores) / n, 4)})


@torch.no_grad()
def vae_ceiling(vae: nn.Module, config: LoraTrainConfig, resolution: int, batch: int = 25) -> dict:
    """The most a U-Net / text-encoder LoRA can reach: the held-out concept prompts rendered by the shapes
    generator (with its jitter), encoded and decoded by the frozen VAE (posterior mean), read by the analyser
    with the concept colours. A VAE trained only on the base palette may not carry a new colour: the demo's
    decodes brown (140, 80, 30) as orange on grey, greyish pink on blue."""
    from training.data.analyser import analyse, score
    from training.data.shapes import render

    prompts = concept_prompts(config.eval_prompts, config, seed=config.seed)
    rng = np.random.default_rng([config.seed, 5])
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    scores = []
    for i in range(0, len(prompts), batch):
        attrs = [a for _, a in prompts[i:i + batch]]
        images = np.stack([render(a, resolution, rng) for a in attrs])
        x = torch.from_numpy(images).to(device, dtype).permute(0, 3, 1, 2) / 127.5 - 1
        y = vae.decode(vae.encode(x).mean)
        back = ((y.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scores += [score(a, analyse(im, extra_colours=True, extra_shapes=True)) for a, im in zip(attrs, back)]
    return _rates(scores)


def evaluate_lora(base: str | Path, lora_file: str | Path, config: LoraTrainConfig, *, scale: float = 1.0) -> dict:
    """Concept prompts with the LoRA at `scale`; the base's held-out prompts at scale 0 (the base weights)."""
    from ldm_deploy.lora import load_lora, merge, torch_targets
    from training.checkpoint import load_components
    from training.data.analyser import analyse, score
    from training.data.shapes import holdout_prompts
    from training.stages.sampling import generate

    comps = load_components(Path(base))
    modules = {"unet": comps.unet.eval(), "vae": comps.vae.eval(), "text_encoder": comps.text_encoder.eval()}
    resolution = int(comps.unet_config["sample_size"]) * vae_scale_factor(comps.vae_config)
    kw = dict(steps=config.eval_steps, guidance=config.guidance, seed=config.seed, resolution=resolution)
    prompts = holdout_prompts(config.eval_prompts, seed=config.seed)
    base_images = generate(modules, Path(comps.tokenizer_dir), dict(comps.scheduler_config),
                           float(comps.vae.config.scaling_factor), [p for p, _ in prompts], **kw)
    base_scores = [score(a, analyse(im)) for (_, a), im in zip(prompts, base_images)]

    targets = torch_targets({"unet": comps.unet, "text_encoder": comps.text_encoder})
    lora = load_lora(lora_file, targets)
    with torch.no_grad():
        for component in ("unet", "text_encoder"):
            module = modules[component]
            base_sd = {k: v.numpy() for k, v in module.state_dict().items()}
            merged = merge(base_sd, [(lora, scale)], component, targets[component])
            module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in merged.items()})
    concept = concept_prompts(config.eval_prompts, config, seed=config.seed)
    images = generate(modules, Path(comps.tokenizer_dir), dict(comps.scheduler_config),
                      float(comps.vae.config.scaling_factor), [p for p, _ in concept], **kw)
    scores = [score(a, analyse(im, extra_colours=True, extra_shapes=True)) for (_, a), im in zip(concept, images)]

    return {"scale": scale, "prompts": config.eval_prompts, "concept": _rates(scores),
            "base_at_scale_0": _rates(base_scores),
            "concept_examples": [p for p, _ in concept[:4]]}
