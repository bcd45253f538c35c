"""Run the README's tour (the bash block between <!-- tour:start --> and <!-- tour:end -->) as written,
in a scratch folder, with the venv's console scripts on PATH. The tour uses the tiny preset, so no
substitution is needed; a command marked `# needs .[EXTRA]` is skipped where that extra is missing."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
NEEDS = {"tensorrt-rtx": "tensorrt_rtx_bindings", "tensorrt": "tensorrt", "gpu": "cuda"}


def tour_commands(text: str) -> list[str]:
    """Shell commands of the tour block: comments dropped, backslash continuations joined."""
    m = re.search(r"<!-- tour:start -->\s*```bash\n(.*?)```\s*<!-- tour:end -->", text, re.S)
    assert m, "README.md lost its <!-- tour:start --> ... <!-- tour:end --> bash block"
    joined = re.sub(r"\\\n\s*", "", m.group(1))
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _needs(command: str) -> str | None:
    m = re.search(r"#\s*needs \.\[([\w-]+)\]", command)
    return m.group(1) if m else None


def test_tour_is_train_export_validate_build_generate():
    commands = tour_commands(README.read_text())
    words = [shlex.split(c, comments=True)[:2] for c in commands]
    assert [w[0] for w in words] == ["ldm-train"] + ["ldm-deploy"] * (len(words) - 1)
    order = [w[1] for w in words]
    for a, b in zip(["all", "export", "validate", "build"], ["export", "validate", "build", "generate"]):
        assert order.index(a) < order.index(b), order


@pytest.mark.slow  # 50-65 s on 2 busy cores (training + export + validate + build + generate)
def test_readme_tour_runs(tmp_path):
    import importlib.util

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="2", TQDM_DISABLE="1")
    ran, skipped = [], []
    for command in tour_commands(README.read_text()):
        need = _needs(command)
        if need and importlib.util.find_spec(NEEDS[need]) is None:
            skipped.append(command)
            continue
        r = subprocess.run(["bash", "-c", f"set -euo pipefail\n{command}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        if r.returncode:
            pytest.fail(f"README tour command failed (exit {r.returncode}): {command}\n{r.stderr[-3000:]}")
        ran.append((command, r.stdout))
    image = tmp_path / "outputs" / "quickstart" / "image.png"
    assert image.is_file() and (tmp_path / "outputs" / "quickstart" / "onnx" / "manifest.json").is_file()
    validate_out = next(out for cmd, out in ran if cmd.startswith("ldm-deploy validate"))
    assert validate_out.rstrip().endswith("PASS")
    from ldm_deploy.runtime.image import read_png_metadata

    meta = read_png_metadata(image)
    assert meta["seed"] == "0" and meta["prompt"] == "a small red triangle at the top left on a white background"
    if not skipped:
        assert (tmp_path / "outputs" / "quickstart" / "onnx" / "engines" / "unet.engine.json").is_file()
