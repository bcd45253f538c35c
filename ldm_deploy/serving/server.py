"""Run Triton Inference Server on a repository in the foreground: `ldm-deploy serve`'s engine.

    serve("out/sd15-onnx", RepoConfig(backend="ort-cuda"), ServerPorts(http=8000, grpc=8001, metrics=8002))

The binary is NVIDIA's (`tritonserver` on PATH, or /opt/tritonserver/bin in NVIDIA's container) when there
is one, else the one bundled in the `nvidia-pytriton` wheel (`pip install 'ldm-deploy[serve]'`: Python
backend only, which is all this model needs). The traps of that backend are handled here:

* its stub loads the system libpython unless LD_LIBRARY_PATH names this interpreter's lib folder first, and
  it ignores PYTHONPATH: the stub runs the `python3` found first on PATH, so this environment's bin/ goes
  first (ldm-deploy must be installed in it);
* it breaks with numpy 2 (a BYTES input crashes the stub), so serving refuses to start under numpy >= 2;
* a stub that crashes leaves its shared-memory regions in /dev/shm: the server gets a prefix of its own
  (`shm-region-prefix-name`) and every region with that prefix is removed when it stops.

SIGTERM / SIGINT are passed to the server, which drains and exits; then the temporary repository and the
shared-memory regions go.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ldm_deploy.errors import LdmError

log = logging.getLogger("ldm_deploy")

CONTAINER_BINARY = Path("/opt/tritonserver/bin/tritonserver")
SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class ServerPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002
    host: str = "0.0.0.0"            # the address HTTP and gRPC listen on (127.0.0.1 for loopback only)


@dataclass(frozen=True)
class TritonBinary:
    path: Path
    backend_dir: Path | None          # None: the binary's own (NVIDIA's container)
    bundled: bool
    libs: Path | None = None          # pytriton's bundled shared libraries (the stub needs them too)


def find_binary(workdir: Path) -> TritonBinary:
    """NVIDIA's tritonserver when present, else pytriton's bundle with a backend folder made in `workdir`."""
    on_path = shutil.which("tritonserver")
    for candidate in filter(None, (on_path, CONTAINER_BINARY)):
        candidate = Path(candidate)
        if candidate.is_file() and os.access(candidate, os.X_OK) and "pytriton" not in str(candidate):
            return TritonBinary(candidate, None, False)
    try:
        import pytriton  # noqa: PLC0415
    except ImportError:
        raise LdmError("no Triton Inference Server here: no `tritonserver` on PATH or in /opt/tritonserver, "
                       "and nvidia-pytriton is not installed",
                       hint="pip install 'ldm-deploy[serve]' (bundles a CPU-capable tritonserver with the "
                            "Python backend), or run inside NVIDIA's tritonserver container") from None
    dist = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise LdmError(f"nvidia-pytriton ships no Python backend stub for Python {version}",
                       hint="use a Python its wheel supports (3.8-3.13)")
    backend = workdir / "backends" / "python"
    backend.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        os.symlink(dist / "backends" / "python" / name, backend / name)
    shutil.copy2(stub, backend / "triton_python_backend_stub")    # the backend looks for it beside itself
    libs = next((p for p in (dist / "external_libs", dist.parent.parent / "nvidia_pytriton.libs") if p.is_dir()), None)
    return TritonBinary(dist / "bin" / "tritonserver", workdir / "backends", True, libs)


def check_environment() -> None:
    """Refuse what breaks the Python backend: numpy >= 2 in the environment the stub will run."""
    import numpy as np

    if int(np.__version__.split(".")[0]) >= 2:
        raise LdmError(f"this environment has numpy {np.__version__}; Triton's Python backend (2.51) crashes on "
                       "BYTES inputs with numpy 2",
                       hint="serve from an environment with numpy < 2: `make serve-venv` makes one "
                            "(pip install 'numpy<2' 'ldm-deploy[serve]')")


def server_env(shm_prefix: str, binary: TritonBinary | None = None) -> dict[str, str]:
    """The server's environment: this interpreter's bin/ first on PATH and its lib folder on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdirs = [sysconfig.get_config_var("LIBDIR") or "", str(Path(sys.base_prefix) / "lib")]
    if binary is not None and binary.libs is not None:
        libdirs.append(str(binary.libs))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in libdirs if d] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(
        os.pathsep)
    env.pop("PYTHONPATH", None)      # the stub ignores it; a stale one only confuses the model's imports
    env["LDM_DEPLOY_SHM_PREFIX"] = shm_prefix
    return env


def server_command(binary: TritonBinary, repo: Path, ports: ServerPorts, shm_prefix: str,
                   extra: list[str] | None = None) -> list[str]:
    cmd = [str(binary.path), f"--model-repository={repo}", f"--http-port={ports.http}",
           f"--grpc-port={ports.grpc}", f"--metrics-port={ports.metrics}", f"--http-address={ports.host}",
           f"--grpc-address={ports.host}", "--exit-on-error=true", "--strict-readiness=true",
           "--model-control-mode=none", f"--backend-config=python,shm-region-prefix-name={shm_prefix}"]
    if binary.backend_dir is not None:
        cmd.append(f"--backend-directory={binary.backend_dir}")
    return cmd + list(extra or [])


def shm_regions(prefix: str) -> list[Path]:
    try:
        return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def remove_shm_regions(prefix: str) -> list[Path]:
    """Remove the /dev/shm regions named with `prefix` (ours only); the ones removed."""
    removed = []
    for p in shm_regions(prefix):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass


def serve(artifact: str | Path, config, ports: ServerPorts = ServerPorts(), *, extra_args: list[str] | None = None,
          verbose: bool = False) -> int:
    """Write the repository to a temporary folder and run Triton on it until it exits or gets SIGTERM/SIGINT."""
    from ldm_deploy.serving.repository import write_repository

    check_environment()
    workdir = Path(tempfile.mkdtemp(prefix="ldm-deploy-serve-"))
    shm_prefix = f"ldm-deploy-{os.getpid()}-"
    proc = None
    previous = {}
    try:
        write_repository(artifact, workdir / "repo", config)
        binary = find_binary(workdir)
        cmd = server_command(binary, workdir / "repo", ports, shm_prefix,
                             (extra_args or []) + (["--log-verbose=1"] if verbose else []))
        log.info(f"serving {artifact} as model 'ldm' ({config.backend}) with {binary.path}: "
                 f"HTTP {ports.host}:{ports.http}, gRPC {ports.grpc}, metrics {ports.metrics}")
        # its own session: a terminal's Ctrl-C reaches us once and is forwarded once (a second SIGINT would
        # cut Triton's drain short); it dies with us if we are killed (PR_SET_PDEATHSIG)
        proc = subprocess.Popen(cmd, env=server_env(shm_prefix, binary), start_new_session=True, preexec_fn=_die_with_parent)

        def forward(signum, _frame):
            if proc.poll() is None:
                proc.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, forward)
        rc = proc.wait()
        return 0 if rc in (0, -signal.SIGTERM, -signal.SIGINT) else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        removed = remove_shm_regions(shm_prefix)
        if removed:
            log.info(f"removed {len(removed)} shared-memory region(s) left by the Python backend")
        shutil.rmtree(workdir, ignore_errors=True)
