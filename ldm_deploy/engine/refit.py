"""Refittable TensorRT engines for LoRA switching (artifacts exported with `lora_switchable`).

Build side: the switchable ONNX takes its Linear / Conv2d weights as graph inputs; TensorRT refits
*weights*, not inputs, so the builder parses a copy of the graph in which those inputs are
initializers again (values from `<component>/lora_base.safetensors`, names unchanged) and marks exactly
those weights refittable: `BuilderFlag.REFIT_INDIVIDUAL` + `network.set_weights_refittable(name)` where
the TensorRT module has it (TensorRT 10, TensorRT for RTX), else `BuilderFlag.REFIT` (every weight).
`REFIT_IDENTICAL` is not used: it promises the refit weights equal the build weights, which a LoRA breaks.

Run side: `Refitter` (runners/tensorrt.py) sets the changed weights by name with `trt.Refitter` and
refits the engine in place; the runner's buffers and context stay as they are. The caller computes
`W_base + sum(deltas)` from the stored base each time (runtime/lora_switch.py), so no drift.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from ldm_deploy.errors import LdmError

log = logging.getLogger("ldm_deploy")


def refit_key(artifact_dir: Path, entry, files: Mapping[str, str]) -> dict | None:
    """The sidecar key's `refit` part for a switchable component (an artifact.ComponentSpec; None otherwise)."""
    weights = entry.lora_weights
    if not weights:
        return None
    return {"base": weights["file"], "sha256": files.get(weights["file"]), "names": sorted(weights["inputs"])}


def refittable_onnx(artifact_dir: Path, entry, work: Path) -> Path:
    """A copy of the component graph (`entry`: its artifact.ComponentSpec) with the switchable weight inputs
    turned back into initializers."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    from ldm_deploy.artifact import named_path

    src = named_path(artifact_dir, entry.file, regular_file=True)
    model = onnx.load(str(src))                  # with its external data
    base = load_file(str(named_path(artifact_dir, entry.lora_weights["file"], regular_file=True)))
    names = set(entry.lora_weights["inputs"])
    kept = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    for name in sorted(names):
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(base[name]), name))
    work.mkdir(parents=True, exist_ok=True)
    dst = work / "model.onnx"
    large = sum(a.nbytes for a in base.values()) > (1 << 30)
    onnx.save(model, str(dst), save_as_external_data=large, location="model.onnx.data" if large else None)
    return dst


def mark_refittable(trt, network, bcfg, names) -> str:
    """Make the named weights refittable; returns the mode used ("individual" | "all")."""
    individual = hasattr(trt.BuilderFlag, "REFIT_INDIVIDUAL") and hasattr(network, "set_weights_refittable")
    if individual:
        missing = [n for n in names if not network.set_weights_refittable(n)]
        if len(missing) == len(names):
            raise LdmError("TensorRT found none of the switchable weights in the parsed network",
                           hint="re-export the artifact with lora_switchable")
        if missing:
            log.info("%d switchable weights were folded away by the parser (not refittable): e.g. %s",
                     len(missing), ", ".join(missing[:3]))
        bcfg.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        return "individual"
    if not hasattr(trt.BuilderFlag, "REFIT"):
        raise LdmError("this TensorRT has no refittable engines (BuilderFlag.REFIT)",
                       hint="use ort-cpu / ort-cuda to switch LoRAs, or merge them at export (export --lora)")
    bcfg.set_flag(trt.BuilderFlag.REFIT)
    return "all"


class Refitter:
    """Set named weights of a refittable engine and refit it in place."""

    def __init__(self, trt, engine, logger):
        self.trt = trt
        self.refitter = trt.Refitter(engine, logger)
        self.refittable = set(self.refitter.get_all_weights())

    def apply(self, weights: Mapping[str, np.ndarray]) -> int:
        keep = []                                        # host arrays must live until the refit is done
        count = 0
        for name, array in weights.items():
            if name not in self.refittable:
                continue
            array = np.ascontiguousarray(array)
            keep.append(array)
            if not self.refitter.set_named_weights(name, self.trt.Weights(array)):
                raise LdmError(f"TensorRT refused the weights {name} {array.shape} {array.dtype}")
            count += 1
        if count and not self.refitter.refit_cuda_engine():
            raise LdmError("TensorRT failed to refit the engine (see the TensorRT error above)")
        return count
