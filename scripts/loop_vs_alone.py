"""Why an ort-cuda U-Net call is slower inside the pipeline than alone (H100, 2026-12-07: 21.19 ms a call alone,
25.36 ms in the loop at B=4; 7.41 against 8.24 ms at B=1; docs/performance.md), in one process on one runner:

  alone        the same feeds every call: the bench's component timing (no upload: the runner sees them unchanged)
  new-inputs   new latents and timestep every call, nothing else: the loop's inputs without the loop
  host-work    as new-inputs, with the loop's host work between calls (the DDIM update and finite check in numpy)
  pipeline     the pipeline's own calls (whole generates)
  alone-again  as alone, after the rest: a drift (clocks, memory) shows against the first

Per mode: the median and p90 call (ms), and the runner's split per call (`OrtBoundRunner.call_split`: binding and
uploading the inputs, the run, the outputs to host). Which mode first adds the time names the cause.

    python scripts/loop_vs_alone.py --artifact build/gpu-perf/sd15-onnx-fp16 --batch 1 4 --out loop.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("alone", "new-inputs", "host-work", "pipeline", "alone-again")


def _timed_calls(runner, feeds_for, calls: int, between=None) -> list[float]:
    out = []
    for i in range(calls):
        feeds = feeds_for(i)
        start = time.perf_counter()
        pred = runner(feeds)
        out.append((time.perf_counter() - start) * 1e3)
        if between is not None:
            between(feeds, pred)
    return out


class Feeds:
    """The U-Net feeds of each mode at one batch: fixed ones, new latents and timestep per call, and the loop's
    host work between calls (a DDIM-like update and the finite check, in numpy)."""

    def __init__(self, pipe, unet, batch: int, guidance: float, prompt: str):
        from ldm_deploy.runtime import guidance as g
        from ldm_deploy.runtime.runners.base import takes_guidance

        self.g, self.batch = g, batch
        self.folded = takes_guidance(unet)   # the CFG-folded graph (export --ort-cuda): B latents in; else 2B rows
        self.emb = g.rows(pipe.encode_text([""] * batch), pipe.encode_text([prompt] * batch), guidance)
        self.context, self.scalars = g.folded_context(self.emb, guidance), g.folded_scalars(guidance, 0.0)
        prof, scale = pipe.info.profiles, pipe.info.vae_scale_factor
        self.height, self.width = (prof.height.opt, prof.width.opt) if prof is not None else (512, 512)
        shape = (batch, pipe.latent_channels, self.height // scale, self.width // scale)
        self.timestep = np.empty((batch if self.folded else 2 * batch,), np.float32)
        rng = np.random.default_rng(0)
        self.fixed = self._of(rng.standard_normal(shape, dtype=np.float32), 500.0)
        self.fixed[g.TIMESTEP] = self.fixed[g.TIMESTEP].copy()
        self.latents = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]

    def _of(self, x: np.ndarray, t: float) -> dict:
        self.timestep.fill(t)
        if self.folded:
            return self.g.folded_feeds(x, self.timestep, self.context, self.scalars)
        return self.g.plain_feeds(np.concatenate([x, x]), self.timestep, self.emb)

    def new_inputs(self, i: int) -> dict:
        return self._of(self.latents[i % 4], 999.0 - 20.0 * (i % 50))

    def host_work(self, feeds: dict, pred: dict) -> None:
        eps = np.asarray(pred[self.g.OUTPUT], dtype=np.float32)[:self.batch]
        self.latents[0] = (0.99 * feeds[self.g.SAMPLE][:self.batch] - 0.01 * eps).astype(np.float32)
        float(np.vdot(self.latents[0], self.latents[0]))


def measure(artifact: str, batch: int, steps: int, guidance: float = 7.5, warmup: int = 3) -> dict:
    from ldm_deploy.bench.ort_side import CallSplits, _open_pipeline

    record: dict = {}
    pipe = _open_pipeline(artifact, "ort-cuda", {"enable_cuda_graph": True}, record, lambda m: print(m, flush=True))
    try:
        unet = pipe.runners["unet"]
        if not hasattr(unet, "call_split"):
            raise SystemExit("the U-Net runner has no call_split (not an IO-bound ort-cuda runner)")
        prompt = "a photograph of an astronaut riding a horse on the moon"
        f = Feeds(pipe, unet, batch, guidance, prompt)
        result: dict = {"batch": batch, "steps": steps, "cfg_folded": f.folded, "cuda_graph": record.get("cuda_graph"),
                        "modes": {}}
        _timed_calls(unet, lambda i: f.fixed, warmup)                 # capture and warm-up
        splits = CallSplits(unet)                                     # the bench's per-window split of the calls
        run = dict(prompt=prompt, steps=steps, guidance=guidance, scheduler="ddim", seed=0, num_images=batch,
                   height=f.height, width=f.width)
        for mode in MODES:
            if mode == "pipeline":
                pipe(**run)                                           # warm-up, outside the window
            with splits.window(mode):
                if mode in ("alone", "alone-again"):
                    samples = _timed_calls(unet, lambda i: f.fixed, steps)
                elif mode in ("new-inputs", "host-work"):
                    samples = _timed_calls(unet, f.new_inputs, steps,
                                           between=f.host_work if mode == "host-work" else None)
                else:
                    start = time.perf_counter()
                    per_call = pipe(**run).timings.get("unet_per_step")
                    result["pipeline_total_ms"] = round((time.perf_counter() - start) * 1e3, 2)
                    samples = [per_call * 1e3] if per_call else []
            entry = {"split": splits.record(unet)["unet_call_split_ms"][mode]}
            if samples:
                entry.update(median_ms=round(float(np.median(samples)), 4), p90_ms=round(float(np.percentile(samples, 90)), 4))
            result["modes"][mode] = entry
            print(f"B={batch} {mode:12} {entry.get('median_ms', '-')} ms a call; split {entry['split']}", flush=True)
        return result
    finally:
        pipe.close()


FORMAT = "ldm-deploy-loop-vs-alone"   # the --out file's "format": an earlier result, which a rerun may replace


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True, help="an artifact with the ort-cuda U-Net variant (export --ort-cuda)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=50, help="calls per mode (the pipeline: denoising steps)")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args(argv)
    from ldm_deploy.bench.machine import machine_info
    from ldm_deploy.errors import LdmError
    from ldm_deploy.fileio import check_out_file, write_json

    try:
        if args.out:   # an earlier result of this script is replaced, nothing else
            check_out_file(args.out, FORMAT)
        runs = [measure(args.artifact, b, args.steps) for b in args.batch]
    except LdmError as e:   # e.g. no CUDA here: one line, not a traceback
        print(f"loop_vs_alone: {e}", file=sys.stderr)
        return 1
    results = {"format": FORMAT, "machine": machine_info(),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "artifact": str(args.artifact),
               "runs": runs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
