"""ldm_deploy.paths.inside / check_tree and fileio.check_out_dir / atomic_dir, in process (the CLI
cases are in tests/reliability/test_overwrite.py and test_outside_folder.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.fileio import MARKER, OutputKind, atomic_dir, check_out_dir, has_marker, sha256_regular
from ldm_deploy.paths import check_tree, inside

KIND = OutputKind("thing", "a thing folder")


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "secret.txt").write_text("s")
    return tmp_path / "d"


@pytest.mark.parametrize("rel, match", [
    ("/etc/passwd", "not inside"), ("../secret.txt", "not inside"), ("sub/../../secret.txt", "not inside"),
    ("", "not a relative path"), ("a\0b", "not a relative path"),
])
def test_inside_refuses_paths_that_leave_the_folder(root, rel, match):
    with pytest.raises(LdmError, match=match):
        inside(root, rel, named_in=root / "manifest.json")


def test_inside_refuses_a_link_out_and_names_its_target(root):
    (root / "sub" / "out").symlink_to(root.parent / "secret.txt")
    with pytest.raises(LdmError, match=r"sub/out is a symbolic link to .*secret.txt, outside"):
        inside(root, "sub/out")
    (root / "linked").symlink_to(root.parent, target_is_directory=True)
    with pytest.raises(LdmError, match=r"linked is a symbolic link to"):
        inside(root, "linked/secret.txt")


def test_inside_accepts_links_that_stay_inside(root):
    (root / "sub" / "b.txt").symlink_to("../a.txt")
    assert inside(root, "sub/b.txt").read_text() == "a"
    check_tree(root)


def test_check_tree_refuses_a_fifo_and_sha256_regular_never_blocks_on_one(root):
    os.mkfifo(root / "sub" / "pipe")
    with pytest.raises(LdmError, match="pipe is not a regular file"):
        check_tree(root)
    with pytest.raises(LdmError, match="not a regular file"):
        sha256_regular(root / "sub" / "pipe")      # O_NONBLOCK: opening a FIFO with no writer returns at once


def test_sha256_regular_does_not_follow_a_link(root):
    (root / "l").symlink_to(root / "a.txt")
    with pytest.raises(LdmError, match="is a symbolic link"):
        sha256_regular(root / "l")


def test_check_out_dir_rules(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "x").write_text("x")
    inp = tmp_path / "in"
    (inp / "engines").mkdir(parents=True)
    with pytest.raises(UsageError, match="is not a thing folder"):
        check_out_dir(mine, KIND)
    assert check_out_dir(mine, KIND, force=True) == mine.resolve()
    (mine / MARKER).write_text('{"kind": "thing"}')
    assert check_out_dir(mine, KIND) == mine.resolve()                     # its own kind
    assert check_out_dir(tmp_path / "new", KIND) == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty", KIND) == (tmp_path / "empty").resolve()
    for out, rel in ((inp, "is the input"), (inp / "x", "is inside the input"), (tmp_path, "holds the input")):
        with pytest.raises(UsageError, match=rel):
            check_out_dir(out, KIND, inputs=[inp], force=True)
    assert check_out_dir(inp / "engines", KIND, inputs=[inp], allow_inside=[inp / "engines"]) == (inp / "engines").resolve()
    (tmp_path / "f").write_text("f")
    with pytest.raises(UsageError, match="is not a folder"):
        check_out_dir(tmp_path / "f", KIND, force=True)


def test_atomic_dir_writes_through_a_link_and_marks_its_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with atomic_dir(tmp_path / "link", KIND) as tmp:
        (tmp / "new.txt").write_text("n")
    assert (tmp_path / "link").is_symlink() and (real / "new.txt").is_file() and has_marker(real, "thing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]      # no .old, no .tmp
