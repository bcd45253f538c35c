"""The run folder: its layout, and claiming it before a stage writes.

Run folder (TrainConfig.out):
    stages/tokenizer/        the tokenizer (vocab.json, merges.txt, ...)
    stages/vae/              config.json + diffusion_pytorch_model.safetensors (+ report.json)
    stages/text_encoder/     config.json + model.safetensors (+ report.json)
    model/                   the complete diffusers folder (written after the U-Net stage)
    checkpoints/<stage>/     resumable training state (trainer.py)
    logs/<stage>.csv, .png   loss curves;  samples/  sample grids;  cache/  cached latents
"""
from __future__ import annotations

from pathlib import Path

from ldm_deploy.fileio import MARKER, OutputKind, check_out_dir, has_marker, write_marker
from training.config import TrainConfig


def run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out)


# What a run folder holds; one holding nothing else (with stages/, checkpoints/ or reports/) is a run folder
# written before runs carried fileio.MARKER.
RUN_ENTRIES = {"stages", "checkpoints", "logs", "reports", "samples", "model", "cache", "eval", "train_config.json", MARKER}


def _is_older_run_dir(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    return names <= RUN_ENTRIES and bool(names & {"stages", "checkpoints", "reports"})


RUN_OUTPUT = OutputKind("training-run", "an ldm-train run folder", _is_older_run_dir)


def claim_run_dir(cfg: TrainConfig, force: bool = False) -> Path:
    """Check that `cfg.out` may be written (fileio.check_out_dir: an ldm-train run folder or a new or empty
    one, or any folder with `force`; never one that is, holds or lies inside an input path of the config),
    then create it with its marker. Every stage calls this first: the run's sub-folders are then ours."""
    inputs = [p for p in (cfg.data.path, cfg.tokenizer.path, cfg.vae.path, cfg.text_encoder.path) if p]
    out = check_out_dir(run_dir(cfg), RUN_OUTPUT, inputs=inputs, force=force)
    from training.distributed import dist_env

    if dist_env().is_main and not has_marker(out, RUN_OUTPUT.name):
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, RUN_OUTPUT.name)
    return out


def stage_dir(cfg: TrainConfig, part: str) -> Path:
    return run_dir(cfg) / "stages" / part
