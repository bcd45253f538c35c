"""The torch-free txt2img / img2img loop: tokenizer -> text encoder -> numpy sampler over the U-Net -> VAE.

One loop serves every backend: the pipeline holds a tokenizer, one runner per component
(`dict[str, ndarray] -> dict[str, ndarray]`, see runners/base.py) and the model's `ModelInfo`
(ldm_deploy/artifact.py: sizes, prediction type, scheduler config, profiles), and never knows which
backend the runners are. `Pipeline(tokenizer, runners, info)` is the one constructor;
`Pipeline.from_artifact(dir, backend="ort-cpu")` builds the deployed path and
`training.runner.pipeline_from_model_folder(folder)` the PyTorch reference over the same loop.

`Pipeline.__call__` reads as its stages, each a public method SDXLPipeline (runtime/sdxl.py) reuses:
`check` (the arguments -> a frozen `Request`) -> `encode` (text -> U-Net conditioning) -> `start_latents`
-> `denoise` (a numpy sampler over a denoiser) -> `decode`. The denoiser is the sampler's
`model(x_in, t)`: `CfgDenoiser` over a plain U-Net graph (CFG as ONE batch of 2B rows [uncond, cond],
guided on the host; a plain batch of B when guidance <= 1), `FoldedCfgDenoiser` over a graph with CFG
in it; the maths and the feeds are runtime/guidance.py's. Latents are numpy float32 (B, 4, H/8, W/8);
the decoded image is quantized as diffusers does: round((x * 0.5 + 0.5).clip(0, 1) * 255).

`callback(i, n, x)` runs after each of the n steps the sampler makes (i = 0 .. n-1) with its latent x.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ldm_deploy.artifact import SD_COMPONENTS, ModelInfo
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime import device_loop
from ldm_deploy.runtime import guidance as g
from ldm_deploy.runtime.runners.base import takes_guidance

log = logging.getLogger(__name__)
_LOOP_DECLINED: set[str] = set()   # why the device loop was not used, each said once per process


@dataclass
class GenerationResult:
    images: np.ndarray                  # uint8 (N, H, W, 3)
    latents: np.ndarray                 # float32 (N, 4, H/8, W/8): the sampler's final x0, before / scaling_factor
    timings: dict[str, float]           # seconds per stage (+ per-step U-Net and scheduler overhead)
    params: dict[str, Any] = field(default_factory=dict)  # what produced the images (PNG metadata)


Callback = Callable[[int, int, np.ndarray], None]    # callback(step_index, n_steps, latent) after each step


@dataclass(frozen=True, eq=False)      # holds arrays: compared by identity
class Request:
    """One checked call (`Pipeline.check`): what the loop runs and the PNG metadata records."""
    prompts: list[str]
    negatives: list[str]                # one per prompt
    scheduler: str
    steps: int
    guidance: float
    guidance_rescale: float
    eta: float
    strength: float | None              # img2img only
    num_images: int
    height: int
    width: int
    seed: int | list[int]               # one seed, or one per image row
    init: np.ndarray | None = None      # uint8 (1 or B, H, W, 3) init image (img2img)
    latents: np.ndarray | None = None   # float32 (B, C, h, w): the caller's start noise (txt2img)
    init_latents: np.ndarray | None = None  # float32 (B, C, h, w): a hand-off's sampler state (SDXL refiner)

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def rows(self) -> list[str]:
        return [p for p in self.prompts for _ in range(self.num_images)]

    @property
    def negative_rows(self) -> list[str]:
        return [n for n in self.negatives for _ in range(self.num_images)]

    def rng(self):
        """`default_rng(seed)` for one seed; for a list of seeds a RowRNG whose row i draws from
        `default_rng(seed[i])`: row i then gets the start noise, img2img noise and sampler noise it gets alone."""
        from ldm_deploy.runtime.schedulers.noise import RowRNG

        return RowRNG(self.seed) if isinstance(self.seed, list) else np.random.default_rng(self.seed)

    def metadata(self, **more) -> dict[str, Any]:
        """GenerationResult.params: the request, then `more`; None values are left out."""
        def one(items: list[str]):
            return items if len(items) > 1 else items[0]

        params = {"prompt": one(self.prompts), "negative_prompt": one(self.negatives), "seed": self.seed,
                  "latents": "caller" if self.latents is not None else None, "steps": self.steps,
                  "guidance": self.guidance, "scheduler": self.scheduler, "height": self.height, "width": self.width,
                  "num_images": self.num_images, "guidance_rescale": self.guidance_rescale, "eta": self.eta,
                  "strength": self.strength, **more}
        return {k: v for k, v in params.items() if v is not None}


# --- denoisers: the samplers' model(x_in, t) over a U-Net runner ----------------------------------------

class Denoiser:
    """Times the U-Net runner (`unet_s`, `calls`; the rest of the loop is scheduler + CFG) and names a
    non-finite output. Per step it allocates one latent-sized array (the prediction, which a multistep
    sampler may keep); the U-Net's inputs are buffers reused across steps, so a runner must not keep
    references to its inputs past the call (none does; ORT/TensorRT copy them to the device)."""

    def __init__(self, unet):
        self.unet = unet
        self.unet_s = 0.0
        self.calls = 0
        self._timestep: np.ndarray | None = None     # (rows,) float32, reused

    def _timesteps(self, rows: int, t) -> np.ndarray:
        if self._timestep is None or self._timestep.shape[0] != rows:
            self._timestep = np.empty(rows, np.float32)
        self._timestep.fill(np.float32(t))
        return self._timestep

    def _run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        start = time.perf_counter()
        out = self.unet(feeds)
        self.unet_s += time.perf_counter() - start
        self.calls += 1
        return np.asarray(out[g.OUTPUT], dtype=np.float32)

    def _check(self, probe: np.ndarray, pred: np.ndarray, t) -> None:
        """`probe` is non-finite whenever `pred` (the U-Net's output) is: the fast check on it, the exact
        one (which names the U-Net's bad values) on `pred` only then."""
        if not finite_fast(probe):
            check_finite(pred, "unet", f"(step {self.calls}, t={float(np.ravel(t)[0]):g})")

    def timings(self, loop_s: float) -> dict[str, float]:
        """The denoise loop's split: U-Net time vs the rest (sampler, CFG, host copies), per step."""
        out = {"denoise": loop_s, "unet": self.unet_s, "unet_calls": self.calls,
               "scheduler_overhead": loop_s - self.unet_s}
        if self.calls:
            out["unet_per_step"] = self.unet_s / self.calls
            out["scheduler_overhead_per_step"] = (loop_s - self.unet_s) / self.calls
            out["overhead_fraction"] = (loop_s - self.unet_s) / max(self.unet_s, 1e-12)
        return out


class CfgDenoiser(Denoiser):
    """A plain U-Net graph: 2B rows [uncond, cond] and `guidance.guide` on the host under CFG; without
    CFG (guidance <= 1) the B rows as they are."""

    def __init__(self, unet, context: np.ndarray, guidance: float, guidance_rescale: float,
                 extra: Mapping[str, np.ndarray] | None = None):
        super().__init__(unet)
        self.context = context                  # (2B, 77, D) under CFG, else (B, 77, D)
        self.extra = dict(extra or {})          # SDXL (runtime/sdxl.py): text_embeds, time_ids, rows as context
        self.cfg = g.uses_cfg(guidance)
        self.guidance, self.rescale = float(guidance), float(guidance_rescale)
        self._sample: np.ndarray | None = None  # (2B, 4, h, w) float32 U-Net input, reused

    def __call__(self, x_in: np.ndarray, t) -> np.ndarray:
        x_in = np.asarray(x_in, dtype=np.float32)
        n = x_in.shape[0]
        if not self.cfg:
            pred = self._run(g.plain_feeds(x_in, self._timesteps(n, t), self.context, self.extra))
            self._check(pred, pred, t)
            return pred
        if self._sample is None or self._sample.shape != (2 * n, *x_in.shape[1:]):
            self._sample = np.empty((2 * n, *x_in.shape[1:]), np.float32)
        self._sample[:n] = x_in                                                 # [uncond, cond] rows: (2B, 4, h, w)
        self._sample[n:] = x_in
        pred = self._run(g.plain_feeds(self._sample, self._timesteps(2 * n, t), self.context, self.extra))
        guided = g.guide(pred[:n], pred[n:], self.guidance, self.rescale)      # (B, 4, h, w), one new array
        # a NaN/Inf in either half leaves the guided output non-finite (g > 1), so checking the B rows of
        # `guided` covers all 2B rows of `pred`
        self._check(guided, pred, t)
        return guided


class FoldedCfgDenoiser(Denoiser):
    """A U-Net graph with CFG folded in (export/cfg_fold.py): the B latents, the 2B (or B twice) context
    rows (and SDXL's text_embeds / time_ids rows alike) and the guidance scalars in, the guided prediction
    out; no 2B copies or CFG on the host."""

    def __init__(self, unet, context: np.ndarray, guidance: float, guidance_rescale: float,
                 extra: Mapping[str, np.ndarray] | None = None):
        super().__init__(unet)
        # context, guidance scalars and SDXL's text_embeds / time_ids (per-row like the context, so doubled alike
        # without CFG): constant over the loop
        self.conditioning = g.folded_conditioning(context, guidance, guidance_rescale, extra)

    def __call__(self, x_in: np.ndarray, t) -> np.ndarray:
        x_in = np.asarray(x_in, dtype=np.float32)
        guided = self._run({g.SAMPLE: x_in, g.TIMESTEP: self._timesteps(x_in.shape[0], t), **self.conditioning})
        self._check(guided, guided, t)                                          # (B, 4, h, w), guided in-graph
        return guided


def make_denoiser(unet, context: np.ndarray, guidance: float, guidance_rescale: float,
                  extra: Mapping[str, np.ndarray] | None = None) -> Denoiser:
    """The denoiser for this U-Net runner: folded when its graph takes `guidance_scale`, else plain CFG."""
    cls = FoldedCfgDenoiser if takes_guidance(unet) else CfgDenoiser
    return cls(unet, context, guidance, guidance_rescale, extra)


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """timings[key] = seconds the block took."""
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


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


@lru_cache(maxsize=1)
def _fp16_uint8_table() -> np.ndarray:
    """to_uint8 of every float16 bit pattern (65536 entries; the non-finite ones are never looked up)."""
    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    with np.errstate(invalid="ignore"):
        return to_uint8(codes.astype(np.float32).reshape(1, 1, 256, 256)).reshape(-1)


def image_to_uint8(image: np.ndarray, stage: str = "vae_decoder") -> np.ndarray:
    """A decoder's image (N, 3, H, W) -> uint8 (N, H, W, 3), as to_uint8, after check_finite. An fp16 image (the
    fp16 VAE's own output) goes through a table of to_uint8's value for each of the 65536 fp16 bit patterns:
    bit for bit the float32 path, in one gather instead of a cast and five float32 passes, with the
    finiteness check on the bits (exponent all ones). Host time the image spends between the decoder and the
    caller, 512x512 on 2 CPU cores: 6.3 -> 0.9 ms at B=1, 15.4 -> 4.0 ms at B=4 (scripts/bench_image_uint8.py)."""
    if image.dtype == np.float16 and image.ndim == 4:
        bits = image.view(np.uint16)
        if image.size and int((bits & 0x7FFF).max()) >= 0x7C00:
            check_finite(image.astype(np.float32), stage)
        return _fp16_uint8_table()[bits.transpose(0, 2, 3, 1)]
    image = np.asarray(image, dtype=np.float32)
    check_finite(image, stage)
    return to_uint8(image)


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

    @cached_property
    def parsed_scheduler(self):
        """The scheduler config parsed once per pipeline (`schedulers.as_config`), on first use: the sampler
        name's resolution and every schedule read it; a bad config still fails at the first generate."""
        from ldm_deploy.runtime.schedulers import as_config

        return as_config(self.scheduler_config)

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
                      verify: bool = True, device_loop: bool = False, **runner_opts) -> "Pipeline":
        """Open an exported artifact directory and one `backend` runner per component.

        `verify` checks every file's sha256 against the manifest first (seconds for SD-sized graphs).
        An SDXL artifact gives a runtime.sdxl.SDXLPipeline. `device_loop` (ort-cuda): the U-Net is the artifact's
        device-loop variant (export --device-loop) run by runners/ort_loop.py, so ddim / euler loops never wait
        for the GPU between steps (`denoise_on_device`).
        """
        from ldm_deploy.artifact import Artifact
        from ldm_deploy.runtime.tokenizer import ClipTokenizer

        artifact = Artifact.open(path, verify=verify)
        if artifact.info.sdxl is not None and cls is Pipeline:      # SDXL conditioning lives in runtime/sdxl.py
            from ldm_deploy.runtime.sdxl import SDXLPipeline

            return SDXLPipeline.from_artifact(artifact, backend, components, device_loop=device_loop, **runner_opts)
        if device_loop:
            check_device_loop(artifact, backend)
        names = components or [c for c in SD_COMPONENTS if c in artifact.components]
        runners = open_runners(artifact, backend, names, runner_opts, device_loop)
        tokenizer = ClipTokenizer.from_dir(artifact.tokenizer_dir)
        te_vocab = artifact.text_vocab_size
        if te_vocab is not None and max(tokenizer.vocab.values()) >= te_vocab:
            raise LdmError(f"the tokenizer in {artifact.tokenizer_dir} has ids up to {max(tokenizer.vocab.values())} "
                           f"but the text encoder's vocabulary has {te_vocab} rows",
                           hint="the artifact's tokenizer/ belongs to another model; re-export from the model folder")
        return cls(tokenizer, runners, artifact.info, backend=backend, artifact_hash=artifact.manifest_sha256)

    def close(self) -> None:
        """Close every runner (sessions, engines, device buffers); a call afterwards is an error. Idempotent."""
        from ldm_deploy.runtime.runners.base import close_all

        close_all(self.runners)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
                 callback: Callback | None = None) -> GenerationResult:
        """txt2img (seed or latents) or img2img (image + strength); `callback(i, n, x)` after each step."""
        from ldm_deploy.runtime import schedulers as sch

        t_total = time.perf_counter()
        req = self.check(prompt, negative_prompt, steps=steps, guidance=guidance, scheduler=scheduler, seed=seed,
                         latents=latents, height=height, width=width, num_images=num_images, image=image,
                         strength=strength, guidance_rescale=guidance_rescale, eta=eta)
        rng, timings = req.rng(), {}
        with timed(timings, "text_encoder"):
            context, extra = self.encode(req)
        schedule = sch.make_schedule(req.scheduler, self.parsed_scheduler, req.steps, strength=req.strength or 1.0)
        x = self.start_latents(req, schedule, rng, timings)
        x = self.denoise(req, schedule, x, context, extra, rng, callback, timings)
        with timed(timings, "vae_decoder"):
            images = self.decode(x)
        timings["total"] = time.perf_counter() - t_total
        return GenerationResult(images=images, latents=x, timings=timings, params=req.metadata(
            backend=self.backend, artifact_hash=self.artifact_hash, loras=getattr(self, "loras", None) or None))

    # --- stages (SDXLPipeline reuses them) -------------------------------------------------------------

    def check(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
              steps: int, guidance: float, scheduler: str | None, seed: int | Sequence[int] | None,
              latents: np.ndarray | None, height: int | None, width: int | None, num_images: int,
              image: np.ndarray | None, strength: float, guidance_rescale: float, eta: float,
              init_latents: np.ndarray | None = None) -> Request:
        """Every argument checked (a one-line UsageError naming the fix), sizes and the seed resolved."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = self._negatives(negative_prompt, len(prompts))
        name = self._scheduler_name(scheduler)
        self._check_numbers(steps, guidance, guidance_rescale, strength, eta, num_images, len(prompts))
        init = None if image is None else as_image_batch(image)
        if init is not None and latents is not None:
            raise UsageError("pass either an init image (img2img) or latents, not both")
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
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            if latents.shape != shape:
                raise UsageError(f"latents have shape {list(latents.shape)}, expected {list(shape)} "
                                 f"([num_prompts*num_images, {self.latent_channels}, height/8, width/8])")
            if not np.isfinite(latents).all():
                raise UsageError("latents contain NaN or Inf values", hint="pass finite N(0, I) noise")
        return Request(prompts=prompts, negatives=negatives, scheduler=name, steps=steps, guidance=guidance,
                       guidance_rescale=guidance_rescale, eta=eta, strength=strength if init is not None else None,
                       num_images=num_images, height=height, width=width, seed=_seed(seed, batch), init=init,
                       latents=latents, init_latents=init_latents)

    def encode(self, req: Request) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The U-Net's conditioning: context rows [negative, prompt] (2B) under CFG, else the B prompt rows;
        and extra per-row feeds (none here; SDXL's pooled embeddings and time_ids)."""
        cond = self.encode_text(req.rows)                                                  # (B, 77, D)
        uncond = self.encode_text(req.negative_rows) if g.uses_cfg(req.guidance) else None
        return g.rows(uncond, cond, req.guidance), {}                                      # (2B, 77, D)

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> the text encoder's last hidden state (N, 77, D) float32."""
        ids = np.asarray(self.tokenizer(prompts), dtype=np.int32)            # (B, 77)
        out = self.runners["text_encoder"]({"input_ids": ids})["last_hidden_state"]
        out = np.asarray(out, dtype=np.float32)                               # (B, 77, D)
        check_finite(out, "text_encoder")
        return out

    def encode_image(self, init: np.ndarray, batch: int, rng: np.random.Generator) -> np.ndarray:
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

    def start_latents(self, req: Request, schedule, rng, timings: dict[str, float]) -> np.ndarray:
        """The sampler's start (schedulers.start_latent): the caller's latents or N(0, I) noise times
        init_noise_sigma (txt2img), the encoded init image noised to the first step (img2img), or a
        hand-off's latents as they are."""
        from ldm_deploy.runtime.schedulers import start_latent

        if req.init_latents is not None:
            return req.init_latents.copy()
        f = self.vae_scale_factor
        shape = (req.batch, self.latent_channels, req.height // f, req.width // f)
        if req.init is None:
            return start_latent(schedule, rng.standard_normal(shape, dtype=np.float32)
                                if req.latents is None else req.latents)
        with timed(timings, "vae_encoder"):
            x0 = self.encode_image(req.init, req.batch, rng)                              # (B, 4, h, w), scaled
        return start_latent(schedule, rng.standard_normal(shape, dtype=np.float32), x0)

    def denoise(self, req: Request, schedule, x: np.ndarray, context: np.ndarray, extra: Mapping[str, np.ndarray],
                rng, callback: Callback | None, timings: dict[str, float]) -> np.ndarray:
        """Run the request's sampler over `schedule` from x; the loop's timings go into `timings`."""
        from ldm_deploy.runtime import schedulers as sch

        unet = self.runners["unet"]
        if getattr(unet, "device_loop", False):
            reason = "a callback sees every step" if callback is not None else \
                device_loop.why_not(req.scheduler, schedule, req.eta)
            if reason is None:
                return self.denoise_on_device(req, schedule, x, context, extra, timings)
            timings["device_loop_declined"] = 1
            if reason not in _LOOP_DECLINED:   # said once per reason: a batch of such requests is not a wall of lines
                _LOOP_DECLINED.add(reason)
                log.warning("the device loop is not used (%s): the host loop runs, one uncaptured U-Net step a call, "
                            "slower than ort-cuda without --device-loop", reason)
        denoiser = make_denoiser(unet, context, req.guidance, req.guidance_rescale, extra)
        t0 = time.perf_counter()
        x = sch.sample(req.scheduler, denoiser, x, schedule, rng=rng, callback=callback, eta=req.eta)
        timings.update(denoiser.timings(time.perf_counter() - t0))
        x = np.asarray(x, dtype=np.float32)
        check_finite(x, "scheduler", f"({req.scheduler})")
        return x

    def denoise_on_device(self, req: Request, schedule, x: np.ndarray, context: np.ndarray,
                          extra: Mapping[str, np.ndarray], timings: dict[str, float]) -> np.ndarray:
        """The whole loop in the U-Net runner's loop step graph (runtime/device_loop.py): one call, no host
        work or wait between steps; the timings keep the host loop's keys (no scheduler overhead)."""
        tables = device_loop.loop_tables(req.scheduler, schedule, req.eta)
        conditioning = g.folded_conditioning(context, req.guidance, req.guidance_rescale, extra)
        t0 = time.perf_counter()
        x = self.runners["unet"].sample_loop(x, tables, conditioning)
        loop_s, n = time.perf_counter() - t0, tables.steps
        timings.update({"denoise": loop_s, "unet": loop_s, "unet_calls": n, "scheduler_overhead": 0.0,
                        "unet_per_step": loop_s / n, "scheduler_overhead_per_step": 0.0, "overhead_fraction": 0.0,
                        "device_loop": 1})
        check_finite(x, "unet", f"(device loop, {req.scheduler}, {n} steps)")
        return x

    def decode(self, x: np.ndarray) -> np.ndarray:
        """Latents (B, 4, h, w) -> uint8 images (B, H, W, 3)."""
        decoded = self.runners["vae_decoder"]({"latent": x / np.float32(self.scaling_factor)})["image"]
        return image_to_uint8(np.asarray(decoded))

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

        return sch.resolve(scheduler, self.parsed_scheduler)

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


def check_device_loop(artifact, backend: str) -> None:
    """Refuse `device_loop` before any runner opens: another backend, or no device-loop U-Net."""
    from ldm_deploy.artifact import ORT_CUDA_LOOP_VARIANT

    if backend != "ort-cuda":
        raise UsageError(f"the device loop runs on the ort-cuda backend, not {backend}", hint="pass --backend ort-cuda")
    if "unet" not in artifact.components or ORT_CUDA_LOOP_VARIANT not in artifact.component("unet").variants:
        raise LdmError(f"{artifact.path} has no device-loop U-Net (manifest variant {ORT_CUDA_LOOP_VARIANT!r})",
                       hint="re-export with --ort-cuda --device-loop")


def component_options(name: str, runner_opts: Mapping[str, Any]) -> dict:
    """The options a pipeline opens component `name`'s runner with: the VAE decoder's image stays in its own
    dtype (decode converts an fp16 one by table, image_to_uint8) unless the caller set `output_dtype`."""
    return {"output_dtype": None, **runner_opts} if name == "vae_decoder" else dict(runner_opts)


def open_runners(artifact, backend: str, names, runner_opts: Mapping[str, Any], device_loop: bool) -> dict:
    """One runner per component; with `device_loop` the U-Net's is the loop runner over the device-loop variant
    (it captures its own CUDA graph: `enable_cuda_graph` goes to the other components only). A failure closes
    the runners already open."""
    from ldm_deploy.runtime.runners.base import close_all, open_runner

    runners: dict = {}
    try:
        for name in names:
            if device_loop and name == "unet":
                from ldm_deploy.artifact import ORT_CUDA_LOOP_VARIANT
                from ldm_deploy.runtime.runners.ort_loop import open_loop_runner

                keep = {k: v for k, v in runner_opts.items() if k in ("device_id", "use_tf32")}
                runners[name] = open_loop_runner(artifact, ORT_CUDA_LOOP_VARIANT, **keep)
            else:
                runners[name] = open_runner(backend, artifact, name, **component_options(name, runner_opts))
    except BaseException:
        close_all(runners)
        raise
    return runners


def _seed(seed, batch: int) -> int | list[int]:
    """The request's seed: a fresh one when None, else checked (-1 or 2**63 a UsageError, not numpy's
    ValueError); a list, tuple or 1-D integer array is one seed per image row (Request.rng)."""
    from ldm_deploy.limits import check_seed

    if seed is None:
        return int(np.random.SeedSequence().entropy % (2**63))
    if isinstance(seed, np.ndarray) and seed.ndim == 1:
        seed = list(seed)   # each element still goes through check_seed (a float array is refused there)
    if not isinstance(seed, (list, tuple)):
        return check_seed(seed)
    seeds = [check_seed(s) for s in seed]
    if len(seeds) != batch:
        raise UsageError(f"{len(seeds)} seeds for a batch of {batch} images (prompts x num_images); give one per image")
    return seeds


def as_image_batch(image) -> np.ndarray:
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
