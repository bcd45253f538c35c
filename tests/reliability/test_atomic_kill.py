"""SIGKILL in the middle of a write: the previous output stays intact and a re-run completes.

Every writer builds under a temporary name beside its target and renames it into place
(fileio.atomic_dir / atomic_file): `ldm-deploy export` (the artifact folder), `ldm-train` (each
checkpoint folder, then latest.json), `ldm-deploy build` (each engine, then its sidecar). A killed
run leaves its `.NAME.<host>-<pid>.*.tmp` beside the target; it is never read, and the next write
of the same path deletes it (fileio.remove_stale_temporaries).

Kill points are events the process reports, never elapsed time: with LDM_DEPLOY_STOP_AT="PATTERN#N"
the writer stops itself (SIGSTOP) the N-th time it reaches a matching commit point of fileio
("file:NAME": a file complete under its temporary name, not yet renamed; "dir:NAME": the previous
folder moved aside, the new one not yet in place); the test waits for that stop and SIGKILLs it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ldm_deploy.artifact import Artifact
from tests.reliability.conftest import KILLS, REPO, argv_of, cli, env


def _kill_at(stop: str, *args, log: Path, module: str = "ldm_deploy.cli", timeout: float = 300) -> None:
    """Run the CLI with LDM_DEPLOY_STOP_AT=`stop`, wait until it has stopped itself there, SIGKILL it.

    Fails if the run ends before reaching the point. `timeout` only guards against a hang: the kill
    lands at the reported event whatever the machine's speed."""
    with open(log, "wb") as out:   # a file, not a pipe: a stopped child must never be blocked on a full pipe
        proc = subprocess.Popen(argv_of(*args, module=module), env={**env(), "LDM_DEPLOY_STOP_AT": stop},
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"{stop} not reached in {timeout} s:\n{log.read_text()[-2000:]}")
        time.sleep(0.02)
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)
        pytest.fail(f"the run ended (exit {proc.returncode}) before the kill point {stop}:\n{log.read_text()[-2000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == -signal.SIGKILL


def _count(writer: str) -> None:
    KILLS[writer] = KILLS.get(writer, 0) + 1


# ------------------------------------------------------------------------------------------------ export

@pytest.fixture
def export_yaml(tmp_path) -> Path:
    from ldm_deploy.export.config import write_config
    from tests.runtime.tiny_model import export_config

    path = tmp_path / "tiny.yaml"
    write_config(export_config(), path)
    return path


@pytest.mark.parametrize("stop", ["file:manifest.json", "dir:onnx"],
                         ids=["new-artifact-complete-but-manifest", "between-the-two-renames"])
def test_killed_export_keeps_the_previous_artifact(model_folder, artifact_copy, export_yaml, stop, tmp_path):
    before = (artifact_copy / "manifest.json").read_bytes()
    parent = artifact_copy.parent

    _kill_at(stop, "export", model_folder, "--out", artifact_copy, "--config", export_yaml, "--force",
             log=tmp_path / "killed.log")
    assert list(parent.glob(f".{artifact_copy.name}.*.tmp")), "the kill point was not inside the write"
    if stop.startswith("dir:"):   # the old folder is aside as `.onnx.*.old`: the next write puts it back
        assert not artifact_copy.exists()
        from ldm_deploy.fileio import remove_stale_temporaries
        remove_stale_temporaries(artifact_copy)
    assert (artifact_copy / "manifest.json").read_bytes() == before
    Artifact.open(artifact_copy, verify=True)  # every file still matches its recorded sha256
    _count("export")

    ran = cli("export", model_folder, "--out", artifact_copy, "--config", export_yaml, "--force", timeout=300)
    assert ran.rc == 0, ran.stderr
    after = Artifact.open(artifact_copy, verify=True)
    assert set(after.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert (artifact_copy / "manifest.json").read_bytes() != before  # a new export (new `created`)
    assert not list(parent.glob(f".{artifact_copy.name}.*")), "the killed run's temporary was not cleaned up"


# ------------------------------------------------------------------------------------------------ training

TRAIN = ["vae", "--config", "tiny", "--steps", "40", "--set", "vae.save_every=5", "--set", "vae.log_every=5",
         "--set", "vae.keep_checkpoints=2"]


def _final_loss(stdout: str) -> float:
    return json.loads(stdout[stdout.index("{"):])["final_loss"]


def _verify_checkpoint(run: Path) -> int:
    """latest.json points at a complete checkpoint whose weights load; returns its step."""
    from safetensors.torch import load_file

    root = run / "checkpoints" / "vae"
    latest = json.loads((root / "latest.json").read_text())
    folder = root / latest["dir"]
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == latest["step"]
    for f in folder.glob("*.safetensors"):
        assert load_file(str(f))
    import torch
    torch.load(folder / "state.pt", weights_only=True)
    return latest["step"]


def test_killed_training_resumes_to_the_same_losses(tmp_path):
    reference = cli(*TRAIN, "--out", tmp_path / "ref", module="training.cli", timeout=300)
    assert reference.rc == 0, reference.stderr

    run = tmp_path / "run"
    latest = run / "checkpoints" / "vae" / "latest.json"
    # the 3rd latest.json (step 15) is complete under its temporary name: the kill leaves step 10's
    _kill_at("file:latest.json#3", *TRAIN, "--out", run, module="training.cli", log=tmp_path / "killed.log")
    assert json.loads(latest.read_text())["step"] == 10
    assert _verify_checkpoint(run) == 10
    _count("training")

    resumed = cli(*TRAIN, "--out", run, "--resume", module="training.cli", timeout=300)
    assert resumed.rc == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert _verify_checkpoint(run) == 40
    assert not list((run / "checkpoints" / "vae").glob(".*.tmp")), "the killed run's temporary was not cleaned up"
    assert _final_loss(resumed.stdout) == _final_loss(reference.stdout)  # exact resume: bit-identical loss


# ------------------------------------------------------------------------------------------------ build

@pytest.mark.trt_build
def test_killed_build_keeps_consistent_engines(artifact, tmp_path):
    from ldm_deploy.engine import sidecar as sc

    engines = tmp_path / "engines"
    first = cli("build", artifact, "--out", engines, "--opt-level", "0", timeout=300)
    assert first.rc == 0, first.stderr

    def consistent():
        """Every engine with a sidecar has exactly the bytes that sidecar describes."""
        for side in engines.glob("*.engine.json"):
            component = side.name.removesuffix(".engine.json")
            sc.read_engine(engines, sc.read_sidecar(engines, component))
        return sorted(p.name for p in engines.glob("*.engine.json"))

    names = consistent()
    assert len(names) == 4
    # kill at different points of a forced rebuild: an engine written but not renamed in, a sidecar
    # written but not renamed in (its new engine already in place), and a later engine
    for stop in ("file:*.engine#1", "file:*.engine.json#2", "file:*.engine#3"):
        _kill_at(stop, "build", artifact, "--out", engines, "--opt-level", "0", "--force",
                 log=tmp_path / "killed.log")
        left = consistent()   # the component being written may have lost its sidecar: it is rebuilt below
        assert set(left) <= set(names) and len(left) >= len(names) - 1
        _count("build")
    again = cli("build", artifact, "--out", engines, "--opt-level", "0", timeout=300)
    assert again.rc == 0, again.stderr
    assert consistent() == names


# ------------------------------------------------------------------------------------------------ fileio

def test_stale_temporaries_are_removed_and_an_orphaned_old_dir_restored(tmp_path):
    """A writer killed between atomic_dir's two renames leaves only `.NAME.*.old`: the next writer restores it."""
    import socket

    from ldm_deploy.fileio import atomic_dir, remove_stale_temporaries

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is no longer running
    host = socket.gethostname()
    target = tmp_path / "artifact"
    orphan = tmp_path / f".artifact.{host}-{dead.pid}.abc.old"
    orphan.mkdir()
    (orphan / "manifest.json").write_text("previous")
    stray = tmp_path / f".artifact.{host}-{dead.pid}.def.tmp"
    stray.mkdir()
    live = tmp_path / f".artifact.{host}-{os.getpid()}.ghi.tmp"  # a live writer's temporary is left alone
    live.mkdir()
    remove_stale_temporaries(target)
    assert (target / "manifest.json").read_text() == "previous"
    assert not orphan.exists() and not stray.exists() and live.exists()
    with atomic_dir(target) as tmp:
        (tmp / "manifest.json").write_text("new")
    assert (target / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["artifact", live.name])
