"""SDXL conditioning for the numpy pipeline: two tokenizers and text encoders, pooled embeddings,
micro-conditioning `time_ids`, and the base -> refiner hand-off (diffusers' StableDiffusionXLPipeline and
StableDiffusionXLImg2ImgPipeline semantics).

    base = Pipeline.from_artifact("out/sdxl-onnx")            # an SDXLPipeline (the manifest has `sdxl`)
    refiner = Pipeline.from_artifact("out/sdxl-refiner-onnx")
    lat = base("a lighthouse", steps=30, guidance=5.0, denoising_end=0.8, decode=False).latents
    img = refiner("a lighthouse", steps=30, init_latents=lat, denoising_start=0.8).images

Per prompt (diffusers `encode_prompt`): each tokenizer/encoder pair gives its PENULTIMATE hidden states
(the base concatenates CLIP-L's 768 and bigG's 1280 channels into the 2048-wide context; the refiner has
bigG only); text_encoder_2 also gives the pooled `text_embeds`. Under CFG the U-Net sees 2B rows
[negative, positive] of context, pooled embeddings and time_ids. With no negative prompt, a base whose
model_index says `force_zeros_for_empty_prompt` uses ZERO negative context and pooled embeddings (an
explicit "" is encoded like any prompt). time_ids per row: base (original h, w, crop top, left, target
h, w); refiner (original h, w, crop top, left, aesthetic score), 6.0 / 2.5 by default for +/-.

Hand-off: `denoising_end=d` stops the base after the steps with t >= round(T (1 - d)) and returns the
sampler state undecoded; `denoising_start=d` runs the refiner over the remaining steps of the same
N-step schedule, starting from those latents as they are (no noise added). Every sampler hands off as
diffusers' two pipelines do (`slice_schedule`), except PNDM's Runge-Kutta warm-up on the refiner (refused).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ldm_deploy.artifact import ModelInfo
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime import guidance as g
from ldm_deploy.runtime.pipeline import Callback, GenerationResult, Pipeline, Request, check_finite, timed
from ldm_deploy.runtime.schedulers import SCHEDULERS
from ldm_deploy.runtime.schedulers.schedule import plms_restart

HIDDEN, POOLED = "penultimate_hidden_state", "text_embeds"
# Every sampler hands off as diffusers does (`slice_schedule`): each step reads the sigmas / alphas of the
# whole schedule around it (DDPM's and LCM's next timestep, LCM's noise-free last step included), multistep
# samplers restart their history the way diffusers' second pipeline does (UniPC keeps its global step indices,
# `tail_steps`; PLMS restarts its step counter, `plms_restart`). One case is refused at run time: a refiner
# stage of PNDM with its Runge-Kutta warm-up (skip_prk_steps false), see `slice_schedule`.
HANDOFF_SAMPLERS = tuple(SCHEDULERS)


def handoff_range(timesteps: np.ndarray, num_train_timesteps: int, denoising_start: float | None,
                  denoising_end: float | None) -> tuple[int, int]:
    """[a, b): the steps of an N-step schedule a stage runs (diffusers' discrete_timestep_cutoff rules)."""
    n = len(timesteps)
    a, b = 0, n
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and not (isinstance(value, (int, float)) and 0.0 < float(value) < 1.0):
            raise UsageError(f"{name} must be a number in (0, 1), got {value!r}")
    if denoising_end is not None:
        cutoff = int(round(num_train_timesteps - denoising_end * num_train_timesteps))
        b = int(np.count_nonzero(timesteps >= cutoff))
    if denoising_start is not None:
        cutoff = int(round(num_train_timesteps - denoising_start * num_train_timesteps))
        a = n - int(np.count_nonzero(timesteps < cutoff))
    if a >= b:
        raise UsageError(f"denoising_start={denoising_start} / denoising_end={denoising_end} with {n} steps "
                         "leaves no step to run", hint="raise --steps or move the hand-off point")
    return a, b


def slice_schedule(schedule, a: int, b: int):
    """The steps [a, b) of a schedule: a sampler run over it starts fresh at step a (as diffusers' second
    pipeline does) and stops at sigma_b / alpha_b. A multistep sampler's lower-order final step and LCM's
    noise-free last step stay tied to the schedule's real end. PLMS (pndm, skip_prk_steps) restarts its
    step counter at a, as diffusers' fresh PNDMScheduler does: the stage's second evaluation re-takes its
    first step (`plms_restart`)."""
    n = len(schedule.timesteps)
    if (a, b) == (0, n):
        return schedule
    if schedule.name == "pndm" and a > 0:
        if schedule.params.prk_evals:
            # diffusers' refiner would restart the Runge-Kutta warm-up and step each latent from the warm-up's
            # first timestep (the top of the schedule), not from the timestep it is at
            raise UsageError(
                f"pndm with its Runge-Kutta warm-up (skip_prk_steps false, PNDMScheduler's default) cannot run the "
                f"refiner half of a hand-off: diffusers restarts the warm-up there and steps the latents at "
                f"t={int(schedule.timesteps[a])} as if they were at t={int(schedule.timesteps[0])}",
                hint="set skip_prk_steps true in the scheduler config (PLMS, as SD's PNDM configs do) or run the "
                     "refiner with another scheduler")
        return plms_restart(schedule, a, b)
    return dataclasses.replace(
        schedule, timesteps=schedule.timesteps[a:b], sigmas=schedule.sigmas[a:b + 1],
        alphas=schedule.alphas[a:b], alphas_prev=schedule.alphas_prev[a:b], params=schedule.params.sliced(a, b, n))


class SDXLPipeline(Pipeline):
    """SDXL base or refiner over runners of any backend (see the module docstring)."""

    def __init__(self, tokenizers: Mapping[str, Callable], runners: Mapping[str, Any], info: ModelInfo, *,
                 backend: str = "", artifact_hash: str | None = None):
        if info.sdxl is None:
            raise LdmError("SDXL pipeline needs a model description with SDXL conditioning (ModelInfo.sdxl)")
        self.encoders = [c for c in ("text_encoder", "text_encoder_2") if c in runners]
        missing = [c for c in ("text_encoder_2", "unet", "vae_decoder") if c not in runners]
        missing += [f"tokenizer for {c}" for c in self.encoders if c not in tokenizers]
        if missing:
            raise LdmError(f"SDXL pipeline needs {', '.join(missing)}")
        super().__init__(tokenizers[self.encoders[0]], {"text_encoder": None, **runners}, info, backend=backend,
                         artifact_hash=artifact_hash)
        if "text_encoder" not in self.encoders:
            del self.runners["text_encoder"]
        self.tokenizers = dict(tokenizers)
        self.sdxl = info.sdxl
        self.aesthetic = info.sdxl.requires_aesthetics_score
        self.force_zeros = info.sdxl.force_zeros_for_empty_prompt

    @classmethod
    def from_artifact(cls, path, backend: str = "ort-cpu", components: Sequence[str] | None = None,
                      verify: bool = True, device_loop: bool = False, **runner_opts) -> "SDXLPipeline":
        """`path`: an SDXL artifact folder or an opened `Artifact`; `device_loop` as in Pipeline.from_artifact."""
        from ldm_deploy.artifact import SDXL_COMPONENTS, Artifact
        from ldm_deploy.runtime.pipeline import check_device_loop, open_runners
        from ldm_deploy.runtime.tokenizer import ClipTokenizer

        artifact = path if isinstance(path, Artifact) else Artifact.open(path, verify=verify)
        if artifact.info.sdxl is None:
            raise LdmError(f"{artifact.path} is not an SDXL artifact (its manifest has no `sdxl` entry)",
                           hint="open it with Pipeline.from_artifact")
        if device_loop:
            check_device_loop(artifact, backend)
        names = components or [c for c in SDXL_COMPONENTS if c in artifact.components]
        runners = open_runners(artifact, backend, names, runner_opts, device_loop)
        tokenizers = {}
        if "text_encoder" in runners:
            tokenizers["text_encoder"] = ClipTokenizer.from_dir(artifact.tokenizer_dir)
        tokenizers["text_encoder_2"] = ClipTokenizer.from_dir(artifact.tokenizer_2_dir)
        return cls(tokenizers, runners, artifact.info, backend=backend, artifact_hash=artifact.manifest_sha256)

    # --- conditioning --------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(context (B, 77, sum of widths), pooled (B, P)) from every text encoder, as diffusers' encode_prompt."""
        hidden, pooled = [], None
        for name in self.encoders:
            ids = np.asarray(self.tokenizers[name](prompts), dtype=np.int32)            # (B, 77)
            out = self.runners[name]({"input_ids": ids})
            h = np.asarray(out[HIDDEN], dtype=np.float32)
            check_finite(h, name)
            hidden.append(h)
            if name == "text_encoder_2":
                pooled = np.asarray(out[POOLED], dtype=np.float32)                       # (B, P)
        return np.concatenate(hidden, axis=-1), pooled

    def time_ids(self, rows: int, original_size, crop, third) -> np.ndarray:
        """(rows, 6 | 5) float32: original (h, w), crop (top, left), target (h, w) | aesthetic score."""
        values = [*original_size, *crop, *(third if isinstance(third, (tuple, list)) else (third,))]
        want = self.sdxl.time_ids
        if len(values) != want:
            raise LdmError(f"this U-Net takes {want} time_ids but the conditioning gives {len(values)}",
                           hint="the artifact's sdxl.requires_aesthetics_score does not match its U-Net")
        return np.tile(np.asarray(values, np.float32), (rows, 1))

    def encode(self, req: Request, *, original_size: tuple[int, int] | None = None,
               crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
               negative_original_size: tuple[int, int] | None = None,
               negative_crops_coords_top_left: tuple[int, int] | None = None,
               negative_target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0,
               negative_aesthetic_score: float = 2.5, zero_negative: bool = False) -> tuple[np.ndarray, dict]:
        """[negative, positive] rows (2B under CFG, else B) of context, pooled embeddings and time_ids: the
        context and the U-Net's extra feeds {text_embeds, time_ids}."""
        ctx, pooled = self.encode_prompts(req.rows)                              # (B, 77, D), (B, P)
        size, batch = (req.height, req.width), req.batch
        if self.aesthetic:
            pos_ids = self.time_ids(batch, original_size or size, crops_coords_top_left, aesthetic_score)
            neg_ids = self.time_ids(batch, negative_original_size or original_size or size,
                                    negative_crops_coords_top_left or crops_coords_top_left, negative_aesthetic_score)
        else:
            pos_ids = self.time_ids(batch, original_size or size, crops_coords_top_left, target_size or size)
            neg_ids = self.time_ids(batch, negative_original_size or original_size or size,
                                    negative_crops_coords_top_left or crops_coords_top_left,
                                    negative_target_size or target_size or size)
        neg_ctx = neg_pooled = None
        if g.uses_cfg(req.guidance):
            if zero_negative:
                neg_ctx, neg_pooled = np.zeros_like(ctx), np.zeros_like(pooled)
            else:
                neg_ctx, neg_pooled = self.encode_prompts(req.negative_rows)
        return (g.rows(neg_ctx, ctx, req.guidance),
                {POOLED: g.rows(neg_pooled, pooled, req.guidance), "time_ids": g.rows(neg_ids, pos_ids, req.guidance)})

    # --- the loop ------------------------------------------------------------------------------------

    def stage_schedule(self, scheduler: str | None, steps: int, *, denoising_start: float | None = None,
                       denoising_end: float | None = None, strength: float = 1.0):
        """(the N-step schedule, this stage's slice of it). Runs no model, so a caller can check a refiner's
        hand-off (`denoising_start`) before the base runs: a refused one raises the UsageError here."""
        from ldm_deploy.runtime import schedulers as sch

        schedule = sch.make_schedule(self._scheduler_name(scheduler), self.parsed_scheduler, steps, strength=strength)
        num_train = int(self.scheduler_config.get("num_train_timesteps", 1000))
        a, b = handoff_range(schedule.timesteps, num_train, denoising_start, denoising_end)
        return schedule, slice_schedule(schedule, a, b)

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 steps: int = 50, guidance: float = 5.0, scheduler: str | None = None, seed: int | Sequence[int] | None = None,
                 latents: np.ndarray | None = None, height: int | None = None, width: int | None = None,
                 num_images: int = 1, image: np.ndarray | None = None, strength: float = 0.3,
                 guidance_rescale: float = 0.0, eta: float = 0.0, callback: Callback | None = None,
                 init_latents: np.ndarray | None = None, denoising_start: float | None = None,
                 denoising_end: float | None = None, decode: bool = True, **micro_conditioning) -> GenerationResult:
        """txt2img (latents / seed), img2img (image + strength), or a hand-off stage (denoising_end on the
        base with decode=False; init_latents + denoising_start on the refiner). `micro_conditioning`: the
        size / crop / aesthetic keywords of `encode` (diffusers' names)."""
        from ldm_deploy.runtime import schedulers as sch

        t_total = time.perf_counter()
        sources = [k for k, v in {"latents": latents, "image": image, "init_latents": init_latents}.items()
                   if v is not None]
        if len(sources) > 1:
            raise UsageError(f"pass one of latents (txt2img), image (img2img) or init_latents (hand-off), "
                             f"not {' and '.join(sources)}")
        if (init_latents is None) != (denoising_start is None):
            raise UsageError("init_latents and denoising_start go together (the refiner half of a hand-off)")
        req = self.check(prompt, negative_prompt, steps=steps, guidance=guidance, scheduler=scheduler, seed=seed,
                         latents=latents, height=height, width=width, num_images=num_images, image=image,
                         strength=strength, guidance_rescale=guidance_rescale, eta=eta, init_latents=init_latents)
        zero_negative = negative_prompt is None and self.force_zeros
        rng, timings = req.rng(), {}
        # the stage's slice of the N-step schedule (a refused hand-off fails here, before any model runs)
        schedule, stage = self.stage_schedule(req.scheduler, req.steps, denoising_start=denoising_start,
                                              denoising_end=denoising_end, strength=req.strength or 1.0)
        with timed(timings, "text_encoder"):
            context, extra = self.encode(req, zero_negative=zero_negative, **micro_conditioning)
        x = self.start_latents(req, schedule, rng, timings)
        x = self.denoise(req, stage, x, context, extra, rng, callback, timings)
        # decode (fp32 VAE unless the artifact says otherwise), unless a later stage takes the latents
        images = np.zeros((0, req.height, req.width, 3), np.uint8)
        if decode:
            with timed(timings, "vae_decoder"):
                images = self.decode(x)
        timings["total"] = time.perf_counter() - t_total
        params = req.metadata(denoising_start=denoising_start, denoising_end=denoising_end,
                              model="sdxl-refiner" if self.aesthetic else "sdxl", backend=self.backend,
                              artifact_hash=self.artifact_hash, loras=getattr(self, "loras", None) or None)
        if zero_negative:
            del params["negative_prompt"]             # zero context, no prompt encoded
        return GenerationResult(images=images, latents=x, timings=timings, params=params)
