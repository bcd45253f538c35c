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


def test_preset_vae_precision_reaches_the_export(tmp_path, monkeypatch):
    """sd15-gpu exports the VAE in fp16, as its PyTorch sides run it; a preset's export settings, vae_precision
    included, are what the bench's export gets."""
    from ldm_deploy.bench import prepare

    assert load_preset("sd15-gpu").export.vae_precision == "fp16"
    seen = {}

    def stop(model_dir, out, config=None, **kwargs):
        seen.update(kwargs)
        raise LdmError("stopped before exporting")

    monkeypatch.setattr(prepare, "export_for_bench", stop)   # the command imports it when it runs
    p = tmp_path / "p.yaml"
    p.write_text("model: tiny\nexport: {precision: fp16, vae_precision: fp16, ort_cuda: true}\nsides: [ort-cpu]\n")
    assert main(["bench", "--preset", str(p), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r.json")]) != 0
    assert seen["precision"] == "fp16" and seen["vae_precision"] == "fp16" and seen["ort_cuda"] is True


def test_export_for_bench_exports_the_vae_in_the_precision_asked(tmp_path):
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.bench.prepare import export_for_bench, random_model_folder

    model, _ = random_model_folder("tiny", tmp_path / "model")
    done = export_for_bench(model, tmp_path / "onnx", precision="fp16", vae_precision="fp16")
    art = Artifact.open(tmp_path / "onnx")
    assert done["config"]["vae_precision"] == "fp16"
    assert art.component("vae_decoder").precision == "fp16" and art.component("unet").precision == "fp16"
