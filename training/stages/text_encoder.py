"""Text-encoder stage: CLIP-style contrastive training of a transformers CLIPTextModel.

The text tower is the CLIPTextModel the U-Net will read (its pooled EOS-token output + a linear
projection); the image tower is a small CNN used only here. With L2-normalised embeddings
t_i, v_i and a learned temperature:

    logits = exp(s) * V T^T,     loss = (CE(logits, i) + CE(logits^T, i)) / 2

Captions repeated inside a batch (frequent in small synthetic datasets) are positives for each
other: the targets spread over every row with the same caption, so the loss never pushes equal
texts apart. With `text_encoder.path` set, that encoder is copied unchanged (frozen).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.config import TrainConfig
from training.stages.architecture import build, text_encoder_config
from training.stages.images import load_images
from training.stages.parts import load_part, save_part
from training.stages.run_folder import run_dir, stage_dir
from training.stages.text import load_tokenizer, tokenize, tokenizer_path
from training.trainer import Trainer


class ImageEncoder(nn.Module):
    """A small CNN: one stride-2 conv stage per entry of `channels`, global average pool, projection."""

    def __init__(self, channels: tuple[int, ...], dim: int):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:        # (B, 3, H, W) -> (B, dim)
        return self.proj(self.body(x).mean(dim=(2, 3)))


class ContrastiveObjective(nn.Module):
    def __init__(self, text_encoder: nn.Module, image_channels: tuple[int, ...], dim: int):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_proj = nn.Linear(text_encoder.config.hidden_size, dim, bias=False)
        self.image_encoder = ImageEncoder(tuple(image_channels), dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, batch, generator: torch.Generator):
        images, ids = batch                                     # (B, 3, H, W), (B, 77)
        pooled = self.text_encoder(input_ids=ids).pooler_output  # (B, D) at the EOS token
        t = F.normalize(self.text_proj(pooled).float(), dim=-1)
        v = F.normalize(self.image_encoder(images).float(), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * v @ t.T
        same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()   # equal captions are positives
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        acc = (same[torch.arange(len(ids), device=ids.device), logits.argmax(1)] > 0).float().mean()   # top-1
        return loss, {"acc": acc.detach(), "scale": self.logit_scale.detach().exp()}


def train_text_encoder(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or copy cfg.text_encoder.path) the text encoder; writes <out>/stages/text_encoder."""
    sc = cfg.text_encoder
    out = stage_dir(cfg, "text_encoder")
    if sc.path:
        p = Path(sc.path)
        te = load_part("text_encoder", p / "text_encoder" if (p / "text_encoder").is_dir() else p)
        save_part("text_encoder", te, out, {"source": sc.path, "frozen": True})
        return {"source": sc.path, "frozen": True}
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    train = load_images(cfg, "train")
    ids = tokenize(tokenizer, train.captions)
    from training.distributed import dist_env

    if dist_env().device.type == "cuda":
        train = train.to(dist_env().device)
    torch.manual_seed(cfg.seed)
    te = build("text_encoder", text_encoder_config(cfg, tokenizer))
    objective = ContrastiveObjective(te, sc.image_channels, sc.projection_dim)

    def fetch(idx):
        device = trainer.env.device
        return train.batch(idx, device), ids[torch.as_tensor(idx)].to(device)

    trainer = Trainer("text_encoder", objective, {"objective": objective}, fetch, len(train), sc,
                      out=run_dir(cfg), seed=cfg.seed, config_dict=cfg.to_dict())
    result = trainer.fit(resume=resume)
    report = {"steps": result.step, "seconds": round(result.seconds, 1),
              "final_loss": result.losses[-1][1] if result.losses else None}
    if trainer.env.is_main:
        save_part("text_encoder", te.float().cpu(), out, report)
        print(f"[text_encoder] final loss {report['final_loss']} -> {out}")
    trainer.env.barrier()
    return report
