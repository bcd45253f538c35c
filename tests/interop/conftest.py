"""Folders made by the real libraries: a tiny SD1 and SD2 (v-prediction) diffusers folder, their
`optimum-cli export onnx --task text-to-image` export and diffusers' own PyTorch images, all produced in
the optimum venv (`make setup-optimum`; optimum pins transformers < 4.58) by tests/interop/optimum_side.py.

Skipped only where that venv is absent; `make test` creates it, so CI runs these.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
OPTIMUM_PYTHON = Path(os.environ.get("LDM_OPTIMUM_PYTHON", ROOT / ".venv-optimum" / "bin" / "python"))
SIDE = Path(__file__).with_name("optimum_side.py")
PROMPTS = ["a red circle on a blue square", "a green triangle"]
NEGATIVE, STEPS, GUIDANCE = "blurry", 4, 7.5       # as optimum_side.py


def optimum_side(*args: str, script: Path = SIDE) -> None:
    """Run `script` (optimum_side.py, or lora_side.py) in the optimum venv; its output is shown only when it fails."""
    if not OPTIMUM_PYTHON.is_file():
        pytest.skip(f"the optimum venv is absent ({OPTIMUM_PYTHON}): run `make setup-optimum`")
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(OPTIMUM_PYTHON), str(script), *args], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="session")
def interop_inputs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("interop-inputs")
    latents = np.random.default_rng(1234).standard_normal((2, 4, 4, 4), dtype=np.float32)   # 32x32 images
    np.save(d / "latents.npy", latents)
    (d / "prompts.json").write_text(json.dumps(PROMPTS))
    return {"latents": latents, "latents_file": str(d / "latents.npy"), "prompts_file": str(d / "prompts.json")}


_CASES: dict = {}


def _case(family: str, tmp_path_factory, inputs: dict) -> dict:
    """{family, model (diffusers folder), optimum (its Optimum export), reference (scheduler -> uint8 images),
    imported (the artifact `import` made of it)}; made once per session and family."""
    if family not in _CASES:
        from ldm_deploy.interop.importer import import_onnx_folder

        out = tmp_path_factory.mktemp(f"optimum-{family}")
        optimum_side("prepare", "--family", family, "--out", str(out),
                     "--latents", inputs["latents_file"], "--prompts", inputs["prompts_file"])
        ref = np.load(out / "reference.npz")
        _CASES[family] = {"family": family, "model": out / "model", "optimum": out / "optimum",
                          "reference": {k: ref[k] for k in ref.files},
                          "imported": import_onnx_folder(out / "optimum", out / "imported").path}
    return _CASES[family]


@pytest.fixture(scope="session", params=["sd1", "sd2"])
def optimum_case(request, tmp_path_factory, interop_inputs) -> dict:
    """Both families: the parity tests."""
    return _case(request.param, tmp_path_factory, interop_inputs)


@pytest.fixture(scope="session")
def optimum_sd1(tmp_path_factory, interop_inputs) -> dict:
    """SD1 only: tests of behaviour that does not depend on the family (CLI, bad input, caching)."""
    return _case("sd1", tmp_path_factory, interop_inputs)


@pytest.fixture(scope="session")
def imported(optimum_case) -> Path:
    return optimum_case["imported"]


@pytest.fixture(scope="session")
def imported_sd1(optimum_sd1) -> Path:
    return optimum_sd1["imported"]
