"""Engine-test fixtures: the tiny artifact and its engines, each built once per session."""
from __future__ import annotations

import shutil

import pytest

from tests.engine.tiny_artifact import make_tiny_artifact

# Fast builds for tests: optimization level 0, a small workspace.
FAST = {"opt_level": 0, "workspace_mb": 64}


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    return make_tiny_artifact(tmp_path_factory.mktemp("tiny") / "onnx")


@pytest.fixture(scope="session")
def tiny_engines(tiny_artifact, tmp_path_factory):
    """(artifact dir, engine dir, BuildReport): every component built once, never modified."""
    from ldm_deploy.engine.build import BuildConfig, build_engines
    out = tmp_path_factory.mktemp("tiny") / "engines"
    report = build_engines(tiny_artifact, out, BuildConfig(**FAST))
    return tiny_artifact, out, report


@pytest.fixture
def engine_copy(tiny_engines, tmp_path):
    """A private copy of the artifact and engines that a test may change."""
    artifact, engines, _ = tiny_engines
    a, e = tmp_path / "onnx", tmp_path / "engines"
    shutil.copytree(artifact, a)
    shutil.copytree(engines, e)
    return a, e
