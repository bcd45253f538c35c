"""U-Net stage: eps- (or v-) prediction on frozen-VAE latents with frozen text embeddings.

    z0  = (mean + std * n) * scaling_factor           n ~ N(0, I); mean/std from the frozen VAE (cached)
    t   ~ U{0, ..., T-1},   eps ~ N(0, I)
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps        (training.noise)
    loss = || unet(z_t, t, c) - target ||^2             target = eps (or v); c = "" with p = caption_dropout

The dataset is encoded once (latent caching: the posterior's mean and std per image, in memory or on
disk under <out>/cache keyed by a hash of the VAE weights and the dataset); captions are encoded once
per distinct caption by the frozen text encoder. A step then touches only the U-Net, so large batches
under bf16 autocast keep a GPU busy. The EMA weights are what gets exported, into <out>/model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm_deploy.errors import LdmError
from training.config import TrainConfig
from training.latents import cached_latents
from training.noise import NoiseSchedule
from training.stages.architecture import build, model_dicts, with_scaling_factor
from training.stages.images import load_images
from training.stages.parts import frozen, load_part
from training.stages.run_folder import run_dir, stage_dir
from training.stages.text import encode_text, load_tokenizer, tokenize, tokenizer_path
from training.trainer import Trainer

CACHE_CHOICES = ("memory", "disk", "off")


class DiffusionObjective(nn.Module):
    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction_type: str, scaling_factor: float,
                 caption_dropout: float, empty: torch.Tensor, vae: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.schedule, self.prediction_type = schedule, prediction_type
        self.scaling_factor, self.caption_dropout = float(scaling_factor), float(caption_dropout)
        self.register_buffer("empty", empty, persistent=False)         # (1, 77, D): "" embedding
        self.vae = vae                                                  # only when latents are not cached

    def forward(self, batch, generator: torch.Generator):
        moments, context = batch            # (mean, std) (B, 4, h, w) each or images (B, 3, H, W); (B, 77, D)
        if self.vae is not None:
            with torch.no_grad():
                d = self.vae.encode(moments)
                moments = (d.mean.float(), d.std.float())
        mean, std = moments
        b, device = mean.shape[0], mean.device
        z0 = (mean + std * torch.randn(mean.shape, generator=generator, device=device)) * self.scaling_factor
        t = torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=generator, device=device)
        eps = torch.randn(z0.shape, generator=generator, device=device)
        drop = torch.rand(b, generator=generator, device=device) < self.caption_dropout
        context = torch.where(drop[:, None, None], self.empty.to(context.dtype), context)
        z_t = self.schedule.add_noise(z0, eps, t)
        out = self.unet(z_t, t, context)
        target = self.schedule.target(self.prediction_type, z0, eps, t)
        return F.mse_loss(out.float(), target.float()), {}


def train_unet(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train the U-Net on the frozen VAE and text encoder; writes the complete model to <out>/model."""
    sc = cfg.unet
    _check_stage_config(sc)
    from training.distributed import dist_env

    env = dist_env()
    device = env.device
    tok_dir = tokenizer_path(cfg)
    tokenizer = load_tokenizer(tok_dir)
    vae_dir = stage_dir(cfg, "vae")
    vae = frozen(load_part("vae", vae_dir)).to(device)
    te = frozen(load_part("text_encoder", stage_dir(cfg, "text_encoder"))).to(device)
    scaling = sc.scaling_factor if sc.scaling_factor is not None else vae.config.scaling_factor
    if sc.scaling_factor is not None:
        with_scaling_factor(vae, scaling)
    scheduler_config = dict(model_dicts(cfg)["scheduler"], prediction_type=sc.prediction_type)
    schedule = NoiseSchedule.from_config(scheduler_config)

    train = load_images(cfg, "train")
    if sc.cache_latents == "off":
        data = train
    else:
        mean, std = cached_latents(cfg, vae, vae_dir, train, device)   # training/latents.py
        mean, std = mean.to(device), std.to(device)
    emb, empty, row_caption = _caption_table(train.captions, tokenizer, te, device)

    torch.manual_seed(cfg.seed)
    unet_config = dict(model_dicts(cfg)["unet"], cross_attention_dim=te.config.hidden_size,
                       sample_size=cfg.data.resolution // vae_scale(vae))
    unet = build("unet", unet_config)
    objective = DiffusionObjective(unet, schedule, sc.prediction_type, scaling, sc.caption_dropout, empty,
                                   vae if sc.cache_latents == "off" else None)
    if sc.compile and device.type == "cuda":
        objective.unet = torch.compile(unet)

    def fetch(idx):
        rows = torch.as_tensor(idx, device=device)
        context = emb[row_caption[rows]]
        if sc.cache_latents == "off":
            return data.batch(idx, device), context
        return (mean[rows], std[rows]), context

    sampler = _SampleGrid(cfg, tokenizer, tok_dir, vae, te, scheduler_config, scaling) if env.is_main else None
    trainer = Trainer("unet", objective, {"unet": unet}, fetch, len(train), sc, out=run_dir(cfg),
                      seed=cfg.seed, config_dict=cfg.to_dict(), on_step=_sampling_hook(sampler, sc))
    result = trainer.fit(resume=resume)                # EMA weights (if any) are copied into unet
    report = {"steps": result.step, "seconds": round(result.seconds, 1),
              "final_loss": result.losses[-1][1] if result.losses else None, "scaling_factor": scaling,
              "prediction_type": sc.prediction_type, "train_images": len(train),
              "distinct_captions": len(emb)}
    if env.is_main:
        folder = save_model(cfg, unet, vae, te, tok_dir, scheduler_config)
        report["model"] = str(folder)
        sampler(None, result.step, unet=unet)
        print(f"[unet] final loss {report['final_loss']} -> {folder}")
    env.barrier()
    return report


def _check_stage_config(sc) -> None:
    if sc.cache_latents not in CACHE_CHOICES:
        raise LdmError(f"unknown unet.cache_latents {sc.cache_latents!r}", hint=f"use one of {', '.join(CACHE_CHOICES)}")
    if sc.prediction_type not in ("epsilon", "v_prediction"):
        raise LdmError(f"unet.prediction_type {sc.prediction_type!r} is not trainable here", hint="use epsilon or v_prediction")


def _caption_table(captions: list[str], tokenizer, te: nn.Module, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One embedding per distinct caption (shapes has few), looked up per row: the (U, 77, D) table, the
    (1, 77, D) embedding of "" (caption dropout), and each row's index into the table (N,)."""
    uniq, inverse = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
    ids = tokenize(tokenizer, list(uniq) + [""]).to(device)
    emb = encode_text(te, ids)                                            # (U+1, 77, D)
    return emb[:-1], emb[-1:], torch.as_tensor(inverse, device=device)


def _sampling_hook(sampler, sc):
    """Trainer.on_step: a sample grid every `sc.sample_every` steps (the final one is drawn after training)."""
    if sampler is None or sc.sample_every <= 0:
        return None

    def on_step(step, trainer):
        if step % sc.sample_every == 0 and step < sc.steps:
            sampler(trainer, step)
    return on_step


def vae_scale(vae: nn.Module) -> int:
    return vae.config.scale_factor


def save_model(cfg: TrainConfig, unet, vae, te, tok_dir: Path, scheduler_config: dict) -> Path:
    """The complete diffusers folder <out>/model via training.checkpoint.save_components."""
    from training.checkpoint import Components, save_components

    comps = Components(unet=_plain_module(unet), vae=vae.float().cpu(), text_encoder=te.float().cpu(),
                       tokenizer_dir=tok_dir, scheduler_config=scheduler_config)
    # force: the run folder was claimed (run_folder.claim_run_dir), so its model/ is ours, marker or not
    folder = save_components(comps, run_dir(cfg) / "model", fp16=cfg.unet.save_fp16, force=True)
    from ldm_deploy.fileio import write_json

    write_json(run_dir(cfg) / "train_config.json", cfg.to_dict())
    return folder


def _plain_module(m: nn.Module) -> nn.Module:
    return getattr(m, "_orig_mod", m).float().cpu()


class _SampleGrid:
    """A grid of samples for fixed prompts through the numpy pipeline over TorchRunners."""

    def __init__(self, cfg: TrainConfig, tokenizer, tok_dir: Path, vae, te, scheduler_config: dict, scaling: float):
        self.cfg, self.tok_dir, self.vae, self.te = cfg, tok_dir, vae, te
        self.scheduler_config, self.scaling = scheduler_config, scaling
        self.prompts = sample_prompts(cfg, 8)

    def __call__(self, trainer, step: int, unet: nn.Module | None = None) -> Path | None:
        if unet is None:
            unet = trainer.trainable["unet"]
            ema = trainer.ema.get("unet")
            if ema is not None:
                with ema.applied(unet):
                    return self._grid(unet, step)
        return self._grid(unet, step)

    @torch.no_grad()
    def _grid(self, unet: nn.Module, step: int) -> Path | None:
        from training.stages.sampling import generate, save_grid

        was_training = unet.training
        try:
            images = generate({"unet": unet, "vae": self.vae, "text_encoder": self.te}, self.tok_dir,
                              self.scheduler_config, self.scaling, self.prompts, steps=self.cfg.unet.sample_steps,
                              guidance=self.cfg.unet.guidance_scale, seed=self.cfg.seed,
                              resolution=self.cfg.data.resolution)
        finally:
            unet.train(was_training)
        path = run_dir(self.cfg) / "samples" / f"unet_{step:07d}.png"
        save_grid(images, path, self.prompts)
        return path


def sample_prompts(cfg: TrainConfig, n: int) -> list[str]:
    if cfg.data.kind == "shapes":
        from training.data.shapes import holdout_prompts

        return [p for p, _ in holdout_prompts(n, seed=cfg.eval.seed)]
    held = load_images(cfg, "holdout", limit=n)
    return held.captions or ["a photo"]
