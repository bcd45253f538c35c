"""The torch-free txt2img / img2img loop: tokenizer -> text encoder -> numpy sampler over the U-Net -> VAE.

One loop serves every backend: the pipeline holds a tokenizer, one runner per component
(`dict[str, ndarray] -> dict[str, ndarray]`, see runners/base.py) and the model's `ModelInfo`
(ldm_deploy/artifact.py: sizes, prediction type, scheduler config, profiles), and never knows which
backend the runners are. `Pipeline(tokenizer, runners, info)` is the one constructor;
`Pipeline.from_artifact(dir, backend="ort-cpu")` builds the deployed path and
`training.runner.pipeline_from_model_folder(folder)` the PyTorch reference over the same loop.

The CFG glue lives in one place (`_Denoiser`), as diffusers' `StableDiffusionPipeline` does it
(reference §4): the U-Net sees ONE batch of 2B rows ordered `[uncond, cond]`, the guided output is
`u + s (c - u)`, optionally rescaled (Lin et al. 2023) with torch's unbiased std. Guidance <= 1 runs
a plain batch of B. Latents are numpy float32 (B, 4, H/8, W/8); the decoded image is quantized as
diffusers does: round((x * 0.5 + 0.5).clip(0, 1) * 255).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ldm_deploy.artifact import SD_COMPONENTS, ModelInfo
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime.runners.base import takes_guidance


@dataclass
class GenerationResult:
    images: np.ndarray                  # uint8 (N, H, W, 3)
    latents: np.ndarray                 # float32 (N, 4, H/8, W/8): the sampler's final x0, before / scaling_factor
    timings: dict[str, float]           # seconds per stage (+ per-step U-Net and scheduler overhead)
    params: dict[str, Any] = field(default_factory=dict)  # what produced the images (PNG metadata)


class _Denoiser:
    """`model(x_in, t) -> raw U-Net output` for the samplers: CFG over one 2B batch, rescale, NaN check.

    Also accounts time: `unet_s` is spent inside the runner, the rest of the loop is scheduler + CFG.
    Per step it allocates one latent-sized array (the guided output, which a multistep sampler may keep):
    the 2B U-Net input and the timestep vector are buffers reused across steps, so a runner must not
    keep references to its inputs past the call (none does; ORT/TensorRT copy them to the device).
    """

    def __init__(self, unet, embeddings: np.ndarray, guidance: float, guidance_rescale: float,
                 extra_inputs: Mapping[str, np.ndarray] | None = None):
        self.unet = unet
        self.embeddings = embeddings            # (2B, 77, D) under CFG, else (B, 77, D)
        self.extra = dict(extra_inputs or {})   # SDXL (runtime/sdxl.py): text_embeds, time_ids, rows as embeddings
        self.cfg = guidance > 1.0
        self.guidance = float(guidance)
        self.rescale = float(guidance_rescale)
        self.unet_s = 0.0
        self.calls = 0
        self._sample: np.ndarray | None = None      # (2B, 4, h, w) float32 U-Net input, reused
        self._timestep: np.ndarray | None = None    # (2B,) float32, reused
        # A U-Net graph with CFG folded in (ldm_deploy/export/cfg_fold.py) takes the B latents, the 2B (or B)
        # embeddings and the guidance, and returns the guided prediction: no 2B copies or CFG on the host.
        self.folded = takes_guidance(unet)
        if self.folded and self.extra:
            raise LdmError("a CFG-folded U-Net graph takes no extra conditioning inputs",
                           hint="export SDXL without ort_cuda variants")
        if self.folded:
            if not self.cfg:   # the folded graph is CFG-shaped: the same rows twice and g = 1 give cond exactly
                self.embeddings = np.concatenate([embeddings, embeddings])
                self.embeddings.setflags(write=False)
            self._guidance_feeds = {
                "guidance_scale": np.array([self.guidance if self.cfg else 1.0], np.float32),
                "guidance_rescale": np.array([self.rescale if self.cfg else 0.0], np.float32)}
            for value in self._guidance_feeds.values():
                value.setflags(write=False)     # constant over the loop, as the embeddings

    def _buffers(self, x_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = 2 * x_in.shape[0] if self.cfg else x_in.shape[0]
        if self._timestep is None or self._timestep.shape[0] != rows or (
                self.cfg and self._sample.shape[1:] != x_in.shape[1:]):
            self._sample = np.empty((rows, *x_in.shape[1:]), np.float32) if self.cfg else None
            self._timestep = np.empty(rows, np.float32)
        return self._sample, self._timestep

    def __call__(self, x_in: np.ndarray, t) -> np.ndarray:
        x_in = np.asarray(x_in, dtype=np.float32)
        if self.folded:
            return self._folded(x_in, t)
        sample, timestep = self._buffers(x_in)
        n = x_in.shape[0]
        if self.cfg:
            sample[:n] = x_in                                                   # [uncond, cond] rows: (2B, 4, h, w)
            sample[n:] = x_in
        else:
            sample = x_in
        timestep.fill(np.float32(t))                                            # (2B,)
        start = time.perf_counter()
        out = self.unet({"sample": sample, "timestep": timestep, "encoder_hidden_states": self.embeddings,
                         **self.extra})
        self.unet_s += time.perf_counter() - start
        self.calls += 1
        pred = np.asarray(out["noise_pred"], dtype=np.float32)
        if not self.cfg:
            if not finite_fast(pred):
                check_finite(pred, "unet", f"(step {self.calls}, t={float(np.ravel(t)[0]):g})")
            return pred
        uncond, cond = pred[:n], pred[n:]
        guided = np.subtract(cond, uncond)                      # uncond + g (cond - uncond), one new array
        guided *= self.guidance
        guided += uncond
        # a NaN/Inf in either half leaves the guided output non-finite (g > 1), so checking the B rows of
        # `guided` covers all 2B rows of `pred`; the exact check then names the U-Net's bad values
        if not finite_fast(guided):
            check_finite(pred, "unet", f"(step {self.calls}, t={float(np.ravel(t)[0]):g})")
        if self.rescale > 0:
            guided = rescale_noise_cfg(guided, cond, self.rescale)
        return guided

    def _folded(self, x_in: np.ndarray, t) -> np.ndarray:
        if self._timestep is None or self._timestep.shape[0] != x_in.shape[0]:
            self._timestep = np.empty(x_in.shape[0], np.float32)
        self._timestep.fill(np.float32(t))                                      # (B,)
        start = time.perf_counter()
        out = self.unet({"sample": x_in, "timestep": self._timestep, "encoder_hidden_states": self.embeddings,
                         **self._guidance_feeds})
        self.unet_s += time.perf_counter() - start
        self.calls += 1
        guided = np.asarray(out["noise_pred"], dtype=np.float32)                # (B, 4, h, w), guided in-graph
        if not finite_fast(guided):
            check_finite(guided, "unet", f"(step {self.calls}, t={float(np.ravel(t)[0]):g})")
        return guided


def rescale_noise_cfg(guided: np.ndarray, cond: np.ndarray, phi: float) -> np.ndarray:
    """Lin et al. 2023 §3.4, as diffusers' `rescale_noise_cfg` (torch.std is unbiased: ddof=1)."""
    axes = tuple(range(1, guided.ndim))
    std_cond = cond.std(axis=axes, keepdims=True, ddof=1)
    std_cfg = guided.std(axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_cfg)
    return (phi * rescaled + (1 - phi) * guided).astype(np.float32)


def finite_fast(x: np.ndarray) -> bool:
    """True when float `x` surely holds no NaN/Inf: its sum of squares is finite (one BLAS pass, no temporary).

    A NaN or Inf anywhere makes it non-finite; False can also mean a finite sum overflowed (|x| ~ 1e19),
    so on False call `check_finite`, which decides exactly. ~2x faster than np.isfinite(x).all().
    """
    return x.dtype.kind == "f" and math.isfinite(np.vdot(x, x))


def check_finite(x: np.ndarray, stage: str, where: str = "") -> None:
    """Raise LdmError naming the stage when `x` holds NaN or Inf."""
    if np.isfinite(x).all():
        return
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    hint = {
        "vae_decoder": "the fp16 VAE decoder overflows on some latents; re-export with the VAE decoder in fp32 "
                       "(keep vae_decoder out of fp16 in the export config) or run --backend ort-cpu",
        "unet": "an fp16 U-Net can overflow in attention; re-export with attention upcast or in fp32",
        "text_encoder": "the text encoder export is broken; run `ldm-deploy validate` on the artifact",
    }.get(stage, "run `ldm-deploy validate` on the artifact")
    raise LdmError(f"{stage} produced {bad} non-finite values (NaN/Inf) {where}".strip(), hint=hint)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """VAE output (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), diffusers' rounding."""
    x = (np.asarray(image, dtype=np.float32) * 0.5 + 0.5).clip(0.0, 1.0)
    return np.round(x.transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1] (diffusers' 2x - 1 normalization)."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    return (x * 2.0 - 1.0).transpose(0, 3, 1, 2).copy()


class Pipeline:
    """Text (+ optional init image) -> uint8 images, over runners of any backend.

    `info` describes the model (ldm_deploy.artifact.ModelInfo): `Artifact(path).info` for an exported
    artifact, `training.checkpoint.model_info(folder)` for a model folder.
    """

    def __init__(self, tokenizer: Callable[[list[str]], np.ndarray], runners: Mapping[str, Any], info: ModelInfo,
                 *, backend: str = "", artifact_hash: str | None = None):
        missing = [c for c in ("text_encoder", "unet", "vae_decoder") if c not in runners]
        if missing:
            raise LdmError(f"pipeline needs runners for {', '.join(missing)}")
        if not isinstance(info, ModelInfo):
            raise TypeError(f"info must be an ldm_deploy.artifact.ModelInfo, got {type(info).__name__}")
        self.tokenizer = tokenizer
        self.runners = dict(runners)
        self.info = info
        self.backend = backend
        self.artifact_hash = artifact_hash

    # what the loop reads of the model description
    @property
    def scheduler_config(self) -> Mapping[str, Any]:
        return self.info.scheduler_config

    @property
    def scaling_factor(self) -> float:
        return self.info.scaling_factor

    @property
    def prediction_type(self) -> str:
        return self.info.prediction_type

    @property
    def latent_channels(self) -> int:
        return self.info.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return self.info.vae_scale_factor

    @property
    def profiles(self):
        """The artifact's shape profiles (ldm_deploy.artifact.Profiles), or None: any size."""
        return self.info.profiles

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def from_artifact(cls, path: str | Path, backend: str = "ort-cpu", components: Sequence[str] | None = None,
                      verify: bool = True, **runner_opts) -> "Pipeline":
        """Open an exported artifact directory and one `backend` runner per component.

        `verify` checks every file's sha256 against the manifest first (seconds for SD-sized graphs).
        An SDXL artifact gives a runtime.sdxl.SDXLPipeline.
        """
        from ldm_deploy.artifact import Artifact
        from ldm_deploy.runtime.runners.base import open_runner
        from ldm_deploy.runtime.tokenizer import ClipTokenizer

        artifact = Artifact.open(path, verify=verify)
        if artifact.info.sdxl is not None and cls is Pipeline:      # SDXL conditioning lives in runtime/sdxl.py
            from ldm_deploy.runtime.sdxl import SDXLPipeline

            return SDXLPipeline.from_artifact(artifact, backend, components, **runner_opts)
        names = components or [c for c in SD_COMPONENTS if c in artifact.components]
        runners = {c: open_runner(backend, artifact, c, **runner_opts) for c in names}
        tokenizer = ClipTokenizer.from_dir(artifact.tokenizer_dir)
        te_vocab = artifact.text_vocab_size
        if te_vocab is not None and max(tokenizer.vocab.values()) >= te_vocab:
            raise LdmError(f"the tokenizer in {artifact.tokenizer_dir} has ids up to {max(tokenizer.vocab.values())} "
                           f"but the text encoder's vocabulary has {te_vocab} rows",
                           hint="the artifact's tokenizer/ belongs to another model; re-export from the model folder")
        return cls(tokenizer, runners, artifact.info, backend=backend, artifact_hash=artifact.manifest_sha256)

    def set_loras(self, loras: Sequence = ()) -> dict:
        """Switch LoRAs (`LoraSpec`, "FILE[:SCALE]" or (file, scale)) on an artifact exported with switchable
        weights; `[]` restores the base model bit for bit. No re-trace, no re-export (runtime/lora_switch.py).
        Returns {"loras": [records], "seconds": ..., "changed": {component: tensors rewritten}}."""
        from ldm_deploy.runtime import lora_switch

        info = lora_switch.apply(self.runners, loras)
        self.loras = [{"file": r["file"], "sha256": r["sha256"], "scale": r["scale"]} for r in info["loras"]]
        return info

    # --- the loop ----------------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 steps: int = 50, guidance: float = 7.5, scheduler: str | None = None,
                 seed: int | Sequence[int] | None = None,
                 latents: np.ndarray | None = None, height: int | None = None, width: int | None = None,
                 num_images: int = 1, image: np.ndarray | None = None, strength: float = 0.8,
                 guidance_rescale: float = 0.0, eta: float = 0.0,
                 callback: Callable[[int, int, np.ndarray], None] | None = None) -> GenerationResult:
        from ldm_deploy.runtime import schedulers as sch

        t_total = time.perf_counter()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = self._negatives(negative_prompt, len(prompts))
        name = self._scheduler_name(scheduler)
        self._check_numbers(steps, guidance, guidance_rescale, strength, eta, num_images, len(prompts))
        init = None if image is None else _as_image_batch(image)
        given_latents = latents is not None
        if init is not None and latents is not None:
            raise UsageError("pass either an init image (img2img) or latents, not both")
        batch = len(prompts) * num_images
        height, width = self._resolve_size(height, width, latents, init, batch)
        self._check_batch(batch)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        else:
            from ldm_deploy.limits import check_seed
            # -1 or 2**63: a UsageError, not numpy's ValueError
            seed = [check_seed(s) for s in seed] if isinstance(seed, (list, tuple)) else check_seed(seed)
        rng = _generator(seed, batch)   # one Generator, or one per row for a list of seeds (RowRNG)
        timings: dict[str, float] = {}

        # 1. text embeddings: [uncond, cond] as ONE batch of 2B rows when CFG is on
        cfg = guidance > 1.0
        rows = [p for p in prompts for _ in range(num_images)]
        neg_rows = [n for n in negatives for _ in range(num_images)]
        t0 = time.perf_counter()
        cond = self._encode_text(rows)                                     # (B, 77, D)
        emb = np.concatenate([self._encode_text(neg_rows), cond]) if cfg else cond   # (2B, 77, D)
        emb.setflags(write=False)      # constant over the loop: runners may skip re-uploading it by identity
        timings["text_encoder"] = time.perf_counter() - t0

        # 2. schedule and initial latents
        schedule = sch.make_schedule(name, self.scheduler_config, steps,
                                     strength=float(strength) if init is not None else 1.0)
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if init is not None:
            t0 = time.perf_counter()
            x0 = self._encode_image(init, batch, rng)                      # (B, 4, h, w), scaled
            timings["vae_encoder"] = time.perf_counter() - t0
            if len(schedule.timesteps) == 0:
                raise UsageError(f"strength {strength} with {steps} steps leaves no denoising step",
                                 hint="raise --strength or --steps")
            noise = rng.standard_normal(shape, dtype=np.float32)
            x = sch.add_noise(schedule, x0, noise).astype(np.float32)
        else:
            if latents is None:
                latents = rng.standard_normal(shape, dtype=np.float32)
            else:
                latents = np.asarray(latents, dtype=np.float32)
                if latents.shape != shape:
                    raise UsageError(f"latents have shape {list(latents.shape)}, expected {list(shape)} "
                                     f"([num_prompts*num_images, {self.latent_channels}, height/8, width/8])")
                if not np.isfinite(latents).all():
                    raise UsageError("latents contain NaN or Inf values", hint="pass finite N(0, I) noise")
            x = (latents * np.float32(schedule.init_noise_sigma)).astype(np.float32)

        # 3. denoise
        denoiser = _Denoiser(self.runners["unet"], emb, guidance, guidance_rescale)
        n_steps = len(schedule.timesteps)

        def on_step(i, t, x_i):
            if callback is not None:
                callback(i, n_steps, x_i)

        t0 = time.perf_counter()
        x = sch.sample(name, denoiser, x, schedule, rng=rng, callback=on_step, eta=eta)
        loop = time.perf_counter() - t0
        x = np.asarray(x, dtype=np.float32)
        check_finite(x, "scheduler", f"({name})")
        timings["denoise"] = loop
        timings["unet"] = denoiser.unet_s
        timings["unet_calls"] = denoiser.calls
        timings["scheduler_overhead"] = loop - denoiser.unet_s
        if denoiser.calls:
            timings["unet_per_step"] = denoiser.unet_s / denoiser.calls
            timings["scheduler_overhead_per_step"] = (loop - denoiser.unet_s) / denoiser.calls
            timings["overhead_fraction"] = (loop - denoiser.unet_s) / max(denoiser.unet_s, 1e-12)

        # 4. decode
        t0 = time.perf_counter()
        decoded = self.runners["vae_decoder"]({"latent": x / np.float32(self.scaling_factor)})["image"]
        decoded = np.asarray(decoded, dtype=np.float32)
        check_finite(decoded, "vae_decoder")
        images = to_uint8(decoded)
        timings["vae_decoder"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_total

        params = {
            "prompt": prompts if len(prompts) > 1 else prompts[0],
            "negative_prompt": negatives if len(negatives) > 1 else negatives[0],
            "seed": [int(v) for v in seed] if isinstance(seed, (list, tuple, np.ndarray)) else seed,
            "latents": "caller" if given_latents else None,
            "steps": steps, "guidance": guidance, "scheduler": name, "height": height, "width": width,
            "num_images": num_images, "guidance_rescale": guidance_rescale, "eta": eta,
            "strength": strength if init is not None else None, "backend": self.backend,
            "artifact_hash": self.artifact_hash,
            "loras": getattr(self, "loras", None) or None,
        }
        return GenerationResult(images=images, latents=x, timings=timings,
                                params={k: v for k, v in params.items() if v is not None})

    # --- stages --------------------------------------------------------------------------------------

    def _encode_text(self, prompts: list[str]) -> np.ndarray:
        ids = np.asarray(self.tokenizer(prompts), dtype=np.int32)            # (B, 77)
        out = self.runners["text_encoder"]({"input_ids": ids})["last_hidden_state"]
        out = np.asarray(out, dtype=np.float32)                               # (B, 77, D)
        check_finite(out, "text_encoder")
        return out

    def _encode_image(self, init: np.ndarray, batch: int, rng: np.random.Generator) -> np.ndarray:
        """uint8 (1 or B, H, W, 3) -> scaled latents (B, 4, h, w): mean + std * N(0, I), times scaling_factor."""
        if "vae_encoder" not in self.runners:
            raise LdmError("img2img needs the vae_encoder component, and this pipeline has none",
                           hint="export the artifact with the VAE encoder")
        if init.shape[0] not in (1, batch):
            raise UsageError(f"{init.shape[0]} init images for {batch} outputs; give 1 or {batch}")
        pixels = np.repeat(from_uint8(init), batch // init.shape[0], axis=0) if init.shape[0] == 1 else from_uint8(init)
        out = self.runners["vae_encoder"]({"image": pixels})
        mean = np.asarray(out["mean"], dtype=np.float32)
        logvar = np.clip(np.asarray(out["logvar"], dtype=np.float32), -30.0, 20.0)
        check_finite(mean, "vae_encoder")
        check_finite(logvar, "vae_encoder")
        z = mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape, dtype=np.float32)
        return (z * np.float32(self.scaling_factor)).astype(np.float32)

    # --- argument checks -----------------------------------------------------------------------------

    @staticmethod
    def _negatives(negative_prompt, n_prompts: int) -> list[str]:
        if negative_prompt is None:
            return [""] * n_prompts
        if isinstance(negative_prompt, str):
            return [negative_prompt] * n_prompts
        negatives = list(negative_prompt)
        if len(negatives) != n_prompts:
            raise UsageError(f"{len(negatives)} negative prompts for {n_prompts} prompts; give one or {n_prompts}")
        return negatives

    def _scheduler_name(self, scheduler: str | None) -> str:
        from ldm_deploy.runtime import schedulers as sch

        if scheduler is None:
            return sch.default_name(self.scheduler_config)
        if scheduler not in sch.SCHEDULERS:
            raise UsageError(f"unknown scheduler {scheduler!r}; choose one of: {', '.join(sch.SCHEDULERS)}")
        return scheduler

    @staticmethod
    def _check_numbers(steps, guidance, guidance_rescale, strength, eta, num_images, n_prompts) -> None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
            raise UsageError(f"steps must be a positive integer, got {steps!r}")
        if not isinstance(guidance, (int, float)) or math.isnan(guidance) or guidance < 0 or math.isinf(guidance):
            raise UsageError(f"guidance must be a finite number >= 0, got {guidance!r}")
        if not (0.0 <= float(guidance_rescale) <= 1.0):
            raise UsageError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        if not (0.0 < float(strength) <= 1.0):
            raise UsageError(f"strength must be in (0, 1], got {strength!r}")
        if not (float(eta) >= 0.0):
            raise UsageError(f"eta must be >= 0, got {eta!r}")
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images <= 0:
            raise UsageError(f"num_images must be a positive integer, got {num_images!r}")
        if n_prompts == 0:
            raise UsageError("no prompt given")

    def _resolve_size(self, height, width, latents, init, batch) -> tuple[int, int]:
        f = self.vae_scale_factor
        if latents is not None:
            lat = np.shape(latents)
            if len(lat) != 4:
                raise UsageError(f"latents must be 4-D [N, {self.latent_channels}, H/8, W/8], got shape {list(lat)}")
            height = lat[2] * f if height is None else height
            width = lat[3] * f if width is None else width
        if init is not None:
            height = init.shape[1] if height is None else height
            width = init.shape[2] if width is None else width
            if (init.shape[1], init.shape[2]) != (height, width):
                raise UsageError(f"init image is {init.shape[2]}x{init.shape[1]} but {width}x{height} was asked",
                                 hint="resize the init image or drop --height/--width")
        prof = self.info.profiles
        if height is None:  # an explicit 0 is an error below, not "the default"
            height = prof.height.opt if prof else 512
        if width is None:
            width = prof.width.opt if prof else 512
        self.info.check_shape(height=height, width=width)
        return int(height), int(width)

    def _check_batch(self, batch: int) -> None:
        self.info.check_shape(batch=batch, batch_label=f"batch of {batch} images (prompts x num_images)")


def _generator(seed, batch: int):
    """`default_rng(seed)` for one seed; for a list of `batch` seeds a RowRNG whose row i draws from
    `default_rng(seed[i])`: row i then gets the start noise, img2img noise and sampler noise it gets alone."""
    from ldm_deploy.runtime.schedulers.noise import RowRNG

    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        if seed < 0:
            raise UsageError(f"seed must be >= 0, got {seed}")
        return np.random.default_rng(int(seed))
    seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else None
    if seeds is None or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
        raise UsageError(f"seed must be a non-negative integer or a list of them, got {str(seed)[:80]}")
    if len(seeds) != batch:
        raise UsageError(f"{len(seeds)} seeds for a batch of {batch} images (prompts x num_images); give one per image")
    return RowRNG(seeds)


def _as_image_batch(image) -> np.ndarray:
    """An init image (PIL image, path, uint8 (H, W, 3) or (N, H, W, 3)) -> uint8 (N, H, W, 3)."""
    if isinstance(image, (str, Path)):
        from ldm_deploy.runtime.image import load_image
        image = load_image(image)
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise UsageError(f"init image must be RGB (H, W, 3) or (N, H, W, 3), got shape {list(arr.shape)}")
    if arr.dtype != np.uint8:
        raise UsageError(f"init image must be uint8, got {arr.dtype}")
    return arr
