"""Per-op-type profile of one U-Net CFG step (or, `--component vae_decoder`, one VAE decode): the deployed graph
under ONNX Runtime beside the PyTorch module (eager or torch.compile) on the same shapes, bucketed the same way
(ldm_deploy/bench/profile.py).

    python scripts/profile_unet.py --artifact /tmp/sd15/onnx-fp16 --batch 1 4 --out profile.json --md profile.md
    python scripts/profile_unet.py --artifact out/demo-onnx --device cpu --torch eager --out p.json --md p.md
    python scripts/profile_unet.py --render profile.json --docs docs/performance.md   # tables into the docs

GPU (ort-cuda + CUDA torch): ORT runs the fused `ort-cuda` variant with IO binding, kernels from CUPTI
(torch.profiler); torch runs each `--torch` recipe (default: reduce-overhead + channels_last) in a
subprocess of its own with a compile budget, so a compile that does not finish is recorded, not waited
for. CPU: ORT's own node profile and torch's CPU ops. Writes the JSON (every profile, top kernels) and
a Markdown file with one table per batch and the reading of the largest differences.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

START, END = "<!-- profile:start -->", "<!-- profile:end -->"
CHANNELS_LAST = {"eager": False, "default": False, "reduce-overhead": True, "max-autotune-no-cudagraphs": True,
                 "max-autotune": True}


def say(message: str) -> None:
    print(f"[profile_unet] {message}", flush=True)


def in_subprocess(args, what: str, batch: int, mode: str | None = None, device: str | None = None) -> dict:
    """One profile (`what`: "ort" or "torch") in a child process of its own group: a crash is recorded, and a
    torch.compile past the budget costs the budget (the child records the timeout, the group is ended)."""
    with tempfile.TemporaryDirectory(prefix="ldm-profile-") as tmp:
        out = Path(tmp) / f"{what}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--batch", str(batch), "--device", device or args.device,
               "--iters", str(args.iters), "--warmup", str(args.warmup), "--compile-budget", str(args.compile_budget),
               "--component", args.component, "--out", str(out)]
        if what == "torch":
            cmd += ["--model-dir", str(args.model_dir), "--one-torch", mode]
        else:
            cmd += ["--artifact", str(args.artifact), "--one-ort", "--ort-variant", args.ort_variant]
            if args.levers_dir:
                cmd += ["--levers-dir", str(args.levers_dir)]
            cmd += [f"--provider-option={o}" for o in args.provider_option]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
        for flag, value in (("--height", args.height), ("--width", args.width)):
            if value:
                cmd += [flag, str(value)]
        proc = subprocess.Popen(cmd, cwd=str(ROOT), start_new_session=True)
        try:
            proc.wait(timeout=args.compile_budget + 120 if what == "torch" else 600)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # the child's group: its compile workers too
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        if out.is_file():
            return json.loads(out.read_text(encoding="utf-8"))
        return {"side": "torch" if what == "torch" else "onnxruntime", "mode": mode, "batch": batch, "status": "error",
                "error": f"profile process exited with code {proc.returncode} and no result"}


def render(data: dict) -> str:
    """The Markdown of a profile JSON. Each profile's listed kernels are put in the buckets `bucket_of` gives
    them now (profile.rebucket: a fresh profile moves nothing); what moved is said under the table."""
    from ldm_deploy.bench.profile import profile_table, reading, rebucket
    from ldm_deploy.bench.report import _machine

    lines = [f"Machine: {_machine(data)}; {data['created']}; {data.get('note', '')}".rstrip("; "), ""]
    for batch, entry in data["batches"].items():
        ok = [rebucket(p) for p in entry["profiles"] if p.get("status", "ok") == "ok"]
        what = (f"VAE decode at B={batch}" if data.get("component") == "vae_decoder"
                else f"U-Net CFG step at B={batch} (U-Net batch {2 * int(batch)})")
        lines += [f"{what}, {ok[0]['height'] if ok else '?'}x{ok[0]['width'] if ok else '?'}:", ""]
        if ok:
            lines += [profile_table(ok), ""]
        for p in ok:
            moved = p["rebucketed"]["moved"]
            if moved:
                flows: dict = {}
                for m in moved:
                    flows[(m["from"], m["to"])] = flows.get((m["from"], m["to"]), 0.0) + m["ms_per_call"]
                what = "ORT" if p["side"] == "onnxruntime" else f"torch {p.get('mode')}"
                lines.append(f"- {what}: re-bucketed from the profile's stored kernel list ({p['rebucketed']['lists']}): "
                             + ", ".join(f"{a} -> {b} {ms:.3f} ms" for (a, b), ms in flows.items())
                             + f" ({len(moved)} kernels; kernels the list does not hold stay where they were, so "
                               "a bucket that gains is a lower bound until the next profile run)")
        for p in entry["profiles"]:
            if p.get("status", "ok") != "ok":
                lines.append(f"- {p.get('side')} {p.get('mode', '')}: {p.get('status')}: {p.get('error')}")
        ort = next((p for p in ok if p["side"] == "onnxruntime"), None)
        torches = [p for p in ok if p["side"] == "torch"]
        if ort and torches:
            best = min(torches, key=lambda p: p["wall_ms_per_call"])
            lines += ["", f"Reading (ONNX Runtime against torch {best['mode']}):", ""]
            lines += [f"- {line}" for line in reading(ort, best)]
        lines.append("")
    return "\n".join(lines)


def one_ort(args) -> dict:
    """Child: the ONNX Runtime profile at one batch (torch imported first on CUDA, for CUPTI and its libraries)."""
    if args.device == "cuda":
        try:   # torch (CUPTI) before onnxruntime: ORT then finds the CUDA / cuDNN libraries torch loaded
            import torch  # noqa: F401
        except ImportError:
            pass
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - the session's own provider check reports a real failure
                pass
    from ldm_deploy.bench.profile import profile_ort

    variant = None if args.ort_variant == "plain" else args.ort_variant
    options = dict(o.split("=", 1) for o in args.provider_option)
    return profile_ort(args.artifact, batch=args.batch[0], height=args.height, width=args.width,
                       backend="ort-cuda" if args.device == "cuda" else "ort-cpu", variant=variant,
                       provider_options=options, iters=args.iters, warmup=args.warmup, threads=args.threads,
                       levers_dir=args.levers_dir, component=args.component)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, help="exported artifact (the ONNX Runtime side)")
    ap.add_argument("--model-dir", type=Path, help="model folder (the torch side; default: the artifact's source)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="image batch sizes (U-Net runs at 2B)")
    ap.add_argument("--component", choices=("unet", "vae_decoder"), default="unet",
                    help="what one profiled call is: a U-Net CFG step (default) or a VAE decode of B latents")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--iters", type=int, default=10, help="profiled steps (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="unprofiled steps first (default 3)")
    ap.add_argument("--ort-variant", default="auto", help="auto (ort-cuda fused on CUDA), plain, or a variant name "
                                                          "(with --levers-dir: a lever graph of that folder)")
    ap.add_argument("--levers-dir", type=Path, help="a benchmark's lever folder (`bench --levers` / `--tuning`): "
                                                    "--ort-variant names one of its graphs")
    ap.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE",
                    help="ONNX Runtime CUDA provider option for the profiled session (repeatable)")
    ap.add_argument("--torch", default=None,
                    help="comma-separated torch recipes: eager, default, reduce-overhead, max-autotune-no-cudagraphs, "
                         "max-autotune (default: reduce-overhead on CUDA, eager on CPU; 'none' skips torch)")
    ap.add_argument("--compile-budget", type=float, default=240.0, help="seconds for one torch.compile (default 240)")
    ap.add_argument("--threads", type=int, help="ORT CPU intra-op threads")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, help="profile JSON")
    ap.add_argument("--md", type=Path, help="also write the tables as Markdown here")
    ap.add_argument("--render", type=Path, help="render an existing profile JSON (no profiling)")
    ap.add_argument("--docs", type=Path, help=f"replace the {START} ... {END} block of this Markdown file")
    ap.add_argument("--one-torch", help=argparse.SUPPRESS)
    ap.add_argument("--one-ort", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from ldm_deploy.errors import UsageError
    from ldm_deploy.fileio import write_json

    if args.one_torch:   # child: one torch recipe at one batch
        from ldm_deploy.bench.profile import profile_torch

        mode = None if args.one_torch == "eager" else args.one_torch
        timeout_record = {"side": "torch", "mode": args.one_torch, "batch": args.batch[0]}
        result = profile_torch(args.model_dir, batch=args.batch[0], height=args.height, width=args.width,
                               device=args.device, mode=mode, channels_last=CHANNELS_LAST[args.one_torch],
                               iters=args.iters, warmup=args.warmup, compile_budget_s=args.compile_budget,
                               on_timeout_record=timeout_record, on_timeout_path=str(args.out),
                               component=args.component)
        write_json(args.out, {**result, "status": "ok"})
        return 0

    if args.one_ort:   # child: the ONNX Runtime profile at one batch
        write_json(args.out, {**one_ort(args), "status": "ok"})
        return 0

    if args.render:
        data = json.loads(args.render.read_text(encoding="utf-8"))
    else:
        if args.artifact is None:
            raise UsageError("--artifact is required (or --render JSON)")
        if args.levers_dir and args.ort_variant in ("auto", "plain"):
            raise UsageError("--levers-dir needs --ort-variant naming one of its graphs",
                             hint="e.g. --ort-variant tuning-fold-transposes")
        if args.model_dir is None:
            from ldm_deploy.artifact import Artifact

            args.model_dir = Artifact(args.artifact, verify=False).source_path
        from ldm_deploy.bench.machine import machine_info

        cuda = args.device == "cuda"
        if args.device == "auto":
            import onnxruntime as ort

            cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        recipes = [r for r in (args.torch or ("reduce-overhead" if cuda else "eager")).split(",") if r and r != "none"]
        unknown = [r for r in recipes if r not in CHANNELS_LAST]
        if unknown:
            raise UsageError(f"unknown torch recipes {unknown}; choose from {', '.join(CHANNELS_LAST)}")
        bad = [o for o in args.provider_option if "=" not in o]
        if bad:
            raise UsageError(f"--provider-option takes KEY=VALUE, got {bad}")
        data = {"format": "ldm-deploy-profile", "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "machine": machine_info(), "note": args.note, "component": args.component, "batches": {}}
        for batch in args.batch:
            entry = data["batches"].setdefault(str(batch), {"profiles": []})
            say(f"B={batch}: ONNX Runtime ({'ort-cuda' if cuda else 'ort-cpu'}) ...")
            p = in_subprocess(args, "ort", batch, device="cuda" if cuda else "cpu")
            entry["profiles"].append({"status": "ok", **p})
            say(f"B={batch}: ORT " + (f"step {p['wall_ms_per_call']:.3f} ms ({p['source']})" if "wall_ms_per_call" in p
                                      else f"{p.get('status')}: {p.get('error')}"))
            if args.out:
                write_json(args.out, data)
            for mode in recipes:
                if args.model_dir is None:
                    entry["profiles"].append({"side": "torch", "mode": mode, "status": "skipped",
                                              "error": "no model folder (--model-dir)"})
                    continue
                say(f"B={batch}: torch {mode} ...")
                p = in_subprocess(args, "torch", batch, mode=mode)
                entry["profiles"].append({"status": "ok", **p})
                say(f"B={batch}: torch {mode}: " + (f"step {p['wall_ms_per_call']:.3f} ms" if "wall_ms_per_call" in p
                                                    else f"{p.get('status')}: {p.get('error')}"))
                if args.out:
                    write_json(args.out, data)
    text = render(data)
    if args.out and not args.render:
        write_json(args.out, data)
    if args.md:
        args.md.write_text(text, encoding="utf-8")
    if args.docs:
        from ldm_deploy.bench.report import replace_block

        args.docs.write_text(replace_block(args.docs.read_text(encoding="utf-8"), text, START, END), encoding="utf-8")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
