"""Engine compatibility refusals seen from `ldm-deploy generate --backend tensorrt`: one line, exit 1,
nothing written. Each check itself (TensorRT flavour and version, compute capability, no GPU, ONNX
hash, truncated / corrupted / missing engine, missing / foreign sidecar) is pinned at the API level
in tests/engine/test_refusals.py; here every path goes through the CLI on engines built (TensorRT for
RTX, on the CPU) from the exported tiny artifact. The GPU query is answered by a stand-in GPU so
the checks past "no GPU" are reached on a machine without one.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest

from ldm_deploy.engine import sidecar as sc
from ldm_deploy.runtime import cuda
from tests.reliability.test_bad_files import random_bytes, rehash

pytestmark = pytest.mark.trt_build


@pytest.fixture(scope="module")
def engines(artifact, tmp_path_factory):
    from ldm_deploy.engine.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("rel_engines") / "engines"
    build_engines(artifact, out, BuildConfig(opt_level=0, workspace_mb=64))
    return out


@pytest.fixture
def copies(artifact, engines, tmp_path):
    a, e = tmp_path / "onnx", tmp_path / "engines"
    shutil.copytree(artifact, a)
    shutil.copytree(engines, e)
    for side in e.glob("*.engine.json"):  # point the sidecars at the copied artifact
        s = json.loads(side.read_text())
        s["artifact"] = str(a)
        side.write_text(json.dumps(s))
    return a, e


def _gpu(monkeypatch, cc=(8, 9), name="NVIDIA GeForce RTX 4090"):
    monkeypatch.setattr(cuda, "gpu_info", lambda device=0: None if cc is None else cuda.GpuInfo(device, name, cc))


def _edit_sidecar(engines, component, fn):
    path = sc.sidecar_path(engines, component)
    s = json.loads(path.read_text())
    fn(s)
    path.write_text(json.dumps(s))


def _targets(engines) -> list[str]:
    return json.loads(sc.sidecar_path(engines, "text_encoder").read_text())["key"]["compute_capabilities"]


CASES = {
    "no GPU": (lambda a, e, mp: _gpu(mp, None), "needs a CUDA GPU"),
    "other TensorRT version": (lambda a, e, mp: _edit_sidecar(e, "text_encoder", lambda s: s["key"].update(
        tensorrt_version="1.0.0.0")), "engines only load in the exact version"),
    "other TensorRT flavour": (lambda a, e, mp: _edit_sidecar(e, "text_encoder", lambda s: s["key"].update(
        flavour="tensorrt")), "TensorRT backend .tensorrt. is not installed|built with TensorRT but"),
    "other compute capability": (lambda a, e, mp: _gpu(mp, (3, 0), "NVIDIA Tesla K80"),
                                 r"built for compute capability .* is 3\.0"),
    "ONNX changed since the build": (lambda a, e, mp: (
        (a / "text_encoder" / "model.onnx").write_bytes((a / "text_encoder" / "model.onnx").read_bytes() + b"\0"),
        rehash(a)), "built from a different ONNX"),
    "engine truncated": (lambda a, e, mp: (e / "text_encoder.engine").write_bytes(
        (e / "text_encoder.engine").read_bytes()[:1000]), "truncated"),
    "engine corrupted": (lambda a, e, mp: (e / "text_encoder.engine").write_bytes(
        random_bytes((e / "text_encoder.engine").stat().st_size)), "corrupted"),
    "engine missing": (lambda a, e, mp: (e / "text_encoder.engine").unlink(), "is missing"),
    "sidecar random bytes": (lambda a, e, mp: sc.sidecar_path(e, "text_encoder").write_bytes(random_bytes(300)),
                             "sidecar .* is unreadable"),
    "sidecar missing": (lambda a, e, mp: sc.sidecar_path(e, "text_encoder").unlink(), "no engine for 'text_encoder'"),
    "sidecar of another format": (lambda a, e, mp: _edit_sidecar(e, "text_encoder", lambda s: s.update(
        format_version=99)), "not an ldm-deploy engine sidecar"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generate_tensorrt_refuses(copies, tmp_path, monkeypatch, capsys, case):
    from ldm_deploy.cli import main

    artifact, engines = copies
    _gpu(monkeypatch)
    damage, match = CASES[case]
    damage(artifact, engines, monkeypatch)
    out = tmp_path / "x.png"
    rc = main(["generate", "-q", str(artifact), "--backend", "tensorrt", "--engine-dir", str(engines),
               "--prompt", "a red cube", "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("ldm-deploy: error: ") and "Traceback" not in err[0]
    assert re.search(match, err[0]), err[0]
    assert not out.exists()
