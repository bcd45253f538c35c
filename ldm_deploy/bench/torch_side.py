"""The PyTorch baseline sides: eager fp32, eager fp16 (CUDA), and torch.compile recipes (spec.COMPILE_SIDES).

A fair baseline, the way a PyTorch user would write it: modules from `training.checkpoint.load_components`
(our U-Net / VAE with diffusers names, SDPA attention), cast with `.half()` (no autocast), latents on
the device, CFG as one 2B batch guided by `runtime/guidance.guide` on the tensors, the DDIM step
(`training.noise.ddim_step`, the torch conversion point) done in torch on the device with the same
timesteps and alphas as the numpy sampler (taken from `make_schedule`, the one place they are computed),
everything under `torch.inference_mode()` and timed with `torch.cuda.synchronize()`.

The compile sides compile the U-Net, the text encoder and the VAE decoder the same way (mode, and
channels_last for the convolutional ones where the recipe has it), so their end to end compares with a
deployed path that optimises all three. Each component's first call (the compile) is timed into
`compile_s`; all of them must finish within `BenchSpec.compile_budget_s`, else the worker records
`status: "timeout"` and exits (`worker.deadline`) instead of hanging. Under the CUDA-graph modes
(reduce-overhead, max-autotune) each top-level call starts with `torch.compiler.cudagraph_mark_step_begin()`
and an output kept across calls (the text embeddings) is cloned, as torch's documentation asks.
The record states the attention kernel: which SDPA backends are enabled and which aten kernel the U-Net
dispatches to at these shapes (`attention`).

Imports torch: only the side workers load this module.
"""
from __future__ import annotations

import time

import numpy as np

from ldm_deploy.bench.timing import from_samples, measure_samples, measure_within, windowed
from ldm_deploy.runtime import guidance as g


def _device(spec) -> "torch.device":
    import torch

    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class TorchTxt2Img:
    """Text -> uint8 images with PyTorch modules on one device; DDIM (eta 0) in torch."""

    def __init__(self, components, tokenizer, scheduler_config: dict, device, dtype, *, steps: int):
        import torch

        from ldm_deploy.runtime.schedulers import make_schedule

        self.device, self.dtype = device, dtype
        self.unet = components.unet.to(device=device, dtype=dtype).eval()
        self.vae = components.vae.to(device=device, dtype=dtype).eval()
        self.text_encoder = components.text_encoder.to(device=device, dtype=dtype).eval()
        self.in_channels = int(self.unet.config.in_channels)
        self.latent_channels = int(self.vae.config.latent_channels)
        # what the loop calls; compile() swaps in compiled versions
        self.unet_fn, self.text_fn, self.decode_fn = self.unet, self.text_encoder, self.vae.decode
        self.cudagraphs = False
        self.tokenizer = tokenizer
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.schedule = make_schedule("ddim", scheduler_config, steps)
        self.prediction_type = self.schedule.prediction_type
        # per-step constants as Python floats: no host<->device traffic in the loop
        self.steps = [(float(t), float(a), float(ap)) for t, a, ap in
                      zip(self.schedule.timesteps, self.schedule.alphas, self.schedule.alphas_prev)]
        self.timestep_cache = {}
        self._torch = torch

    def compile(self, mode: str, channels_last: bool) -> None:
        """torch.compile the U-Net, the text encoder and the VAE decode the same way (lazy: each compiles on
        its first call)."""
        torch = self._torch
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self.unet_fn = torch.compile(self.unet, mode=mode)
        self.text_fn = torch.compile(self.text_encoder, mode=mode)
        self.decode_fn = torch.compile(self.vae.decode, mode=mode)
        self.cudagraphs = self.device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")

    def _step_begin(self) -> None:
        if self.cudagraphs:
            self._torch.compiler.cudagraph_mark_step_begin()

    def encode_text(self, prompts: list[str]):
        ids = self._torch.from_numpy(np.asarray(self.tokenizer(prompts), dtype=np.int64)).to(self.device)
        self._step_begin()
        hidden = self.text_fn(ids).last_hidden_state                                  # (N, 77, D)
        return hidden.clone() if self.cudagraphs else hidden   # kept across U-Net calls: not graph memory

    def unet_step(self, x, t: float, emb, guidance: float):
        """One CFG evaluation: U-Net at 2B, guided eps (or v, x0) at B; without CFG the B rows."""
        torch = self._torch
        cfg = g.uses_cfg(guidance)
        sample = torch.cat([x, x]) if cfg else x                                     # (2B, 4, h, w)
        key = (t, sample.shape[0])
        if key not in self.timestep_cache:
            self.timestep_cache[key] = torch.full((sample.shape[0],), t, device=self.device, dtype=torch.float32)
        self._step_begin()
        out = self.unet_fn(sample, self.timestep_cache[key], emb)
        if not cfg:
            return out.clone() if self.cudagraphs else out
        uncond, cond = out.chunk(2)
        return g.guide(uncond, cond, guidance)                                       # a new tensor (B, 4, h, w)

    def decode(self, latents):
        self._step_begin()
        image = self.decode_fn(latents / self.scaling_factor)                        # (B, 3, H, W) in [-1, 1]
        return ((image.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(self._torch.uint8)

    def __call__(self, prompt: str, batch: int, height: int, width: int, guidance: float, seed: int = 0,
                 stages: dict | None = None):
        """One image batch. `stages`, when given, gets each stage's seconds (text_encoder, denoise, vae_decoder),
        the device synchronised at the two boundaries between them (nothing waits inside the loop)."""
        from training.noise import ddim_step

        torch = self._torch
        mark = _StageClock(self.device, stages)
        # CFG: one text-encoder call over the 2B rows (uncond, cond), as the component timing runs it
        emb = self.encode_text([""] * batch + [prompt] * batch) if g.uses_cfg(guidance) else self.encode_text([prompt] * batch)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.randn((batch, self.in_channels, height // 8, width // 8), generator=gen,
                        device=self.device, dtype=torch.float32) * float(self.schedule.init_noise_sigma)
        mark("text_encoder")
        for t, a, a_prev in self.steps:
            out = self.unet_step(x.to(self.dtype), t, emb, guidance).float()
            x = ddim_step(self.prediction_type, x, out, a, a_prev)
        mark("denoise")
        images = self.decode(x.to(self.dtype)).permute(0, 2, 3, 1).cpu().numpy()     # uint8 (B, H, W, 3)
        mark("vae_decoder")
        return images


class _StageClock:
    """stages[name] = seconds since the previous mark, the CUDA device synchronised first (no-op without stages)."""

    def __init__(self, device, stages: dict | None):
        import torch

        self.stages, self.last = stages, time.perf_counter()
        self.sync = torch.cuda.synchronize if (stages is not None and device.type == "cuda") else None

    def __call__(self, name: str) -> None:
        if self.stages is None:
            return
        if self.sync:
            self.sync()
        now = time.perf_counter()
        self.stages[name] = now - self.last
        self.last = now


SDPA_KERNELS = (  # aten op -> backend, most specific first
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "flash (CPU)"),
    ("aten::_scaled_dot_product_flash_attention", "flash"),
    ("aten::_scaled_dot_product_efficient_attention", "efficient"),
    ("aten::_scaled_dot_product_cudnn_attention", "cudnn"),
    ("aten::_scaled_dot_product_fused_attention_overrideable", "overrideable"),
    ("aten::_scaled_dot_product_attention_math", "math"),
)


def sdpa_backends(fn) -> dict:
    """Which SDPA backends torch may use, and which aten attention kernels one call of `fn` dispatched to
    (with counts), from a CPU-side torch.profiler trace of an eager call. Inductor calls the same aten kernel
    for SDPA, so this holds for the compiled module at these shapes too."""
    import torch

    enabled = {"flash": torch.backends.cuda.flash_sdp_enabled(),
               "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
               "math": torch.backends.cuda.math_sdp_enabled()}
    if hasattr(torch.backends.cuda, "cudnn_sdp_enabled"):
        enabled["cudnn"] = torch.backends.cuda.cudnn_sdp_enabled()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    used: dict[str, int] = {}
    for event in prof.events():
        for op, backend in SDPA_KERNELS:
            if event.name == op:
                used[backend] = used.get(backend, 0) + 1
                break
    return {"kind": "sdpa", "enabled_cuda_backends": enabled, "used": used}


def _first_calls(calls, sync, compile_s: dict) -> None:
    """Each component's first call (its compile), timed into compile_s[name], then compile_s["total"]."""
    for name, call in calls:
        t0 = time.perf_counter()
        call()
        if sync:
            sync()
        compile_s[name] = round(time.perf_counter() - t0, 2)
    compile_s["total"] = round(sum(compile_s.values()), 2)


def run(spec, side: str, batch: int, height: int, width: int, log) -> dict:
    import torch

    from ldm_deploy.bench.spec import COMPILE_SIDES
    from ldm_deploy.bench.worker import deadline
    from ldm_deploy.runtime.tokenizer import ClipTokenizer
    from training.checkpoint import load_components
    from training.models.attention import attention_backend

    device = _device(spec)
    cuda = device.type == "cuda"
    if side == "torch-eager-fp16" and not cuda:
        return {"status": "skipped", "reason": "fp16 eager needs CUDA (CPU fp16 convolutions are not a baseline)"}
    mode, channels_last = COMPILE_SIDES.get(side, (None, False))
    if mode and mode != "default" and not cuda:
        return {"status": "skipped", "reason": f"torch.compile mode={mode} is a CUDA recipe (CUDA graphs / GPU "
                                               "kernel autotuning); on CPU torch-compile is the compiled side"}
    dtype = torch.float16 if (side == "torch-eager-fp16" or (mode and cuda)) else torch.float32
    if spec.threads and not cuda:
        torch.set_num_threads(int(spec.threads))
    sync = torch.cuda.synchronize if cuda else None
    record = {"device": str(device), "dtype": "fp16" if dtype == torch.float16 else "fp32",
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    if mode:
        record["compile"] = {"mode": mode, "channels_last": channels_last,
                             "components": ["unet", "text_encoder", "vae_decoder"],
                             "budget_s": spec.compile_budget_s}

    t0 = time.perf_counter()
    comps = load_components(spec.model_dir)
    tokenizer = ClipTokenizer.from_dir(comps.tokenizer_dir)
    pipe = TorchTxt2Img(comps, tokenizer, comps.scheduler_config, device, dtype, steps=spec.steps)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    record["load_s"] = round(time.perf_counter() - t0, 3)

    with torch.inference_mode(), attention_backend("sdpa"):
        # the rows one run encodes: uncond + cond under CFG (2B), else the B prompts
        prompts = ([""] * batch if spec.guidance > 1 else []) + [spec.prompt] * batch
        emb = pipe.encode_text(prompts)                                              # (2B or B, 77, D)
        x = torch.randn((batch, pipe.in_channels, height // 8, width // 8), device=device, dtype=dtype)
        t_mid = pipe.steps[len(pipe.steps) // 2][0]
        record["attention"] = sdpa_backends(lambda: pipe.unet_step(x, t_mid, emb, spec.guidance))
        z = torch.randn((batch, pipe.latent_channels, height // 8, width // 8), device=device, dtype=dtype)
        if mode:
            pipe.compile(mode, channels_last)
            record["compile_s"] = {}
            log(f"{side} b{batch}: compiling U-Net, text encoder, VAE decoder (mode={mode}, "
                f"budget {spec.compile_budget_s:.0f} s)")
            first_calls = (("unet", lambda: pipe.unet_step(x, t_mid, emb, spec.guidance)),
                           ("text_encoder", lambda: pipe.encode_text(prompts)), ("vae_decoder", lambda: pipe.decode(z)))
            with deadline(spec.compile_budget_s, record, what=f"torch.compile mode={mode}"):
                _first_calls(first_calls, sync, record["compile_s"])
            log(f"{side} b{batch}: compiled in {record['compile_s']['total']} s")
        record["components_ms"] = {}

        def components(window: int) -> None:
            for name, call, warmup, repeats in (
                    ("text_encoder", lambda: pipe.encode_text(prompts), spec.component_warmup, spec.component_repeats),
                    ("unet_step", lambda: pipe.unet_step(x, t_mid, emb, spec.guidance), spec.component_warmup,
                     spec.component_repeats),
                    ("vae_decoder", lambda: pipe.decode(z), min(spec.component_warmup, 1),
                     max(1, spec.component_repeats // 3))):
                samples = measure_samples(call, warmup=warmup if window == 0 else 1, repeats=repeats, sync=sync)
                windows.setdefault(name, []).append(samples)

        windows: dict[str, list[list[float]]] = {}
        components(0)
        log(f"{side} b{batch}: U-Net step {from_samples(windows['unet_step'][0]).median_ms:.1f} ms; end to end ...")
        images = []

        stage_runs: list[dict] = []

        def e2e():
            stage_runs.append({})
            images[:] = [pipe(spec.prompt, batch, height, width, spec.guidance, stages=stage_runs[-1])]

        timing = measure_within(e2e, budget_s=spec.e2e_budget_s, warmup=spec.warmup, repeats=spec.repeats, sync=sync)
        components(1)   # a second window after the end-to-end runs: a load change between them shows
    record["components_ms"] = {name: windowed(w, spec.component_warmup) for name, w in windows.items()}
    record["end_to_end"] = timing.as_dict()
    timed = stage_runs[spec.warmup:] or stage_runs
    record["stages_ms"] = {k: round(float(np.median([r[k] for r in timed])) * 1e3, 2) for k in timed[0]}
    record["images_shape"] = list(images[0].shape)
    if cuda:
        record["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        record["gpu_memory_method"] = "torch.cuda.max_memory_allocated"
    return record
