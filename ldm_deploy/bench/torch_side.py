"""The PyTorch baseline sides: eager fp32, eager fp16 (CUDA), torch.compile.

A fair baseline, the way a PyTorch user would write it: modules from `training.checkpoint.load_components`
(our U-Net / VAE with diffusers names, SDPA attention), cast with `.half()` (no autocast), latents on
the device, CFG as one 2B batch, the DDIM step done in torch on the device with the same timesteps and
alphas as the numpy sampler (taken from `make_schedule`, the one place they are computed), everything
under `torch.inference_mode()` and timed with `torch.cuda.synchronize()`.

Imports torch: only the side workers load this module.
"""
from __future__ import annotations

import time

import numpy as np

from ldm_deploy.bench.timing import measure, measure_within


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
        self.tokenizer = tokenizer
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.schedule = make_schedule("ddim", scheduler_config, steps)
        self.prediction_type = self.schedule.prediction_type
        # per-step constants as Python floats: no host<->device traffic in the loop
        self.steps = [(float(t), float(a), float(ap)) for t, a, ap in
                      zip(self.schedule.timesteps, self.schedule.alphas, self.schedule.alphas_prev)]
        self.timestep_cache = {}
        self._torch = torch

    def encode_text(self, prompts: list[str]):
        ids = self._torch.from_numpy(np.asarray(self.tokenizer(prompts), dtype=np.int64)).to(self.device)
        return self.text_encoder(ids).last_hidden_state                              # (N, 77, D)

    def unet_step(self, x, t: float, emb, guidance: float):
        """One CFG evaluation: U-Net at 2B, guided eps (or v) at B."""
        torch = self._torch
        sample = torch.cat([x, x]) if guidance > 1 else x                            # (2B, 4, h, w)
        key = (t, sample.shape[0])
        if key not in self.timestep_cache:
            self.timestep_cache[key] = torch.full((sample.shape[0],), t, device=self.device, dtype=torch.float32)
        out = self.unet(sample, self.timestep_cache[key], emb)
        if guidance <= 1:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    def decode(self, latents):
        image = self.vae.decode(latents / self.scaling_factor)                       # (B, 3, H, W) in [-1, 1]
        return ((image.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(self._torch.uint8)

    def __call__(self, prompt: str, batch: int, height: int, width: int, guidance: float, seed: int = 0):
        torch = self._torch
        cond = self.encode_text([prompt] * batch)
        emb = self.encode_text([""] * batch + [prompt] * batch) if guidance > 1 else cond  # (2B, 77, D)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.randn((batch, self.unet.config.in_channels, height // 8, width // 8), generator=gen,
                        device=self.device, dtype=torch.float32) * float(self.schedule.init_noise_sigma)
        for t, a, a_prev in self.steps:
            out = self.unet_step(x.to(self.dtype), t, emb, guidance).float()
            if self.prediction_type == "v_prediction":
                x0, eps = a**0.5 * x - (1 - a) ** 0.5 * out, a**0.5 * out + (1 - a) ** 0.5 * x
            else:
                x0, eps = (x - (1 - a) ** 0.5 * out) / a**0.5, out
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        return self.decode(x.to(self.dtype)).permute(0, 2, 3, 1).cpu().numpy()     # uint8 (B, H, W, 3)


def run(spec, side: str, batch: int, height: int, width: int, log) -> dict:
    import torch

    from ldm_deploy.runtime.tokenizer import ClipTokenizer
    from training.checkpoint import load_components
    from training.models.attention import attention_backend

    device = _device(spec)
    cuda = device.type == "cuda"
    if side == "torch-eager-fp16" and not cuda:
        return {"status": "skipped", "reason": "fp16 eager needs CUDA (CPU fp16 convolutions are not a baseline)"}
    dtype = torch.float16 if (side == "torch-eager-fp16" or (side == "torch-compile" and cuda)) else torch.float32
    if spec.threads and not cuda:
        torch.set_num_threads(int(spec.threads))
    sync = torch.cuda.synchronize if cuda else None
    record = {"device": str(device), "dtype": "fp16" if dtype == torch.float16 else "fp32",
              "attention": "sdpa", "torch": torch.__version__, "threads": torch.get_num_threads()}

    t0 = time.perf_counter()
    comps = load_components(spec.model_dir)
    tokenizer = ClipTokenizer.from_dir(comps.tokenizer_dir)
    pipe = TorchTxt2Img(comps, tokenizer, comps.scheduler_config, device, dtype, steps=spec.steps)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    record["load_s"] = round(time.perf_counter() - t0, 3)

    with torch.inference_mode(), attention_backend("sdpa"):
        emb = pipe.encode_text([""] * batch + [spec.prompt] * batch)                 # (2B, 77, D)
        if spec.guidance <= 1:
            emb = emb[batch:]
        x = torch.randn((batch, pipe.unet.config.in_channels, height // 8, width // 8), device=device, dtype=dtype)
        t_mid = pipe.steps[len(pipe.steps) // 2][0]
        if side == "torch-compile":
            pipe.unet = torch.compile(pipe.unet)
            log(f"{side} b{batch}: compiling the U-Net")
            t0 = time.perf_counter()
            pipe.unet_step(x, t_mid, emb, spec.guidance)
            if sync:
                sync()
            record["compile_s"] = round(time.perf_counter() - t0, 2)
            log(f"{side} b{batch}: compiled in {record['compile_s']} s")
        prompts = [""] * batch + [spec.prompt] * batch
        z = torch.randn((batch, pipe.vae.config.latent_channels, height // 8, width // 8), device=device, dtype=dtype)
        record["components_ms"] = {
            "text_encoder": measure(lambda: pipe.encode_text(prompts), warmup=spec.component_warmup,
                                    repeats=spec.component_repeats, sync=sync).as_dict(),
            "unet_step": measure(lambda: pipe.unet_step(x, t_mid, emb, spec.guidance), warmup=spec.component_warmup,
                                 repeats=spec.component_repeats, sync=sync).as_dict(),
            "vae_decoder": measure(lambda: pipe.decode(z), warmup=min(spec.component_warmup, 1),
                                   repeats=max(1, spec.component_repeats // 3), sync=sync).as_dict(),
        }
        log(f"{side} b{batch}: U-Net step {record['components_ms']['unet_step']['median_ms']:.1f} ms; end to end ...")
        images = []

        def e2e():
            images[:] = [pipe(spec.prompt, batch, height, width, spec.guidance)]

        timing = measure_within(e2e, budget_s=spec.e2e_budget_s, warmup=spec.warmup, repeats=spec.repeats, sync=sync)
    record["end_to_end"] = timing.as_dict()
    record["images_shape"] = list(images[0].shape)
    if cuda:
        record["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        record["gpu_memory_method"] = "torch.cuda.max_memory_allocated"
    return record
