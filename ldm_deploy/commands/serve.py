"""`ldm-deploy serve`: run Triton Inference Server on an artifact in the foreground (until SIGTERM / Ctrl-C).

Python twin:
    serve(ARTIFACT_DIR, RepoConfig(backend="ort-cuda"), ServerPorts(http=8000, grpc=8001, metrics=8002))
"""
from __future__ import annotations

NAME = "serve"
HELP = "serve an artifact through Triton Inference Server (HTTP/gRPC, dynamic batching, metrics)"
EXAMPLE = "ldm-deploy serve out/sd15-onnx --backend ort-cuda --http-port 8000"


def add_arguments(p) -> None:
    from ldm_deploy.commands.triton_repo import add_model_arguments

    p.add_argument("artifact", metavar="ARTIFACT_DIR", help="folder written by `ldm-deploy export`")
    add_model_arguments(p, default_backend="ort-cpu")
    p.add_argument("--http-port", type=int, default=8000, metavar="PORT", help="KServe v2 HTTP (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, metavar="PORT", help="KServe v2 gRPC (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, metavar="PORT", help="Prometheus /metrics (default 8002)")
    p.add_argument("--host", default="0.0.0.0", help="address HTTP and gRPC listen on (default 0.0.0.0)")
    p.add_argument("--triton-arg", action="append", default=[], metavar="ARG",
                   help="extra tritonserver flag, e.g. --triton-arg=--log-info=false (repeatable)")


def run(args) -> int:
    from ldm_deploy.commands.triton_repo import repo_config
    from ldm_deploy.serving.server import ServerPorts, serve

    ports = ServerPorts(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port, host=args.host)
    return serve(args.artifact, repo_config(args), ports, extra_args=args.triton_arg, verbose=args.verbose)
