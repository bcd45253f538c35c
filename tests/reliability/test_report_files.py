"""Data loss, for the files a command writes beside its real output: `bench --out RESULTS.json` (rewritten
after every side), `bench --chart PNG` and `debug-precision --json FILE` replace only an earlier file of the
same command (the JSON's "format", the chart's PNG Software text), never a user's own file, and refuse
before any work starts (exit 2, one line, the file untouched). Controls: an earlier file is accepted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm_deploy.errors import UsageError
from ldm_deploy.fileio import check_out_file
from tests.reliability.conftest import cli


def test_check_out_file(tmp_path):
    new = tmp_path / "new.json"
    check_out_file(new, "ldm-deploy-bench")                       # nothing there: fine
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"format": "ldm-deploy-bench", "results": []}))
    check_out_file(ours, "ldm-deploy-bench")                      # an earlier results file: fine
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "dir").mkdir()
    (tmp_path / "link.json").symlink_to(ours)
    for path in (other, tmp_path / "dir", tmp_path / "link.json", tmp_path / "notes.txt"):
        if path.name == "notes.txt":
            path.write_text("not json")
        with pytest.raises(UsageError, match="refusing to replace it"):
            check_out_file(path, "ldm-deploy-bench")
    with pytest.raises(UsageError, match="refusing to replace it"):
        check_out_file(ours, "ldm-deploy-precision-report", "--json")   # ours, but another command's


@pytest.mark.parametrize("flag", ["--out", "--chart"])
def test_bench_refuses_a_users_file(tmp_path, flag):
    mine = tmp_path / ("results.json" if flag == "--out" else "chart.png")
    mine.write_bytes(b'{"my": "own results"}' if flag == "--out" else b"\x89PNG\r\n\x1a\n not really")
    before = mine.read_bytes()
    args = ["--out", str(mine)] if flag == "--out" else ["--out", str(tmp_path / "r.json"), "--chart", str(mine)]
    r = cli("bench", "--preset", "tiny-quick", "--work", str(tmp_path / "work"), *args)
    assert r.rc == 2 and len(r.stderr.strip().splitlines()) == 1 and "refusing to replace" in r.stderr, r
    assert mine.read_bytes() == before
    assert not (tmp_path / "work").exists() and not (tmp_path / "r.json").exists()   # refused before any work


def test_debug_precision_refuses_a_users_json(tmp_path):
    mine = tmp_path / "report.json"
    mine.write_text('{"format": "ldm-deploy-bench"}')      # even one of our own files of another kind
    r = cli("debug-precision", str(tmp_path / "no-such-model"), "--json", str(mine))
    assert r.rc == 2 and len(r.stderr.strip().splitlines()) == 1 and "--json" in r.stderr, r
    assert mine.read_text() == '{"format": "ldm-deploy-bench"}'
