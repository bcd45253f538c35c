"""The training loop every stage shares: optimiser, precision, EMA, DDP, logging, checkpoint/resume.

A stage hands the Trainer an `Objective` (an nn.Module whose forward(batch, generator) returns
(loss, metrics)), the named sub-modules that are trained, and a `fetch(indices) -> batch` function.
Everything random in a step comes from a torch.Generator seeded from (seed, step, rank, micro-batch)
(training.rng) and the data order is a pure function of (seed, step) (training.batching), so a resumed
run repeats the uninterrupted one exactly; the global RNG states (python, numpy, torch, cuda) are saved
and restored too, for any module that draws from them (dropout).

Checkpoints: <out>/checkpoints/<stage>/step_NNNNNNN/ (written with atomic_dir), then latest.json
(written atomically) points at it, so a process killed at any moment loses at most one interval:
    <module>.safetensors, ema_<module>.safetensors   weights
    state.pt     optimizer, grad scaler, RNG states (plain tensors/lists: torch.load(weights_only=True))
    state.json   step, samples seen, config, metrics

Multi-GPU: the same command runs under `torchrun --nproc_per_node N` (training.distributed); each rank
takes its slice of every global batch; only rank 0 logs (training.loss_log), samples and saves.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ldm_deploy.errors import LdmError
from ldm_deploy.fileio import atomic_dir, check_free_space, write_json
from training.batching import BatchOrder
from training.config import StageConfig
from training.distributed import dist_env
from training.ema import EMA
from training.loss_log import LossLog
from training.rng import rng_state, set_rng_state, step_seed

# --- precision ----------------------------------------------------------------------------------------


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = fp32. "auto" picks bf16 on CUDA and fp32 on CPU."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise LdmError(f"unknown precision {precision!r}", hint="use auto, fp32, bf16 or fp16")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise LdmError("fp16 training needs a CUDA GPU", hint="use precision bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_at(step: int, cfg: StageConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        floor = cfg.lr * cfg.lr_min_ratio
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise LdmError(f"unknown lr_schedule {cfg.lr_schedule!r}", hint="use constant or cosine")


# --- the loop -----------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int
    losses: list[tuple[int, float]]         # (step, loss) of this process's run, for tests and reports
    seconds: float
    modules: dict[str, nn.Module]           # trained modules, EMA weights copied in when EMA is on


class Trainer:
    def __init__(self, name: str, objective: nn.Module, trainable: dict[str, nn.Module],
                 fetch: Callable[[list[int]], Any], dataset_size: int, cfg: StageConfig, *,
                 out: str | Path, seed: int, config_dict: dict | None = None,
                 on_step: Callable[[int, "Trainer"], None] | None = None):
        self.name, self.cfg, self.seed = name, cfg, seed
        self.env = dist_env()
        self.objective = objective.to(self.env.device)
        self.trainable = trainable
        self.fetch = fetch
        self.on_step = on_step
        self.config_dict = config_dict or {}
        self.out = Path(out)
        self.ckpt_root = self.out / "checkpoints" / name
        self.log = LossLog(self.out / "logs" / f"{name}.csv", title=f"{name} loss")
        self.order = BatchOrder(dataset_size, cfg.batch_size, seed, self.env, cfg.grad_accum)
        self.params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
        if not self.params:
            raise LdmError(f"stage {name}: nothing to train")
        fused = self.env.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))
        self.amp_dtype = autocast_dtype(cfg.precision, self.env.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ema = {k: EMA(m, cfg.ema_decay) for k, m in trainable.items()} if cfg.ema_decay > 0 else {}
        self.model: nn.Module = self.objective
        if self.env.distributed:
            ids = [self.env.local_rank] if self.env.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)

    # -- checkpoints --

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_root / "latest.json"
        if not pointer.is_file():
            return None
        path = self.ckpt_root / json.loads(pointer.read_text())["dir"]
        return path if path.is_dir() else None

    def save_checkpoint(self, step: int, metrics: dict | None = None) -> None:
        if self.env.is_main:
            from safetensors.torch import save_file

            folder = self.ckpt_root / f"step_{step:07d}"
            need = sum(t.numel() * t.element_size() for m in self.trainable.values() for t in m.state_dict().values())
            # weights, EMA copies and AdamW's two moments, plus headroom
            check_free_space(self.ckpt_root, need * (3 + len(self.ema)) + (16 << 20), f"the {self.name} checkpoint")
            with atomic_dir(folder) as tmp:
                for key, module in self.trainable.items():
                    save_file(_plain_state(module.state_dict()), tmp / f"{key}.safetensors")
                for key, ema in self.ema.items():
                    save_file(_plain_state(ema.state_dict()), tmp / f"ema_{key}.safetensors")
                torch.save({"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                            "rng": rng_state()}, tmp / "state.pt")
                write_json(tmp / "state.json", {
                    "stage": self.name, "step": step, "samples_seen": self.order.samples_seen(step),
                    "data_position": self.order.position(step),
                    "ema_updates": {k: e.updates for k, e in self.ema.items()}, "world_size": self.env.world,
                    "metrics": metrics or {}, "config": self.config_dict})
            write_json(self.ckpt_root / "latest.json", {"step": step, "dir": folder.name})
            self._prune(keep=folder)
            self.log.plot(final=step == self.cfg.steps)
        self.env.barrier()

    def _prune(self, keep: Path) -> None:
        done = sorted(p for p in self.ckpt_root.glob("step_*") if p.is_dir() and p != keep)
        for old in done[: max(0, len(done) - (self.cfg.keep_checkpoints - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, folder: Path) -> int:
        from safetensors.torch import load_file

        info = json.loads((folder / "state.json").read_text())
        dev = str(self.env.device)
        for key, module in self.trainable.items():
            module.load_state_dict(load_file(folder / f"{key}.safetensors", device=dev), strict=True)
        for key, ema in self.ema.items():
            ema.load_state_dict(load_file(folder / f"ema_{key}.safetensors", device=dev), info["ema_updates"][key])
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        return int(info["step"])

    def _resume(self) -> int:
        """Load the latest checkpoint (weights, EMA, optimizer, scaler, RNG state); its step, or 0 when none."""
        folder = self.latest_checkpoint()
        if folder is None:
            if self.env.is_main:
                print(f"[{self.name}] no checkpoint under {self.ckpt_root}; starting from step 0")
            return 0
        step = self.load_checkpoint(folder)
        if self.env.is_main:
            print(f"[{self.name}] resumed from {folder} (step {step})")
        return step

    # -- the loop --

    def fit(self, resume: bool = False) -> TrainResult:
        cfg, env = self.cfg, self.env
        step = self._resume() if resume else 0
        if env.is_main:
            self.log.start(step)
        bar = _progress(self.name, step, cfg.steps, disable=not env.is_main)
        speed = _StepRate(self.name, env.device, cfg.steps)
        try:  # close the bar on errors too, so an error message starts on its own line
            losses: list[tuple[int, float]] = []
            t0 = time.perf_counter()
            metrics: dict = {}
            self.objective.train()
            while step < cfg.steps:
                lr = lr_at(step, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                total, sums = self._step(step)
                step += 1
                if env.is_main:
                    bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    loss, metrics = self._reduce(step, total, sums)
                    losses.append((step, loss))
                    if env.is_main:
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                        self.log.append(step, loss, lr, metrics)
                if env.is_main:
                    speed.tick(step, bar)
                if self.on_step is not None:
                    self.on_step(step, self)
                if step % cfg.save_every == 0 or step == cfg.steps:
                    self.save_checkpoint(step, metrics)
        finally:
            bar.close()
        for key, ema in self.ema.items():
            ema.copy_to(self.trainable[key])
        return TrainResult(step, losses, time.perf_counter() - t0, self.trainable)

    def _step(self, step: int) -> tuple[torch.Tensor, dict]:
        cfg, env = self.cfg, self.env
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=env.device)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = self.fetch(self.order.indices(step, micro))
            gen = torch.Generator(device=env.device).manual_seed(step_seed(self.seed, step, env.rank, micro))
            sync = contextlib.nullcontext()
            if env.distributed and micro < cfg.grad_accum - 1:
                sync = self.model.no_sync()
            amp = (torch.autocast(env.device.type, dtype=self.amp_dtype) if self.amp_dtype
                   else contextlib.nullcontext())
            with sync:
                with amp:
                    loss, metrics = self.model(batch, gen)
                self.scaler.scale(loss.float() / cfg.grad_accum).backward()
            total += loss.detach().float() / cfg.grad_accum
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + torch.as_tensor(v, device=env.device).detach().float() / cfg.grad_accum
        self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            sums["grad_norm"] = gnorm.detach().float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        for key, ema in self.ema.items():
            ema.update(self.trainable[key])
        return total, sums          # device tensors: no host sync here, so the CPU runs ahead of the GPU

    def _reduce(self, step: int, total: torch.Tensor, sums: dict) -> tuple[float, dict]:
        """Mean over ranks, to host floats (the one sync per logged step); a non-finite loss stops training."""
        if self.env.distributed:
            packed = torch.stack([total, *sums.values()])
            torch.distributed.all_reduce(packed)
            packed /= self.env.world
            total, sums = packed[0], dict(zip(sums, packed[1:]))
        loss = float(total)
        if not math.isfinite(loss):
            raise LdmError(f"[{self.name}] loss became {loss} at step {step}",
                           hint="lower the learning rate, use bf16 instead of fp16, or enable grad_clip")
        return loss, {k: float(v) for k, v in sums.items()}


def _plain_state(state: dict) -> dict:
    """Contiguous, unshared CPU copies (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _progress(name: str, initial: int, total: int, disable: bool):
    from tqdm import tqdm

    # ldm-train -q sets TQDM_DISABLE; an explicit `disable=` would win over tqdm's own reading of it
    disable = disable or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    return tqdm(total=total, initial=initial, desc=name, unit="step", disable=disable, dynamic_ncols=True)


class _StepRate:
    """Says once how long a step takes and how long is left: timed over 20 steps after the first 3."""

    def __init__(self, name: str, device: torch.device, total: int):
        self.name, self.device, self.total = name, device, total
        self._from: tuple[int, float] | None = None

    def tick(self, step: int, bar) -> None:
        if self._from is None and step >= min(self.total, 3):
            self._sync()
            self._from = (step, time.perf_counter())
        elif self._from is not None and step == self._from[0] + 20:
            self._sync()
            rate = (time.perf_counter() - self._from[1]) / 20
            bar.write(f"[{self.name}] {rate * 1000:.1f} ms/step; about {_fmt_time(rate * (self.total - step))} left")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"

