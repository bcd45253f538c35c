"""`validate`: every exported component against PyTorch, on the same random inputs, per backend.

Shapes: the min/opt/max of each component's profile, plus an odd in-range size when the height/width
are dynamic. Tolerances are relative to the reference output's scale (max |torch output|):
1e-4 for fp32 graphs, 2e-2 for fp16 ones; any NaN/Inf fails. Backends are runner names
(`ldm_deploy.runtime.runners.base.BACKENDS`): "ort-cpu" by default, "ort-cuda" and "tensorrt" add
columns where the machine has them.

    report = validate("models/tiny", "out/tiny-onnx")
    print(report.table()); assert report.passed
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm_deploy.artifact import Artifact, is_artifact
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.compare import ErrorStats, error_stats
from ldm_deploy.export.cfg_fold import folded_inputs, reference_cfg, symmetric_unet_inputs
from ldm_deploy.export.config import ExportConfig
from ldm_deploy.export.onnx_export import graph_module
from ldm_deploy.export.source import folder_sha256, load_source, math_attention
from ldm_deploy.feeds import example_feeds

log = logging.getLogger(__name__)

TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2}   # max |ort - torch| / max |torch|
# a U-Net with CFG folded in is checked at this guidance: uncond + g (cond - uncond) adds both halves'
# errors, so it gets twice the tolerance
VALIDATE_GUIDANCE = 7.5
FOLDED_TOLERANCE_FACTOR = 2.0


@dataclass(frozen=True)
class Check:
    component: str
    backend: str
    case: str                  # "min" / "opt" / "max" / "odd"
    shape: str                 # the first input's shape, e.g. "2x4x8x8"
    output: str
    stats: ErrorStats
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.stats.nan_count == 0 and self.stats.max_rel <= self.tolerance


@dataclass
class ValidationReport:
    artifact: Path
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def table(self) -> str:
        head = ("component", "backend", "case", "shape", "output", "max abs", "mean abs", "max rel", "tol", "NaN",
                "result")
        rows = [(c.component, c.backend, c.case, c.shape, c.output, f"{c.stats.max_abs:.2e}",
                 f"{c.stats.mean_abs:.2e}", f"{c.stats.max_rel:.2e}", f"{c.tolerance:.0e}", str(c.stats.nan_count),
                 "PASS" if c.passed else "FAIL") for c in self.checks]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        verdict = "PASS" if self.passed else f"FAIL ({len(self.failures)} of {len(self.checks)} checks)"
        return "\n".join([*self.notes, *lines, verdict])


def validate(model_dir, artifact_dir, backends=("ort-cpu",), *, components=None, seed: int = 0,
             tolerances: dict | None = None) -> ValidationReport:
    """Compare each component of the artifact (on each backend) with the PyTorch model in `model_dir`."""
    from ldm_deploy.runtime.runners.base import close_all, open_runner, takes_guidance

    if is_artifact(model_dir) and (Path(artifact_dir) / "model_index.json").is_file():
        raise UsageError(f"arguments swapped: {model_dir} is the exported artifact and {artifact_dir} the model folder",
                         hint=f"ldm-deploy validate {artifact_dir} {model_dir}")
    if not Path(model_dir).exists():
        raise LdmError(f"MODEL_DIR {model_dir} does not exist", hint="check the path to the model folder")
    artifact = Artifact.open(artifact_dir)
    tol = {**TOLERANCES, **(tolerances or {})}
    report = ValidationReport(Path(artifact_dir))
    if folder_sha256(Path(model_dir)) != artifact.source_sha256:
        report.notes.append(f"note: {model_dir} differs from the folder this artifact was exported from")
    names = list(components or artifact.components)
    config = ExportConfig.from_dict(artifact.export_config, where="manifest export_config")
    source = load_source(model_dir, names)
    for name in names:
        spec = artifact.component(name)
        module = graph_module(name, source, config)
        runners = {b: open_runner(b, artifact, name) for b in backends}
        text = name if name in ("text_encoder", "text_encoder_2") else "text_encoder"
        vocab = int((source.configs.get(text) or source.configs.get("text_encoder_2") or {}).get("vocab_size", 1000))
        folded = {b for b, r in runners.items() if takes_guidance(r)}   # ORT CUDA U-Net with CFG in the graph
        for i, (case, shapes) in enumerate(_cases(artifact, spec).items()):
            inputs = example_feeds(spec, seed=seed + i, shapes=shapes, vocab_size=vocab, float_dtype=np.float32)
            if folded:   # the halves repeat, so the plain outputs say what the folded graph must return
                inputs = symmetric_unet_inputs(inputs)
            expected = _torch_outputs(module, inputs, spec.output_names, source.text_module(name))
            for backend, runner in runners.items():
                if backend in folded:
                    actual = runner(folded_inputs(inputs, VALIDATE_GUIDANCE))
                    want = {"noise_pred": reference_cfg(expected["noise_pred"], len(inputs["sample"]) // 2,
                                                        VALIDATE_GUIDANCE)}
                else:
                    actual, want = runner(inputs), expected
                limit = tol[spec.precision] * (FOLDED_TOLERANCE_FACTOR if backend in folded else 1.0)
                for out in spec.output_names:
                    stats = error_stats(np.asarray(actual[out], np.float32), want[out])
                    report.checks.append(Check(name, backend, case, "x".join(map(str, shapes[spec.inputs[0].name])),
                                               out, stats, limit))
        close_all(runners)
    return report


def _cases(artifact: Artifact, spec) -> dict[str, dict[str, tuple]]:
    """min/opt/max input shapes from the profile, plus an odd in-range size for dynamic sizes."""
    cases = {k: {name: tuple(p[k]) for name, p in spec.profile.items()} for k in ("min", "opt", "max")}
    h, w, f = artifact.profiles.height, artifact.profiles.width, artifact.vae_scale_factor
    if (h.static and w.static) or spec.name == "text_encoder":
        return cases
    odd_h, odd_w = (_odd(r, f) for r in (h, w))
    odd = {}
    for name, shape in cases["opt"].items():
        if len(shape) == 4:
            div = 1 if name == "image" else f
            shape = (*shape[:2], odd_h // div, odd_w // div)
        odd[name] = shape
    cases["odd"] = odd
    return cases


def _odd(r, f: int) -> int:
    """An in-range size that is not min/opt/max, preferring an odd number of latent pixels."""
    candidates = [v for v in range(r.min, r.max + 1, f) if v not in (r.min, r.opt, r.max)]
    odd = [v for v in candidates if (v // f) % 2]
    return (odd or candidates or [r.opt])[len(odd or candidates or [r.opt]) // 2]


def _torch_outputs(module, inputs: dict, names: list[str], text_encoder) -> dict[str, np.ndarray]:
    with torch.no_grad(), math_attention(text_encoder):
        out = module(*(torch.from_numpy(a) for a in inputs.values()))
    out = out if isinstance(out, tuple) else (out,)
    return {n: t.float().numpy() for n, t in zip(names, out)}
