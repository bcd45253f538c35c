"""Run every (batch, side) of a BenchSpec in its own subprocess and collect one results JSON.

    spec = BenchSpec(model_dir="models/shapes-demo", artifact="out/demo-onnx", sides=("ort-cpu", "torch-eager-fp32"))
    results = run_bench(spec, "benchmarks/results/cpu-demo.json", chart="benchmarks/results/cpu-demo.png")

Batches are the outer loop (every side's batch-1 number lands before any batch-4 run), and the JSON is
rewritten after each side, so a run cut short keeps what finished. Results JSON (format_version 1):

    {"format": "ldm-deploy-bench", "format_version": 1, "created": ..., "name": ...,
     "machine": machine_info(), "note": ..., "spec": BenchSpec.to_dict(),
     "model": {"height", "width", "steps", "guidance", "scheduler", "params": {...}},
     "flops": {"<B>": {"text_encoder", "unet_step", "vae_decoder", "end_to_end"}},   # analytic, flops.py
     "export": {...} | null,                                                      # export / variant timings
     "results": [{"side", "batch", "status": ok|error|skipped|timeout, "error"|"reason",
                  "components_ms": {"text_encoder"|"unet_step"|"vae_decoder": Timing + "windows_median_ms"},
                  "end_to_end": Timing, "images_per_s", "load_s", "load_avg_1min",
                  "compile": {"mode", "channels_last", ...}, "compile_s": {"unet", "text_encoder", "vae_decoder",
                  "total"}, "attention": {"used": {...}}, "timing_check": {"ok", ...}, "peak_rss_mib",
                  "peak_gpu_mib", "gpu_memory_method", "scheduler_overhead", "floor": {...}, ...}]}
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from ldm_deploy import flops as F
from ldm_deploy.artifact import Artifact, is_artifact
from ldm_deploy.bench.machine import gpu_peak_tflops, machine_info
from ldm_deploy.bench.spec import (COMPILE_SIDES, FORMAT, FORMAT_VERSION, ORT_SIDES, SIDE_NOTES, TORCH_SIDES,
                                   BenchSpec)
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.fileio import write_json

ROOT = Path(__file__).resolve().parents[2]


def model_configs(spec: BenchSpec) -> dict:
    """The unet / vae / text_encoder config dicts: from the artifact's manifest, else the model folder."""
    if spec.artifact and is_artifact(spec.artifact):
        return {k: dict(v) for k, v in Artifact(spec.artifact, verify=False).model_configs.items()}
    if spec.model_dir:
        folder = Path(spec.model_dir)
        return {part: json.loads((folder / part / "config.json").read_text(encoding="utf-8"))
                for part in ("unet", "vae", "text_encoder")}
    raise UsageError("a benchmark needs a model folder (torch sides) or an artifact (deployed sides)")


def resolve_size(spec: BenchSpec, configs: dict) -> tuple[int, int]:
    """Image size: the spec's, else the artifact profile's opt, else the U-Net's sample_size * 8."""
    profiles = Artifact(spec.artifact, verify=False).profiles if spec.artifact and is_artifact(spec.artifact) else None
    default = int(configs["unet"].get("sample_size", 64)) * 8
    height = spec.height or (profiles.height.opt if profiles else default)
    width = spec.width or (profiles.width.opt if profiles else default)
    return int(height), int(width)


def flop_counts(configs: dict, batch: int, height: int, width: int, steps: int, guidance: float) -> dict:
    """Analytic FLOPs of each stage at this batch: U-Net at 2B under CFG, text encoder over 2B rows."""
    rows = 2 * batch if guidance > 1 else batch
    h, w = height // 8, width // 8
    te = F.text_encoder_flops(configs["text_encoder"], 77, rows)
    unet = F.unet_flops(configs["unet"], h, w, rows, 77)
    vae = F.vae_decoder_flops(configs["vae"], h, w, batch)
    return {"text_encoder": te, "unet_step": unet, "vae_decoder": vae, "end_to_end": te + steps * unet + vae}


def floor_view(record: dict, flops: dict, machine: dict) -> dict | None:
    """Achieved TFLOP/s and the fraction of the card's dense peak (the FLOP floor / measured time)."""
    if record.get("status") != "ok" or record.get("device", "cpu") == "cpu" or not machine.get("gpus"):
        return None
    peak = gpu_peak_tflops(machine["gpus"][0], record.get("dtype") or "fp32")
    view = {"peak_tflops": peak, "peak_dtype": "fp16" if record.get("dtype") == "fp16" else "tf32"}
    for stage, timing in (("unet_step", record["components_ms"]["unet_step"]), ("end_to_end", record["end_to_end"])):
        tflops = flops[stage] / (timing["median_ms"] * 1e-3) / 1e12
        view[f"{stage}_tflops"] = round(tflops, 2)
        view[f"{stage}_fraction_of_peak"] = round(tflops / peak, 4) if peak else None
        view[f"{stage}_floor_ms"] = round(flops[stage] / (peak * 1e12) * 1e3, 3) if peak else None
    return view


def timeout_record(side: str, batch: int, timeout_s: float, wall_s: float) -> dict:
    """The record of a side its time limit ended before it wrote one. A torch.compile side is a timeout with its
    recipe named (the tables show it as one, like a compile past its own budget), since the limit may have cut
    its compile short (a run's --time-limit can leave a side less than its --compile-budget); others an error."""
    record = {"side": side, "batch": batch, "status": "error", "error": f"timed out after {timeout_s:.0f} s",
              "wall_s": round(wall_s, 1)}
    if side in COMPILE_SIDES:
        mode, channels_last = COMPILE_SIDES[side]
        record.update(status="timeout", compile={"mode": mode, "channels_last": channels_last},
                      error=f"ended by the side's time limit ({timeout_s:.0f} s) before it wrote a record: "
                            f"torch.compile mode={mode} (compile or measurement) had not finished")
    return record


def run_side(case: dict, timeout_s: float, log: Callable[[str], None]) -> dict:
    """Run one worker subprocess; whatever happens, return a record (fail soft)."""
    side, batch = case["side"], case["batch"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    threads = case["spec"].get("threads")
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as tmp:
        case_file, out_file = Path(tmp) / "case.json", Path(tmp) / "result.json"
        case_file.write_text(json.dumps(case), encoding="utf-8")
        start = time.perf_counter()
        # the worker leads its own process group, so a timeout ends it with every process it started
        # (torch.compile's compile workers); stderr goes to a file, which no leftover child can hold open
        with open(Path(tmp) / "stderr.txt", "w+", encoding="utf-8") as err:
            proc = subprocess.Popen([sys.executable, "-m", "ldm_deploy.bench.worker", str(case_file), str(out_file)],
                                    cwd=str(ROOT), env=env, stderr=err, start_new_session=True)
            try:
                proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)
            err.seek(0)
            stderr = err.read()
        if timed_out:
            return timeout_record(side, batch, timeout_s, time.perf_counter() - start)
        if out_file.is_file():
            return json.loads(out_file.read_text(encoding="utf-8"))
        tail = [line for line in stderr.splitlines() if line.strip() and not line.startswith("USDT:")][-3:]
        return {"side": side, "batch": batch, "status": "error",
                "error": f"worker exited with code {proc.returncode}: {' | '.join(tail)[-500:]}",
                "wall_s": round(time.perf_counter() - start, 1)}


def _kill_group(proc: subprocess.Popen) -> None:
    """End what is left of the worker's process group (its own id, from start_new_session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _check_inputs(spec: BenchSpec) -> None:
    if any(s in TORCH_SIDES for s in spec.sides) and not spec.model_dir:
        raise UsageError("torch sides need the model folder", hint="pass --model-dir DIR or drop the torch sides")
    if any(s not in TORCH_SIDES for s in spec.sides) and not spec.artifact:
        raise UsageError("deployed sides need an exported artifact", hint="pass --artifact DIR (or export first)")
    for what, path in (("model folder", spec.model_dir), ("artifact", spec.artifact)):
        if path and not Path(path).is_dir():
            raise LdmError(f"{what} {path} does not exist")


def run_bench(spec: BenchSpec, out: str | Path, *, chart: str | Path | None = None, name: str | None = None,
              export: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """Benchmark every (batch, side) of `spec`; write `out` (JSON) after each, then the chart. Returns the dict."""
    _check_inputs(spec)
    configs = model_configs(spec)
    height, width = resolve_size(spec, configs)
    machine = machine_info()
    results = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "name": name or Path(out).stem, "machine": machine, "note": spec.note, "spec": spec.to_dict(),
        "sides": {s: SIDE_NOTES[s] for s in spec.sides},
        "model": {"height": height, "width": width, "steps": spec.steps, "guidance": spec.guidance,
                  "scheduler": spec.scheduler, "params": _param_counts(configs)},
        "flops": {str(b): flop_counts(configs, b, height, width, spec.steps, spec.guidance) for b in spec.batches},
        "export": export, "results": [],
    }
    out = Path(out)
    write_json(out, results)
    start = time.perf_counter()
    for batch in spec.batches:
        for side in spec.sides:
            elapsed = time.perf_counter() - start
            if spec.total_budget_s is not None and elapsed > spec.total_budget_s:
                record = {"side": side, "batch": batch, "status": "skipped",
                          "reason": f"run time budget of {spec.total_budget_s:.0f} s spent ({elapsed:.0f} s)"}
                results["results"].append(record)
                write_json(out, results)
                log(f"[bench] {side} batch {batch}: {record['reason']}")
                continue
            log(f"[bench] {side} batch {batch} ({height}x{width}, {spec.steps} steps) ...")
            case = {"spec": spec.to_dict(), "side": side, "batch": batch, "height": height, "width": width}
            timeout = spec.timeout_s
            if spec.total_budget_s is not None:   # leave the last side enough to finish, not unbounded
                timeout = min(timeout, max(60.0, spec.total_budget_s + 60.0 - elapsed))
            record = run_side(case, timeout, log)
            record = finish_record(record, results["flops"][str(batch)], machine, batch, spec)
            results["results"].append(record)
            write_json(out, results)
            log(f"[bench] {side} batch {batch}: {summary_line(record)}")
            if (record.get("timing_check") or {}).get("ok") is False:
                log(f"[bench] WARNING {side} batch {batch}: {record['timing_check']['message']}")
    if chart:
        from ldm_deploy.bench.report import write_chart

        try:
            write_chart(results, chart)
        except Exception as e:  # noqa: BLE001 - the JSON is the result; a chart failure must not lose it
            log(f"[bench] chart not written: {e}")
    return results


def finish_record(record: dict, flops: dict, machine: dict, batch: int, spec: BenchSpec | None = None) -> dict:
    if record.get("status") == "ok" and "end_to_end" in record:
        record["images_per_s"] = round(batch / (record["end_to_end"]["median_ms"] * 1e-3), 4)
        floor = floor_view(record, flops, machine)
        if floor:
            record["floor"] = floor
        if spec is not None:
            check = timing_check(record, spec.steps, spec.timing_slack)
            if check:
                record["timing_check"] = check
    return record


def timing_check(record: dict, steps: int, slack: float) -> dict | None:
    """Do the component timings add up? steps x U-Net step + text encoder + VAE decoder is what one end-to-end
    run must at least spend (it runs each of them, plus the scheduler and copies), so it may not exceed the
    end-to-end median by more than `slack` (a fraction; the components are timed in isolation and the
    medians of two samples of a noisy machine differ by run-to-run noise). A record that fails was timed
    while the load on the machine changed (a component median from a loaded window, the end to end from a
    quiet one, or the reverse), or counts a cost twice: its numbers are not to be quoted. None when the
    record lacks the timings."""
    comp, e2e = record.get("components_ms") or {}, (record.get("end_to_end") or {}).get("median_ms")
    if not e2e or any(k not in comp for k in ("text_encoder", "unet_step", "vae_decoder")):
        return None
    parts = {"unet_steps_ms": steps * comp["unet_step"]["median_ms"], "text_encoder_ms": comp["text_encoder"]["median_ms"],
             "vae_decoder_ms": comp["vae_decoder"]["median_ms"]}
    total = sum(parts.values())
    ok = total <= e2e * (1 + slack)
    check = {"ok": ok, "components_sum_ms": round(total, 3), "end_to_end_ms": round(e2e, 3),
             "ratio": round(total / e2e, 4), "slack": slack, **{k: round(v, 3) for k, v in parts.items()}}
    if not ok:
        windows = comp["unet_step"].get("windows_median_ms")
        load = record.get("load_avg_1min") or {}
        busy = [v for v in (load.get("before"), load.get("after")) if v is not None]
        check["message"] = (f"{steps} steps x U-Net step {comp['unet_step']['median_ms']:.1f} ms + text encoder + "
                            f"VAE decoder = {total:.0f} ms exceeds the end-to-end median {e2e:.0f} ms by more "
                            f"than {slack:.0%}: the timings do not add up (machine load changed during the run?"
                            + (f" U-Net step window medians {windows} ms" if windows else "")
                            + (f"; load average {max(busy):.1f} on {load.get('cores')} cores" if busy else "") + ")")
    return check


def summary_line(record: dict) -> str:
    if record.get("status") != "ok":
        return f"{record.get('status')}: {record.get('error') or record.get('reason')}"
    e2e = record["end_to_end"]["median_ms"] / 1e3
    unet = record["components_ms"]["unet_step"]["median_ms"]
    flag = " [timings do not add up]" if (record.get("timing_check") or {}).get("ok") is False else ""
    return f"end to end {e2e:.3f} s ({record['images_per_s']:.3f} img/s), U-Net step {unet:.2f} ms{flag}"


def _param_counts(configs: dict) -> dict:
    return {"unet_block_out_channels": configs["unet"].get("block_out_channels"),
            "text_encoder_hidden_size": configs["text_encoder"].get("hidden_size"),
            "vae_block_out_channels": configs["vae"].get("block_out_channels")}


def ratio(results: dict, side: str, baseline: str, batch: int = 1) -> float | None:
    """baseline end-to-end median / side's (> 1: `side` is faster); None when either did not run."""
    by = {(r["side"], r["batch"]): r for r in results["results"] if r.get("status") == "ok"}
    a, b = by.get((side, batch)), by.get((baseline, batch))
    if not a or not b:
        return None
    return round(b["end_to_end"]["median_ms"] / a["end_to_end"]["median_ms"], 3)


__all__ = ["run_bench", "ratio", "flop_counts", "model_configs", "resolve_size", "ORT_SIDES", "TORCH_SIDES"]
