#!/usr/bin/env python
"""First-run smoke of the ONNX Runtime CUDA path on a GPU host (~1 minute), from nothing but the repo.

    python scripts/gpu_check.py --json gpu_check.json            # on the GPU machine
    python scripts/gpu_check.py --json dry.json --cpu-dry-run    # anywhere: everything except CUDA

1. builds a tiny SD1-like model folder (training.models.presets "tiny", seeded, non-zero norm biases),
2. exports it fp32 and fp16 (keep_fp32_unet) with the ORT CUDA fused variants (--ort-cuda),
3. checks, each fail-soft, everything printed and written to one JSON:
   a. every component on ort-cuda vs ort-cpu (error stats): plain graph and fused variant, with and
      without CUDA graphs,
   b. a full Pipeline generation on ort-cuda vs ort-cpu (same seed): max abs pixel difference,
   c. per-step U-Net time and the scheduler-overhead fraction from GenerationResult.timings,
   d. `pytest -m gpu` over the repo's gpu-marked tests (summary line).

`--cpu-dry-run` runs the same code with OrtCudaRunner's device buffers and provider on the CPU (its IO
binding, buffer reuse and output preallocation run for real); the fused variants, whose contrib ops
have CUDA kernels only, are reported as skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
FUSED = ("text_encoder", "unet", "vae_decoder")
PROMPT = "a red circle on a blue square"

log = logging.getLogger("gpu_check")


# --- bookkeeping: every check is fail-soft and lands in one JSON -----------------------------------

class Report:
    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "checks": {}}

    @contextlib.contextmanager
    def check(self, name: str):
        entry: dict = {"status": "ok"}
        self.data["checks"][name] = entry
        t0 = time.perf_counter()
        print(f"--- {name}", flush=True)
        try:
            yield entry
        except Skip as e:
            entry["status"] = "skipped"
            entry["reason"] = str(e)
        except Exception as e:  # fail-soft: record and go on
            entry["status"] = "failed"
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc(limit=8)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        shown = {k: v for k, v in entry.items() if k != "traceback"}
        print(f"    {json.dumps(shown, default=str)[:1500]}", flush=True)
        self.save()

    def save(self) -> None:
        counts: dict = {}
        for e in self.data["checks"].values():
            counts[e["status"]] = counts.get(e["status"], 0) + 1
        self.data["summary"] = counts      # also without --json: the last line prints it
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


class Skip(Exception):
    pass


def stats(actual, expected) -> dict:
    from ldm_deploy.compare import error_stats

    s = error_stats(actual, expected).as_dict()
    s.pop("shape", None)
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in s.items()}


# --- setup -------------------------------------------------------------------------------------------

def environment() -> dict:
    info: dict = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "tensorrt_rtx_bindings",
                "cuda-bindings", "diffusers", "transformers"):
        try:
            from importlib.metadata import version
            info[pkg] = version(pkg)
        except Exception:
            pass
    try:
        import onnxruntime as ort
        info["ort_providers"] = ort.get_available_providers()
        info["ort_device"] = ort.get_device()
    except Exception as e:
        info["ort_error"] = str(e)
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["gpus"] = [line.strip() for line in q.stdout.splitlines() if line.strip()]
    return info


def make_model_folder(folder: Path) -> Path:
    """The `tiny` preset with seeded weights and non-zero norm biases (as trained models have)."""
    from ldm_deploy.bench.prepare import random_model_folder

    return random_model_folder("tiny", folder, norm_bias_std=0.1)[0]


def export(folder: Path, out: Path, precision: str) -> dict:
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model

    import importlib.util

    # onnxslim (the plain graphs' cleanup) may be missing on a GPU image: export uncleaned then, and say so
    cleanup = importlib.util.find_spec("onnxslim") is not None
    config = load_config("tiny").replace(precision=precision, keep_fp32_unet=precision == "fp16", ort_cuda=True,
                                         measure_runtime=False, optimize=cleanup)
    result = export_model(folder, out, config, force=True)
    def summary(v):   # the ort-cuda variant: precision, fusions, node counts
        return {"precision": v.precision, "fused_ops": dict(v.fused_ops),
                **{k: v.record.get(k) for k in ("declined_fusions", "nodes_before", "nodes_after")}}

    return {"path": str(out), "seconds": round(result.seconds, 1), "onnxslim_cleanup": cleanup,
            "variants": {c: summary(e.variants["ort-cuda"]) for c, e in result.artifact.components.items()
                         if e.variants}}


@contextlib.contextmanager
def cpu_bound_cuda_runner():
    """--cpu-dry-run: OrtCudaRunner with CPU 'device' buffers and the CPU provider (everything but CUDA)."""
    import onnxruntime as ort

    from ldm_deploy.runtime.runners import ort as ort_runners

    cls = ort_runners.OrtCudaRunner
    saved = (ort.get_available_providers, cls._providers, cls._device_value)

    def device_value(self, shape, dtype):
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype), "cpu", 0)

    ort.get_available_providers = lambda: ["CUDAExecutionProvider", *saved[0]()]
    cls._providers = lambda self: ["CPUExecutionProvider"]
    cls._device_value = device_value
    cls._check_provider = lambda self: None
    try:
        yield
    finally:
        ort.get_available_providers, cls._providers, cls._device_value = saved
        del cls._check_provider


# --- the checks ------------------------------------------------------------------------------------

def component_inputs(artifact, component: str, batch: int = 1, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    spec = artifact.component(component)
    size = artifact.profiles.height.opt, artifact.profiles.width.opt
    f = artifact.vae_scale_factor
    if component == "text_encoder":
        ids = rng.integers(0, 49406, (batch, 77)).astype(np.int32)
        ids[:, 0], ids[:, 12:] = 49406, 49407
        return {"input_ids": ids}
    if component == "unet":
        n = spec.batch_multiplier * batch
        d = next(t.shape[-1] for t in spec.inputs if t.name == "encoder_hidden_states")
        from ldm_deploy.export.cfg_fold import symmetric_unet_inputs

        # the latents and timesteps repeat over the two CFG halves, as the pipeline feeds them (so a U-Net
        # graph with CFG folded in can be checked against the plain one: folded_feeds / folded_reference)
        return symmetric_unet_inputs({
            "sample": rng.standard_normal((n, artifact.latent_channels, size[0] // f, size[1] // f), np.float32),
            "timestep": np.linspace(999, 1.5, n).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((n, 77, d), np.float32)})
    if component == "vae_decoder":
        return {"latent": rng.standard_normal((batch, artifact.latent_channels, size[0] // f, size[1] // f),
                                              np.float32)}
    return {"image": rng.uniform(-1, 1, (batch, 3, *size)).astype(np.float32)}


GUIDANCE = 7.5


def folded_feeds(runner, feeds: dict) -> dict:
    """Feeds for `runner`: unchanged, or for a U-Net with CFG folded in, B latents + 2B embeddings + g."""
    from ldm_deploy.export.cfg_fold import folded_inputs
    from ldm_deploy.runtime.runners.base import takes_guidance

    return folded_inputs(feeds, GUIDANCE) if takes_guidance(runner) else feeds


def folded_reference(runner, reference: dict) -> dict:
    """The plain graph's 2B output as a folded graph returns it: uncond + g (cond - uncond), B rows."""
    from ldm_deploy.export.cfg_fold import reference_cfg
    from ldm_deploy.runtime.runners.base import takes_guidance

    if not takes_guidance(runner):
        return reference
    pred = reference["noise_pred"]
    return {"noise_pred": reference_cfg(pred, len(pred) // 2, GUIDANCE)}


def check_components(report: Report, name: str, art_dir: Path, dry: bool) -> None:
    """(a) each component: ort-cuda (plain / fused, graph off / on) vs ort-cpu plain."""
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.runtime.runners.base import open_runner, takes_guidance

    artifact = Artifact.open(art_dir)
    for component in artifact.components:
        feeds = component_inputs(artifact, component)
        with report.check(f"{name}/{component}/cpu") as e:
            cpu = open_runner("ort-cpu", artifact, component)
            reference = cpu(feeds)
            e["outputs"] = {k: list(v.shape) for k, v in reference.items()}
        has_variant = "ort-cuda" in artifact.component(component).variants
        for variant in (None, "ort-cuda"):
            for graph in (False, True):
                label = f"{name}/{component}/cuda-{'fused' if variant else 'plain'}-{'graph' if graph else 'nograph'}"
                with report.check(label) as e:
                    if variant and not has_variant:
                        raise Skip("no ort-cuda variant for this component")
                    if variant and dry:
                        raise Skip("cpu-dry-run: the fused graph's contrib ops have CUDA kernels only")
                    runner = open_runner("ort-cuda", artifact, component, variant=variant, enable_cuda_graph=graph)
                    e["model"] = runner.model_path.name
                    e["io_dtypes"] = {k: str(v) for k, v in runner.input_dtypes.items()}
                    e["cfg_folded"] = takes_guidance(runner)
                    run_feeds, expected = folded_feeds(runner, feeds), folded_reference(runner, reference)
                    outs = [runner(run_feeds) for _ in range(3)]       # warm-up/capture, then replays
                    e["stats"] = {k: stats(outs[-1][k], expected[k]) for k in expected}
                    e["replay_stable"] = all(np.array_equal(outs[1][k], outs[2][k]) for k in expected)
                    t0 = time.perf_counter()
                    for _ in range(10):
                        runner(run_feeds)
                    e["ms_per_call"] = round((time.perf_counter() - t0) * 100, 3)
                    if graph:   # new values into the same buffers: the replay must see them
                        other = component_inputs(artifact, component, seed=1)
                        got, want = runner(folded_feeds(runner, other)), folded_reference(runner, cpu(other))
                        e["new_inputs_stats"] = {k: stats(got[k], want[k]) for k in expected}
                    # fp32 graphs: 1e-3 without TF32 (an fp32 export's default); an fp16 export's fp32 VAE runs
                    # on TF32 (10-bit mantissa, unit roundoff 2^-11): 5e-3 (an H200 measured 1.3e-3 / 2.1e-3)
                    e["use_tf32"] = runner.use_tf32
                    half = "float16" in e["io_dtypes"].values() or artifact.component(component).precision == "fp16"
                    tol = 5e-2 if half else (5e-3 if runner.use_tf32 else 1e-3)
                    if e["cfg_folded"]:   # guided = uncond + 7.5 (cond - uncond): the halves' errors add, scaled
                        tol *= 2
                    worst = max(s["max_rel"] for s in e["stats"].values())
                    e["tolerance_max_rel"] = tol
                    if not np.isfinite(worst) or worst > tol:
                        raise AssertionError(f"max_rel {worst:.3g} > {tol} vs ort-cpu")


def check_pipeline(report: Report, name: str, art_dir: Path, dry: bool, steps: int) -> None:
    """(b) txt2img on ort-cuda vs ort-cpu, same seed; (c) per-step U-Net time and scheduler overhead."""
    from ldm_deploy.runtime.pipeline import Pipeline

    cpu_pipe = Pipeline.from_artifact(art_dir, backend="ort-cpu")
    cpu = cpu_pipe(PROMPT, steps=steps, seed=0, guidance=7.5)
    report.data.setdefault("timings", {})[f"{name}/cpu"] = timing_summary(cpu.timings)
    for variant in (None, "auto"):
        for graph in (False, True):
            label = f"{name}/pipeline-{'fused' if variant else 'plain'}-{'graph' if graph else 'nograph'}"
            with report.check(label) as e:
                if variant and dry:
                    raise Skip("cpu-dry-run: the fused graphs' contrib ops have CUDA kernels only")
                pipe = Pipeline.from_artifact(art_dir, backend="ort-cuda", variant=variant, enable_cuda_graph=graph)
                e["models"] = {c: f"{r.model_path.name}" for c, r in pipe.runners.items()}
                pipe(PROMPT, steps=2, seed=1, guidance=7.5)          # warm-up (and CUDA graph capture)
                gpu = pipe(PROMPT, steps=steps, seed=0, guidance=7.5)
                diff = np.abs(gpu.images.astype(np.int16) - cpu.images.astype(np.int16))
                e["max_abs_pixel_diff"] = int(diff.max())
                e["mean_abs_pixel_diff"] = round(float(diff.mean()), 4)
                e["latents"] = stats(gpu.latents, cpu.latents)
                e["timings"] = timing_summary(gpu.timings)
                report.data["timings"][label] = e["timings"]
                if diff.max() > 64:
                    raise AssertionError(f"max abs pixel difference {int(diff.max())} > 64 vs ort-cpu")


def timing_summary(t: dict) -> dict:
    keys = ("text_encoder", "denoise", "unet", "unet_calls", "unet_per_step", "scheduler_overhead_per_step",
            "overhead_fraction", "vae_decoder", "total")
    out = {}
    for k in keys:
        if k in t:
            v = t[k]
            out[k if k in ("unet_calls", "overhead_fraction") else f"{k}_ms"] = (
                v if k == "unet_calls" else round(v, 4) if k == "overhead_fraction" else round(v * 1e3, 3))
    return out


def check_pytest(report: Report, dry: bool, timeout: int) -> None:
    """(d) the repo's gpu-marked tests (collected only in --cpu-dry-run: they skip without a GPU)."""
    with report.check("pytest -m gpu") as e:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs" if dry else "-rfE",
               "--continue-on-collection-errors"]   # one module missing a package must not stop the rest
        if dry:
            cmd.append("--collect-only")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        lines = [line for line in r.stdout.splitlines() if line.strip()]
        e["returncode"] = r.returncode
        e["summary"] = lines[-1] if lines else r.stderr.strip()[-500:]
        e["failures"] = [line for line in lines if line.startswith(("FAILED", "ERROR"))][:30]
        if r.returncode not in (0, 5):   # 5: nothing collected
            raise AssertionError(e["summary"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write every result here (rewritten after each check)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="no CUDA: run the same checks on the CPU")
    ap.add_argument("--work", type=Path, help="keep the model folder and artifacts here (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps for the pipeline checks (default 20)")
    ap.add_argument("--skip-pytest", action="store_true", help="skip `pytest -m gpu`")
    ap.add_argument("--pytest-timeout", type=int, default=300, help="seconds for `pytest -m gpu` (default 300)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    report = Report(args.json)
    report.data["mode"] = "cpu-dry-run" if args.cpu_dry_run else "gpu"
    report.data["environment"] = environment()
    print(json.dumps(report.data["environment"], indent=1), flush=True)
    if not args.cpu_dry_run:
        try:
            import onnxruntime as ort
            if hasattr(ort, "preload_dlls"):    # onnxruntime-gpu >= 1.21: CUDA/cuDNN from pip wheels if present
                ort.preload_dlls()
        except Exception as e:
            report.data["preload_dlls_error"] = str(e)
        if "CUDAExecutionProvider" not in report.data["environment"].get("ort_providers", []):
            print("onnxruntime has no CUDAExecutionProvider: the CUDA checks will fail (use --cpu-dry-run?)")

    work = args.work or Path(tempfile.mkdtemp(prefix="ldm_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    artifacts = {}
    with report.check("setup/model_folder") as e:
        folder = make_model_folder(work / "tiny-model")
        e["path"] = str(folder)
    for precision in ("fp32", "fp16"):
        with report.check(f"setup/export_{precision}") as e:
            e.update(export(folder, work / f"onnx-{precision}", precision))
            artifacts[precision] = work / f"onnx-{precision}"

    dry = contextlib.ExitStack()
    if args.cpu_dry_run:
        dry.enter_context(cpu_bound_cuda_runner())
    with dry:
        for precision, art in artifacts.items():
            check_components(report, precision, art, args.cpu_dry_run)
            with report.check(f"{precision}/pipeline-cpu-reference"):
                check_pipeline(report, precision, art, args.cpu_dry_run, args.steps)
    if not args.skip_pytest:
        check_pytest(report, args.cpu_dry_run, args.pytest_timeout)

    report.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report.save()
    summary = report.data.get("summary", {})
    print(f"=== {summary}  ({args.json or 'no --json'})")
    failed = [k for k, v in report.data["checks"].items() if v["status"] == "failed"]
    for k in failed:
        print(f"FAILED {k}: {report.data['checks'][k].get('error', '')[:300]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
