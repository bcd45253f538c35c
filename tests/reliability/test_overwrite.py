"""Data loss: a command that writes a folder never destroys files that are not its own.

Through the real CLI, each in a fresh process: an existing --out that is not an output of the
command's own kind is refused (exit 2, one line, every file of it untouched) unless --force; an --out
that is, lies inside or holds an input is refused even with --force; a symbolic-link --out is written
through (the link stays, the folder it points to is replaced) and no `.old` link is left behind.
Covers `export`, `convert`, `build`, `ldm-train` (and `lora`), `triton-repo` and `save_components` (one mechanism:
fileio.check_out_dir). Controls: the same commands where replacing is right (an artifact re-exported,
--force on a folder of one's own files) succeed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.reliability.conftest import cli


def snapshot(root: Path) -> dict:
    """Every entry under `root` (links not followed): relative path -> bytes, link target or 'dir'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            out[rel] = ("link", os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def user_folder(path: Path) -> Path:
    """A folder of someone's own files (nothing ldm-deploy wrote)."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.tex").write_text("\\documentclass{article}\n")
    (path / "notes" / "todo.txt").write_text("back up the thesis\n")
    return path


def export(model: Path, out: Path, *extra):
    return cli("export", model, "--out", out, "--config", "tiny", "--components", "vae_decoder", *extra, timeout=300)


# ------------------------------------------------------------------------------------------ refusals
# name -> (setup(tmp, model, artifact) -> (argv, folder whose files must survive), flags, stderr match)

def _export_into_user_folder(tmp, model, artifact):
    out = user_folder(tmp / "mine")
    return ["export", model, "--out", out, "--config", "tiny"], out


def _export_into_the_model(tmp, model, artifact):
    return ["export", model, "--out", model, "--config", "tiny"], model


def _export_inside_the_model(tmp, model, artifact):
    return ["export", model, "--out", model / "onnx", "--config", "tiny"], model


def _export_above_the_model(tmp, model, artifact):
    return ["export", model, "--out", model.parent, "--config", "tiny"], model.parent


def _export_over_a_file(tmp, model, artifact):
    (tmp / "x.onnx").write_bytes(b"not a folder")
    return ["export", model, "--out", tmp / "x.onnx", "--config", "tiny"], tmp


def _export_through_link_to_user_folder(tmp, model, artifact):
    target = user_folder(tmp / "mine")
    (tmp / "link").symlink_to(target, target_is_directory=True)
    return ["export", model, "--out", tmp / "link", "--config", "tiny"], tmp


def _export_through_link_to_the_model(tmp, model, artifact):
    (tmp / "link").symlink_to(model, target_is_directory=True)
    return ["export", model, "--out", tmp / "link", "--config", "tiny"], model


def _convert_into_user_folder(tmp, model, artifact):
    out = user_folder(tmp / "mine")
    (tmp / "sd.safetensors").write_bytes(b"never read: the --out check comes first")
    return ["convert", tmp / "sd.safetensors", "--out", out, "--tokenizer", model / "tokenizer"], out


def _convert_into_folder_holding_the_checkpoint(tmp, model, artifact):
    out = user_folder(tmp / "mine")
    (out / "sd.safetensors").write_bytes(b"the checkpoint being converted")
    return ["convert", out / "sd.safetensors", "--out", out, "--tokenizer", model / "tokenizer"], out


def _convert_into_the_tokenizer(tmp, model, artifact):
    (tmp / "sd.safetensors").write_bytes(b"x")
    return ["convert", tmp / "sd.safetensors", "--out", model / "tokenizer", "--tokenizer", model / "tokenizer"], model


def _build_into_user_folder(tmp, model, artifact):
    out = user_folder(tmp / "mine")
    return ["build", artifact, "--out", out], out


def _build_into_the_artifact(tmp, model, artifact):
    return ["build", artifact, "--out", artifact], artifact


def _build_above_the_artifact(tmp, model, artifact):
    return ["build", artifact, "--out", artifact.parent], artifact.parent


def _train_into_user_folder(tmp, model, artifact):
    out = user_folder(tmp / "mine")
    (out / "model").mkdir()
    (out / "model" / "weights-i-made.safetensors").write_bytes(b"precious")
    return ["tokenizer", "--config", "tiny", "--out", out], out


def _train_over_its_given_tokenizer(tmp, model, artifact):
    return ["tokenizer", "--config", "tiny", "--out", model, "--set", f"tokenizer.path={model / 'tokenizer'}"], model


def _export_optimum_layout_above_the_model(tmp, model, artifact):
    return ["export", model, "--out", model.parent, "--config", "tiny", "--layout", "optimum"], model.parent


def _triton_repo_over_the_artifact(tmp, model, artifact):
    # REPO/ldm would be the artifact itself: `--out PARENT` of an artifact folder named ldm
    art = tmp / "ldm"
    art.symlink_to(artifact, target_is_directory=True)
    return ["triton-repo", art, "--out", tmp, "--backend", "ort-cpu"], artifact


def _triton_repo_inside_the_artifact(tmp, model, artifact):
    return ["triton-repo", artifact, "--out", artifact, "--backend", "ort-cpu"], artifact


def _lora_into_user_folder(tmp, model, artifact):
    out = user_folder(tmp / "mine")
    return ["lora", "--base", model, "--out", out, "--steps", "1", "--device", "cpu", "--eval-prompts", "0"], out


def _lora_into_the_base(tmp, model, artifact):
    return ["lora", "--base", model, "--out", model, "--steps", "1", "--device", "cpu", "--eval-prompts", "0"], model


REFUSALS = {
    # name: (setup, run with --force (it must not apply), stderr match)
    "export into a folder of the user's files": (_export_into_user_folder, False, "is not an ldm-deploy artifact"),
    "export --out MODEL_DIR": (_export_into_the_model, True, "is the input"),
    "export --out inside MODEL_DIR": (_export_inside_the_model, True, "is inside the input"),
    "export --out above MODEL_DIR": (_export_above_the_model, True, "holds the input"),
    "export --out an existing file": (_export_over_a_file, True, "is not a folder"),
    "export --out a link to the user's folder": (_export_through_link_to_user_folder, False, "is not an ldm-deploy artifact"),
    "export --out a link to MODEL_DIR": (_export_through_link_to_the_model, True, "is the input"),
    "convert into a folder of the user's files": (_convert_into_user_folder, False, "is not a model folder written by"),
    "convert into the folder holding CKPT": (_convert_into_folder_holding_the_checkpoint, True, "holds the input"),
    "convert --out the tokenizer folder": (_convert_into_the_tokenizer, True, "is the input"),
    "build into a folder of the user's files": (_build_into_user_folder, False, "is not an engines folder"),
    "build --out ONNX_DIR": (_build_into_the_artifact, True, "is the input"),
    "build --out above ONNX_DIR": (_build_above_the_artifact, True, "holds the input"),
    "ldm-train into a folder of the user's files": (_train_into_user_folder, False, "is not an ldm-train run folder"),
    "ldm-train --out holding tokenizer.path": (_train_over_its_given_tokenizer, True, "holds the input"),
    "export --layout optimum --out above MODEL_DIR": (_export_optimum_layout_above_the_model, True, "holds the input"),
    "triton-repo whose REPO/ldm is the artifact": (_triton_repo_over_the_artifact, True, "is the input"),
    "triton-repo --out the artifact": (_triton_repo_inside_the_artifact, True, "is inside the input"),
    "ldm-train lora into a folder of the user's files": (_lora_into_user_folder, False, "is not a LoRA folder"),
    "ldm-train lora --out the base model": (_lora_into_the_base, True, "is the input"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refuses_to_replace_what_is_not_its_own(folder_copy, artifact_copy, tmp_path, case):
    """A folder of one's own files is refused without --force (with it, it is replaced: the control
    test_force_replaces_a_folder_of_ones_own_files); an input, a folder holding one, a folder inside one
    and a file are refused even with --force."""
    setup, force, match = REFUSALS[case]
    work = tmp_path / "work"
    work.mkdir()
    argv, guarded = setup(work, folder_copy, artifact_copy)
    argv += ["--force"] if force else []
    module = "training.cli" if case.startswith("ldm-train") else "ldm_deploy.cli"
    before, model_before, artifact_before = snapshot(guarded), snapshot(folder_copy), snapshot(artifact_copy)
    ran = cli(*argv, module=module, timeout=300)
    ran.assert_clean_failure(2, match)
    assert snapshot(guarded) == before, "files under --out were changed"
    assert snapshot(folder_copy) == model_before and snapshot(artifact_copy) == artifact_before
    assert not [p for p in work.iterdir() if p.name.startswith(".")], "a temporary was left behind"


def test_save_components_refuses_a_folder_it_did_not_write(tmp_path):
    """The Python API behind convert and ldm-train: the same refusal, before any weight is written."""
    from ldm_deploy.errors import UsageError
    from training.checkpoint import load_components, save_components
    from tests.runtime.tiny_model import make_tiny_folder

    comps = load_components(make_tiny_folder(tmp_path / "model"))
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(UsageError, match="is not a model folder written by ldm-deploy"):
        save_components(comps, mine)
    assert snapshot(mine) == before
    with pytest.raises(UsageError, match="holds the input"):
        save_components(comps, tmp_path / "model", force=True)   # its tokenizer_dir is model/tokenizer
    save_components(comps, tmp_path / "new")
    save_components(comps, tmp_path / "new")                     # its own folder: replaced
    assert (tmp_path / "new" / "model_index.json").is_file()


# ------------------------------------------------------------------------------------------ links and controls

def test_symlinked_out_is_written_through_without_leaving_an_old_link(model_folder, artifact, tmp_path):
    """`--out LINK` pointing at an artifact: the artifact it points to is replaced, the link stays a link,
    and nothing (no `.LINK.*.old`) is left beside either."""
    import shutil

    real = tmp_path / "disk" / "onnx"
    real.parent.mkdir()
    shutil.copytree(artifact, real)
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    ran = export(model_folder, link, "--force")
    assert ran.rc == 0, ran.stderr
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "manifest.json").is_file() and (real / "vae_decoder" / "model.onnx").is_file()
    leftovers = [p.name for d in (tmp_path, real.parent) for p in d.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"left behind: {leftovers}"


def test_force_replaces_a_folder_of_ones_own_files(model_folder, tmp_path):
    """The control for the refusals: with --force the same folder is replaced by the artifact."""
    out = user_folder(tmp_path / "mine")
    ran = export(model_folder, out, "--force")
    assert ran.rc == 0, ran.stderr
    assert (out / "manifest.json").is_file() and not (out / "thesis.tex").exists()


def test_an_artifact_is_replaced_without_force(model_folder, artifact_copy):
    """The control: re-exporting over an artifact (as the demo rewrites its outputs/demo/onnx) needs no
    --force (an empty folder neither: tests/test_paths_and_out_dirs.py)."""
    ran = export(model_folder, artifact_copy)
    assert ran.rc == 0, ran.stderr
    assert set(json.loads((artifact_copy / "manifest.json").read_text())["components"]) == {"vae_decoder"}
