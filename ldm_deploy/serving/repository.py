"""Write a Triton model repository serving an artifact: REPO/ldm/config.pbtxt and REPO/ldm/1/model.py.

    write_repository("out/sd15-onnx", "repo", RepoConfig(backend="ort-cuda", instances=1))

The model (`ldm`, Python backend) runs the whole sampling loop in-process (no BLS hop per U-Net step);
Triton's dynamic batcher gathers up to `max_batch` requests (default the artifact's profile max batch,
waiting at most `queue_delay_us`), the queue holds at most `max_queue_size` waiting requests and rejects
the next one at once; `request_timeout_s` bounds a request's time in the queue (Triton's queue policy) and
in the loop (checked at every step). GPU backends get `count` instances on every GPU (KIND_GPU, each on its
own device); ort-cpu gets KIND_CPU. LoRAs (`loras`: name -> file) are referenced like the artifact, by path
and sha256 (checked when an instance loads), and need an artifact exported with switchable weights (checked
here, with every file read against the artifact's weights). model.py is a two-line shim over ldm_deploy.serving.triton_model, so
the repository runs unchanged in NVIDIA's tritonserver container with ldm-deploy installed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.fileio import OutputKind
from ldm_deploy.serving.contract import INPUTS, OUTPUTS

MODEL_NAME = "ldm"
# REPO/ldm: an existing one is replaced only with --force (checked in write_repository); the kind serves the
# input checks of fileio.check_out_dir
REPO_OUTPUT = OutputKind("triton-model", "a Triton model folder written by `ldm-deploy triton-repo`", marker=False)
BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt")
_TYPES = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FP32": "TYPE_FP32",
          "UINT8": "TYPE_UINT8"}

MODEL_PY = '''"""Triton model `{name}`, written by `ldm-deploy triton-repo` (ldm-deploy {version}).

Serves {artifact} (manifest sha256 {sha}); the logic lives in ldm_deploy.serving (docs/serving.md).
The Python environment Triton runs this in needs ldm-deploy installed, with numpy < 2.
"""
from ldm_deploy.serving.triton_model import TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class RepoConfig:
    backend: str = "ort-cuda"            # ort-cuda | tensorrt | ort-cpu
    max_batch: int | None = None         # requests per batch; default the artifact's profile max batch
    instances: int = 1                   # model instances per GPU (GPU backends) or in all (ort-cpu)
    queue_delay_us: int = 20_000         # longest a request waits for others to fill its batch
    max_queue_size: int = 32             # waiting requests beyond this are rejected at once
    request_timeout_s: float = 0.0       # 0: none; else the queue timeout and the loop deadline
    artifact_path: str | None = None     # the artifact's path as the server sees it (default: its path here)
    runner_options: dict = field(default_factory=dict)   # passed to every runner (e.g. {"cuda_graph": True}, tensorrt;
                                                         # {"enable_cuda_graph": True}, ort-cuda)
    verify: bool = True                  # check every artifact file's sha256 when an instance loads
    loras: dict = field(default_factory=dict)   # name -> LoRA file requests may name (`--lora NAME=FILE`)


def _check(config: RepoConfig, batch_max: int) -> int:
    if config.backend not in BACKENDS:
        raise UsageError(f"unknown backend {config.backend!r}; choose one of: {', '.join(BACKENDS)}")
    max_batch = batch_max if config.max_batch is None else config.max_batch
    if not 1 <= max_batch <= batch_max:
        raise UsageError(f"max batch {max_batch} is outside the artifact's batch profile [1, {batch_max}]",
                         hint="re-export with a larger profiles.batch.max to batch more requests")
    for what, v, lo in (("instances", config.instances, 1), ("max_queue_size", config.max_queue_size, 1),
                        ("queue_delay_us", config.queue_delay_us, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise UsageError(f"{what} must be an integer >= {lo}, got {v!r}")
    if config.runner_options:   # an option the runner does not take: refused here, not when each instance loads
        from ldm_deploy.runtime.runners.base import check_options

        try:
            check_options(config.backend, config.runner_options)
        except UsageError:
            raise
        except LdmError:   # the backend's own package (tensorrt, ...) may be on the serving host only
            pass
    # ort-cuda's enable_cuda_graph keeps one graph per batch shape the batcher forms (runners/ort.py OrtBoundRunner)
    bound = config.runner_options.get("max_cuda_graphs")
    if config.backend == "ort-cuda" and bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)
                                                               or bound < 1):
        raise UsageError(f"max_cuda_graphs must be an integer >= 1, got {bound!r}")
    if not config.request_timeout_s >= 0:
        raise UsageError(f"request timeout must be >= 0 seconds, got {config.request_timeout_s!r}")
    return max_batch


def _param(key: str, value) -> str:
    return f'parameters {{ key: {json.dumps(key)} value: {{ string_value: {json.dumps(str(value))} }} }}'


def lora_params(art, loras: dict) -> dict[str, dict]:
    """name -> {"path", "sha256"} for `--lora NAME=FILE`s, after checking each file against the artifact.

    The artifact must take LoRAs at run time (a manifest `lora_weights` entry); every file is read against
    those weights now, so a wrong file fails here, in one line, not when the server loads."""
    from ldm_deploy.fileio import sha256_file
    from ldm_deploy.lora import load_lora
    from ldm_deploy.serving.contract import LORA_NAME

    if not loras:
        return {}
    targets = {c: {**{n: tuple(v) for n, v in (spec.lora_weights.get("unused") or {}).items()},
                   **{n: tuple(v["shape"]) for n, v in (spec.lora_weights.get("inputs") or {}).items()}}
               for c, spec in art.components.items() if spec.lora_weights}
    if not targets:
        raise UsageError(f"--lora needs an artifact exported with switchable weights, and {art.path} was not",
                         hint="re-export it with `ldm-deploy export MODEL --lora-switchable`")
    out = {}
    for name, file in loras.items():
        if not LORA_NAME.match(str(name)):
            raise UsageError(f"--lora {name}=...: a LoRA name is 1-64 letters, digits, '_', '.' or '-', starting "
                             "with a letter or digit", hint="e.g. --lora style=style.safetensors")
        path = Path(file).resolve()
        load_lora(path, targets)            # UsageError / LdmError in one line: missing, not LoRA, wrong model
        out[name] = {"path": str(path), "sha256": sha256_file(path)}
    return out


def config_pbtxt(artifact_path: str, artifact_sha256: str, config: RepoConfig, max_batch: int,
                 loras: dict | None = None) -> str:
    """The text of config.pbtxt (Triton's protobuf text format)."""
    lines = [f'name: "{MODEL_NAME}"', 'backend: "python"', f"max_batch_size: {max_batch}", "dynamic_batching {",
             f"  preferred_batch_size: [ {max_batch} ]",
             f"  max_queue_delay_microseconds: {config.queue_delay_us}", "  default_queue_policy {",
             "    timeout_action: REJECT", f"    default_timeout_microseconds: {int(config.request_timeout_s * 1e6)}",
             "    allow_timeout_override: true", f"    max_queue_size: {config.max_queue_size}", "  }", "}"]
    for i in INPUTS:
        optional = "" if i.required else " optional: true"
        lines.append(f'input {{ name: "{i.name}" data_type: {_TYPES[i.triton_dtype]} dims: [ 1 ]{optional} }}'
                     f"  # {i.doc}")
    for name, dtype, dims in OUTPUTS:
        lines.append(f'output {{ name: "{name}" data_type: {_TYPES[dtype]} dims: [ {", ".join(map(str, dims))} ] }}')
    kind = "KIND_CPU" if config.backend == "ort-cpu" else "KIND_GPU"
    lines.append(f"instance_group [ {{ count: {config.instances} kind: {kind} }} ]"
                 + ("  # per GPU" if kind == "KIND_GPU" else ""))
    params = {"artifact": artifact_path, "artifact_sha256": artifact_sha256, "backend": config.backend,
              "max_batch": max_batch, "request_timeout_s": config.request_timeout_s,
              "runner_options": json.dumps(config.runner_options, sort_keys=True), "verify": int(config.verify)}
    if loras:
        params["loras"] = json.dumps(loras, sort_keys=True)
    lines += [_param(k, v) for k, v in params.items()]
    return "\n".join(lines) + "\n"


def write_repository(artifact: str | Path, out: str | Path, config: RepoConfig = RepoConfig(), *,
                     force: bool = False) -> Path:
    """Write OUT/ldm/{config.pbtxt, 1/model.py} for `artifact` (atomically); returns OUT/ldm."""
    from ldm_deploy import __version__
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.fileio import atomic_dir, check_out_dir

    art = Artifact.open(artifact, verify=False)
    max_batch = _check(config, art.profiles.batch.max)
    sha = art.manifest_sha256
    target = Path(out) / MODEL_NAME
    # never an input, even with --force: REPO/ldm that is, lies inside or holds the artifact (fileio's --out guard)
    check_out_dir(target, REPO_OUTPUT, inputs=[art.path], force=True)
    if target.exists() and not force:
        raise UsageError(f"{target} already exists", hint="pass --force to replace it, or choose another --out")
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    served_path = config.artifact_path or str(Path(art.path).resolve())
    text = config_pbtxt(served_path, sha, config, max_batch, lora_params(art, config.loras))
    with atomic_dir(target) as tmp:
        (tmp / "config.pbtxt").write_text(text, encoding="utf-8")
        (tmp / "1").mkdir()
        (tmp / "1" / "model.py").write_text(MODEL_PY.format(name=MODEL_NAME, version=__version__,
                                                            artifact=served_path, sha=sha), encoding="utf-8")
    return target


def read_parameters(config_text: str) -> dict[str, str]:
    """The `parameters` of a config.pbtxt written by `config_pbtxt` (for checks and tests)."""
    import re

    out = {}
    for key, value in re.findall(r'parameters \{ key: ("(?:[^"\\]|\\.)*") value: \{ string_value: '
                                 r'("(?:[^"\\]|\\.)*") \} \}', config_text):
        out[json.loads(key)] = json.loads(value)
    if "artifact" not in out:
        raise LdmError("config.pbtxt names no artifact parameter", hint="rewrite it with `ldm-deploy triton-repo`")
    return out
