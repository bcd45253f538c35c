"""Fixtures of the reliability suite: one tiny model folder and its exported artifact per session,
private copies a test may damage, and the CLI run as a subprocess (so a crash or a hang is seen
as what it is: a signal or a timeout, never a passing test).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.runtime.tiny_model import export_tiny_artifact, make_tiny_folder

REPO = Path(__file__).resolve().parents[2]
FUZZ_COUNTS: dict[str, int] = {}   # loader -> inputs tried; printed at the end of the run
KILLS: dict[str, int] = {}         # writer -> SIGKILLs survived (previous output intact, re-run completed)


@dataclass
class Ran:
    rc: int
    stdout: str
    stderr: str

    def assert_clean_failure(self, rc: int | tuple = (1, 2), match: str | None = None) -> str:
        """Non-zero exit (no signal), exactly one line on stderr, no traceback; returns that line."""
        codes = (rc,) if isinstance(rc, int) else rc
        assert self.rc in codes, f"exit {self.rc} (want {codes}); stderr:\n{self.stderr}"
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, f"want one line on stderr, got {len(lines)}:\n{self.stderr}"
        assert "Traceback" not in self.stderr + self.stdout
        assert re.match(r"ldm-(deploy|train)( \w+)?: error: ", lines[0]), lines[0]
        if match is not None:
            assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
        return lines[0]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1",
            "PYTHONWARNINGS": "ignore"}


def argv_of(*args, module: str = "ldm_deploy.cli") -> list[str]:
    args = [str(a) for a in args]
    if module == "ldm_deploy.cli" and args:
        args.insert(1, "-q")
    return [sys.executable, "-m", module, *args]


def cli(*args, timeout: float = 120, module: str = "ldm_deploy.cli") -> Ran:
    """`ldm-deploy CMD -q ARGS` (or `ldm-train ARGS` with module="training.cli") in a fresh process.

    `-q` keeps progress lines off stderr, so an error is exactly the one line there."""
    p = subprocess.run(argv_of(*args, module=module), capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)
    return Ran(p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory) -> Path:
    """A tiny SD-1-shaped diffusers folder (random weights, the real CLIP tokenizer)."""
    return make_tiny_folder(tmp_path_factory.mktemp("rel") / "model")


@pytest.fixture(scope="session")
def artifact(model_folder, tmp_path_factory) -> Path:
    """Its fp32 artifact, as `ldm-deploy export` writes it: batch 1..4, 32..64 px."""
    return export_tiny_artifact(model_folder, tmp_path_factory.mktemp("rel") / "onnx")


@pytest.fixture
def artifact_copy(artifact, tmp_path) -> Path:
    dst = tmp_path / "onnx"
    shutil.copytree(artifact, dst)
    return dst


@pytest.fixture
def folder_copy(model_folder, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model_folder, dst)
    return dst


def pytest_terminal_summary(terminalreporter):
    if FUZZ_COUNTS:
        total = sum(FUZZ_COUNTS.values())
        parts = ", ".join(f"{k} {v}" for k, v in FUZZ_COUNTS.items())
        terminalreporter.write_line(f"reliability fuzz inputs: {total} ({parts})")
    if KILLS:
        parts = ", ".join(f"{k} {v}" for k, v in KILLS.items())
        terminalreporter.write_line(f"reliability SIGKILLs survived: {sum(KILLS.values())} ({parts})")
