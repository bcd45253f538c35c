"""VAE stage: reconstruction (L1 or L2) + a small KL against N(0, I); PSNR on held-out images.

    loss = |x - D(z)|  (or squared)  + kl_weight * KL(q(z|x) || N(0, I)) / latent_size,   z ~ q(z|x)

With `foreground_balance` b > 0 the reconstruction term is b x (mean over foreground pixels) +
(1 - b) x (mean over background pixels), per image, where a pixel is foreground when one of its
channels differs from the image's median colour by more than `foreground_threshold` (in [-1, 1]
units). On objects over flat backgrounds (the shapes data) the plain mean is ~97 % background, and a
VAE trained on it reproduces the background and smears the object's colour and outline; the balance
gives the object a fixed share of the loss whatever its size. An image without foreground pixels
falls back to the plain mean.

The KL is summed over latent dims and averaged over the batch (as LDM's), then divided by the
number of latent elements so that kl_weight means the same at any resolution. After training, the
latent scaling factor is estimated as 1 / std(z) over training images and written to the VAE config,
so the U-Net sees unit-variance latents.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ldm_deploy.errors import LdmError
from training.config import TrainConfig
from training.stages.architecture import build, model_dicts, with_scaling_factor
from training.stages.images import ImageSet, load_images
from training.stages.parts import load_part, save_part
from training.stages.run_folder import run_dir, stage_dir
from training.trainer import Trainer


def foreground_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, 1, H, W) bool: pixels with a channel farther than `threshold` from the image's median colour."""
    median = x.flatten(2).median(dim=2).values[:, :, None, None]           # (B, C, 1, 1)
    return ((x - median).abs() > threshold).any(dim=1, keepdim=True)


def balanced_mean(err: torch.Tensor, mask: torch.Tensor, balance: float) -> torch.Tensor:
    """Per image: balance x mean(err over mask) + (1 - balance) x mean(err elsewhere); the plain mean
    for an image whose mask is empty or full. err: (B, C, H, W); mask: (B, 1, H, W)."""
    m = mask.to(err.dtype)
    per_pixel = err.mean(dim=1, keepdim=True)                               # (B, 1, H, W)
    fg_n, bg_n = m.sum(dim=(1, 2, 3)), (1 - m).sum(dim=(1, 2, 3))
    fg = (per_pixel * m).sum(dim=(1, 2, 3)) / fg_n.clamp_min(1)
    bg = (per_pixel * (1 - m)).sum(dim=(1, 2, 3)) / bg_n.clamp_min(1)
    split = (fg_n > 0) & (bg_n > 0)
    return torch.where(split, balance * fg + (1 - balance) * bg, per_pixel.mean(dim=(1, 2, 3))).mean()


class VAEObjective(nn.Module):
    def __init__(self, vae: nn.Module, loss: str, kl_weight: float, foreground_balance: float = 0.0,
                 foreground_threshold: float = 0.1):
        super().__init__()
        if loss not in ("l1", "l2"):
            raise LdmError(f"unknown vae.loss {loss!r}", hint="use l1 or l2")
        if not 0.0 <= foreground_balance < 1.0:
            raise LdmError(f"vae.foreground_balance {foreground_balance} is out of range",
                           hint="use 0 (plain mean) or a share in (0, 1), e.g. 0.5")
        self.vae, self.loss_kind, self.kl_weight = vae, loss, kl_weight
        self.balance, self.threshold = float(foreground_balance), float(foreground_threshold)

    def forward(self, x: torch.Tensor, generator: torch.Generator):       # x: (B, 3, H, W) in [-1, 1]
        posterior = self.vae.encode(x)
        recon = self.vae.decode(posterior.sample(generator)).float()
        diff = recon - x.float()
        err = diff.abs() if self.loss_kind == "l1" else diff.pow(2)
        if self.balance > 0:
            rec = balanced_mean(err, foreground_mask(x.float(), self.threshold), self.balance)
        else:
            rec = err.mean()
        kl = posterior.kl().float().mean() / posterior.mean[0].numel()
        return rec + self.kl_weight * kl, {"rec": rec.detach(), "kl": kl.detach()}


@torch.no_grad()
def psnr(vae: nn.Module, images: ImageSet, device, batch: int = 64) -> float:
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
def latent_std(vae: nn.Module, images: ImageSet, device, n: int = 1024, batch: int = 64) -> float:
    """std of sampled latents over up to n images (the quantity 1/scaling_factor normalises)."""
    vae.eval()
    g = torch.Generator(device=device).manual_seed(0)
    zs = [vae.encode(images.batch(range(i, min(i + batch, n, len(images))), device)).sample(g).float()
          for i in range(0, min(n, len(images)), batch)]
    return float(torch.cat(zs).std())


@torch.no_grad()
def shapes_roundtrip(vae: nn.Module, cfg: TrainConfig, device, n: int, batch: int = 64) -> dict:
    """The analyser's accuracy on held-out shapes images after encode -> decode: the ceiling the
    U-Net's samples can reach, per attribute and by size (the VAE's shape/colour fidelity, which PSNR
    averages away)."""
    from training.data.analyser import analyse, score
    from training.data.shapes import ShapesDataset

    ds = ShapesDataset(split="holdout", resolution=cfg.data.resolution, size=min(n, cfg.data.holdout_size),
                       seed=cfg.data.seed)
    vae.eval()
    totals: dict[str, dict[str, int]] = {}
    for start in range(0, len(ds), batch):
        items = [ds[i] for i in range(start, min(start + batch, len(ds)))]
        x = torch.from_numpy(np.stack([im for im, _, _ in items])).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = vae.decode(vae.encode(x).mode()).float().clamp(-1, 1)
        out = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for image, (_, _, attrs) in zip(out, items):
            for group in ("all", attrs["size"]):
                t = totals.setdefault(group, {"images": 0})
                t["images"] += 1
                for key, ok in score(attrs, analyse(image)).items():
                    t[key] = t.get(key, 0) + int(ok)
    return {group: {k: (v if k == "images" else round(v / t["images"], 4)) for k, v in t.items()}
            for group, t in totals.items()}


def train_vae(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or take cfg.vae.path) the VAE; writes <out>/stages/vae. Returns the report."""
    sc = cfg.vae
    out = stage_dir(cfg, "vae")
    if sc.path:
        vae = load_part("vae", _as_vae_dir(sc.path))
        save_part("vae", vae, out, {"source": sc.path})
        return {"source": sc.path}
    train = load_images(cfg, "train")
    held = load_images(cfg, "holdout", limit=sc.eval_images)
    from training.distributed import dist_env

    if dist_env().device.type == "cuda":
        train = train.to(dist_env().device)
    torch.manual_seed(cfg.seed)
    config = dict(model_dicts(cfg)["vae"], sample_size=cfg.data.resolution)
    vae = build("vae", config)
    objective = VAEObjective(vae, sc.loss, sc.kl_weight, sc.foreground_balance, sc.foreground_threshold)
    trainer = Trainer("vae", objective, {"vae": vae},
                      lambda idx: train.batch(idx, trainer.env.device), len(train), sc,
                      out=run_dir(cfg), seed=cfg.seed, config_dict=cfg.to_dict())
    result = trainer.fit(resume=resume)
    report = {"steps": result.step, "seconds": round(result.seconds, 1),
              "final_loss": result.losses[-1][1] if result.losses else None}
    if trainer.env.is_main:
        device = trainer.env.device
        std = latent_std(vae, train, device)
        scaling = 1.0 / std if std > 0 and math.isfinite(std) else 1.0
        with_scaling_factor(vae, scaling)
        report.update(psnr_db=round(psnr(vae, held, device), 3), heldout_images=len(held),
                      latent_std=std, scaling_factor=scaling)
        if cfg.data.kind == "shapes":
            report["roundtrip_analyser"] = rt = shapes_roundtrip(vae, cfg, device, sc.eval_images)
            print(f"[vae] held-out round trip read by the analyser: colour {rt['all']['colour']:.1%}, "
                  f"shape {rt['all']['shape']:.1%}, position {rt['all']['position']:.1%} "
                  f"({rt['all']['images']} images)")
        save_part("vae", vae.float().cpu(), out, report)
        print(f"[vae] held-out PSNR {report['psnr_db']:.2f} dB; scaling_factor {scaling:.5f} -> {out}")
    trainer.env.barrier()
    return report


def _as_vae_dir(path: str):
    from pathlib import Path

    p = Path(path)
    return p / "vae" if (p / "vae" / "config.json").is_file() else p
