"""VAE stage: reconstruction (L1 or L2) + a small KL against N(0, I); PSNR on held-out images.

    loss = |x - D(z)|  (or squared)  + kl_weight * KL(q(z|x) || N(0, I)) / latent_size,   z ~ q(z|x)

The KL is summed over latent dims and averaged over the batch (as LDM's), then divided by the
number of latent elements so that kl_weight means the same at any resolution. After training, the
latent scaling factor is estimated as 1 / std(z) over training images and written to the VAE config,
so the U-Net sees unit-variance latents.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ldm_deploy.errors import LdmError
from training.config import TrainConfig
from training.stages import common
from training.trainer import Trainer


class VAEObjective(nn.Module):
    def __init__(self, vae: nn.Module, loss: str, kl_weight: float):
        super().__init__()
        if loss not in ("l1", "l2"):
            raise LdmError(f"unknown vae.loss {loss!r}", hint="use l1 or l2")
        self.vae, self.loss_kind, self.kl_weight = vae, loss, kl_weight

    def forward(self, x: torch.Tensor, generator: torch.Generator):       # x: (B, 3, H, W) in [-1, 1]
        posterior = self.vae.encode(x)
        recon = self.vae.decode(posterior.sample(generator)).float()
        diff = recon - x.float()
        rec = diff.abs().mean() if self.loss_kind == "l1" else diff.pow(2).mean()
        kl = posterior.kl().float().mean() / posterior.mean[0].numel()
        return rec + self.kl_weight * kl, {"rec": rec.detach(), "kl": kl.detach()}


@torch.no_grad()
def psnr(vae: nn.Module, images: common.ImageSet, device, batch: int = 64) -> float:
    """Mean reconstruction PSNR (dB, images in [0, 1]) of decode(mode(encode(x)))."""
    vae.eval()
    values = []
    for i in range(0, len(images), batch):
        x = images.batch(range(i, min(i + batch, len(images))), device)
        y = vae.decode(vae.encode(x).mode()).float().clamp(-1, 1)
        mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        values.append(10 * torch.log10(1.0 / mse))
    return float(torch.cat(values).mean())


@torch.no_grad()
def latent_std(vae: nn.Module, images: common.ImageSet, device, n: int = 1024, batch: int = 64) -> float:
    """std of sampled latents over up to n images (the quantity 1/scaling_factor normalises)."""
    vae.eval()
    g = torch.Generator(device=device).manual_seed(0)
    zs = [vae.encode(images.batch(range(i, min(i + batch, n, len(images))), device)).sample(g).float()
          for i in range(0, min(n, len(images)), batch)]
    return float(torch.cat(zs).std())


def train_vae(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or take cfg.vae.path) the VAE; writes <out>/stages/vae. Returns the report."""
    sc = cfg.vae
    out = common.stage_dir(cfg, "vae")
    if sc.path:
        vae = common.load_part("vae", _as_vae_dir(sc.path))
        common.save_part("vae", vae, out, {"source": sc.path})
        return {"source": sc.path}
    train = common.load_images(cfg, "train")
    held = common.load_images(cfg, "holdout", limit=sc.eval_images)
    from training.trainer import dist_env

    if dist_env().device.type == "cuda":
        train = train.to(dist_env().device)
    torch.manual_seed(cfg.seed)
    config = dict(common.model_dicts(cfg)["vae"], sample_size=cfg.data.resolution)
    vae = common.build("vae", config)
    trainer = Trainer("vae", VAEObjective(vae, sc.loss, sc.kl_weight), {"vae": vae},
                      lambda idx: train.batch(idx, trainer.env.device), len(train), sc,
                      out=common.run_dir(cfg), seed=cfg.seed, config_dict=cfg.to_dict())
    result = trainer.fit(resume=resume)
    report = {"steps": result.step, "seconds": round(result.seconds, 1),
              "final_loss": result.losses[-1][1] if result.losses else None}
    if trainer.env.is_main:
        device = trainer.env.device
        std = latent_std(vae, train, device)
        scaling = 1.0 / std if std > 0 and math.isfinite(std) else 1.0
        common.with_scaling_factor(vae, scaling)
        report.update(psnr_db=round(psnr(vae, held, device), 3), heldout_images=len(held),
                      latent_std=std, scaling_factor=scaling)
        common.save_part("vae", vae.float().cpu(), out, report)
        print(f"[vae] held-out PSNR {report['psnr_db']:.2f} dB; scaling_factor {scaling:.5f} -> {out}")
    trainer.env.barrier()
    return report


def _as_vae_dir(path: str):
    from pathlib import Path

    p = Path(path)
    return p / "vae" if (p / "vae" / "config.json").is_file() else p
