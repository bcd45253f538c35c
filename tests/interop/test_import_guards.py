"""`ldm-deploy import` keeps the guarantees of export (issue 17) on folders it did not write: the profiles it
records are protected by profiles_sha256, its profile ranges are bounded by ldm_deploy/limits.py, and the
external-data files a graph names stay inside the graph's folder. The source folder is our own
`export --layout optimum` of the tiny model (no optimum venv needed)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ldm_deploy.cli import main
from tests.runtime.tiny_model import export_tiny_artifact, make_tiny_folder

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory) -> Path:
    from ldm_deploy.interop.to_optimum import write_optimum_folder

    root = tmp_path_factory.mktemp("guards")
    art = export_tiny_artifact(make_tiny_folder(root / "model"), root / "onnx")
    return write_optimum_folder(art, root / "sd-onnx")


def test_imported_manifest_carries_profiles_sha256(onnx_folder, tmp_path):
    from ldm_deploy.artifact import Artifact, profiles_digest

    assert main(["-q", "import", str(onnx_folder), "--out", str(tmp_path / "art")]) == 0
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["profiles_sha256"] == profiles_digest(m)
    m["profiles"]["batch"]["max"] += 1                       # an edited profile is refused, as for an export
    (tmp_path / "art" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(Exception, match="edited after export"):
        Artifact.open(tmp_path / "art", verify=False)


def test_profile_over_the_limits_is_a_usage_error(onnx_folder, tmp_path, capsys):
    assert main(["-q", "import", str(onnx_folder), "--out", str(tmp_path / "art"), "--batch", "1:1:100000"]) == 2
    assert "over ldm-deploy's limit" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/hostname", "link.bin"])
def test_external_data_outside_the_folder_is_refused(onnx_folder, tmp_path, capsys, location):
    src = tmp_path / "src"
    shutil.copytree(onnx_folder, src)
    unet = onnx.load(str(src / "unet" / "model.onnx"))
    onnx.save_model(unet, str(src / "unet" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.pb", size_threshold=0)
    (src / "outside.bin").write_bytes((src / "unet" / "weights.pb").read_bytes())   # the same bytes, one level up
    (src / "unet" / "link.bin").symlink_to(src / "outside.bin")
    model = onnx.load(str(src / "unet" / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (src / "unet" / "model.onnx").write_bytes(model.SerializeToString())
    assert main(["-q", "import", str(src), "--out", str(tmp_path / "art")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("not inside" in err[0] or "outside" in err[0]), err
    assert not (tmp_path / "art").exists()


def test_link_out_of_the_source_folder_is_refused(onnx_folder, tmp_path, capsys):
    """The folder is hashed and read: a file that is a link out of it is refused (one line, exit 1), as
    for model folders (paths.check_tree), instead of being followed."""
    src = tmp_path / "src"
    shutil.copytree(onnx_folder, src)
    (tmp_path / "elsewhere.json").write_text((src / "unet" / "config.json").read_text())
    (src / "unet" / "config.json").unlink()
    (src / "unet" / "config.json").symlink_to(tmp_path / "elsewhere.json")
    assert main(["-q", "import", str(src), "--out", str(tmp_path / "art")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbolic link" in err[0], err
    assert not (tmp_path / "art").exists()


def test_foreign_out_is_refused_before_the_source_is_read(onnx_folder, tmp_path, capsys):
    """--out holding files we did not write is refused first: one line about --out, exit 2, the folder
    untouched, even when the source's graphs would fail to load (they are never read)."""
    src = tmp_path / "src"
    shutil.copytree(onnx_folder, src)
    (src / "unet" / "model.onnx").write_bytes(b"not an onnx graph")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["-q", "import", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists and is not" in err[0], err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
