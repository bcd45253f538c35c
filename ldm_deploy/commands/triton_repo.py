"""`ldm-deploy triton-repo`: a Triton model repository (model `ldm`, Python backend) serving an artifact.

Python twin:
    write_repository(ARTIFACT_DIR, REPO, RepoConfig(backend="ort-cuda", max_batch=4, instances=1))
"""
from __future__ import annotations

import json

from ldm_deploy.errors import UsageError

NAME = "triton-repo"
HELP = "write a Triton Inference Server model repository that serves an artifact"
EXAMPLE = "ldm-deploy triton-repo out/sd15-onnx --out model_repository --backend ort-cuda --lora style=style.safetensors"


def add_arguments(p) -> None:
    p.add_argument("artifact", metavar="ARTIFACT_DIR", help="folder written by `ldm-deploy export`")
    p.add_argument("--out", required=True, metavar="REPO", help="model repository folder (REPO/ldm is written)")
    add_model_arguments(p)
    p.add_argument("--artifact-path", metavar="PATH",
                   help="the artifact's path as the server sees it (e.g. inside the container; default: its path here)")
    p.add_argument("--force", action="store_true", help="replace an existing REPO/ldm")


def add_model_arguments(p, default_backend: str = "ort-cuda") -> None:
    """The model flags `triton-repo` and `serve` share."""
    from ldm_deploy.serving.repository import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default=default_backend,
                   help=f"runner backend of the model instances (default {default_backend})")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="requests per batch (default: the artifact's profile max batch)")
    p.add_argument("--instances", type=int, default=1, metavar="N",
                   help="model instances per GPU (GPU backends) or in all (ort-cpu) (default 1)")
    p.add_argument("--queue-delay-ms", type=float, default=20.0, metavar="MS",
                   help="longest a request waits for others to fill its batch (default 20)")
    p.add_argument("--max-queue-size", type=int, default=32, metavar="N",
                   help="waiting requests beyond this are rejected at once (default 32)")
    p.add_argument("--request-timeout", type=float, default=0.0, metavar="S",
                   help="seconds a request may wait and run before it fails (default 0: no limit)")
    p.add_argument("--runner-options", metavar="JSON", default="{}",
                   help='options for every runner, e.g. \'{"cuda_graph": true}\' (tensorrt), '
                        '\'{"enable_cuda_graph": true}\' (ort-cuda: one CUDA graph per batch size)')
    p.add_argument("--lora", action="append", default=[], metavar="NAME=FILE",
                   help="a LoRA requests may name in their `lora` input (NAME[:SCALE]); repeatable; the artifact "
                        "must be exported with --lora-switchable")


def repo_config(args):
    from ldm_deploy.serving.repository import RepoConfig

    try:
        options = json.loads(args.runner_options)
    except json.JSONDecodeError as e:
        raise UsageError(f"--runner-options is not JSON: {e}") from None
    if not isinstance(options, dict):
        raise UsageError("--runner-options must be a JSON object")
    loras = {}
    for item in args.lora:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise UsageError(f"--lora {item!r}: write NAME=FILE", hint="e.g. --lora style=loras/style.safetensors")
        if name in loras:
            raise UsageError(f"--lora {name} is given twice", hint="give each LoRA its own name")
        loras[name] = file
    return RepoConfig(backend=args.backend, max_batch=args.max_batch, instances=args.instances,
                      queue_delay_us=int(round(args.queue_delay_ms * 1000)), max_queue_size=args.max_queue_size,
                      request_timeout_s=args.request_timeout, runner_options=options,
                      artifact_path=getattr(args, "artifact_path", None), loras=loras)


def run(args) -> int:
    from ldm_deploy.serving.repository import write_repository

    target = write_repository(args.artifact, args.out, repo_config(args), force=args.force)
    print(target)
    return 0
