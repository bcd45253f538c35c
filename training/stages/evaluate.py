"""`ldm-train eval`: sample held-out prompts and score them with the shapes analyser.

For each of `eval.prompts` held-out prompts (colour x shape x position triples never seen in
training, shapes.holdout_prompts) one image is sampled through the numpy pipeline over
TorchRunners (`eval.steps` DDIM steps, guidance `eval.guidance_scale`), read back by
training.data.analyser, and compared with what the prompt asked for. The report (JSON) holds the
per-attribute accuracy, the VAE's held-out reconstruction PSNR, the stage reports and the paths of
the loss curves and a sample grid; the U-Net loss curve is re-plotted from its CSV.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ldm_deploy.errors import LdmError
from ldm_deploy.fileio import write_json
from training.config import TrainConfig
from training.stages.images import load_images
from training.stages.run_folder import run_dir

ATTRIBUTES = ("colour", "shape", "position", "size", "background", "all")


def evaluate(cfg: TrainConfig, model: str | Path | None = None) -> dict:
    """Score a model folder (default <out>/model) on held-out prompts; writes <out>/eval/report.json."""
    if cfg.data.kind != "shapes":
        raise LdmError("ldm-train eval scores the shapes dataset only", hint="set data.kind=shapes")
    from training.checkpoint import load_components
    from training.data.analyser import analyse, score
    from training.data.shapes import holdout_prompts
    from training.stages.sampling import generate, save_grid
    from training.stages.vae import psnr
    from training.distributed import dist_env
    from training.loss_log import plot_losses

    ec = cfg.eval
    folder = Path(model) if model else run_dir(cfg) / "model"
    if not (folder / "model_index.json").is_file():
        raise LdmError(f"no model folder at {folder}", hint="train one with `ldm-train all`, or pass --model")
    device = dist_env().device
    comps = load_components(folder)
    modules = {"unet": comps.unet.to(device), "vae": comps.vae.to(device), "text_encoder": comps.text_encoder.to(device)}
    pairs = holdout_prompts(ec.prompts, seed=ec.seed)
    prompts = [p for p, _ in pairs]
    start = time.perf_counter()
    images = generate(modules, comps.tokenizer_dir, comps.scheduler_config, comps.vae.config.scaling_factor, prompts,
                      steps=ec.steps, guidance=ec.guidance_scale, seed=ec.seed, sampler=ec.sampler,
                      batch=ec.batch_size, resolution=cfg.data.resolution)
    sample_s = time.perf_counter() - start
    scores = [score(attrs, analyse(im)) for im, (_, attrs) in zip(images, pairs)]
    accuracy = {k: float(np.mean([s[k] for s in scores])) for k in ATTRIBUTES}
    held = load_images(cfg, "holdout", limit=min(cfg.data.holdout_size, 256))
    out = run_dir(cfg) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images[:16], out / "samples.png", prompts[:16])
    curves = {}
    for stage in ("vae", "text_encoder", "unet"):
        csv_path = run_dir(cfg) / "logs" / f"{stage}.csv"
        if csv_path.is_file():
            plot_losses(csv_path, out / f"loss_{stage}.png", title=f"{stage} loss")
            curves[stage] = str(out / f"loss_{stage}.png")
    report = {
        "model": str(folder), "prompts": len(prompts), "steps": ec.steps, "guidance_scale": ec.guidance_scale,
        "sampler": ec.sampler, "resolution": cfg.data.resolution, "accuracy": accuracy,
        "vae_psnr_db": round(psnr(modules["vae"], held, device), 3), "sample_seconds": round(sample_s, 1),
        "stage_reports": _stage_reports(cfg), "loss_curves": curves, "samples": str(out / "samples.png"),
        "per_prompt": [{"prompt": p, **s} for p, s in zip(prompts, scores)],
    }
    write_json(out / "report.json", report)
    print("[eval] " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()) + f"; VAE PSNR {report['vae_psnr_db']} dB"
          f" -> {out / 'report.json'}")
    return {k: v for k, v in report.items() if k != "per_prompt"}


def _stage_reports(cfg: TrainConfig) -> dict:
    reports = {}
    for path in sorted((run_dir(cfg) / "reports").glob("*.json")):
        reports[path.stem] = json.loads(path.read_text())
    return reports
