"""Benchmark results -> a PNG chart, a Markdown table, and the README block generated from them.

    write_chart(results, "benchmarks/results/cpu-demo.png")
    markdown_table([results_a, results_b])      # one row per (run, side, batch)
    replace_block(readme_text, table)           # between <!-- bench:start --> and <!-- bench:end -->
    lever_table(results)                        # the GPU levers one at a time (ldm-deploy bench --levers)
"""
from __future__ import annotations

import json
from pathlib import Path

from ldm_deploy.errors import LdmError

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
LEVERS_START, LEVERS_END = "<!-- levers:start -->", "<!-- levers:end -->"
TUNING_START, TUNING_END = "<!-- tuning:start -->", "<!-- tuning:end -->"
# The baseline each run's speed-up column is measured against: the strongest plain PyTorch side that ran.
BASELINES = ("torch-eager-fp16", "torch-eager-fp32")
CHART_SOFTWARE = "ldm-deploy bench"   # the chart PNG's Software text: an earlier chart may be replaced


def load_results(paths) -> list[dict]:
    runs = []
    for path in sorted(Path(p) for p in paths):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LdmError(f"{path} cannot be read as JSON: {e}", hint="pass only `ldm-deploy bench` result files") from None
        if not isinstance(data, dict) or data.get("format") != "ldm-deploy-bench":
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise LdmError(f"{path} is not an ldm-deploy benchmark result (format {found!r})",
                           hint="keep other JSON out of the results folder, or pass the result files explicitly")
        data.setdefault("name", path.stem)
        runs.append(data)
    return runs


def _ok(run: dict) -> list[dict]:
    return [r for r in run["results"] if r.get("status") == "ok"]


def _baseline(run: dict, batch: int) -> dict | None:
    by = {r["side"]: r for r in _ok(run) if r["batch"] == batch}
    return next((by[s] for s in BASELINES if s in by), None)


def _machine(run: dict) -> str:
    m = run.get("machine", {})
    if m.get("gpus"):
        return m["gpus"][0].split(",")[0]
    return f"{m.get('cpu', 'CPU')} ({m.get('cores', '?')} cores)"


def _ms(timing: dict | None) -> str:
    if not timing:
        return "-"
    v = timing["median_ms"]
    return f"{v:.0f}" if v >= 100 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


UNEVEN = " (!)"
UNEVEN_NOTE = ("(!) the record's steps x U-Net step + text encoder + VAE decoder exceeds its end-to-end time by more "
               "than the stated slack (`timing_check` in the JSON): its timings do not add up, do not quote them")


def _uneven(r: dict) -> str:
    return UNEVEN if (r.get("timing_check") or {}).get("ok") is False else ""


def markdown_table(runs: list[dict]) -> str:
    """One row per (run, side, batch): end to end, img/s, per stage, memory, FLOP fraction, speed-up; a record
    whose timings do not add up (harness.timing_check) is marked (!) with a note under the table."""
    lines = [
        "| run | machine | side | B | end to end (s) | img/s | U-Net step (ms) | text enc (ms) | VAE dec (ms) "
        "| sched. overhead | peak GPU (MiB) | peak RSS (MiB) | U-Net % of peak | vs PyTorch eager |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for run in runs:
        model = run.get("model", {})
        label = f"{run['name']} ({model.get('height')}x{model.get('width')}, {model.get('steps')} steps)"
        for r in run["results"]:
            if r.get("status") != "ok":
                why = r.get("error") or r.get("reason") or r.get("status")
                lines.append(f"| {label} | {_machine(run)} | {r['side']} | {r['batch']} | {r.get('status')}: "
                             f"{str(why)[:80].replace('|', '/')} |  |  |  |  |  |  |  |  |  |")
                continue
            comp = r.get("components_ms", {})
            base = _baseline(run, r["batch"])
            speed = (f"{base['end_to_end']['median_ms'] / r['end_to_end']['median_ms']:.2f}x vs {base['side']}"
                     if base and base is not r else "baseline" if base is r else "-")
            overhead = r.get("scheduler_overhead", {}).get("fraction_of_step")
            floor = (r.get("floor") or {}).get("unet_step_fraction_of_peak")
            lines.append(" | ".join([
                f"| {label}", _machine(run), r["side"], str(r["batch"]),
                f"{r['end_to_end']['median_ms'] / 1e3:.3f}", f"{r['images_per_s']:.3f}",
                _ms(comp.get("unet_step")) + _uneven(r), _ms(comp.get("text_encoder")), _ms(comp.get("vae_decoder")),
                f"{overhead:.2%}" if overhead is not None else "-",
                f"{r['peak_gpu_mib']:.0f}" if r.get("peak_gpu_mib") is not None else "-",
                f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") is not None else "-",
                f"{floor:.1%}" if floor is not None else "-",
                f"{speed} |",
            ]))
    if any(_uneven(r) for run in runs for r in run["results"]):
        lines += ["", UNEVEN_NOTE]
    return "\n".join(lines)


def stage_table(run: dict, batch: int = 1) -> str:
    """Where the end-to-end time goes, per side: text encoder, N U-Net steps, VAE decode, the rest, and the
    FLOP floor (the run's FLOPs at the card's dense peak for the side's dtype)."""
    steps = run.get("model", {}).get("steps", 0)
    lines = [f"| side (B={batch}) | text enc (ms) | {steps} x U-Net (ms) | VAE dec (ms) | rest (ms) | end to end (ms) "
             "| FLOP floor (ms) | x floor |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in _ok(run):
        if r["batch"] != batch:
            continue
        comp = r["components_ms"]
        te, unet, vae = (comp["text_encoder"]["median_ms"], steps * comp["unet_step"]["median_ms"],
                         comp["vae_decoder"]["median_ms"])
        e2e = r["end_to_end"]["median_ms"]
        floor = (r.get("floor") or {}).get("end_to_end_floor_ms")
        lines.append(f"| {r['side']} | {te:.1f} | {unet:.0f} | {vae:.1f} | {e2e - te - unet - vae:.1f} | {e2e:.0f} | "
                     + (f"{floor:.0f} | {e2e / floor:.1f}x |" if floor else "- | - |"))
    return "\n".join(lines)


def lever_table(run: dict, batch: int = 1) -> str:
    """The lever ladder of one run (spec.LEVERS, then ort-cuda): each row adds one lever to the U-Net, with
    its U-Net step and end-to-end time and the gain over the row above; then the full path less one lever
    and the PyTorch references, when the run has them."""
    from ldm_deploy.bench.spec import LEVER_FINAL, LEVERS, SIDE_NOTES

    by = {r["side"]: r for r in _ok(run) if r["batch"] == batch}
    failed = {r["side"]: r for r in run["results"] if r["batch"] == batch and r.get("status") != "ok"}
    eager, compiled = by.get("torch-eager-fp16"), by.get("torch-compile")
    steps = run.get("model", {}).get("steps")

    def vs(r, base):
        return f"{base['end_to_end']['median_ms'] / r['end_to_end']['median_ms']:.2f}x" if base else "-"

    def row(number, what, r, ref, suffix=""):
        """One ladder row: the U-Net step and end to end, each with its gain over `ref` (a record or None)."""
        step, e2e = r["components_ms"]["unet_step"], r["end_to_end"]["median_ms"]
        gains = [f"{ref['components_ms']['unet_step']['median_ms'] / step['median_ms']:.2f}x{suffix}",
                 f"{ref['end_to_end']['median_ms'] / e2e:.2f}x{suffix}"] if ref else ["-", "-"]
        peak = (r.get("floor") or {}).get("unet_step_fraction_of_peak")
        return (f"| {number} | {what} | {_ms(step)}{_uneven(r)} | {gains[0]} | {e2e / 1e3:.3f} | {gains[1]} | "
                f"{vs(r, eager)} | "
                f"{vs(r, compiled)} | {f'{peak:.1%}' if peak is not None else '-'} |")

    lines = [f"| # | U-Net lever (B={batch}, CFG batch {2 * batch}) | U-Net step (ms) | step gain | "
             f"end to end, {steps} steps (s) | e2e gain | vs PyTorch eager fp16 | vs torch.compile | U-Net % of peak |",
             "|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    ladder = [(side, what) for side, (what, _) in LEVERS.items()] + [LEVER_FINAL]
    above = None
    for i, (side, what) in enumerate(ladder):
        r = by.get(side)
        if r is None:
            why = failed.get(side, {})
            why = why.get("error") or why.get("reason") or "not run"
            lines.append(f"| {i} | {what} | {str(why)[:80].replace('|', '/')} |  |  |  |  |  |  |")
            continue
        lines.append(row(i, what, r, above))
        above = r
    full = by.get(LEVER_FINAL[0])
    others = [("ort-cuda-no-graph", "full path less the CUDA graph"),
              ("ort-cuda-plain", "full path on the plain graphs, all components (no fusions, no CFG fold)"),
              # a run's own note of what a side was (what torch-compile compiled changed with issue 23)
              *((side, (run.get("sides") or {}).get(side, SIDE_NOTES[side]))
                for side in ("torch-eager-fp16", "torch-compile", "torch-compile-ro"))]
    lines += [row("-", f"{side}: {what}", by[side], full, " vs full") for side, what in others if side in by]
    if any(_uneven(r) for r in by.values()):
        lines += ["", UNEVEN_NOTE]
    return "\n".join(lines)


def tuning_table(run: dict, batch: int = 1, reference: str = "ort-cuda") -> str:
    """The profile levers (spec.TUNING), each one change on top of `reference`: U-Net step and end to end with
    the gain over the reference (> 1: the lever helps)."""
    from ldm_deploy.bench.spec import TUNING

    by = {r["side"]: r for r in _ok(run) if r["batch"] == batch}
    failed = {r["side"]: r for r in run["results"] if r["batch"] == batch and r.get("status") != "ok"}
    ref = by.get(reference)
    lines = [f"| lever on {reference} (B={batch}) | U-Net step (ms) | step gain | end to end (s) | e2e gain |",
             "|---|--:|--:|--:|--:|"]
    for side in [reference, *TUNING]:
        r = by.get(side)
        what = f"`{side}`: " + (TUNING[side][0] if side in TUNING else "reference")
        if r is None:
            if side in failed:
                why = failed[side].get("error") or failed[side].get("reason") or failed[side].get("status")
                lines.append(f"| {what} | {failed[side].get('status')}: {str(why)[:80].replace('|', '/')} |  |  |  |")
            continue
        step, e2e = r["components_ms"]["unet_step"]["median_ms"], r["end_to_end"]["median_ms"]
        gain = (f"{ref['components_ms']['unet_step']['median_ms'] / step:.2f}x",
                f"{ref['end_to_end']['median_ms'] / e2e:.2f}x") if ref and r is not ref else ("-", "-")
        lines.append(f"| {what} | {_ms(r['components_ms']['unet_step'])}{_uneven(r)} | {gain[0]} | {e2e / 1e3:.3f} "
                     f"| {gain[1]} |")
    return "\n".join(lines)


def run_step_ms(record: dict, steps: int) -> float | None:
    """The U-Net step as the end-to-end run saw it: (end to end - text encoder - VAE decoder) / steps, the
    same arithmetic for every side (scheduler and host work included). The isolated step timing waits for
    the GPU after every call; inside a run, a loop that never waits (PyTorch: the scheduler on the GPU) hides
    that wait, while one that waits every step (our numpy scheduler on the host) pays it, so the two can
    rank sides differently."""
    c = record.get("components_ms") or {}
    try:
        rest = record["end_to_end"]["median_ms"] - c["text_encoder"]["median_ms"] - c["vae_decoder"]["median_ms"]
    except (KeyError, TypeError):
        return None
    return rest / steps if steps else None


def versus_torch_table(run: dict, batch: int = 1, deployed: tuple[str, ...] = ()) -> str:
    """Every PyTorch side of the run (compile mode, compile time or timeout, attention kernel) against the
    fastest deployed side (default: the fastest non-PyTorch side by end to end): the deployed path's
    speed-up per U-Net step (isolated, and as the run saw it: `run_step_ms`) and end to end (> 1: deployed
    is faster), and the best PyTorch side named."""
    from ldm_deploy.bench.spec import COMPILE_SIDES, TORCH_SIDES

    steps = int((run.get("model") or {}).get("steps") or (run.get("spec") or {}).get("steps") or 0)
    ok = [r for r in _ok(run) if r["batch"] == batch]
    mine = [r for r in ok if (r["side"] in deployed if deployed else r["side"] not in TORCH_SIDES)]
    best = min(mine, key=lambda r: r["end_to_end"]["median_ms"], default=None)
    name = best["side"] if best else "deployed"
    lines = [f"| PyTorch side (B={batch}) | compile | compile time (s) | attention | U-Net step (ms) "
             f"| step in the run (ms) | end to end (s) | {name} step speed-up | in-run step speed-up "
             f"| e2e speed-up |",
             "|---|---|--:|---|--:|--:|--:|--:|--:|--:|"]
    torch_records = [r for r in run["results"] if r["batch"] == batch and r["side"] in TORCH_SIDES]
    best_run_step = run_step_ms(best, steps) if best else None
    for r in torch_records:
        comp = r.get("compile") or {}
        recipe = (comp["mode"], comp.get("channels_last")) if comp else COMPILE_SIDES.get(r["side"])
        mode = f"{recipe[0]}{' + channels_last' if recipe[1] else ''}" if recipe else "eager"
        cs = r.get("compile_s")
        total = cs.get("total") if isinstance(cs, dict) else cs   # a dict since issue 23, a number before
        ctime = f"{total:.0f}" if isinstance(total, (int, float)) else "-"
        attn = ", ".join(f"{k} x{v}" for k, v in ((r.get("attention") or {}).get("used") or {}).items()) or "-"
        if r.get("status") != "ok":
            why = r.get("error") or r.get("reason") or r.get("status")
            lines.append(f"| {r['side']} | {mode} | {ctime} | {attn} | {r.get('status')}: "
                         f"{str(why)[:100].replace('|', '/')} |  |  |  |  |  |")
            continue
        step, e2e = r["components_ms"]["unet_step"]["median_ms"], r["end_to_end"]["median_ms"]
        run_step = run_step_ms(r, steps)
        su = (f"{step / best['components_ms']['unet_step']['median_ms']:.2f}x",
              f"{e2e / best['end_to_end']['median_ms']:.2f}x") if best else ("-", "-")
        in_run = f"{run_step / best_run_step:.2f}x" if run_step and best_run_step else "-"
        lines.append(f"| {r['side']} | {mode} | {ctime} | {attn} | {_ms(r['components_ms']['unet_step'])}{_uneven(r)} "
                     f"| {f'{run_step:.2f}' if run_step else '-'} | {e2e / 1e3:.3f} | {su[0]} | {in_run} | {su[1]} |")
    ok_torch = [r for r in torch_records if r.get("status") == "ok"]
    if best and ok_torch:
        fastest_step = min(ok_torch, key=lambda r: r["components_ms"]["unet_step"]["median_ms"])
        fastest_e2e = min(ok_torch, key=lambda r: r["end_to_end"]["median_ms"])
        step_ratio = (fastest_step["components_ms"]["unet_step"]["median_ms"]
                      / best["components_ms"]["unet_step"]["median_ms"])
        in_run = ""
        run_steps = [(run_step_ms(r, steps), r["side"]) for r in ok_torch]
        run_steps = [(v, side) for v, side in run_steps if v]
        if run_steps and best_run_step:
            fastest_run = min(run_steps)
            in_run = f", in the run {fastest_run[0] / best_run_step:.2f}x ({fastest_run[1]})"
        lines += ["", f"{name} against the best PyTorch side at B={batch}: U-Net step {step_ratio:.2f}x "
                      f"({fastest_step['side']}){in_run}, end to end "
                      f"{fastest_e2e['end_to_end']['median_ms'] / best['end_to_end']['median_ms']:.2f}x ({fastest_e2e['side']})."]
    return "\n".join(lines)


def replace_block(text: str, block: str, start_marker: str = START, end_marker: str = END) -> str:
    """`text` with everything between the markers (default: the bench table's) replaced by `block`."""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < 0 or end < start:
        raise LdmError(f"README has no {start_marker} ... {end_marker} block",
                       hint="add both markers in the Performance section")
    return text[: start + len(start_marker)] + "\n" + block.strip("\n") + "\n" + text[end:]


def write_chart(results: dict, path: str | Path) -> Path:
    """Two panels: end-to-end seconds per side (bars per batch, p10-p90 whiskers) and the U-Net step in ms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(results)
    sides = list(dict.fromkeys(r["side"] for r in ok))
    batches = sorted({r["batch"] for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(batches))
    for panel, (key, scale, title) in enumerate((("end_to_end", 1e-3, "end to end (s)"),
                                                  ("unet_step", 1.0, "one U-Net step at the CFG batch 2B (ms)"))):
        ax = axes[panel]
        for j, b in enumerate(batches):
            xs, ys, lo, hi = [], [], [], []
            for i, side in enumerate(sides):
                r = next((r for r in ok if r["side"] == side and r["batch"] == b), None)
                if r is None:
                    continue
                t = r["end_to_end"] if key == "end_to_end" else r["components_ms"]["unet_step"]
                xs.append(i + (j - (len(batches) - 1) / 2) * width)
                ys.append(t["median_ms"] * scale)
                lo.append((t["median_ms"] - t["p10_ms"]) * scale)
                hi.append((t["p90_ms"] - t["median_ms"]) * scale)
            ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=f"B={b}")
        ax.set_xticks(range(len(sides)))
        ax.set_xticklabels(sides, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if ys or ax.containers:
            ax.legend(fontsize=8)
    model = results.get("model", {})
    fig.suptitle(f"{results.get('name')}: {model.get('height')}x{model.get('width')}, {model.get('steps')} steps, "
                 f"guidance {model.get('guidance')} - {_machine(results)}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": CHART_SOFTWARE})
    plt.close(fig)
    tmp.replace(path)
    return path
