"""The training loop every stage shares: optimiser, precision, EMA, DDP, logging, checkpoint/resume.

A stage hands the Trainer an `Objective` (an nn.Module whose forward(batch, generator) returns
(loss, metrics)), the named sub-modules that are trained, and a `fetch(indices) -> batch` function.
Everything random in a step comes from a torch.Generator seeded from (seed, step, rank, micro-batch)
and the data order is a pure function of (seed, step), so a resumed run repeats the uninterrupted
one exactly; the global RNG states (python, numpy, torch, cuda) are saved and restored too, for any
module that draws from them (dropout).

Checkpoints: <out>/checkpoints/<stage>/step_NNNNNNN/ (written with atomic_dir), then latest.json
(written atomically) points at it, so a process killed at any moment loses at most one interval:
    <module>.safetensors, ema_<module>.safetensors   weights
    state.pt     optimizer, grad scaler, RNG states (plain tensors/lists: torch.load(weights_only=True))
    state.json   step, samples seen, config, metrics

Multi-GPU: the same command runs under `torchrun --nproc_per_node N`; WORLD_SIZE/RANK/LOCAL_RANK
select DDP over NCCL (gloo on CPU). Each rank takes its slice of every global batch; only rank 0
logs, samples and saves.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ldm_deploy.errors import LdmError
from ldm_deploy.fileio import atomic_dir, check_free_space, write_json
from training.config import StageConfig
from training.ema import EMA

# --- distributed environment -------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


_ENV: DistEnv | None = None


def dist_env() -> DistEnv:
    """Read torchrun's env vars once; initialise the process group (NCCL on GPU, gloo on CPU)."""
    global _ENV
    if _ENV is not None:
        return _ENV
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and os.environ.get("LDM_TRAIN_DEVICE", "") != "cpu":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _ENV = DistEnv(rank, world, local, device)
    return _ENV


# --- data order: a pure function of (seed, step) -----------------------------------------------------


class BatchOrder:
    """Epoch-wise permutations of range(n) (ResumableSampler's), cut into global batches, sharded over ranks.

    Optimizer step s consumes global positions [s*B, (s+1)*B) of the concatenated permutations;
    each global batch splits into world*accum micro-batches and rank r takes micro-batches
    r, r+world, ... (a DistributedSampler-equivalent split). Resuming needs only the step.
    """

    def __init__(self, n: int, global_batch: int, seed: int, env: DistEnv, accum: int = 1):
        if global_batch % (env.world * accum):
            raise LdmError(f"batch_size {global_batch} is not divisible by world size {env.world} x grad_accum {accum}",
                           hint="choose a batch size that splits evenly")
        if n <= 0:
            raise LdmError("the training set is empty", hint="check the dataset path / train_size")
        self.n, self.global_batch, self.seed, self.env, self.accum = n, global_batch, seed, env, accum
        self.micro = global_batch // (env.world * accum)
        from training.data.loader import ResumableSampler

        self.sampler = ResumableSampler(n, seed=seed)      # the shared per-epoch permutation
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, self.sampler.permutation(epoch))
        return self._perm[1]

    def indices(self, step: int, micro: int) -> list[int]:
        start = step * self.global_batch + (micro * self.env.world + self.env.rank) * self.micro
        out = []
        for pos in range(start, start + self.micro):
            out.append(int(self._permutation(pos // self.n)[pos % self.n]))
        return out

    def samples_seen(self, step: int) -> int:
        return step * self.global_batch

    def position(self, step: int) -> dict:
        """The ResumableSampler state (epoch, position in epoch) after `step` optimizer steps."""
        self.sampler.resume(*divmod(self.samples_seen(step), self.n))
        return self.sampler.state_dict()


def _mix(*values: int) -> int:
    """A stable 63-bit seed from integers (splitmix64-style)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


# --- RNG state (weights_only-friendly) ---------------------------------------------------------------


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [list(s) if isinstance(s, tuple) else s for s in random.getstate()],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        self.log_path = self.out / "logs" / f"{name}.csv"
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
            if step == self.cfg.steps or time.perf_counter() - self._last_plot > 60:
                self._plot()
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

    # -- the loop --

    def fit(self, resume: bool = False) -> TrainResult:
        cfg, env = self.cfg, self.env
        step = 0
        if resume:
            folder = self.latest_checkpoint()
            if folder is None:
                if env.is_main:
                    print(f"[{self.name}] no checkpoint under {self.ckpt_root}; starting from step 0")
            else:
                step = self.load_checkpoint(folder)
                if env.is_main:
                    print(f"[{self.name}] resumed from {folder} (step {step})")
        if env.is_main:
            self._start_log(step)
        bar = _progress(self.name, step, cfg.steps, disable=not env.is_main)
        try:  # close the bar on errors too, so an error message starts on its own line
            losses: list[tuple[int, float]] = []
            t0, timed_from = time.perf_counter(), None
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
                        self._log(step, loss, lr, metrics)
                if env.is_main:
                    if timed_from is None and step >= min(cfg.steps, 3):
                        if env.device.type == "cuda":
                            torch.cuda.synchronize()
                        timed_from = (step, time.perf_counter())
                    elif timed_from is not None and step == timed_from[0] + 20:
                        if env.device.type == "cuda":
                            torch.cuda.synchronize()
                        rate = (time.perf_counter() - timed_from[1]) / 20
                        bar.write(f"[{self.name}] {rate * 1000:.1f} ms/step; about "
                                  f"{_fmt_time(rate * (cfg.steps - step))} left")
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
            gen = torch.Generator(device=env.device).manual_seed(_mix(self.seed, step, env.rank, micro))
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

    # -- logs --

    def _start_log(self, step: int) -> None:
        """Keep the CSV rows up to `step` (a resumed run rewrites what came after its checkpoint)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if step > 0 and self.log_path.is_file():
            with open(self.log_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self._fields: list[str] | None = list(rows[0].keys()) if rows else None
        with open(self.log_path, "w", newline="") as f:
            if rows:
                writer = csv.DictWriter(f, fieldnames=self._fields)
                writer.writeheader()
                writer.writerows(rows)

    def _log(self, step: int, loss: float, lr: float, metrics: dict) -> None:
        row = {"step": step, "loss": f"{loss:.8g}", "lr": f"{lr:.6g}", **{k: f"{v:.6g}" for k, v in metrics.items()}}
        new = self._fields is None
        if new:
            self._fields = list(row)
        with open(self.log_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    _last_plot = 0.0

    def _plot(self) -> None:
        self._last_plot = time.perf_counter()
        plot_losses(self.log_path, self.log_path.with_suffix(".png"), title=f"{self.name} loss")


def plot_losses(csv_path: Path, png_path: Path, title: str = "loss") -> None:
    """Loss curve (raw + moving average, log scale) from a stage's CSV, written with matplotlib Agg."""
    if not Path(csv_path).is_file():
        return
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    k = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, alpha=0.35, lw=0.8, label="loss")
    ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if loss.min() > 0:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


def _plain_state(state: dict) -> dict:
    """Contiguous, unshared CPU copies (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _progress(name: str, initial: int, total: int, disable: bool):
    from tqdm import tqdm

    # ldm-train -q sets TQDM_DISABLE; an explicit `disable=` would win over tqdm's own reading of it
    disable = disable or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    return tqdm(total=total, initial=initial, desc=name, unit="step", disable=disable, dynamic_ncols=True)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"

