"""`ldm-deploy bench --preset`: shipped runs (bench/presets/*.yaml) load strictly; options given win."""
from __future__ import annotations

import json

import pytest

from ldm_deploy.bench.preset import OPTIONS, load_preset, preset_names
from ldm_deploy.bench.spec import SIDES
from ldm_deploy.cli import main
from ldm_deploy.errors import LdmError, UsageError
from tests.bench.test_harness import tiny  # noqa: F401 (fixture)


@pytest.mark.parametrize("name", preset_names())
def test_shipped_presets_load_and_name_known_sides(name):
    preset = load_preset(name)
    assert set(preset.options()) <= set(OPTIONS) and set(preset.sides) <= set(SIDES)
    assert {"sd15-gpu", "tiny-quick"} <= set(preset_names())


def test_bad_presets_are_refused(tmp_path):
    with pytest.raises(UsageError, match="unknown bench preset 'nope'.*sd15-gpu"):
        load_preset("nope")
    p = tmp_path / "p.yaml"
    p.write_text("model: tiny\nexport: {precison: fp16}\n")
    with pytest.raises(LdmError, match="unknown keys export.precison"):
        load_preset(str(p))
    p.write_text("model: tiny\nsteps: 0\n")
    with pytest.raises(LdmError, match="steps = 0 is outside"):
        load_preset(str(p))
    assert main(["bench", "--out", str(tmp_path / "r.json")]) == 2          # neither a folder nor a preset


def test_preset_fills_only_what_is_not_given(tiny, tmp_path):  # noqa: F811
    """tiny-quick's model folder is built in --work; `--batch 1` (the option's default value, given) beats the
    preset's batches 1 and 4; steps / size / note come from the preset."""
    _, artifact, _ = tiny
    out = tmp_path / "r.json"
    assert main(["bench", "--preset", "tiny-quick", "--work", str(tmp_path / "work"), "--artifact", str(artifact),
                 "--sides", "ort-cpu", "--batch", "1", "--repeats", "1", "--component-repeats", "1",
                 "--component-warmup", "0", "--threads", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    spec = results["spec"]
    assert spec["batches"] == [1] and spec["sides"] == ["ort-cpu"] and spec["repeats"] == 1
    assert spec["steps"] == 3 and spec["height"] == 64 and spec["note"] == "quick smoke test (tiny preset)"
    assert spec["timeout_s"] == 420 and 0 < spec["total_budget_s"] <= 420
    assert (tmp_path / "work" / "tiny-model" / "model_index.json").is_file()
    assert [r["status"] for r in results["results"]] == ["ok"]
