"""The JSON sidecar next to every engine: what it was built from, for, and with.

ENGINE_DIR/<component>.engine        the serialized TensorRT engine
ENGINE_DIR/<component>.engine.json   this sidecar

The sidecar's "key" is everything that decides the engine's bytes (TensorRT flavour and version,
target compute capabilities, build GPU, profile, precision, ONNX hashes, build options): the
builder rebuilds an engine exactly when its key changed. At load time `check_loadable` refuses,
with the command that rebuilds, an engine whose TensorRT version, compute capability or ONNX no
longer match, and `read_engine` refuses a truncated or corrupted engine file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ldm_deploy.errors import LdmError
from ldm_deploy.fileio import OutputKind
from ldm_deploy.paths import inside

FORMAT = "ldm-deploy-engine"
FORMAT_VERSION = 1
NO_GPU = "none (built on CPU)"
_FLAVOUR_NAMES = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT for RTX"}


def engine_path(engine_dir: str | Path, component: str) -> Path:
    return Path(engine_dir) / f"{component}.engine"


def sidecar_path(engine_dir: str | Path, component: str) -> Path:
    return Path(engine_dir) / f"{component}.engine.json"


def _is_engines_folder(folder: Path) -> bool:
    for p in folder.glob("*.engine.json"):
        try:
            if not p.is_symlink() and json.loads(p.read_bytes()[: 1 << 20]).get("format") == FORMAT:
                return True
        except (OSError, ValueError, RecursionError, AttributeError):
            continue
    return False


# `ldm-deploy build --out` writes into an existing folder only when it holds our sidecars (or is empty), or with --force
ENGINES_OUTPUT = OutputKind("engines", "an engines folder written by `ldm-deploy build` (no *.engine.json sidecars)",
                            _is_engines_folder, marker=False)


@dataclass(frozen=True)
class Environment:
    """The TensorRT and GPU that would load an engine here and now."""

    flavour: str                      # "tensorrt" | "tensorrt-rtx"
    tensorrt_version: str
    gpu_name: str | None = None       # None: no GPU
    compute_capability: str | None = None  # "8.9"; None: no GPU


def read_sidecar(engine_dir: str | Path, component: str) -> dict:
    """The sidecar of `component`'s engine, checked for format; LdmError when missing or unreadable."""
    path = inside(engine_dir, sidecar_path(engine_dir, component).name)   # not a link out of the folder
    if not path.is_file():
        raise LdmError(f"no engine for {component!r} in {engine_dir} ({path.name} is missing)",
                       hint=f"build it: ldm-deploy build ARTIFACT_DIR --out {engine_dir}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise LdmError(f"engine sidecar {path} is unreadable: {e}",
                       hint=f"rebuild: ldm-deploy build ARTIFACT_DIR --out {engine_dir}") from None
    if not isinstance(data, dict):
        raise LdmError(f"engine sidecar {path} is not a JSON object",
                       hint=f"rebuild: ldm-deploy build ARTIFACT_DIR --out {engine_dir}")
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise LdmError(f"{path} is not an ldm-deploy engine sidecar (format {data.get('format')!r} "
                       f"version {data.get('format_version')!r}, expected {FORMAT!r} {FORMAT_VERSION})",
                       hint=f"rebuild: {data.get('rebuild') or 'ldm-deploy build ARTIFACT_DIR --out ' + str(engine_dir)}")
    problem = _schema_problem(data)
    if problem:
        raise LdmError(f"engine sidecar {path} is malformed: {problem}",
                       hint=f"rebuild: ldm-deploy build ARTIFACT_DIR --out {engine_dir} --force")
    return data


def _schema_problem(data: dict) -> str | None:
    """What is wrong with the fields that loading reads, or None."""
    def typed(obj, key, kind):
        value = obj.get(key) if isinstance(obj, dict) else None
        return isinstance(value, kind) and not isinstance(value, bool)

    if not typed(data, "component", str):
        return "`component` is not a string"
    if data.get("rebuild") is not None and not typed(data, "rebuild", str):
        return "`rebuild` is not a string"
    if data.get("artifact") is not None and not typed(data, "artifact", str):
        return "`artifact` is not a string"
    engine = data.get("engine")
    if not (typed(engine, "file", str) and typed(engine, "bytes", int) and typed(engine, "sha256", str)):
        return "`engine` lacks file / bytes / sha256"
    if Path(engine["file"]).name != engine["file"] or engine["file"] in ("", ".", ".."):
        return f"engine file {engine['file'][:80]!r} is not a file name in the engine folder"
    key = data.get("key")
    if not all(typed(key, k, str) for k in ("flavour", "tensorrt_version", "gpu")):
        return "`key` lacks flavour / tensorrt_version / gpu"
    ccs = key.get("compute_capabilities")
    if not (isinstance(ccs, list) and ccs and all(isinstance(c, str) for c in ccs)):
        return "`key.compute_capabilities` is not a list of strings"
    if not (typed(key.get("onnx"), "file", str) and typed(key.get("onnx"), "sha256", str)):
        return "`key.onnx` lacks file / sha256"
    return None


def key_differences(old_key: dict, new_key: dict) -> list[str]:
    """Names of the key fields that differ (nested dicts compared as a whole, field by field)."""
    names = sorted(set(old_key) | set(new_key))
    return [n for n in names if old_key.get(n) != new_key.get(n)]


def rebuild_command(sidecar: dict) -> str:
    return sidecar.get("rebuild") or "ldm-deploy build ARTIFACT_DIR --out ENGINE_DIR"


def check_loadable(sidecar: dict, env: Environment, onnx_sha256: str | None = None) -> None:
    """Refuse (LdmError naming the mismatch and the rebuild command) an engine that can't or
    shouldn't run here. `onnx_sha256`: the current ONNX's hash when it is known, else unchecked."""
    key = sidecar["key"]
    name = f"{sidecar['component']} engine ({sidecar['engine']['file']})"
    hint = f"rebuild it: {rebuild_command(sidecar)}"
    built_with = _FLAVOUR_NAMES.get(key["flavour"], key["flavour"])
    if key["flavour"] != env.flavour:
        raise LdmError(f"{name} was built with {built_with} but {_FLAVOUR_NAMES.get(env.flavour, env.flavour)} "
                       "is loading it", hint=f"install {key['flavour']} or {hint}")
    if key["tensorrt_version"] != env.tensorrt_version:
        raise LdmError(f"{name} was built with {built_with} {key['tensorrt_version']} but "
                       f"{env.tensorrt_version} is installed; engines only load in the exact version "
                       "that built them", hint=hint)
    if env.compute_capability is None:
        raise LdmError(f"{name} needs a CUDA GPU to run and none was found",
                       hint="run on a machine with an NVIDIA GPU and driver")
    targets = key["compute_capabilities"]
    if env.compute_capability not in targets:
        raise LdmError(f"{name} was built for compute capability {', '.join(targets)} "
                       f"({key['gpu']}) but this GPU ({env.gpu_name}) is {env.compute_capability}",
                       hint=hint)
    if onnx_sha256 is not None and onnx_sha256 != key["onnx"]["sha256"]:
        raise LdmError(f"{name} was built from a different ONNX ({key['onnx']['file']} sha256 "
                       f"{key['onnx']['sha256'][:12]}..., now {onnx_sha256[:12]}...)", hint=hint)


def read_engine(engine_dir: str | Path, sidecar: dict) -> bytes:
    """The engine's bytes, after checking size and sha256 against the sidecar."""
    hint = f"rebuild it: {rebuild_command(sidecar)}"
    path = inside(engine_dir, sidecar["engine"]["file"], named_in=sidecar_path(engine_dir, sidecar["component"]),
                  hint=hint)
    if not path.is_file():
        raise LdmError(f"engine file {path} is missing", hint=hint)
    data = path.read_bytes()
    want = sidecar["engine"]["bytes"]
    if len(data) != want:
        raise LdmError(f"engine file {path} is truncated or was overwritten: {len(data)} bytes, "
                       f"the sidecar says {want}", hint=hint)
    if hashlib.sha256(data).hexdigest() != sidecar["engine"]["sha256"]:
        raise LdmError(f"engine file {path} is corrupted: its sha256 does not match the sidecar", hint=hint)
    return data
