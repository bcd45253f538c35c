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
N-step schedule, starting from those latents as they are (no noise added).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ldm_deploy.artifact import ModelInfo
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime.pipeline import (
    GenerationResult, Pipeline, _as_image_batch, _Denoiser, _generator, check_finite, to_uint8,
)

HIDDEN, POOLED = "penultimate_hidden_state", "text_embeds"
# Samplers whose run over a slice of the schedule is what diffusers does across a hand-off (each step reads
# only sigmas / alphas around it, or restarts its history the way diffusers' second pipeline does).
# PNDM's step count differs from diffusers' at the seam, DDPM and LCM special-case the last step: those are
# refused. UniPC keeps its global step indices through the slice (`tail_steps`).
HANDOFF_SAMPLERS = ("euler", "euler-ancestral", "ddim", "lms", "dpmpp-2m", "dpmpp-2m-karras", "unipc")


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
    pipeline does) and stops at sigma_b / alpha_b. A multistep sampler's lower-order final step stays
    tied to the schedule's real end."""
    n = len(schedule.timesteps)
    if (a, b) == (0, n):
        return schedule
    params = dict(schedule.params)
    if b < n and "first_order_final" in params:
        params["first_order_final"] = False
    if "start_index" in params:                     # UniPC: global step indices and steps after the slice
        params["start_index"] = params["start_index"] + a
        params["tail_steps"] = n - b
    return dataclasses.replace(
        schedule, timesteps=schedule.timesteps[a:b], sigmas=schedule.sigmas[a:b + 1],
        alphas=schedule.alphas[a:b], alphas_prev=schedule.alphas_prev[a:b], params=params)


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
                      verify: bool = True, **runner_opts) -> "SDXLPipeline":
        """`path`: an SDXL artifact folder or an opened `Artifact`."""
        from ldm_deploy.artifact import SDXL_COMPONENTS, Artifact
        from ldm_deploy.runtime.runners.base import open_runner
        from ldm_deploy.runtime.tokenizer import ClipTokenizer

        artifact = path if isinstance(path, Artifact) else Artifact.open(path, verify=verify)
        if artifact.info.sdxl is None:
            raise LdmError(f"{artifact.path} is not an SDXL artifact (its manifest has no `sdxl` entry)",
                           hint="open it with Pipeline.from_artifact")
        names = components or [c for c in SDXL_COMPONENTS if c in artifact.components]
        runners = {c: open_runner(backend, artifact, c, **runner_opts) for c in names}
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

    # --- the loop ------------------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 steps: int = 50, guidance: float = 5.0, scheduler: str | None = None, seed: int | Sequence[int] | None = None,
                 latents: np.ndarray | None = None, height: int | None = None, width: int | None = None,
                 num_images: int = 1, image: np.ndarray | None = None, strength: float = 0.3,
                 guidance_rescale: float = 0.0, eta: float = 0.0,
                 callback: Callable[[int, int, np.ndarray], None] | None = None,
                 init_latents: np.ndarray | None = None, denoising_start: float | None = None,
                 denoising_end: float | None = None, decode: bool = True,
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, negative_original_size: tuple[int, int] | None = None,
                 negative_crops_coords_top_left: tuple[int, int] | None = None,
                 negative_target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5) -> GenerationResult:
        """txt2img (latents / seed), img2img (image + strength), or a hand-off stage (denoising_end on the
        base with decode=False; init_latents + denoising_start on the refiner)."""
        from ldm_deploy.runtime import schedulers as sch

        t_total = time.perf_counter()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        zero_negative = negative_prompt is None and self.force_zeros
        negatives = self._negatives(negative_prompt, len(prompts))
        name = self._scheduler_name(scheduler)
        self._check_numbers(steps, guidance, guidance_rescale, strength, eta, num_images, len(prompts))
        given = {"latents": latents, "image": image, "init_latents": init_latents}
        sources = [k for k, v in given.items() if v is not None]
        if len(sources) > 1:
            raise UsageError(f"pass one of latents (txt2img), image (img2img) or init_latents (hand-off), "
                             f"not {' and '.join(sources)}")
        if (init_latents is None) != (denoising_start is None):
            raise UsageError("init_latents and denoising_start go together (the refiner half of a hand-off)")
        init = None if image is None else _as_image_batch(image)
        batch = len(prompts) * num_images
        if init_latents is not None:
            init_latents = np.asarray(init_latents, np.float32)
            lat = init_latents.shape
            if len(lat) != 4 or lat[0] != batch or lat[1] != self.latent_channels:
                raise UsageError(f"init_latents have shape {list(lat)}, expected [{batch}, {self.latent_channels}, "
                                 "h, w] (the base's denoising_end latents)")
        height, width = self._resolve_size(height, width, latents if init_latents is None else init_latents,
                                           init, batch)
        self._check_batch(batch)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        else:
            from ldm_deploy.limits import check_seed
            # as Pipeline: -1 or 2**63 a UsageError; a list is one seed per row (RowRNG), not one mixed entropy
            seed = [check_seed(s) for s in seed] if isinstance(seed, (list, tuple)) else check_seed(seed)
        rng = _generator(seed, batch)
        timings: dict[str, float] = {}

        # 1. conditioning: [negative, positive] rows of context, pooled embeddings and time_ids
        cfg = guidance > 1.0
        rows = [p for p in prompts for _ in range(num_images)]
        t0 = time.perf_counter()
        ctx, pooled = self.encode_prompts(rows)                                  # (B, 77, D), (B, P)
        size = (height, width)
        if self.aesthetic:
            pos_ids = self.time_ids(batch, original_size or size, crops_coords_top_left, aesthetic_score)
            neg_ids = self.time_ids(batch, negative_original_size or original_size or size,
                                    negative_crops_coords_top_left or crops_coords_top_left, negative_aesthetic_score)
        else:
            pos_ids = self.time_ids(batch, original_size or size, crops_coords_top_left, target_size or size)
            neg_ids = self.time_ids(batch, negative_original_size or original_size or size,
                                    negative_crops_coords_top_left or crops_coords_top_left,
                                    negative_target_size or target_size or size)
        if cfg:
            if zero_negative:
                neg_ctx, neg_pooled = np.zeros_like(ctx), np.zeros_like(pooled)
            else:
                neg_ctx, neg_pooled = self.encode_prompts([n for n in negatives for _ in range(num_images)])
            ctx, pooled = np.concatenate([neg_ctx, ctx]), np.concatenate([neg_pooled, pooled])
            ids = np.concatenate([neg_ids, pos_ids])
        else:
            ids = pos_ids
        for a in (ctx, pooled, ids):
            a.setflags(write=False)     # constant over the loop: runners may skip re-uploading by identity
        timings["text_encoder"] = time.perf_counter() - t0

        # 2. schedule (the stage's slice of the N-step schedule) and the start latent
        schedule = sch.make_schedule(name, self.scheduler_config, steps,
                                     strength=float(strength) if init is not None else 1.0)
        num_train = int(self.scheduler_config.get("num_train_timesteps", 1000))
        a, b = handoff_range(schedule.timesteps, num_train, denoising_start, denoising_end)
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if init_latents is not None:
            x = init_latents.copy()                                   # the base's sampler state, as it is
        elif init is not None:
            t0 = time.perf_counter()
            x0 = self._encode_image(init, batch, rng)
            timings["vae_encoder"] = time.perf_counter() - t0
            if len(schedule.timesteps) == 0:
                raise UsageError(f"strength {strength} with {steps} steps leaves no denoising step",
                                 hint="raise --strength or --steps")
            x = sch.add_noise(schedule, x0, rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        else:
            if latents is None:
                latents = rng.standard_normal(shape, dtype=np.float32)
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != shape:
                raise UsageError(f"latents have shape {list(latents.shape)}, expected {list(shape)}")
            if not np.isfinite(latents).all():
                raise UsageError("latents contain NaN or Inf values", hint="pass finite N(0, I) noise")
            x = (latents * np.float32(schedule.init_noise_sigma)).astype(np.float32)
        if (a, b) != (0, len(schedule.timesteps)) and name not in HANDOFF_SAMPLERS:
            raise UsageError(f"the base -> refiner hand-off (denoising_start / denoising_end) is not supported with "
                             f"{name}", hint=f"use one of {', '.join(HANDOFF_SAMPLERS)} for the hand-off")
        stage = slice_schedule(schedule, a, b)

        # 3. denoise
        denoiser = _Denoiser(self.runners["unet"], ctx, guidance, guidance_rescale,
                             extra_inputs={POOLED: pooled, "time_ids": ids})
        n_steps = len(stage.timesteps)

        def on_step(i, t, x_i):
            if callback is not None:
                callback(i, n_steps, x_i)

        t0 = time.perf_counter()
        x = np.asarray(sch.sample(name, denoiser, x, stage, rng=rng, callback=on_step, eta=eta), np.float32)
        check_finite(x, "scheduler", f"({name})")
        timings["denoise"] = loop = time.perf_counter() - t0
        timings["unet"], timings["unet_calls"] = denoiser.unet_s, denoiser.calls
        timings["scheduler_overhead"] = loop - denoiser.unet_s
        if denoiser.calls:
            timings["unet_per_step"] = denoiser.unet_s / denoiser.calls
            timings["scheduler_overhead_per_step"] = (loop - denoiser.unet_s) / denoiser.calls
            timings["overhead_fraction"] = (loop - denoiser.unet_s) / max(denoiser.unet_s, 1e-12)

        # 4. decode (fp32 VAE unless the artifact says otherwise), unless a later stage takes the latents
        if decode:
            t0 = time.perf_counter()
            decoded = np.asarray(self.runners["vae_decoder"]({"latent": x / np.float32(self.scaling_factor)})["image"],
                                 np.float32)
            check_finite(decoded, "vae_decoder")
            images = to_uint8(decoded)
            timings["vae_decoder"] = time.perf_counter() - t0
        else:
            images = np.zeros((0, height, width, 3), np.uint8)
        timings["total"] = time.perf_counter() - t_total
        params = {
            "prompt": prompts if len(prompts) > 1 else prompts[0],
            "negative_prompt": None if zero_negative else (negatives if len(negatives) > 1 else negatives[0]),
            "seed": seed, "latents": "caller" if latents is not None and image is None else None,
            "steps": steps, "guidance": guidance, "scheduler": name, "height": height, "width": width,
            "num_images": num_images, "guidance_rescale": guidance_rescale, "eta": eta,
            "strength": strength if init is not None else None, "denoising_start": denoising_start,
            "denoising_end": denoising_end, "model": "sdxl-refiner" if self.aesthetic else "sdxl",
            "backend": self.backend, "artifact_hash": self.artifact_hash,
        }
        return GenerationResult(images=images, latents=x, timings=timings,
                                params={k: v for k, v in params.items() if v is not None})
