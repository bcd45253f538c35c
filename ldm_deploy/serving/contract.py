"""The request contract of the served model: named tensors in, one validated `Request` out (no server needed).

    inputs (each one value per request; Triton adds the batch dimension in front):
      prompt           BYTES  required   UTF-8 text, at most MAX_PROMPT_BYTES
      negative_prompt  BYTES  optional   default ""
      seed             INT64  optional   0 <= seed < 2**63; default: drawn at random and returned
      steps            INT32  optional   1..MAX_STEPS; default 50 (as `ldm-deploy generate`)
      guidance         FP32   optional   finite, >= 0 (<= 1 turns CFG off); default 7.5
      scheduler        BYTES  optional   a sampler name (`ldm-deploy generate --scheduler`); default the artifact's
      height, width    INT32  optional   multiples of the VAE factor inside the artifact's profile; default its opt
      lora             BYTES  optional   NAME[:SCALE][,NAME[:SCALE]...] from the set the server was started with
                                         (`serve --lora NAME=FILE`); scale default 1; default none (the base model)
    outputs:
      image            UINT8  H x W x 3
      seed             INT64  the seed used
      batch_size       INT32  how many requests shared its pipeline call

`parse_request(limits, tensors)` checks every input and raises one `RequestError` (a UsageError: one line
naming the input and the fix) for the first problem: a missing prompt, a wrong dtype, steps 0, a size outside
the profile, a prompt over the byte limit (checked before it is decoded, so a 10 MB prompt costs nothing),
a LoRA name the server does not have, a bad LoRA scale.
A request equals `ldm-deploy generate ARTIFACT --prompt P --seed S --steps N ... [--lora FILE:SCALE]` with the
same values (`Request.generate_args`). SDXL: a request without negative_prompt gets SDXL's zero negative
conditioning, as `generate` without --negative-prompt does (`Request.zero_negative`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ldm_deploy.errors import UsageError

MAX_PROMPT_BYTES = 16384   # CLIP reads 77 tokens (a few hundred characters); anything far longer is a mistake
MAX_STEPS = 500            # half the usual 1000 training timesteps (at 1000 DDIM with steps_offset 1 runs past them)
DEFAULT_STEPS = 50         # `ldm-deploy generate`'s defaults, so a request and the CLI agree on omitted values
DEFAULT_GUIDANCE = 7.5


@dataclass(frozen=True)
class Input:
    name: str
    triton_dtype: str        # config.pbtxt / KServe v2 datatype
    required: bool
    doc: str


INPUTS: tuple[Input, ...] = (
    Input("prompt", "BYTES", True, "UTF-8 prompt"),
    Input("negative_prompt", "BYTES", False, "what to steer away from (default empty)"),
    Input("seed", "INT64", False, "noise seed, 0 <= seed < 2**63 (default random, returned as the seed output)"),
    Input("steps", "INT32", False, f"denoising steps (default {DEFAULT_STEPS})"),
    Input("guidance", "FP32", False, f"classifier-free guidance scale (default {DEFAULT_GUIDANCE})"),
    Input("scheduler", "BYTES", False, "sampler name (default the artifact's)"),
    Input("height", "INT32", False, "image height (default the profile's opt)"),
    Input("width", "INT32", False, "image width (default the profile's opt)"),
    Input("lora", "BYTES", False, "LoRAs the server was started with: NAME[:SCALE], comma-separated (default none)"),
)
OUTPUTS = (("image", "UINT8", (-1, -1, 3)),      # the image, H x W x 3
           ("seed", "INT64", (1,)),              # the seed it was made with (drawn by the server if none was sent)
           ("batch_size", "INT32", (1,)))        # requests in the pipeline call it ran in (observability)
INPUT_NAMES = tuple(i.name for i in INPUTS)
_KIND = {"BYTES": ("O", "S"), "INT64": ("i", "u"), "INT32": ("i", "u"), "FP32": ("f",)}


class RequestError(UsageError):
    """A malformed request: one line naming the input and how to fix it (the client's mistake)."""


@dataclass(frozen=True)
class Limits:
    """What an artifact accepts: its profile, VAE factor, samplers and default scheduler."""
    height: tuple[int, int, int]      # (min, opt, max)
    width: tuple[int, int, int]
    max_batch: int                    # the profile's max batch (prompts x images per U-Net call)
    vae_scale_factor: int
    default_scheduler: str
    schedulers: tuple[str, ...]
    loras: tuple[str, ...] = ()       # LoRA names the server was started with (`serve --lora NAME=FILE`)
    zero_negative: bool = False       # SDXL: no negative prompt means zero negative conditioning

    @classmethod
    def from_pipeline(cls, pipe, loras=()) -> "Limits":
        from ldm_deploy.runtime import schedulers as sch

        prof = pipe.profiles

        def rng(name):
            r = getattr(prof, name) if prof else None
            return (r.min, r.opt, r.max) if r else (512, 512, 512)

        return cls(height=rng("height"), width=rng("width"), max_batch=prof.batch.max if prof else 1,
                   vae_scale_factor=pipe.vae_scale_factor, default_scheduler=sch.default_name(pipe.scheduler_config),
                   schedulers=tuple(sch.SCHEDULERS), loras=tuple(loras),
                   zero_negative=bool(getattr(pipe, "force_zeros", False)))


@dataclass(frozen=True)
class Request:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    scheduler: str
    height: int
    width: int
    loras: tuple[tuple[str, float], ...] = ()    # (name, scale) in the order given; () = the base model
    zero_negative: bool = False                   # SDXL, no negative prompt sent: zero negative conditioning

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys run as rows of one pipeline call (prompts, negatives and seeds differ);
        different LoRA sets or scales (the weights) and SDXL's zeroed negatives never share a call."""
        return (self.steps, self.guidance, self.scheduler, self.height, self.width, self.loras, self.zero_negative)

    def generate_args(self, lora_files: Mapping[str, Any] | None = None) -> list[str]:
        """The `ldm-deploy generate` flags that make the same image (`lora_files`: name -> the server's file)."""
        args = ["--prompt", self.prompt, "--seed", str(self.seed), "--steps", str(self.steps),
                "--guidance", repr(self.guidance), "--scheduler", self.scheduler,
                "--height", str(self.height), "--width", str(self.width)]
        for name, scale in self.loras:
            if lora_files is None or name not in lora_files:
                raise ValueError(f"generate_args needs the file of LoRA {name!r}")
            args += ["--lora", f"{lora_files[name]}:{scale!r}"]
        # an empty negative prompt equals none, except on SDXL, where none means zero conditioning
        return args + (["--negative-prompt", self.negative_prompt] if self.negative_prompt or not self.zero_negative
                       else [])


def _one(name: str, value: Any, triton_dtype: str) -> Any:
    """The single element of an input tensor, after checking its dtype and element count."""
    arr = np.asarray(value) if not isinstance(value, np.ndarray) else value
    if arr.dtype.kind not in _KIND[triton_dtype]:
        raise RequestError(f"input {name!r} has datatype {arr.dtype}, expected {triton_dtype}",
                           hint=f"send {name} as {triton_dtype}")
    if arr.size != 1:
        raise RequestError(f"input {name!r} holds {arr.size} values; send exactly one per request",
                           hint="send several requests (the server batches them)")
    return arr.reshape(-1)[0]


def _text(name: str, value: Any) -> str:
    raw = _one(name, value, "BYTES")
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if not isinstance(raw, (bytes, np.bytes_)):
        raise RequestError(f"input {name!r} is not text (got {type(raw).__name__})", hint=f"send {name} as BYTES")
    if len(raw) > MAX_PROMPT_BYTES:
        raise RequestError(f"input {name!r} is {len(raw)} bytes; at most {MAX_PROMPT_BYTES} are accepted",
                           hint="CLIP reads only the first 77 tokens: shorten the prompt")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"input {name!r} is not valid UTF-8 ({e.reason} at byte {e.start})",
                           hint="encode the text as UTF-8") from None


def _int(name: str, value: Any, triton_dtype: str, lo: int, hi: int) -> int:
    v = int(_one(name, value, triton_dtype))
    if not lo <= v <= hi:
        raise RequestError(f"input {name!r} is {v}; it must be in [{lo}, {hi}]")
    return v


LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")   # `serve --lora NAME=FILE` names


def parse_loras(limits: Limits, text: str) -> tuple[tuple[str, float], ...]:
    """`NAME[:SCALE][,NAME[:SCALE]...]` -> ((name, scale), ...); RequestError naming the first problem."""
    from ldm_deploy.limits import MAX_LORA_SCALE

    out = []
    for item in (part.strip() for part in text.split(",")) if text.strip() else ():
        name, sep, scale_text = item.partition(":")
        if name not in limits.loras:
            have = ", ".join(limits.loras) if limits.loras else "none (start it with --lora NAME=FILE)"
            raise RequestError(f"input 'lora' names {name[:64]!r}, which this server was not started with; it has: {have}")
        scale = 1.0
        if sep:
            try:
                scale = float(scale_text)
            except ValueError:
                raise RequestError(f"input 'lora': the scale of {name!r} is {scale_text[:40]!r}, not a number",
                                   hint="send NAME or NAME:SCALE, e.g. style:0.8") from None
        if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
            raise RequestError(f"input 'lora': the scale of {name!r} is {scale_text[:40]}; it must be a finite number "
                               f"in [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}]", hint="usual scales are 0..1.5")
        out.append((name, scale))
    return tuple(out)


def parse_request(limits: Limits, tensors: Mapping[str, Any], seed_source: np.random.Generator | None = None) -> Request:
    """Named input tensors (numpy, one value each) -> a checked Request; RequestError on the first problem."""
    unknown = sorted(set(tensors) - set(INPUT_NAMES))
    if unknown:
        raise RequestError(f"unknown input(s) {unknown}; the model takes {', '.join(INPUT_NAMES)}")
    if tensors.get("prompt") is None:
        raise RequestError("input 'prompt' is missing", hint="send prompt as a BYTES tensor holding one UTF-8 string")
    prompt = _text("prompt", tensors["prompt"])
    negative = _text("negative_prompt", tensors["negative_prompt"]) if tensors.get("negative_prompt") is not None else ""
    if tensors.get("seed") is not None:
        seed = _int("seed", tensors["seed"], "INT64", 0, 2**63 - 1)
    else:
        seed = int((seed_source or np.random.default_rng()).integers(0, 2**63 - 1))
    steps = _int("steps", tensors["steps"], "INT32", 1, MAX_STEPS) if tensors.get("steps") is not None else DEFAULT_STEPS
    guidance = DEFAULT_GUIDANCE
    if tensors.get("guidance") is not None:
        guidance = float(_one("guidance", tensors["guidance"], "FP32"))
        if not math.isfinite(guidance) or guidance < 0:
            raise RequestError(f"input 'guidance' is {guidance}; it must be a finite number >= 0")
    scheduler = limits.default_scheduler
    if tensors.get("scheduler") is not None:
        scheduler = _text("scheduler", tensors["scheduler"]) or limits.default_scheduler
        if scheduler not in limits.schedulers:
            raise RequestError(f"input 'scheduler' is {scheduler[:40]!r}; choose one of: {', '.join(limits.schedulers)}")
    size = {}
    for name, (lo, opt, hi) in (("height", limits.height), ("width", limits.width)):
        if tensors.get(name) is None:
            size[name] = opt
            continue
        v = int(_one(name, tensors[name], "INT32"))
        f = limits.vae_scale_factor
        if not lo <= v <= hi or v % f:
            raise RequestError(f"input {name!r} is {v}; the artifact's profile takes multiples of {f} in [{lo}, {hi}]",
                               hint=f"send a {name} in that range, or re-export with a wider profile")
        size[name] = v
    loras = parse_loras(limits, _text("lora", tensors["lora"])) if tensors.get("lora") is not None else ()
    zero_negative = limits.zero_negative and tensors.get("negative_prompt") is None
    return Request(prompt, negative, seed, steps, guidance, scheduler, size["height"], size["width"], loras,
                   zero_negative)
