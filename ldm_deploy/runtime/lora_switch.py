"""Switch LoRAs at run time on an artifact exported with `lora_switchable: linear | all` (torch-free).

Such an artifact's U-Net / text encoder take every Linear / Conv2d weight as a graph input (the manifest
entry's `lora_weights` lists them; their base values are `<component>/lora_base.safetensors`). A runner
feeds them with every call (ort-cpu: numpy arrays ORT reads in place) or binds them once as device
buffers (ort-cuda with IO binding: switching rewrites those buffers in place, so the binding and a
captured CUDA graph, which hold their addresses, stay valid). Switching never re-traces or re-exports.

`Pipeline.set_loras([(file, scale), ...])` (a file may also be a `LoraFile` from `preload`, as the server
keeps them) recomputes `W = W_base + sum_i scale_i * delta_i` from the stored base every time
(`ldm_deploy.lora.merge`, one weight at a time over a thread pool) and hands the runner
only the arrays that change, so A, then B, then none gives the base model's outputs bit for bit (on the ORT CUDA
fused variant to float rounding: its GroupNorm kernels sum with atomics, so two identical calls may already differ in
the last bits).

The ORT CUDA fused variant of such a component (`export --lora-switchable --ort-cuda`, export/ort_lora.py) takes
the weights in the form its fusions put them in (a Linear's W^T, fp16; a conv kernel stays OIHW): its manifest
entry's `lora_weights["fused"]` maps each of its weight inputs to `{"weight", "perm", "shape", "dtype"}`, and the
runner feeds `fused_tensor(W, recipe)` -- W (base + deltas, as for the plain graph) transposed by `perm`, reshaped,
cast as ONNX Runtime's float16 converter casts (`to_float16`) -- for each.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ldm_deploy.errors import LdmError
from ldm_deploy.lora import LoraFile, LoraSpec, load_lora, merge

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")   # text_encoder_2: SDXL
# ONNX Runtime's float16 converter (onnxruntime/python/tools/transformers/float16.py, convert_np_to_float16) maps
# nonzero magnitudes below this to it, and finite ones above FP16_MAX_FINITE to that, before casting
FP16_MIN_POSITIVE = 5.96e-08
FP16_MAX_FINITE = float(np.finfo(np.float16).max)   # 65504


def load_base(artifact, spec) -> dict[str, np.ndarray]:
    """name -> base weight array of a switchable component (an artifact.ComponentSpec; {} when the component
    is not switchable)."""
    entry = spec.lora_weights
    if not entry:
        return {}
    from ldm_deploy.artifact import named_path

    # named in the manifest, which is not in its own hashes: it must stay inside the artifact (paths.py)
    path = named_path(artifact.path, entry.get("file"), regular_file=True)
    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        raise LdmError(f"safetensors is not installed: {e}", hint="pip install safetensors") from None
    try:
        weights = load_file(str(path))
    except Exception as e:  # safetensors' own error types
        raise LdmError(f"{path} is not a readable safetensors file: {str(e).splitlines()[0][:200]}",
                       hint="re-export the artifact with lora_switchable") from None
    missing = sorted(set(entry["inputs"]) - set(weights))
    if missing:
        raise LdmError(f"{path} lacks {len(missing)} weights its manifest lists (e.g. {', '.join(missing[:4])})",
                       hint="re-export the artifact")
    for name, arr in weights.items():
        arr.setflags(write=False)     # read-only: the CUDA runner skips re-uploads by identity
    return {name: weights[name] for name in entry["inputs"]}


def switchable(runners: Mapping[str, object]) -> dict[str, object]:
    """component -> runner for the runners that take LoRAs at run time."""
    return {c: r for c, r in runners.items() if c in COMPONENTS and getattr(r, "base_weights", None)}


def _targets(runners: Mapping[str, object], artifact_path=None) -> tuple[dict, dict]:
    """(component -> switchable runner, component -> {weight name: shape}); LdmError when none is switchable."""
    targets_of = switchable(runners)
    if not targets_of:
        raise LdmError(f"the artifact {artifact_path or ''} was not exported with switchable weights".replace("  ", " "),
                       hint="re-export with `ldm-deploy export ... --lora-switchable`, or merge with `export --lora`")
    return targets_of, {c: {**_unused(r), **{n: w.shape for n, w in r.base_weights.items()}}
                        for c, r in targets_of.items()}


def _unused(runner) -> dict[str, tuple]:
    """Weights the exported graph dropped (they feed no output): a LoRA may touch them, to no effect."""
    spec = getattr(runner, "spec", None)     # ComponentSpec (ORT runners); the TensorRT runner keeps none
    entry = (spec.lora_weights if spec is not None else None) or {}
    return {n: tuple(shape) for n, shape in (entry.get("unused") or {}).items()}


def preload(runners: Mapping[str, object], path) -> LoraFile:
    """Read and check one LoRA file against the switchable runners once (the server keeps its set loaded)."""
    return _load(_spec((path, 1.0)), *_targets(runners))[0]


def apply(runners: Mapping[str, object], loras: Sequence, *, artifact_path=None) -> dict:
    """Set the LoRAs (LoraSpec / "FILE[:SCALE]" / (file or LoraFile, scale)) of the switchable runners; []
    restores the base.

    Returns {"loras": [records], "seconds": switch time, "changed": {component: tensors rewritten}}."""
    start = time.perf_counter()
    items = [(s[0], LoraSpec(s[0].path, s[1]).scale) if isinstance(s, (tuple, list)) and isinstance(s[0], LoraFile)
             else _spec(s) for s in loras]           # a preloaded LoraFile: its scale checked as any other
    targets_of, targets = _targets(runners, artifact_path)
    loaded: list[tuple[LoraFile, float]] = [s if isinstance(s, tuple) else _load(s, targets_of, targets)
                                            for s in items]
    changed = {}
    for component, runner in targets_of.items():
        base = runner.base_weights
        new = merge(base, loaded, component, targets[component])
        changed[component] = runner.set_weights(new)
    return {"loras": [lora.record(scale) for lora, scale in loaded], "seconds": time.perf_counter() - start,
            "changed": changed}


def _load(spec: LoraSpec, targets_of: Mapping[str, object], targets: Mapping[str, Mapping]) -> tuple[LoraFile, float]:
    try:
        return load_lora(spec.path, targets), spec.scale
    except LdmError as e:
        modes = {(getattr(getattr(r, "spec", None), "lora_weights", None) or {}).get("mode")
                 for r in targets_of.values()}
        if "linear" in modes and "not LoRA weights" in str(e):
            raise LdmError(f"{e} -- this artifact switches Linear and 1x1 conv weights only",
                           hint="re-export with `--lora-switchable all` for LoCon (3x3 conv) LoRAs, or merge "
                                "them at export (export --lora)") from None
        raise


def _spec(item) -> LoraSpec:
    if isinstance(item, LoraSpec):
        return item
    if isinstance(item, (tuple, list)):
        path, scale = item
        return LoraSpec(Path(path), float(scale))
    return LoraSpec.parse(str(item))


# ----------------------------------------------------------------------------- the fused variant's weight inputs

def to_float16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 as ONNX Runtime's float16 converter casts initializers (so a fused fp16 graph's weight
    inputs get the values its converted initializers had): nonzero magnitudes under FP16_MIN_POSITIVE become it,
    finite ones over FP16_MAX_FINITE become that, then round to nearest."""
    x = np.asarray(x, np.float32)
    lo, hi = np.float32(FP16_MIN_POSITIVE), np.float32(FP16_MAX_FINITE)
    mag = np.abs(x)
    fix = ((mag > 0) & (mag < lo)) | ((mag > hi) & np.isfinite(x))
    if fix.any():
        x = np.where(fix, np.copysign(np.where(mag < lo, lo, hi), x), x)
    return x.astype(np.float16)


def fused_tensor(weight: np.ndarray, recipe: Mapping) -> np.ndarray:
    """The fused graph's input for `weight` (the merged W, any float dtype) by its recipe entry: W in float32,
    axes permuted by `perm`, reshaped to `shape`, cast to `dtype` (float16 as ONNX Runtime's converter does)."""
    w = np.asarray(weight).astype(np.float32, copy=False)
    perm = recipe.get("perm")
    if perm is not None and list(perm) != list(range(w.ndim)):
        w = w.transpose(perm)
    w = np.ascontiguousarray(w).reshape(recipe["shape"])
    dtype = np.dtype(recipe["dtype"])
    if dtype == np.float16:
        return to_float16(w)
    return w.astype(dtype, copy=False)


class WeightFeeds:
    """Weight name -> the graph inputs it feeds. For a plain switchable graph each weight is its own input, fed
    as is (no copy); for a fused variant (`recipe`: its `lora_weights["fused"]`) each input is `fused_tensor` of
    its weight."""

    def __init__(self, recipe: Mapping | None):
        self.recipe = dict(recipe or {})
        self.inputs_of: dict[str, list[str]] = {}
        for name, entry in self.recipe.items():
            _check_entry(name, entry)
            self.inputs_of.setdefault(entry["weight"], []).append(name)

    def __call__(self, weights: Mapping[str, np.ndarray], names=None) -> dict[str, np.ndarray]:
        """{graph input: array} for the weights `names` (default: all) of `weights` (name -> merged array)."""
        return dict(self.items(weights, names))

    def items(self, weights: Mapping[str, np.ndarray], names=None):
        """(graph input, array) pairs, made one at a time (the CUDA runner uploads each, then drops it)."""
        for n in (weights if names is None else names):
            if not self.recipe:
                yield n, weights[n]
            for f in self.inputs_of.get(n, ()):
                yield f, fused_tensor(weights[n], self.recipe[f])


def _check_entry(name: str, entry) -> None:
    """A `lora_weights["fused"]` entry as the exporter writes it, else LdmError (the manifest is not hashed)."""
    ok = (isinstance(entry, Mapping) and isinstance(entry.get("weight"), str)
          and isinstance(entry.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
          and entry.get("dtype") in ("float16", "float32")
          and isinstance(entry.get("perm"), list) and sorted(entry["perm"]) == list(range(len(entry["perm"]))))
    if not ok:
        raise LdmError(f"the manifest's fused weight input {name!r} is malformed ({str(entry)[:120]})",
                       hint="re-export the artifact; never edit manifest.json by hand")
