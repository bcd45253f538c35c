"""Report side of the benchmark harness: FLOP floor view, Markdown table, README block, chart; no subprocesses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm_deploy.bench.harness import finish_record, floor_view, flop_counts, ratio
from ldm_deploy.bench.report import END, START, load_results, markdown_table, replace_block, stage_table, write_chart
from ldm_deploy.bench.spec import BenchSpec
from ldm_deploy.bench.timing import from_samples, measure_within
from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError, UsageError

H100 = {"gpus": ["NVIDIA H100 80GB HBM3, 81559 MiB, 580.00"], "cpu": "x", "cores": 16}


def _timing(ms: float) -> dict:
    return from_samples([ms * 0.98, ms, ms * 1.03]).as_dict()


def _record(side: str, batch: int, unet_ms: float, e2e_ms: float, dtype: str = "fp16", device: str = "cuda") -> dict:
    return {"side": side, "batch": batch, "status": "ok", "device": device, "dtype": dtype,
            "components_ms": {"text_encoder": _timing(3.0), "unet_step": _timing(unet_ms), "vae_decoder": _timing(40.0)},
            "end_to_end": _timing(e2e_ms), "peak_rss_mib": 3000.0, "peak_gpu_mib": 4000.0}


def _sd15_configs() -> dict:
    from training.models.presets import preset

    p = preset("sd15")
    return {"unet": p["unet"], "vae": p["vae"], "text_encoder": p["text_encoder"]}


def _sample_run() -> dict:
    flops = flop_counts(_sd15_configs(), 1, 512, 512, 50, 7.5)
    results = [finish_record(_record("ort-cuda", 1, 20.0, 1100.0), flops, H100, 1),
               finish_record(_record("torch-eager-fp16", 1, 40.0, 2200.0), flops, H100, 1),
               {"side": "tensorrt", "batch": 1, "status": "skipped", "reason": "TensorRT cannot execute here"},
               {"side": "torch-compile", "batch": 1, "status": "error", "error": "RuntimeError: boom | pipe"}]
    return {"format": "ldm-deploy-bench", "format_version": 1, "name": "h100-sd15", "machine": H100,
            "model": {"height": 512, "width": 512, "steps": 50, "guidance": 7.5}, "flops": {"1": flops},
            "results": results}


def test_flop_counts_follow_the_cfg_batch():
    flops = flop_counts(_sd15_configs(), 1, 512, 512, 50, 7.5)
    # one SD 1.5 U-Net forward at 64x64 latents is ~0.80 TFLOP; the CFG step runs it at batch 2
    assert 1.55e12 < flops["unet_step"] < 1.65e12
    assert flops["end_to_end"] == flops["text_encoder"] + 50 * flops["unet_step"] + flops["vae_decoder"]
    no_cfg = flop_counts(_sd15_configs(), 1, 512, 512, 50, 1.0)
    assert_close(no_cfg["unet_step"] * 2.0, flops["unet_step"], rtol=1e-9, atol=0)


def test_floor_view_is_flops_over_time_over_peak():
    flops = flop_counts(_sd15_configs(), 1, 512, 512, 50, 7.5)
    view = floor_view(_record("ort-cuda", 1, 20.0, 1100.0), flops, H100)
    assert view["peak_tflops"] == pytest.approx(989.4)
    expected = flops["unet_step"] / 20e-3 / 1e12 / 989.4
    assert view["unet_step_fraction_of_peak"] == pytest.approx(expected, abs=1e-4)
    assert view["unet_step_floor_ms"] == pytest.approx(flops["unet_step"] / 989.4e12 * 1e3, abs=1e-3)
    fp32 = floor_view(_record("torch-eager-fp32", 1, 60.0, 3000.0, dtype="fp32"), flops, H100)
    assert fp32["peak_tflops"] == pytest.approx(494.7) and fp32["peak_dtype"] == "tf32"
    assert floor_view(_record("ort-cpu", 1, 60.0, 3000.0, device="cpu"), flops, H100) is None
    assert floor_view({"status": "error"}, flops, H100) is None


def test_ratio_and_images_per_second():
    run = _sample_run()
    assert ratio(run, "ort-cuda", "torch-eager-fp16") == pytest.approx(2.0, abs=1e-3)
    assert ratio(run, "ort-cuda", "torch-compile") is None          # the baseline failed: no ratio
    assert run["results"][0]["images_per_s"] == pytest.approx(1 / 1.1, abs=1e-3)


def test_markdown_table_rows(tmp_path):
    path = tmp_path / "h100-sd15.json"
    path.write_text(json.dumps(_sample_run()))
    table = markdown_table(load_results([path]))
    lines = table.splitlines()
    assert len(lines) == 2 + 4
    assert all(line.count("|") == lines[0].count("|") for line in lines), table   # every row has every column
    ort = next(line for line in lines if "| ort-cuda |" in line)
    assert "2.00x vs torch-eager-fp16" in ort and "1.100" in ort
    assert "baseline" in next(line for line in lines if "| torch-eager-fp16 |" in line)
    assert "skipped: TensorRT cannot execute here" in table
    assert "RuntimeError: boom / pipe" in table                     # a '|' in an error cannot break the table


def test_stage_table_splits_the_end_to_end_time():
    run = _sample_run()
    table = stage_table(run, 1)
    ort = next(line for line in table.splitlines() if line.startswith("| ort-cuda |"))
    cells = [c.strip() for c in ort.strip("|").split("|")]
    # 3.0 + 50 * 20.0 + 40.0 = 1043 ms of stages in 1100 ms end to end: 57 ms of rest
    assert cells[1:6] == ["3.0", "1000", "40.0", "57.0", "1100"]
    floor = run["results"][0]["floor"]["end_to_end_floor_ms"]
    assert cells[6] == f"{floor:.0f}" and cells[7] == f"{1100 / floor:.1f}x"


def test_load_results_rejects_other_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(LdmError, match="not an ldm-deploy benchmark"):
        load_results([bad])


def test_replace_block_keeps_the_rest():
    text = f"# T\n\n## Performance\n\n{START}\nold table\n{END}\n\n## Next\nkept\n"
    new = replace_block(text, "| a |\n|---|\n")
    assert new == f"# T\n\n## Performance\n\n{START}\n| a |\n|---|\n{END}\n\n## Next\nkept\n"
    assert replace_block(new, "| a |\n|---|\n") == new              # idempotent
    with pytest.raises(LdmError, match="bench:start"):
        replace_block("# no markers\n", "x")


def test_chart_is_a_png(tmp_path):
    path = write_chart(_sample_run(), tmp_path / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measure_within_budget_cuts_repeats():
    import time

    t = measure_within(lambda: time.sleep(0.02), budget_s=0.05, warmup=0, repeats=10)
    assert 1 <= t.repeats <= 3
    t = measure_within(lambda: None, budget_s=10, warmup=1, repeats=4)
    assert t.repeats == 4 and t.warmup == 1


def test_spec_rejects_unknown_sides_and_keys():
    with pytest.raises(UsageError, match="unknown sides"):
        BenchSpec(sides=("ort-cpu", "onnx-magic"))
    with pytest.raises(UsageError, match="unknown bench spec keys"):
        BenchSpec.from_dict({"sides": ["ort-cpu"], "stepz": 3})
    spec = BenchSpec(sides=("ort-cuda",), batches=(1, 4))
    assert BenchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def _lever_run() -> dict:
    """A lever run: l0..l5 and ort-cuda with halving / shrinking U-Net steps, one failed row, references."""
    from ldm_deploy.bench.spec import LEVERS

    flops = flop_counts(_sd15_configs(), 1, 512, 512, 50, 7.5)
    steps = dict(zip([*LEVERS, "ort-cuda"], (40.0, 20.0, 18.0, 12.0, 10.0, 9.0, 8.0)))
    results = [finish_record(_record(side, 1, ms, 100.0 + 50 * ms), flops, H100, 1) for side, ms in steps.items()
               if side != "ort-cuda-l2-iobinding"]
    results.append({"side": "ort-cuda-l2-iobinding", "batch": 1, "status": "error", "error": "boom"})
    results += [finish_record(_record(side, 1, ms, 100.0 + 50 * ms), flops, H100, 1)
                for side, ms in (("ort-cuda-no-graph", 11.0), ("torch-eager-fp16", 36.0), ("torch-compile", 19.0))]
    return {"format": "ldm-deploy-bench", "format_version": 1, "name": "h200-sd15-levers", "machine": H100,
            "model": {"height": 512, "width": 512, "steps": 50, "guidance": 7.5}, "results": results}


def test_lever_table_rows_gain_over_the_row_above():
    from ldm_deploy.bench.report import lever_table

    table = lever_table(_lever_run(), 1)
    lines = table.splitlines()
    assert all(line.count("|") == lines[0].count("|") for line in lines), table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:9]}
    assert rows["0"][3] == "-" and rows["1"][3] == "2.00x"          # fp16: 40 -> 20 ms
    assert "boom" in rows["2"][2]                                   # a failed row says why ...
    assert rows["3"][3] == "1.67x"                                  # ... and the next compares with the last one that ran
    assert rows["6"][1].endswith("(= ort-cuda)") and rows["6"][3] == "1.12x"
    e2e_full, e2e_eager = 100 + 50 * 8.0, 100 + 50 * 36.0
    assert rows["6"][6] == f"{e2e_eager / e2e_full:.2f}x"
    no_graph = next(line for line in lines if "ort-cuda-no-graph" in line)
    assert f"{8.0 / 11.0:.2f}x vs full" in no_graph
    assert "ort-cuda-plain" not in table                             # not in the run: no row


def test_bench_table_renders_the_lever_block(tmp_path):
    """scripts/bench_table.py puts the lever runs (results/levers/*.json) in their own README block."""
    import importlib.util

    from ldm_deploy.bench.report import LEVERS_END, LEVERS_START, TUNING_END, TUNING_START

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("bench_table", root / "scripts" / "bench_table.py")
    bench_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_table)
    fake_root = tmp_path / "repo"
    (fake_root / "benchmarks" / "results" / "levers").mkdir(parents=True)
    (fake_root / "benchmarks" / "results" / "h100-sd15.json").write_text(json.dumps(_sample_run()))
    (fake_root / "benchmarks" / "results" / "levers" / "h200-sd15-levers.json").write_text(json.dumps(_lever_run()))
    readme = fake_root / "README.md"
    (fake_root / "benchmarks" / "results" / "tuning").mkdir()
    tuning_run = {**_sample_run(), "name": "h100-sd15-tuning-b1",
                  "results": [*_sample_run()["results"], {**_record("torch-compile-ro", 1, 7.0, 400.0),
                                                          "compile": {"mode": "reduce-overhead", "channels_last": True},
                                                          "compile_s": {"total": 70.0}}]}
    (fake_root / "benchmarks" / "results" / "tuning" / "h100-sd15-tuning-b1.json").write_text(json.dumps(tuning_run))
    readme = fake_root / "README.md"
    readme.write_text(f"# x\n{START}\nold\n{END}\n\n{LEVERS_START}\nold\n{LEVERS_END}\n"
                      f"{TUNING_START}\nold\n{TUNING_END}\nrest\n")
    bench_table.ROOT = fake_root
    assert bench_table.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    levers = text[text.index(LEVERS_START):text.index(LEVERS_END)]
    assert "h200-sd15-levers" in levers and "(= ort-cuda)" in levers and "ort-cuda-l0" not in text[:text.index(END)]
    assert "| ort-cuda |" in text[:text.index(END)] and text.endswith("rest\n")
    tuning = text[text.index(TUNING_START):text.index(TUNING_END)]
    assert "**h100-sd15-tuning-b1**" in tuning and "| `ort-cuda`: reference |" in tuning
    assert "| torch-compile-ro | reduce-overhead + channels_last | 70 |" in tuning and "old" not in tuning


def test_timing_check_flags_components_that_exceed_the_end_to_end():
    """The issue's CPU record: a 2780 ms U-Net step in a 25-step run that took 1.68 s end to end cannot add up."""
    from ldm_deploy.bench.harness import summary_line, timing_check

    spec = BenchSpec(steps=25)
    bad = _record("torch-eager-fp32", 1, 2780.0, 1680.0, dtype="fp32", device="cpu")
    bad["components_ms"]["unet_step"]["windows_median_ms"] = [2780.0, 19.0]
    bad["load_avg_1min"] = {"before": 6.1, "after": 1.2, "cores": 2}
    rec = finish_record(bad, {}, {"gpus": []}, 1, spec)
    check = rec["timing_check"]
    assert check["ok"] is False and check["slack"] == spec.timing_slack
    # 25 x 2780 x (0.98 + 1 + 1.03)/3 medians: the median of the three samples is the middle one
    assert check["components_sum_ms"] == pytest.approx(25 * 2780.0 + 3.0 + 40.0)
    assert "do not add up" in check["message"] and "[2780.0, 19.0]" in check["message"] and "6.1 on 2 cores" in check["message"]
    assert "[timings do not add up]" in summary_line(rec)
    run = {**_sample_run(), "results": [rec]}
    table = markdown_table([run])
    assert "2780 (!)" in table and "do not quote them" in table
    # a record whose parts fit within the end to end (plus the slack) passes and is not marked
    good = finish_record(_record("ort-cpu", 1, 20.0, 25 * 20.0 + 43.0), {}, {"gpus": []}, 1, spec)
    assert good["timing_check"]["ok"] is True and "(!)" not in markdown_table([{**run, "results": [good]}])
    # within the slack: 25 % over still passes, more does not
    edge = 25 * 20.0 + 43.0
    assert timing_check(_record("x", 1, 20.0, edge / 1.25), 25, 0.25)["ok"] is True
    assert timing_check(_record("x", 1, 20.0, edge / 1.26), 25, 0.25)["ok"] is False
    assert timing_check({"status": "ok"}, 25, 0.25) is None


def test_windowed_timing_keeps_each_window_median():
    from ldm_deploy.bench.timing import windowed

    t = windowed([[10.0, 11.0, 12.0], [100.0, 101.0, 99.0]], warmup=3)
    assert t["windows_median_ms"] == [11.0, 100.0] and t["repeats"] == 6 and t["warmup"] == 3
    assert t["median_ms"] == pytest.approx((12.0 + 99.0) / 2)


def test_versus_torch_and_tuning_tables():
    from ldm_deploy.bench.report import tuning_table, versus_torch_table

    flops = flop_counts(_sd15_configs(), 1, 512, 512, 50, 7.5)
    ro = _record("torch-compile-ro", 1, 7.0, 400.0)
    ro.update(compile={"mode": "reduce-overhead", "channels_last": True}, compile_s={"unet": 50.0, "total": 70.0},
              attention={"used": {"flash": 32}})
    results = [finish_record(_record("ort-cuda", 1, 8.0, 440.0), flops, H100, 1),
               finish_record(_record("ort-cuda-conv-heuristic", 1, 7.5, 420.0), flops, H100, 1),
               {"side": "ort-cuda-attn-cudnn-flash", "batch": 1, "status": "error", "error": "RuntimeError: no kernel"},
               finish_record(_record("torch-eager-fp16", 1, 17.0, 900.0), flops, H100, 1),
               finish_record(ro, flops, H100, 1),
               {"side": "torch-compile-max-autotune", "batch": 1, "status": "timeout",
                "compile": {"mode": "max-autotune", "channels_last": True},
                "error": "torch.compile mode=max-autotune did not finish within 180 s (timeout after 180 s)"}]
    run = {**_sample_run(), "results": results}
    table = versus_torch_table(run, 1)
    # in the run: (400 - 3 - 40) / 50 = 7.14 ms against (420 - 3 - 40) / 50 = 7.54 ms
    assert "reduce-overhead + channels_last | 70 | flash x32 | 7.00 | 7.14 | 0.400 | 0.93x | 0.95x | 0.95x |" in table
    assert "timeout: torch.compile mode=max-autotune did not finish within 180 s" in table
    assert ("ort-cuda-conv-heuristic against the best PyTorch side at B=1: U-Net step 0.93x (torch-compile-ro), "
            "in the run 0.95x (torch-compile-ro), end to end 0.95x (torch-compile-ro).") in table
    tuning = tuning_table(run, 1)
    assert "`ort-cuda-conv-heuristic`: cuDNN convolution algorithm search HEURISTIC | 7.50 | 1.07x | 0.420 | 1.05x |" in tuning
    assert "`ort-cuda-attn-cudnn-flash`" in tuning and "error: RuntimeError: no kernel" in tuning


def test_cli_levers_and_tuning_are_two_runs(tmp_path, capsys):
    from ldm_deploy.cli import main

    assert main(["bench", str(tmp_path), "--levers", "--tuning", "--out", str(tmp_path / "r.json")]) == 2
    assert "--levers and --tuning are two runs" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_spec_checks_compile_budget_and_slack():
    from ldm_deploy.bench.spec import COMPILE_SIDES, TORCH_SIDES, TUNING, TUNING_RUN

    with pytest.raises(UsageError, match="compile_budget_s"):
        BenchSpec(compile_budget_s=0)
    with pytest.raises(UsageError, match="timing_slack"):
        BenchSpec(timing_slack=-0.1)
    assert set(COMPILE_SIDES) <= set(TORCH_SIDES) and COMPILE_SIDES["torch-compile-ro"] == ("reduce-overhead", True)
    assert TUNING_RUN[:3] == ("ort-cuda", "torch-compile-ro", "torch-eager-fp16") and set(TUNING) <= set(TUNING_RUN)
    BenchSpec(sides=TUNING_RUN)   # every side is known


def test_a_file_that_is_not_a_bench_result_is_one_line_and_nothing_is_written(tmp_path, capsys):
    """Another tool's JSON beside the results (bench_sdxl's once), a truncated file, a JSON list: bench_table says
    which file and why in one line, exits 1, and leaves the README as it was."""
    import importlib.util

    from ldm_deploy.bench.report import load_results

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("bench_table", root / "scripts" / "bench_table.py")
    bench_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_table)
    results = tmp_path / "repo" / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "h100-sd15.json").write_text(json.dumps(_sample_run()))
    readme = tmp_path / "repo" / "README.md"
    readme.write_text(f"# x\n{START}\nold\n{END}\n")
    bench_table.ROOT = tmp_path / "repo"
    for name, text, why in (("sdxl.json", json.dumps({"workload": {}}), "not an ldm-deploy benchmark result"),
                            ("cut.json", '{"format": "ldm-deploy-bench", "res', "cannot be read as JSON"),
                            ("list.json", "[1, 2]", "format 'list'")):
        bad = results / name
        bad.write_text(text)
        with pytest.raises(LdmError, match=why):
            load_results([bad])
        assert bench_table.run(["--readme", str(readme)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0] and why in err[0]
        assert readme.read_text() == f"# x\n{START}\nold\n{END}\n"
        bad.unlink()
    assert bench_table.run(["--readme", str(readme)]) == 0 and "ort-cuda" in readme.read_text()
