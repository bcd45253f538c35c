"""The VAE decoder's fused ort-cuda graph with and without the NHWC residual passes (export/ort_nhwc_residual.py),
on one GPU: decode time and error, each against the fp32 plain graph's image.

    python scripts/vae_layout_ab.py --model-dir MODEL --work DIR --batch 1 4 --out ab.json

The decoder alone is exported from MODEL (fp32, the traced graph: what `export --ort-cuda` fuses), then fused
twice in fp16 (`vae_layout` off and on). Each graph runs in its own ONNX Runtime CUDA session with IO binding
and a CUDA graph, as the deployed runner runs it; the time is the median of `--iters` replays after warm-up.
The error is the largest absolute difference from the fp32 graph's image (TF32 off) over that image's largest
value: the passes only reorder one fp16 sum, so "after" should be as close as "before" (the GPU test
tests/runtime/test_ort_cuda_vae_layout.py holds it to that).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


FORMAT = "ldm-deploy-vae-layout-ab"   # the --out file's "format"


def export_decoder(model_dir: Path, out: Path) -> Path:
    from ldm_deploy.bench.prepare import default_size
    from ldm_deploy.export.config import ExportConfig, Range
    from ldm_deploy.export.exporter import export_model

    size = default_size(model_dir)
    cfg = ExportConfig(name="vae-ab", components=("vae_decoder",), precision="fp32", vae_precision="fp32",
                       optimize=False, measure_runtime=False, batch=Range(1, 1, 4), height=Range(size, size, size),
                       width=Range(size, size, size))
    export_model(model_dir, out, cfg, force=False)
    return out / "vae_decoder" / "model.onnx"


def session(path: Path, *, graph: bool, tf32: bool = True):
    import onnxruntime as ort

    options = {"device_id": 0, "enable_cuda_graph": "1" if graph else "0", "use_tf32": "1" if tf32 else "0"}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", options)])


def decode(sess, latent: np.ndarray, iters: int, warmup: int = 3) -> tuple[np.ndarray, list[float]]:
    """Bind the latent and output once on the device; warm up (the first run captures the CUDA graph); time."""
    import onnxruntime as ort

    dtype = np.float16 if "float16" in sess.get_inputs()[0].type else np.float32
    x = ort.OrtValue.ortvalue_from_numpy(latent.astype(dtype), "cuda", 0)
    out_meta = sess.get_outputs()[0]
    b, _, h, w = latent.shape
    y = ort.OrtValue.ortvalue_from_shape_and_type([b, 3, h * 8, w * 8], dtype, "cuda", 0)
    binding = sess.io_binding()
    binding.bind_ortvalue_input(sess.get_inputs()[0].name, x)
    binding.bind_ortvalue_output(out_meta.name, y)
    times = []
    for i in range(warmup + iters):
        binding.synchronize_inputs()
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return y.numpy().astype(np.float32), times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    from ldm_deploy.bench.machine import machine_info
    from ldm_deploy.export.ort_optimize import optimize_for_ort_cuda
    from ldm_deploy.fileio import check_out_file, write_json

    check_out_file(args.out, FORMAT)   # an earlier result of this script is replaced, nothing else
    src = export_decoder(args.model_dir, args.work / "vae-fp32")
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work, prefix=".vae-ab-") as tmp:   # never a name of the user's
        result = run(src, Path(tmp), args.batch, args.iters, optimize_for_ort_cuda)
    write_json(args.out, {"format": FORMAT, "machine": machine_info(), **result})
    return 0


def run(src: Path, tmp: Path, batches, iters: int, optimize) -> dict:
    """Fuse `src` without and with the passes into `tmp`, then time and check both at each batch size."""
    import onnxruntime as ort

    graphs, result = {}, {"graphs": {}, "batches": {}, "onnxruntime": ort.__version__}
    for name, layout in (("before", False), ("after", True)):
        graphs[name] = tmp / f"vae_decoder.{name}.onnx"
        stats = optimize(src, graphs[name], "vae_decoder", float16=True, vae_layout=layout)
        result["graphs"][name] = {k: stats.get(k) for k in ("fused_ops", "nodes_after", "vae_layout")}
    reference = session(src, graph=False, tf32=False)
    for batch in batches:
        rng = np.random.default_rng(batch)
        size = reference.get_inputs()[0].shape[2]
        latent = rng.standard_normal((batch, 4, size if isinstance(size, int) else 64,
                                      size if isinstance(size, int) else 64)).astype(np.float32)
        want, _ = decode(reference, latent, iters=1, warmup=0)
        scale = float(np.abs(want).max())
        rows = {}
        for name, path in graphs.items():
            got, times = decode(session(path, graph=True), latent, iters)
            rows[name] = {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3),
                          "err": float(np.abs(got - want).max()) / scale}
            print(f"B={batch} {name}: {rows[name]}", flush=True)
        result["batches"][str(batch)] = rows
    return result


if __name__ == "__main__":
    from ldm_deploy.errors import script_exit

    sys.exit(script_exit(main, "vae_layout_ab"))   # e.g. --out names a file of the user's: one line, nothing written
