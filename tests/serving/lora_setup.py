"""A switchable tiny artifact and LoRA files for the serving tests (numpy-built kohya files: the file formats
themselves are tested against diffusers / peft in tests/export/test_lora_export.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
TARGETS = {"unet": ("attn1.to_q.weight", "attn2.to_v.weight", "ff.net.2.weight"), "text_encoder": ("q_proj.weight",)}
PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def export_switchable(folder: Path, out: Path, config=None) -> Path:
    """`ldm-deploy export --lora-switchable` (Linear weights as graph inputs) of a model folder, fp32."""
    from ldm_deploy.export.exporter import export_model
    from tests.runtime.tiny_model import export_config

    config = config or export_config().replace(components=COMPONENTS)
    return export_model(folder, out, config.replace(lora_switchable="linear", measure_runtime=False)).path


def write_kohya(artifact: Path, path: Path, seed: int, rank: int = 2, alpha: float = 1.5,
                targets: dict | None = None) -> Path:
    """A kohya-layout LoRA (random down/up, alpha) for the switchable weights of `artifact` that end in TARGETS."""
    from safetensors.numpy import save_file

    manifest = json.loads((artifact / "manifest.json").read_text())
    rng = np.random.default_rng(seed)
    tensors = {}
    for component, entry in manifest["components"].items():
        weights = (entry.get("lora_weights") or {}).get("inputs") or {}
        for name, spec in weights.items():
            if not name.endswith((targets or TARGETS).get(component, ())) or len(spec["shape"]) != 2:
                continue
            out_f, in_f = spec["shape"]
            key = PREFIX[component] + name[: -len(".weight")].replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = (rng.standard_normal((rank, in_f)) * 0.3).astype(np.float32)
            tensors[f"{key}.lora_up.weight"] = (rng.standard_normal((out_f, rank)) * 0.3).astype(np.float32)
            tensors[f"{key}.alpha"] = np.array(alpha, np.float32)
    assert tensors, "no target weights in the artifact"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
