"""Build and write `manifest.json` for an artifact folder (the schema `ldm_deploy.artifact` reads; see docs/DESIGN.md).

The writing half of the manifest: `build_manifest` fills the keys `Artifact` requires (artifact.REQUIRED_KEYS)
with the model description's own names (`ModelInfo.manifest_fields`), and `write_manifest` is the one place
the file is written (export, import, the ORT CUDA variants, the benchmark's lever variants). Reading is
`ldm_deploy.artifact.Artifact`'s alone.
"""
from __future__ import annotations

import copy
import datetime
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnx

from ldm_deploy.artifact import FORMAT, FORMAT_VERSION, MANIFEST, REQUIRED_KEYS, profiles_digest
from ldm_deploy.export.config import ExportConfig
from ldm_deploy.fileio import sha256_file, write_json

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int64"}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def graph_io(path: Path) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs exactly as the saved graph declares them: name, numpy dtype, shape."""
    g = onnx.load(str(path), load_external_data=False).graph

    def spec(v):
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}

    init = {i.name for i in g.initializer}
    return [spec(v) for v in g.input if v.name not in init], [spec(v) for v in g.output]


def copy_tokenizer(src: Path, dst: Path) -> dict:
    """Check that the tokenizer folder loads in the runtime, copy its files, return the manifest entry.

    A folder saved by transformers 5 has tokenizer.json (+ tokenizer_config.json), older ones
    vocab.json + merges.txt; whichever is there is copied, and the entry names it (`source`, `files`).
    """
    from ldm_deploy.runtime.tokenizer import ClipTokenizer

    tok = ClipTokenizer.from_dir(src)  # the runtime's own loader: a folder it cannot read fails the export
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return {"dir": dst.name, "source": tok.source, "files": copied, "model_max_length": tok.max_length,
            "pad_token": tok.pad_token, "pad_id": tok.pad_id, "vocab_size": tok.vocab_size}


def tool_versions() -> dict:
    out = {}
    for pkg in ("ldm-deploy", "torch", "onnx", "onnxruntime", "onnxslim", "transformers"):
        try:
            out[pkg.replace("-", "_")] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except manifest.json, keyed by posix relative path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def build_manifest(folder: Path, *, source, config: ExportConfig, components: dict, tokenizer: dict,
                   extra: dict | None = None) -> dict:
    """The manifest dict; `components` maps name -> entry (file, precision, inputs, outputs, ...).

    `extra`: model-family entries (SDXL: `sdxl`, see export/sdxl.py), written before `files`.
    """
    models = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if "text_encoder_2" in source.configs else ())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {"path": str(Path(source.folder).resolve()), "sha256": source.sha256},
        "precision": config.precision,
        "model": {part: source.configs.get(part) for part in models},
        **source.info.manifest_fields(),   # scaling_factor, prediction_type, latent_channels, vae_scale_factor
        "scheduler": source.scheduler_config,
        "tokenizer": tokenizer,
        "profiles": config.to_dict()["profiles"],
        "components": components,
        **(extra or {}),
        "files": file_hashes(folder),
        "tools": tool_versions(),
        "export_config": config.to_dict(),
    }
    manifest["profiles_sha256"] = profiles_digest(manifest)   # the profiles' integrity (artifact.py checks it)
    return manifest


def editable_manifest(artifact) -> dict:
    """A deep copy of an opened `Artifact`'s manifest dict, for a writer that adds to it (a component's
    variants, their file hashes) and writes it back with `write_manifest`."""
    return copy.deepcopy(artifact.manifest)


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write (or rewrite) `folder/manifest.json` atomically, refusing a manifest without a key `Artifact` needs."""
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest lacks {', '.join(missing)}")   # a bug in the writer, not a user error
    path = Path(folder) / MANIFEST
    write_json(path, manifest)
    return path


def matches(artifact, source_sha256: str, config: ExportConfig) -> bool:
    """True when an existing `Artifact` was made from the same source files with the same settings."""
    from ldm_deploy.export.config import canonical_key

    old = artifact.export_config
    if artifact.source_sha256 != source_sha256 or not old:
        return False
    return canonical_key(old) == config.key()
