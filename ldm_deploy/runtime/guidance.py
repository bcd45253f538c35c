"""Classifier-free guidance and the U-Net's feeds: the one home of CFG (reference §4).

Under CFG (guidance > 1) the U-Net sees ONE batch of 2B rows ordered [uncond; cond] (diffusers'
`StableDiffusionPipeline`, LDM's `p_sample_ddim`) and the guided prediction is

    guided = (cond - uncond) * g + uncond
    guided = phi * guided * std(cond) / std(guided) + (1 - phi) * guided     (rescale, phi > 0; Lin et al. 2023)

with std over every axis but the batch, unbiased (ddof = 1) as torch.std. Guidance <= 1 turns CFG off:
a plain graph runs B rows of cond. A U-Net graph with CFG folded in (export/cfg_fold.py) does the same
maths in-graph: it takes the B latents, the 2B context rows and the two scalars below, and returns the
guided rows; without CFG it takes the cond rows twice and g = 1 (cond - cond = 0 exactly).

`guide` and `rescale_noise_cfg` work on numpy arrays and on torch tensors alike (bench/torch_side.py).
Users: runtime/pipeline.py (the denoisers), runtime/sdxl.py, export/cfg_fold.py (graph names, reference
maths), export/validate.py, bench/ort_side.py and bench/torch_side.py. torch-free.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

# the U-Net graph's IO names (ldm_deploy/export: plain and CFG-folded graphs)
SAMPLE, TIMESTEP, CONTEXT = "sample", "timestep", "encoder_hidden_states"
SCALE, RESCALE = "guidance_scale", "guidance_rescale"     # inputs of a CFG-folded graph only, float32 (1,)
OUTPUT = "noise_pred"


def uses_cfg(guidance: float) -> bool:
    """CFG runs iff guidance > 1 (diffusers' `do_classifier_free_guidance`)."""
    return float(guidance) > 1.0


def guide(uncond, cond, scale: float, rescale: float = 0.0):
    """(cond - uncond) * scale + uncond, then the rescale when > 0: one new array (or tensor) of cond's shape."""
    guided = cond - uncond
    guided *= float(scale)          # a Python float: computed in the arrays' dtype (float32), as in-graph
    guided += uncond
    if rescale > 0:
        guided = rescale_noise_cfg(guided, cond, rescale)
    return guided


def rescale_noise_cfg(guided, cond, phi: float):
    """Lin et al. 2023 §3.4, as diffusers' `rescale_noise_cfg` (torch.std is unbiased: ddof=1)."""
    rescaled = guided * (_std(cond) / _std(guided))
    out = phi * rescaled + (1 - phi) * guided
    return out.astype(np.float32, copy=False) if isinstance(out, np.ndarray) else out


def _std(x):
    """Unbiased std over every axis but the first, kept for broadcasting: numpy array or torch tensor."""
    axes = tuple(range(1, x.ndim))
    if isinstance(x, np.ndarray):
        return x.std(axis=axes, keepdims=True, ddof=1)
    return x.std(dim=axes, keepdim=True)       # torch: unbiased by default


# --- feeds ----------------------------------------------------------------------------------------------

def rows(uncond: np.ndarray | None, cond: np.ndarray, guidance: float) -> np.ndarray:
    """The per-row conditioning a U-Net call takes: [uncond; cond] (2B rows) under CFG, else cond (B rows;
    `uncond` unused, may be None). Frozen: constant over the loop, so runners may skip re-uploading it."""
    out = np.concatenate([uncond, cond]) if uses_cfg(guidance) else cond
    out.setflags(write=False)
    return out


def plain_feeds(sample: np.ndarray, timestep: np.ndarray, context: np.ndarray,
                extra: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Feeds of a plain U-Net graph: rows of sample (2B under CFG), timestep and context, plus extra
    per-row conditioning (SDXL's text_embeds / time_ids), all with the same number of rows."""
    return {SAMPLE: sample, TIMESTEP: timestep, CONTEXT: context, **(extra or {})}


def folded_context(context: np.ndarray, guidance: float) -> np.ndarray:
    """The context a CFG-folded graph takes: the 2B rows under CFG, else the B cond rows twice (g = 1)."""
    if uses_cfg(guidance):
        return context
    doubled = np.concatenate([context, context])
    doubled.setflags(write=False)
    return doubled


def folded_scalars(guidance: float, rescale: float) -> dict[str, np.ndarray]:
    """The guidance inputs of a CFG-folded graph (float32 (1,), frozen): g and phi, or 1 and 0 without CFG."""
    cfg = uses_cfg(guidance)
    out = {SCALE: np.array([float(guidance) if cfg else 1.0], np.float32),
           RESCALE: np.array([float(rescale) if cfg else 0.0], np.float32)}
    for value in out.values():
        value.setflags(write=False)
    return out


def folded_conditioning(context: np.ndarray, guidance: float, rescale: float = 0.0,
                        extra: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """What a CFG-folded graph takes besides the latents and timestep, constant over a loop: the context
    `folded_context` gives, the guidance inputs `folded_scalars` gives, and extra per-row conditioning (SDXL's
    text_embeds / time_ids) each through `folded_context`."""
    return {CONTEXT: folded_context(context, guidance), **folded_scalars(guidance, rescale),
            **{k: folded_context(v, guidance) for k, v in (extra or {}).items()}}


def folded_feeds(latents: np.ndarray, timestep: np.ndarray, context: np.ndarray,
                 scalars: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Feeds of a CFG-folded U-Net graph: B latents and timesteps, the context `folded_context` gives and
    the guidance inputs `folded_scalars` gives, plus extra per-row conditioning (SDXL's text_embeds /
    time_ids) with the context's rows (each through `folded_context`)."""
    return {SAMPLE: latents, TIMESTEP: timestep, CONTEXT: context, **scalars, **(extra or {})}


__all__ = ["CONTEXT", "OUTPUT", "RESCALE", "SAMPLE", "SCALE", "TIMESTEP", "folded_conditioning", "folded_context",
           "folded_feeds", "folded_scalars", "guide", "plain_feeds", "rescale_noise_cfg", "rows", "uses_cfg"]
