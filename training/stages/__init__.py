"""The training stages, in the order `ldm-train all` runs them.

    tokenizer     -> <out>/stages/tokenizer        (stages/tokenizer.py)
    vae           -> <out>/stages/vae              (stages/vae.py)
    text-encoder  -> <out>/stages/text_encoder     (stages/text_encoder.py)
    unet          -> <out>/model (complete)        (stages/unet.py)

Each `run_stage(name, cfg, resume)` returns a JSON-able report, also written to <out>/reports/<name>.json.
"""
from __future__ import annotations

import importlib
import time

from ldm_deploy.errors import UsageError
from ldm_deploy.fileio import write_json
from training.config import TrainConfig

STAGES = {
    "tokenizer": "training.stages.tokenizer:train_tokenizer_stage",
    "vae": "training.stages.vae:train_vae",
    "text-encoder": "training.stages.text_encoder:train_text_encoder",
    "unet": "training.stages.unet:train_unet",
}


def run_stage(name: str, cfg: TrainConfig, resume: bool = False, force: bool = False) -> dict:
    """`force`: write into an existing `cfg.out` that is not an ldm-train run folder (training.stages.run_folder.claim_run_dir)."""
    if name not in STAGES:
        raise UsageError(f"unknown stage {name!r}; choose one of: {', '.join(STAGES)}")
    from training.stages.run_folder import claim_run_dir

    claim_run_dir(cfg, force=force)
    module, fn = STAGES[name].split(":")
    start = time.perf_counter()
    report = getattr(importlib.import_module(module), fn)(cfg, resume=resume)
    report = {"stage": name, "wall_seconds": round(time.perf_counter() - start, 1), **report}
    from training.distributed import dist_env

    if dist_env().is_main:
        write_json(f"{cfg.out}/reports/{name}.json", report)
    return report


def run_all(cfg: TrainConfig, resume: bool = False, force: bool = False) -> dict:
    """Every stage in order; a stage whose result already exists is redone only when it is resumable."""
    return {name: run_stage(name, cfg, resume=resume, force=force) for name in STAGES}
