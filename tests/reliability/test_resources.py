"""Too little disk: a clear one-line error before work starts (export, build, model-folder save)
or at the first write (training checkpoints), with nothing written. The free-space probe
(shutil.disk_usage, read by fileio.check_free_space) is patched to report 1 MiB free, and the
step that does the work is replaced by a spy that fails the test if it is reached.
"""
from __future__ import annotations

import collections
import shutil

import pytest

from ldm_deploy.errors import LdmError

Usage = collections.namedtuple("Usage", "total used free")


@pytest.fixture
def full_disk(monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100 << 30, (100 << 30) - (1 << 20), 1 << 20))


def _main(argv, capsys) -> str:
    from ldm_deploy.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    return err[0]


def _work_must_not_start(*args, **kwargs):
    raise AssertionError("work started despite too little disk space")


def test_export_checks_space_before_tracing(model_folder, tmp_path, full_disk, monkeypatch, capsys):
    from ldm_deploy.export import exporter

    monkeypatch.setattr(exporter, "load_source", _work_must_not_start)
    out = tmp_path / "onnx"
    line = _main(["export", str(model_folder), "--out", str(out), "-q"], capsys)
    assert "not enough disk space for the ONNX export" in line
    assert not out.exists()


@pytest.mark.trt_build
def test_build_checks_space_before_building(artifact, tmp_path, full_disk, monkeypatch, capsys):
    from ldm_deploy.engine import build

    monkeypatch.setattr(build, "build_engine", _work_must_not_start)
    out = tmp_path / "engines"
    line = _main(["build", str(artifact), "--out", str(out), "-q"], capsys)
    assert "not enough disk space for the text_encoder engine" in line
    assert not out.exists()


def test_model_folder_save_checks_space_first(model_folder, tmp_path, full_disk):
    from training.checkpoint import load_components, save_components

    comps = load_components(model_folder)
    with pytest.raises(LdmError, match="not enough disk space for writing"):
        save_components(comps, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_training_checkpoint_fails_cleanly(tmp_path, full_disk, capsys):
    from training.cli import main

    run = tmp_path / "run"
    rc = main(["vae", "--config", "tiny", "--out", str(run), "--steps", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    errors = [line for line in err if "error" in line]  # the rest is the progress bar
    assert len(errors) == 1 and errors[0].startswith("ldm-train: error: not enough disk space for the vae checkpoint")
    assert not list((run / "checkpoints").rglob("*.safetensors")) if (run / "checkpoints").exists() else True


def test_stage_output_checks_space_first(tmp_path, full_disk):
    from training.models.presets import build_models, preset
    from training.stages.parts import save_part

    _, vae, _ = build_models(preset("tiny"), seed=0)
    with pytest.raises(LdmError, match="not enough disk space for the trained vae"):
        save_part("vae", vae, tmp_path / "vae")
    assert not (tmp_path / "vae").exists()
