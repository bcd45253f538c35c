"""Run requests as batches over one Pipeline, each row with its own seed, with cancellation and timeouts.

    server = BatchSampler(Pipeline.from_artifact(ARTIFACT))
    jobs = [Job(parse_request(server.limits, tensors)) for tensors in incoming]
    server.run(jobs, on_done=send)          # every job ends with .image or .error, and on_done(job) once

Requests that agree on `Request.batch_key` (steps, guidance, scheduler, size, LoRAs and their scales) run as
the rows of one pipeline call, at most `max_batch` rows (the artifact's profile max). Before a batch whose LoRA
set differs from the one the pipeline holds, `Pipeline.set_loras` switches the weights (from the files the
server was started with, read once: `loras`); the weights are recomputed from the stored base every time, so
a request's image equals `generate --lora FILE:SCALE` whatever ran before it. The pipeline gets one seed per
row (`RowRNG`): a row's start noise and per-step sampler noise are those of `generate --seed S` alone, so
on a backend whose kernels compute each batch row independently of the others (ONNX Runtime CPU:
tests/serving check it) a request's image is byte-identical whether it ran alone or batched.

Before each step every live job is checked: a cancelled one (`Job.cancelled()` true) or one past its
`deadline` (time.monotonic) ends at once with an error (`on_done` is called then, not at the end of the
batch), and its rows leave the U-Net and VAE calls from the next step on (`LiveRows`); the other rows go on
unchanged. When no row is left the batch stops.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from ldm_deploy.errors import LdmError
from ldm_deploy.lora import LoraFile
from ldm_deploy.serving.contract import Limits, Request

log = logging.getLogger("ldm_deploy")


class Cancelled(LdmError):
    """The client cancelled the request."""


class TimedOut(LdmError):
    """The request ran past its deadline."""


@dataclass(eq=False)
class Job:
    request: Request
    cancelled: Callable[[], bool] = lambda: False
    deadline: float | None = None            # time.monotonic() after which the request fails with TimedOut
    context: object = None                   # the caller's handle (e.g. the Triton request)
    image: np.ndarray | None = None          # uint8 (H, W, 3) on success
    error: LdmError | None = None
    batch_size: int = 0                      # rows of the pipeline call it ran in
    steps_run: int = 0                       # denoising steps it took part in
    done: bool = field(default=False, repr=False)


def group(jobs: Sequence[Job], max_batch: int) -> list[list[Job]]:
    """Jobs with equal batch keys, in arrival order, cut into batches of at most `max_batch`."""
    by_key: dict[tuple, list[Job]] = {}
    for job in jobs:
        by_key.setdefault(job.request.batch_key, []).append(job)
    return [rows[i:i + max_batch] for rows in by_key.values() for i in range(0, len(rows), max(1, max_batch))]


class LiveRows:
    """Wraps a runner so that only the live rows of a batch of B are computed.

    An input whose leading dimension is k*B (the 2B CFG rows [uncond, cond], the B latents) is cut to the
    live rows of each of its k blocks; other inputs pass as they are. Outputs of k*B rows come back full size
    with zeros in the dead rows (finite, so the sampler's arithmetic on them stays finite; those rows are
    never returned). With every row live (`live is None`) the call passes straight through. A read-only
    input (the text embeddings) is cut once per live set and handed on read-only, so a runner that skips
    re-uploading an unchanged input by identity (OrtCudaRunner) still does.
    """

    def __init__(self, runner):
        self.runner = runner
        self.component = getattr(runner, "component", "")
        self.input_names = getattr(runner, "input_names", [])
        self.output_names = getattr(runner, "output_names", [])
        # LoRA switching (runtime/lora_switch.py) reaches the wrapped runner's base_weights / set_weights / spec
        for name in ("base_weights", "set_weights", "spec"):
            if hasattr(runner, name):
                setattr(self, name, getattr(runner, name))
        self.rows: int | None = None             # B of the current batch
        self.live: np.ndarray | None = None      # indices of live rows, None = all
        self._cut: dict[tuple, np.ndarray] = {}

    def close(self) -> None:
        from ldm_deploy.runtime.runners.base import close_all

        close_all([self.runner])

    def set_live(self, rows: int, live: Sequence[int] | None) -> None:
        self.rows = rows
        self.live = None if live is None or len(live) == rows else np.asarray(live, dtype=np.int64)
        self._cut.clear()

    def _index(self, n: int) -> np.ndarray | None:
        b = self.rows
        if b is None or n < b or n % b:
            return None
        return np.concatenate([self.live + j * b for j in range(n // b)])

    def __call__(self, inputs):
        if self.live is None:
            return self.runner(inputs)
        cut = {}
        for name, value in inputs.items():
            arr = np.asarray(value)
            idx = self._index(arr.shape[0]) if arr.ndim else None
            if idx is None:
                cut[name] = value
            elif isinstance(value, np.ndarray) and not value.flags.writeable:
                key = (name, id(value))
                if key not in self._cut:
                    sub = arr[idx]
                    sub.setflags(write=False)
                    self._cut[key] = (value, sub)     # keep `value` alive so its id stays its own
                cut[name] = self._cut[key][1]
            else:
                cut[name] = arr[idx]
        out = self.runner(cut)
        full = {}
        for name, value in out.items():
            value = np.asarray(value)
            n = value.shape[0] * self.rows // len(self.live) if value.ndim else 0
            idx = self._index(n) if n and value.shape[0] * self.rows % len(self.live) == 0 else None
            if idx is None:
                full[name] = value
                continue
            whole = np.zeros((n, *value.shape[1:]), value.dtype)
            whole[idx] = value
            full[name] = whole
        return full


class _BatchOver(Exception):
    """Every row of the batch has ended: stop the denoising loop."""


class BatchSampler:
    """One Pipeline serving batches of requests (one instance per model instance; not thread-safe).

    `loras`: name -> LoRA file (a path, or a `LoraFile` from `lora_switch.preload`) that requests may name;
    the pipeline's artifact must have been exported with switchable weights."""

    def __init__(self, pipe, max_batch: int | None = None, limits: Limits | None = None, loras=None):
        from ldm_deploy.runtime import lora_switch

        self.pipe = pipe
        self.loras = {name: f if isinstance(f, LoraFile) else lora_switch.preload(pipe.runners, f)
                      for name, f in (loras or {}).items()}
        self.active: tuple | None = ()               # the (name, scale) set the weights hold; None: unknown
        self.limits = limits or Limits.from_pipeline(pipe, loras=tuple(self.loras))
        self.max_batch = min(int(max_batch or self.limits.max_batch), self.limits.max_batch)
        self._masked = [c for c in ("unet", "vae_decoder") if c in pipe.runners]
        for c in self._masked:
            if not isinstance(pipe.runners[c], LiveRows):
                pipe.runners[c] = LiveRows(pipe.runners[c])

    def run(self, jobs: Iterable[Job], on_done: Callable[[Job], None] | None = None) -> None:
        """Run every job to an image or an error; `on_done(job)` once per job, as soon as it ends."""
        jobs = list(jobs)
        for batch in group(jobs, self.max_batch):
            self._run_batch(batch, on_done)

    def _finish(self, job: Job, on_done, error: LdmError | None = None) -> None:
        if job.done:
            return
        job.error = error
        job.done = True
        if error is not None:
            log.info(f"request with seed {job.request.seed}: {error}")
        if on_done is not None:
            try:
                on_done(job)
            except Exception:  # a failing send must not take the batch's other requests down
                log.exception("sending the response of one request failed")

    def _check(self, batch: Sequence[Job], on_done) -> list[int]:
        """End cancelled / timed-out jobs; the indices of the rows still live."""
        now = time.monotonic()
        for job in batch:
            if job.done:
                continue
            if job.cancelled():
                self._finish(job, on_done, Cancelled(f"request cancelled by the client after {job.steps_run} steps"))
            elif job.deadline is not None and now > job.deadline:
                self._finish(job, on_done, TimedOut(f"request timed out after {job.steps_run} of "
                                                    f"{job.request.steps} steps", hint="raise the request's timeout"))
        return [i for i, job in enumerate(batch) if not job.done]

    def _set_live(self, rows: int, live: Sequence[int] | None) -> None:
        for c in self._masked:
            self.pipe.runners[c].set_live(rows, live)

    def _run_batch(self, batch: list[Job], on_done) -> None:
        live = self._check(batch, on_done)
        if not live:
            return
        batch = [batch[i] for i in live]           # jobs that ended waiting never enter the batch
        r = batch[0].request
        for job in batch:
            job.batch_size = len(batch)
        log.info(f"batch of {len(batch)}: {r.steps} steps, {r.scheduler}, guidance {r.guidance:g}, "
                 f"{r.width}x{r.height}, seeds {[j.request.seed for j in batch]}")

        def on_step(i, total, x):
            for job in batch:
                if not job.done:
                    job.steps_run = i + 1
            alive = self._check(batch, on_done)
            if not alive:
                raise _BatchOver
            self._set_live(len(batch), alive)

        if r.loras != self.active:
            try:
                self.active = None                  # a switch that fails half way leaves unknown weights
                self.pipe.set_loras([(self.loras[name], scale) for name, scale in r.loras])
                self.active = r.loras
            except LdmError as e:
                for job in batch:
                    self._finish(job, on_done, e)
                return
        self._set_live(len(batch), None)
        negatives = None if r.zero_negative else [j.request.negative_prompt for j in batch]
        try:
            result = self.pipe([j.request.prompt for j in batch], negatives,
                               steps=r.steps, guidance=r.guidance, scheduler=r.scheduler, height=r.height,
                               width=r.width, seed=[j.request.seed for j in batch], callback=on_step)
        except _BatchOver:
            return
        except LdmError as e:
            for job in batch:
                self._finish(job, on_done, e)
            return
        except Exception as e:  # an unforeseen failure still answers every request, in one line
            log.exception("batch failed")
            err = LdmError(f"generation failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
            for job in batch:
                self._finish(job, on_done, err)
            return
        finally:
            self._set_live(len(batch), None)
        self._check(batch, on_done)                # a deadline may pass during the VAE decode
        for job, image in zip(batch, result.images):
            if not job.done:
                job.image = image
                self._finish(job, on_done)
