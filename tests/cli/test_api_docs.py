"""Run the Python blocks of docs/api.md, top to bottom in one namespace, on a tiny model.

The working folder is prepared as the page says (a trained model at runs/tiny/model); the code run is
the page's text. A block preceded by `<!-- needs: X -->` is skipped where X is missing, never faked.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.runtime.tiny_model import tiny_folder  # noqa: F401 (fixture)

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
BLOCK = re.compile(r"(?:<!-- needs: (?P<needs>[\w-]+) -->\n)?```python\n(?P<code>.*?)```", re.S)


def doc_blocks(text: str) -> list[tuple[str | None, str]]:
    return [(m["needs"], m["code"]) for m in BLOCK.finditer(text)]


def _available(need: str | None) -> tuple[bool, str]:
    from tests import conftest

    probes = {
        "gpu": (conftest._has_cuda_gpu, "needs a CUDA GPU with onnxruntime-gpu"),
        "trt_build": (conftest._has_trt_builder, "needs tensorrt or tensorrt_rtx_bindings"),
        "tensorrt": (conftest._trt_can_run, "needs a GPU that TensorRT can execute on"),
        "checkpoint": (lambda: False, "needs an original SD checkpoint file (convert is tested in tests/training)"),
    }
    if need is None:
        return True, ""
    probe, why = probes[need]
    return probe(), why


def test_blocks_are_found_and_marked():
    blocks = doc_blocks(DOC.read_text())
    assert len(blocks) >= 10
    assert {n for n, _ in blocks} == {None, "gpu", "tensorrt", "trt_build", "checkpoint"}
    for name in ("export_model", "validate", "build_engines", "Pipeline.from_artifact", "inspect_path",
                 "run_demo", "convert_checkpoint"):
        assert any(name in code for _, code in blocks), name


def test_api_docs_run(tiny_folder, tmp_path, monkeypatch, capsys):  # noqa: F811
    shutil.copytree(tiny_folder, tmp_path / "runs" / "tiny" / "model")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "api_docs"}
    ran, skipped = 0, []
    for i, (need, code) in enumerate(doc_blocks(DOC.read_text())):
        ok, why = _available(need)
        if not ok:
            skipped.append(f"block {i}: {why}")
            continue
        try:
            exec(compile(code, f"docs/api.md block {i}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"docs/api.md block {i} failed: {type(e).__name__}: {e}\n{code}")
        ran += 1
    out = capsys.readouterr().out
    assert "max abs pixel difference vs PyTorch:" in out and "UNet2DConditionModel" in out
    assert (tmp_path / "outputs" / "api" / "demo" / "grid.png").is_file()
    assert (tmp_path / "outputs" / "api" / "triangle.png").is_file()
    assert ran >= 9, skipped
    print("skipped:", skipped)
