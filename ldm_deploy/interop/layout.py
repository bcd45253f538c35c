"""Recognise an ONNX Stable Diffusion folder from Optimum or the Hub (torch-free, onnx-free).

Optimum's `optimum-cli export onnx --task text-to-image` and the Hub's "onnx" revisions (diffusers'
`OnnxStableDiffusionPipeline`) both write `model_index.json` and one `<part>/model.onnx` per part
(text_encoder, unet, vae_decoder, vae_encoder) beside tokenizer/ and scheduler/. Such a folder is not
an ldm-deploy artifact (no manifest.json) and not a diffusers PyTorch folder (no weights): every command
that is given one points at `ldm-deploy import` with `import_hint`.
"""
from __future__ import annotations

import json
from pathlib import Path

GRAPH_PARTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def onnx_layout(path) -> str | None:
    """"optimum" (Optimum's export), "onnx-pipeline" (diffusers' OnnxStableDiffusionPipeline / Hub), or None."""
    path = Path(path)
    try:
        from ldm_deploy.artifact import is_artifact

        if not path.is_dir() or is_artifact(path) or not (path / "model_index.json").is_file():
            return None       # (an artifact that lost its manifest has no model_index.json either)
        if not any((path / part / "model.onnx").is_file() for part in GRAPH_PARTS):
            return None
    except OSError:
        return None
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    name = index.get("_class_name", "") if isinstance(index, dict) else ""
    return "onnx-pipeline" if isinstance(name, str) and name.startswith("Onnx") else "optimum"


def refuse_onnx_folder(path, what: str) -> None:
    """Raise the one-line error with the import hint when `path` is an Optimum / Hub ONNX folder."""
    from ldm_deploy.errors import LdmError

    if onnx_layout(path):
        raise LdmError(f"{path} is an ONNX Stable Diffusion folder (Optimum / Hub layout), not {what}",
                       hint=f"import it first: `ldm-deploy import {path} --out ARTIFACT`, then use ARTIFACT")
