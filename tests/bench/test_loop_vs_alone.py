"""scripts/loop_vs_alone.py (where an ort-cuda U-Net call's time goes alone against inside the loop) runs its modes on
one runner and reports each with the runner's call split. CUDA faked as available, sessions on the CPU provider,
"device" buffers on the CPU; the script's code runs for real. Its numbers mean something on a GPU only."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from tests.bench.test_harness import tiny  # noqa: F401 (fixture)

ROOT_DIR = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("loop_vs_alone", ROOT_DIR / "scripts" / "loop_vs_alone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mode_is_measured_with_its_split(tiny, monkeypatch, tmp_path):  # noqa: F811
    import onnxruntime as ort

    from ldm_deploy.runtime.runners.ort import OrtBoundRunner, SessionFromArtifact

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(SessionFromArtifact, "_providers", lambda self, options: ["CPUExecutionProvider"])
    monkeypatch.setattr(SessionFromArtifact, "_check_provider", lambda self, session, path: None)
    monkeypatch.setattr(OrtBoundRunner, "_device_value", lambda self, shape, dtype:
                        ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype), "cpu", 0))
    script = _script()
    out = tmp_path / "loop.json"
    assert script.main(["--artifact", str(tiny[1]), "--batch", "1", "--steps", "3", "--out", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert list(run["modes"]) == list(script.MODES) and run["cuda_graph"] is True
    for mode, entry in run["modes"].items():
        assert entry["split"]["calls"] == 3 and entry["split"]["run"] > 0, mode
        assert entry["median_ms"] > 0, mode
    assert run["pipeline_total_ms"] > 0


def test_without_cuda_it_says_so_in_one_line(tiny, capsys, tmp_path):  # noqa: F811
    import onnxruntime as ort
    import pytest

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is here")
    out = tmp_path / "loop.json"
    assert _script().main(["--artifact", str(tiny[1]), "--batch", "1", "--steps", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDAExecutionProvider" in err[0] and not out.exists()


def test_a_users_file_at_out_is_refused_before_anything_runs(tiny, capsys, tmp_path):  # noqa: F811
    """--out naming a file the script did not write: one line, exit 1, the file untouched (checked before the
    artifact is even opened, so this holds without CUDA too)."""
    mine = tmp_path / "loop.json"
    mine.write_text("my notes")
    assert _script().main(["--artifact", str(tiny[1]), "--batch", "1", "--steps", "2", "--out", str(mine)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to replace" in err[0] and mine.read_text() == "my notes"
