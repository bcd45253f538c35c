"""`pytest --gpu-report PATH`: one JSON of a (GPU) test run: the machine, every test's outcome, duration
and recorded numbers (`record_property`), and the counts. What scripts/gpu_check.py used to write.

    python -m pytest -m gpu -p no:xdist --gpu-report gpu_check.json tests/

Hooked into tests/conftest.py; written at the end of the session (also when tests fail).
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "tensorrt_rtx_bindings",
            "cuda-bindings", "diffusers", "transformers")
_RECORDS: list[dict] = []


def pytest_addoption(parser) -> None:
    parser.addoption("--gpu-report", metavar="PATH", default=None,
                     help="write a JSON report of this run (machine, each test's outcome and recorded numbers)")


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or report.outcome != "passed":     # setup/teardown only when they fail or skip
        entry = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                 "seconds": round(report.duration, 3)}
        if report.user_properties:
            entry["recorded"] = {k: v for k, v in report.user_properties}
        if report.failed:
            entry["error"] = str(report.longreprtext).strip().splitlines()[-1][:500] if report.longreprtext else ""
        elif report.skipped and isinstance(report.longrepr, tuple):
            entry["reason"] = str(report.longrepr[2])
        _RECORDS.append(entry)


def pytest_sessionfinish(session, exitstatus) -> None:
    path = session.config.getoption("--gpu-report", default=None)
    if not path or hasattr(session.config, "workerinput"):   # pytest-xdist: the controller writes it
        return
    counts: dict = {}
    for r in _RECORDS:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    report = {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "exit_status": int(exitstatus),
              "args": list(session.config.invocation_params.args), "environment": environment(),
              "summary": counts, "tests": _RECORDS}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    info: dict = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        import onnxruntime as ort
        info["ort_providers"] = ort.get_available_providers()
    except Exception as e:  # noqa: BLE001 - a broken onnxruntime install is what the report should show
        info["ort_error"] = str(e)
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["gpus"] = [line.strip() for line in q.stdout.splitlines() if line.strip()]
    return info
