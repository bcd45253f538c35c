"""LoRA at export: merge files into the weights before tracing, or export the weights LoRAs touch as
graph inputs so the runtime can switch LoRAs without a rebuild (ldm_deploy/lora.py reads the files).

Merge (`export --lora FILE[:SCALE]`): `W += sum_i scale_i * delta_i` in float32 on the loaded modules,
what diffusers' `fuse_lora(lora_scale=...)` does; the manifest's `loras` records each file's sha256 and
scale (and the export cache compares them).

Switchable (`lora_switchable: linear | all`): every Linear and 1x1 Conv2d weight (and with "all" every 3x3
Conv2d weight, for LoCon) of the U-Net and text encoder(s) (SDXL: text_encoder_2 too) becomes
a graph input named by its parameter name (traced through `torch.func.functional_call`), its base
values go to `<component>/lora_base.safetensors` in the graph's dtype, and the manifest entry's
`lora_weights` lists them; the runners feed / bind them (runtime/lora_switch.py).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.lora import LoraFile, LoraSpec, load_lora, torch_targets

SWITCHABLE = ("unet", "text_encoder", "text_encoder_2")
BASE_FILE = "lora_base.safetensors"


def cache_key(specs: Sequence[LoraSpec]) -> list[dict]:
    """What identifies the merged LoRAs for the export cache: (sha256, scale) in order."""
    from ldm_deploy.fileio import sha256_file

    for s in specs:
        if not Path(s.path).is_file():
            raise UsageError(f"LoRA file {s.path} does not exist")
    return [{"sha256": sha256_file(Path(s.path)), "scale": float(s.scale)} for s in specs]


def merge(source, specs: Sequence[LoraSpec]) -> list[dict]:
    """Merge the LoRA files into `source`'s U-Net / text encoder(s) in place; returns the manifest records."""
    modules = {"unet": source.unet, "text_encoder": source.text_encoder}
    if source.sdxl:
        modules["text_encoder_2"] = source.text_encoder_2
    targets = torch_targets(modules)
    try:
        loaded: list[tuple[LoraFile, float]] = [(load_lora(s.path, targets), float(s.scale)) for s in specs]
    except LdmError as e:
        left_out = [c for c, m in modules.items() if m is None]
        if left_out and "not LoRA weights" in str(e):
            raise LdmError(f"{e} -- {', '.join(left_out)} is not among the exported components",
                           hint="export it too (--components), or use a LoRA file without its keys") from None
        raise
    for component, module in modules.items():
        if module is None:
            continue
        params = dict(module.named_parameters())
        total: dict[str, np.ndarray] = {}
        for lora, scale in loaded:
            for name, d in lora.deltas(component, targets[component], scale).items():
                total[name] = total[name] + d if name in total else d
        with torch.no_grad():
            for name, d in total.items():
                p = params[name]
                p.copy_((p.float() + torch.from_numpy(d)).to(p.dtype))
    return [lora.record(scale) for lora, scale in loaded]


def switchable_weights(module: torch.nn.Module, mode: str = "all") -> dict[str, torch.Tensor]:
    """graph parameter name -> tensor for the Linear / Conv2d weights of a component graph module
    (`UNetGraph.unet.*`, `TextEncoderGraph.text_encoder.*`); mode "linear" leaves out kernels wider than 1x1."""
    return {name: p.detach() for name, p in module.named_parameters()
            if name.endswith(".weight") and (p.ndim == 2 or (p.ndim == 4 and (mode == "all" or p.shape[-1] == 1)))}


class WeightsAsInputs(torch.nn.Module):
    """`forward(*inputs, *weights)`: the graph module with the named weights taken from the call.

    While tracing, the weights must not be parameters of the module at all (the TorchScript exporter names
    initializers by zipping the graph's parameters with the state_dict, and torch.func.functional_call
    refuses the tracer), so `detached()` removes them for the duration of the export."""

    def __init__(self, graph: torch.nn.Module, names: Sequence[str]):
        super().__init__()
        self.graph, self.names = graph, list(names)

    def _owners(self):
        for name in self.names:
            owner_name, _, attr = name.rpartition(".")
            yield self.graph.get_submodule(owner_name), attr

    @contextlib.contextmanager
    def detached(self):
        saved = []
        try:
            for owner, attr in self._owners():
                saved.append((owner, attr, owner._parameters.pop(attr)))
                setattr(owner, attr, saved[-1][2].detach())
            yield self
        finally:
            for owner, attr, param in reversed(saved):
                owner.__dict__.pop(attr, None)
                owner._parameters[attr] = param

    def forward(self, *args):
        n = len(args) - len(self.names)
        for (owner, attr), value in zip(self._owners(), args[n:]):
            owner.__dict__[attr] = value
        return self.graph(*args[:n])


def input_name(graph_name: str) -> str:
    """`unet.down_blocks.0...weight` -> `down_blocks.0...weight` (our parameter name, the LoRA target)."""
    return graph_name.split(".", 1)[1]


def write_base(path: Path, weights: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(path))




def cache_key_of(manifest: dict) -> list[dict]:
    return [{"sha256": r.get("sha256"), "scale": float(r.get("scale", 1.0))} for r in manifest.get("loras") or []]


def split_weight_inputs(ins: list[dict], weights: dict, root: Path, component: str,
                        mode: str = "all") -> tuple[list[dict], dict]:
    """Graph inputs -> (the component's real inputs, the manifest's `lora_weights` entry); writes the base
    weights (in the graph input's dtype) to `<component>/lora_base.safetensors`."""
    real = [i for i in ins if i["name"] not in weights]
    present = [i for i in ins if i["name"] in weights]     # a weight the graph does not use was dropped
    base = {i["name"]: weights[i["name"]].numpy().astype(i["dtype"]) for i in present}
    path = root / component / BASE_FILE
    write_base(path, base)
    # dropped weights (SDXL's first text encoder: its last layer feeds no output) are listed so that a LoRA
    # touching them still loads at run time; their deltas change nothing, as when merged
    kept = {i["name"] for i in present}
    unused = {n: list(w.shape) for n, w in weights.items() if n not in kept}
    entry = {"file": path.relative_to(root).as_posix(), "mode": mode,
             "inputs": {i["name"]: {"dtype": i["dtype"], "shape": list(i["shape"])} for i in present}}
    if unused:
        entry["unused"] = unused
    return real, entry
