"""The deployed sides: our numpy Pipeline over ONNX Runtime (CPU, CUDA and its levers) or TensorRT runners.

End to end is exactly what `ldm-deploy generate` runs (`Pipeline.__call__`, DDIM); the per-component
timings call the same runners the way the pipeline does (text encoder: two calls of B rows, uncond and
cond; U-Net: one call at 2B; VAE decoder: B latents). The numpy scheduler + CFG overhead per step
comes from the pipeline's own `GenerationResult.timings`. torch-free.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ldm_deploy.bench.spec import LEVERS, TUNING
from ldm_deploy.bench.timing import measure_samples, measure_within, windowed
from ldm_deploy.errors import UsageError
from ldm_deploy.runtime import guidance as g
from ldm_deploy.runtime.runners.base import takes_guidance

# side -> (backend, production runner options, as `generate` / serving pass them to open_runner)
_OPTIONS = {
    "ort-cpu": ("ort-cpu", {}),
    "ort-cpu-no-spin": ("ort-cpu", {"allow_spinning": False}),
    "ort-cuda": ("ort-cuda", {"enable_cuda_graph": True}),
    "ort-cuda-no-graph": ("ort-cuda", {"enable_cuda_graph": False}),
    "ort-cuda-plain": ("ort-cuda", {"enable_cuda_graph": True, "variant": None}),
    "tensorrt": ("tensorrt", {"cuda_graph": True}),
    **{side: ("ort-cuda", {}) for side in LEVERS},   # text encoder / VAE as ort-cuda; the U-Net per LEVERS
    # ort-cuda plus one provider option on every runner (spec.TUNING), a lever knob (LEVER_KNOBS)
    **{side: ("ort-cuda", {"enable_cuda_graph": True,
                           **({"provider_options": dict(t["provider_options"])} if t.get("provider_options") else {})})
       for side, (_, t) in TUNING.items()},
}
# the benchmark's own runner knobs, which no production runner takes: a lever graph from the benchmark's folder
# (prepare.add_lever_variants), session.run without IO binding, extra CUDA provider options
LEVER_KNOBS = ("graph", "io_binding", "provider_options", "device_loop")


def _open_runner(backend: str, artifact, component: str, opts: dict, levers_dir=None):
    """One runner: through open_runner, exactly as the production path opens it, unless `opts` hold lever
    knobs; then assembled from the session loader (SessionFromArtifact) and the runner the knobs ask for."""
    from ldm_deploy.runtime.runners.base import open_runner

    knobs = {k: opts[k] for k in LEVER_KNOBS if k in opts}
    production = {k: v for k, v in opts.items() if k not in LEVER_KNOBS}
    if not knobs:
        return open_runner(backend, artifact, component, **production)
    if backend != "ort-cuda":
        raise UsageError(f"the lever knobs {sorted(knobs)} apply to ort-cuda only, not {backend}")
    from ldm_deploy.bench.prepare import lever_graph
    from ldm_deploy.runtime.runners.ort import OrtBoundRunner, OrtRunner, SessionFromArtifact

    production.setdefault("variant", "auto")
    out = {"output_dtype": production.pop("output_dtype")} if "output_dtype" in production else {}
    graph = lever_graph(levers_dir, knobs["graph"]) if knobs.get("graph") else None
    loader = SessionFromArtifact(artifact, component, provider="cuda", graph=graph,
                                 provider_options=knobs.get("provider_options"), **production)
    if knobs.get("device_loop"):   # a loop step graph: the runner owns the stream and the captures
        from ldm_deploy.runtime.runners.ort_loop import OrtLoopRunner

        return OrtLoopRunner(loader, **out)
    return (OrtBoundRunner if knobs.get("io_binding", True) else OrtRunner)(loader(), **out)


def _skip_reason(spec, side: str) -> str | None:
    if side.startswith("ort-cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider here (needs onnxruntime-gpu and an NVIDIA GPU)"
        graph = (LEVERS.get(side) or TUNING.get(side) or (None, {}))[1].get("graph")
        if graph:
            from ldm_deploy.bench.prepare import read_levers

            graphs = (read_levers(spec.levers_dir).get("graphs") or {}) if spec.levers_dir else {}
            if graph not in graphs:
                return (f"no lever graph {graph!r} in {spec.levers_dir or '(no levers folder)'} "
                        f"(`ldm-deploy bench ARTIFACT {'--tuning' if side in TUNING else '--levers'}` prepares it "
                        "in the benchmark's own folder)")
        if hasattr(ort, "preload_dlls"):   # cuDNN / cuBLAS from the nvidia-* wheels, when the system has none
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - the runner's own provider check reports a real failure
                pass
    if side == "tensorrt":
        from ldm_deploy.engine import trt_api

        engines = Path(spec.engine_dir or Path(spec.artifact) / "engines")
        if not any(engines.glob("*.engine")):
            return f"no TensorRT engines in {engines} (run `ldm-deploy build {spec.artifact}`)"
        try:
            runs = trt_api.can_execute()
        except Exception as e:  # noqa: BLE001 - any import/driver failure means "does not run here"
            return f"TensorRT does not run here: {str(e).splitlines()[0]}"
        if not runs:
            return ("TensorRT cannot execute here (no TensorRT installed for this GPU, "
                    f"or no GPU; installed: {trt_api.installed_flavours() or 'none'})")
    return None


def _runner_options(spec, side: str) -> tuple[str, dict, dict]:
    """(backend, options for every runner, extra options for the U-Net's)."""
    backend, opts = _OPTIONS[side]
    opts = dict(opts)
    unet_opts = dict(LEVERS[side][1]) if side in LEVERS else {}
    if side in TUNING and TUNING[side][1].get("graph"):   # a graph-tuning lever: the U-Net's graph only
        unet_opts = {"graph": TUNING[side][1]["graph"], "enable_cuda_graph": True,
                     **({"device_loop": True} if TUNING[side][1].get("device_loop") else {})}
    if backend == "ort-cpu" and spec.threads:
        opts["intra_op_threads"] = int(spec.threads)
    if backend == "tensorrt" and spec.engine_dir:
        opts["engine_dir"] = spec.engine_dir
    return backend, opts, unet_opts


def _open_pipeline(artifact_dir: str, backend: str, opts: dict, record: dict, log, unet_opts: dict | None = None,
                   graph_all: bool = False, levers_dir=None):
    """Pipeline over text_encoder / unet / vae_decoder runners. CUDA graphs go on the U-Net only (50 replays
    a run; the others run once) unless `graph_all` (every component's shapes are static within a run, so
    a graph each replaces their many small launches: the launch-bound demo model's case); `unet_opts`
    override `opts` for the U-Net (the lever sides). If ORT refuses the U-Net's graph capture at load, the
    side runs without it and says so (`cuda_graph_error`), so the deployed path still gets a number."""
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.runtime.pipeline import Pipeline, component_options
    from ldm_deploy.runtime.tokenizer import ClipTokenizer

    graph_key = {"ort-cuda": "enable_cuda_graph", "tensorrt": "cuda_graph"}.get(backend)
    plain = opts if graph_all else {k: v for k, v in opts.items() if k != graph_key}
    opts = {**opts, **(unet_opts or {})}
    artifact = Artifact.open(artifact_dir, verify=False)
    runners = {c: _open_runner(backend, artifact, c, component_options(c, plain), levers_dir)
               for c in ("text_encoder", "vae_decoder")}
    try:
        runners["unet"] = _open_runner(backend, artifact, "unet", opts, levers_dir)
    except Exception as e:  # noqa: BLE001 - e.g. nodes ORT cannot put on the GPU block graph capture
        if not (graph_key and opts.get(graph_key)):
            for runner in runners.values():
                runner.close()
            raise
        record["cuda_graph_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        log(f"U-Net CUDA graph refused ({record['cuda_graph_error']}); running without it")
        runners["unet"] = _open_runner(backend, artifact, "unet", {k: v for k, v in opts.items() if k != graph_key},
                                       levers_dir)
    record["cuda_graph"] = bool(graph_key and opts.get(graph_key) and "cuda_graph_error" not in record)
    record["cuda_graph_components"] = [c for c, r in runners.items()
                                       if getattr(r, "enable_cuda_graph", getattr(r, "cuda_graph", False))]
    return Pipeline(ClipTokenizer.from_dir(artifact.tokenizer_dir), runners, artifact.info, backend=backend)


def run(spec, side: str, batch: int, height: int, width: int, log) -> dict:
    from ldm_deploy.bench.machine import gpu_used_mib

    reason = _skip_reason(spec, side)
    if reason:
        return {"status": "skipped", "reason": reason}
    backend, opts, unet_opts = _runner_options(spec, side)
    tuning = TUNING.get(side, (None, {}))[1]
    gpu = backend != "ort-cpu"
    gpu_before = gpu_used_mib() if gpu else None
    record = {"device": "cuda" if gpu else "cpu", "backend": backend,
              "runner_options": {k: v for k, v in opts.items()}}
    if unet_opts:
        record["unet_runner_options"] = dict(unet_opts)

    t0 = time.perf_counter()
    if tuning:
        record["tuning"] = dict(tuning)
    pipe = _open_pipeline(spec.artifact, backend, opts, record, log, unet_opts, graph_all=bool(tuning.get("graph_all")),
                          levers_dir=spec.levers_dir)
    record["load_s"] = round(time.perf_counter() - t0, 3)
    try:
        return _measure(spec, side, batch, height, width, log, pipe, record, backend, opts, unet_opts, gpu_before)
    finally:
        pipe.close()


def _loop_record(per_step: list[dict]) -> dict:
    """The timed runs' denoise-loop split (Pipeline timings), medians: the host's share of a step outside the
    U-Net runner ("scheduler_overhead") and the stages' milliseconds."""
    if not per_step:
        return {}
    med = lambda key: float(np.median([t[key] for t in per_step]))  # noqa: E731
    return {"scheduler_overhead": {
                "ms_per_step": round(med("scheduler_overhead_per_step") * 1e3, 4),
                "unet_ms_per_step": round(med("unet_per_step") * 1e3, 3),
                "fraction_of_step": round(med("scheduler_overhead_per_step") / max(med("unet_per_step"), 1e-12), 5),
                "what": "numpy sampler + CFG glue + host<->device copies per step, outside the U-Net runner"},
            "stages_ms": {k: round(med(k) * 1e3, 2) for k in ("text_encoder", "denoise", "vae_decoder", "total")
                          if k in per_step[0]}}


class CallSplits:
    """Where a bound U-Net runner's calls spend their time (`OrtBoundRunner.call_split`: binding and uploading
    the inputs, the run, the outputs to host), summed per named window of calls: the isolated component timing
    against the calls inside the pipeline, so a step slower in the loop than alone shows in which part."""

    def __init__(self, runner):
        self.split = getattr(runner, "call_split", None)
        self.sums: dict[str, dict] = {}

    @contextmanager
    def window(self, what: str | None):
        before = dict(self.split or {})
        yield
        if self.split and what:
            into = self.sums.setdefault(what, dict.fromkeys(self.split, 0))
            for k in self.split:
                into[k] += self.split[k] - before[k]

    def record(self, runner) -> dict:
        """{"unet_call_split_ms": {window: {"calls", and ms per call of each part}}, the CUDA-graph slots and
        ungraphed calls} for a bound runner; {} for another."""
        out = {}
        if self.sums:
            out["unet_call_split_ms"] = {
                what: {"calls": int(sums["calls"]), **{k: round(sums[k] / max(sums["calls"], 1) * 1e3, 4)
                                                       for k in sums if k != "calls"}}
                for what, sums in self.sums.items()}
        if hasattr(runner, "cuda_graphs"):
            out["unet_cuda_graph_slots"] = len(runner.cuda_graphs)
            out["unet_ungraphed_calls"] = int(getattr(runner, "ungraphed_calls", 0))
        if getattr(runner, "device_loop", False):   # runners/ort_loop.py: captures and where a loop's time went
            split = runner.loop_split
            out["device_loop"] = {"captured_slots": runner.captured,
                                  "capture_errors": [str(e) for e in runner.capture_errors.values()],
                                  "loops": split["loops"], "steps": split["steps"],
                                  **{f"{k}_ms_per_loop": round(split[k] / max(split["loops"], 1) * 1e3, 3)
                                     for k in ("setup", "upload", "launch", "wait")}}
        return out


def isolated_step(unet, feeds):
    """The U-Net call the component timing repeats: the runner's own call, or for a device-loop runner one step of
    its loop (a captured launch and the wait): its `__call__` is the uncaptured one-step path other samplers take."""
    if not getattr(unet, "device_loop", False):
        return lambda: unet(feeds)
    from ldm_deploy.runtime.device_loop import single_step_tables

    tables = single_step_tables(float(np.ravel(feeds[g.TIMESTEP])[0]))
    cond = {name: feeds[name] for name in unet.conditioning}
    return lambda: unet.sample_loop(feeds[g.SAMPLE], tables, cond)


def _measure(spec, side, batch, height, width, log, pipe, record, backend, opts, unet_opts, gpu_before) -> dict:
    """Component and end-to-end timings of one opened pipeline (run() closes it)."""
    from ldm_deploy.bench.machine import gpu_used_mib

    gpu = backend != "ort-cpu"
    record["dtype"] = pipe.runners["unet"].spec.precision if hasattr(pipe.runners["unet"], "spec") else None
    record["model_files"] = {c: str(getattr(r, "model_path", getattr(r, "engine_dir", "?"))) for c, r in pipe.runners.items()}
    record["variants"] = {c: getattr(r, "variant", None) for c, r in pipe.runners.items()}
    record["unet_io_binding"] = getattr(pipe.runners["unet"], "io_binding", None)
    record["unet_tf32"] = getattr(pipe.runners["unet"], "use_tf32", None)
    if backend == "ort-cpu":
        record["threads"] = spec.threads or "onnxruntime default (all cores)"
    log(f"{side} b{batch}: loaded in {record['load_s']} s ({record['model_files'].get('unet')})")

    cfg = g.uses_cfg(spec.guidance)
    prompts, negatives = [spec.prompt] * batch, [""] * batch
    emb = g.rows(pipe.encode_text(negatives) if cfg else None, pipe.encode_text(prompts), spec.guidance)
    rng = np.random.default_rng(0)
    feeds = g.plain_feeds(rng.standard_normal((emb.shape[0], pipe.latent_channels, height // 8, width // 8),
                                              dtype=np.float32), np.full((emb.shape[0],), 500.0, dtype=np.float32), emb)
    latent = rng.standard_normal((batch, pipe.latent_channels, height // 8, width // 8), dtype=np.float32)
    record["cfg_folded"] = takes_guidance(pipe.runners["unet"])
    if record["cfg_folded"]:   # the U-Net graph does CFG itself: B latents in (as the pipeline calls it)
        feeds = g.folded_feeds(latent.copy(), np.full((batch,), 500.0, dtype=np.float32),
                               g.folded_context(emb, spec.guidance), g.folded_scalars(spec.guidance, 0.0))
    try:
        pipe.runners["unet"](feeds)                 # first run: ORT allocates, then captures the CUDA graph
    except Exception as e:  # noqa: BLE001 - a capture failure: measure the deployed path without the graph
        if not record["cuda_graph"]:
            raise
        record["cuda_graph_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        record["cuda_graph"] = False
        log(f"{side} b{batch}: U-Net CUDA graph capture failed ({record['cuda_graph_error']}); running without it")
        graph_key = {"ort-cuda": "enable_cuda_graph", "tensorrt": "cuda_graph"}[backend]
        pipe.runners["unet"].close()
        pipe.runners["unet"] = _open_runner(backend, spec.artifact, "unet",
                                            {k: v for k, v in {**opts, **unet_opts}.items() if k != graph_key},
                                            spec.levers_dir)
    unet, vae = pipe.runners["unet"], pipe.runners["vae_decoder"]

    def text():
        pipe.encode_text(negatives)
        pipe.encode_text(prompts)

    windows: dict[str, list[list[float]]] = {}
    splits = CallSplits(unet)

    def components(window: int) -> None:
        for name, call, warmup, repeats in (
                ("text_encoder", text if cfg else (lambda: pipe.encode_text(prompts)), spec.component_warmup,
                 spec.component_repeats),
                ("unet_step", isolated_step(unet, feeds), spec.component_warmup, spec.component_repeats),
                ("vae_decoder", lambda: vae({"latent": latent}), min(spec.component_warmup, 1),
                 max(1, spec.component_repeats // 3))):
            with splits.window("isolated" if name == "unet_step" else None):
                windows.setdefault(name, []).append(measure_samples(call, warmup=warmup if window == 0 else 1,
                                                                    repeats=repeats))

    components(0)
    record["components_ms"] = {name: windowed(w, spec.component_warmup) for name, w in windows.items()}
    log(f"{side} b{batch}: U-Net step {record['components_ms']['unet_step']['median_ms']:.1f} ms; end to end ...")
    results = []

    def e2e():
        results.append(pipe(spec.prompt, steps=spec.steps, guidance=spec.guidance, scheduler=spec.scheduler,
                            seed=0, height=height, width=width, num_images=batch))

    with splits.window("pipeline"):
        timing = measure_within(e2e, budget_s=spec.e2e_budget_s, warmup=spec.warmup, repeats=spec.repeats)
    record["end_to_end"] = timing.as_dict()
    components(1)   # a second window after the end-to-end runs (timing.windowed)
    record["components_ms"] = {name: windowed(w, spec.component_warmup) for name, w in windows.items()}
    timed = results[spec.warmup:] or results
    record.update(_loop_record([r.timings for r in timed if r.timings.get("unet_calls")]))
    record.update(splits.record(unet))
    record["images_shape"] = list(timed[-1].images.shape)
    if gpu:
        after = gpu_used_mib()
        if after is not None:
            before = gpu_before[0] if gpu_before else 0.0
            record["peak_gpu_mib"] = round(after[0] - before, 1)
            record["gpu_memory_method"] = (f"{after[1]}, sampled after the run minus before loading "
                                           "(ONNX Runtime's arena keeps its peak)")
    return record
