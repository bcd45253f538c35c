"""The timestep sinusoid of an fp16 U-Net conversion against its fp32 graph (issue 22), on ONNX Runtime CPU.

Converts an fp32 U-Net graph as `export` and `debug-precision` do (`export/precision.convert`: the config's kept
ops, the fp32 timestep path) and runs both graphs with the sinusoid's argument (t * freq), `/unet/Cos`,
`/unet/Sin`, the time embedding's first Gemm and `noise_pred` marked as outputs, at the given timesteps.
`--unfixed` also converts it with `export/fp16.constant_feeders` disabled: the conversion before the fix, whose
frequency table (a `Constant` node in a graph onnxslim did not clean up) was rounded to fp16.

    python scripts/precision_sinusoid.py --fp32 /tmp/prec/sd15-fp32/unet/model.onnx --config sd15 --unfixed \
        --out benchmarks/precision/sd15-sinusoid-cpu2core.json

The fp32 graph comes from an fp32 export (`scripts/precision_report.py --model sd15` caches one under --work).
Peak memory is about 2.5x the fp32 graph's weights (one session at a time).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARG, COS, SIN = "/unet/Mul_1_output_0", "/unet/Cos_output_0", "/unet/Sin_output_0"
LINEAR_1, OUT = "/unet/time_embedding/linear_1/Gemm_output_0", "noise_pred"


def marked(src: Path, names: list[str], work: Path) -> Path:
    """`src` with `names` added as outputs, written to `work` (its external data file hard-linked there: ONNX
    Runtime refuses a data file outside the model's folder, through a symlink too; copied across file systems)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    work.mkdir(parents=True, exist_ok=True)
    for data in {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}:
        link = work / data
        if not link.exists():
            try:
                os.link(src.parent / data, link)
            except OSError:
                shutil.copyfile(src.parent / data, link)
    dst = work / "marked.onnx"
    onnx.save(model, str(dst))
    return dst


def run(path: Path, names: list[str], t: float, size: int, seed: int) -> dict[str, np.ndarray]:
    """One U-Net call on a batch of 2: N(0, 1) latents and text states, both rows at timestep `t`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        dtype = np.float16 if i.type == "tensor(float16)" else np.float32
        if i.name == "timestep":
            feeds[i.name] = np.full(2, t, np.float32)
            continue
        shape = [2, *(d if isinstance(d, int) else size // 8 for d in i.shape[1:])]
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    out = {n: r.astype(np.float32) for n, r in zip(names, session.run(names, feeds))}
    del session
    gc.collect()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp32", required=True, help="an fp32 U-Net graph (an fp32 export's unet/model.onnx)")
    p.add_argument("--config", default="sd15", help="export config whose fp16_keep_ops the conversion uses")
    p.add_argument("--size", type=int, default=256, help="image size (latents size/8)")
    p.add_argument("--t", type=float, nargs="+", default=[901.0, 643.7], help="timesteps")
    p.add_argument("--unfixed", action="store_true", help="also the conversion without export/fp16.constant_feeders")
    p.add_argument("--work", default="/tmp/precision-sinusoid", help="where the fp16 graphs are written")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from ldm_deploy.bench.machine import machine_info
    from ldm_deploy.export import fp16
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.precision import convert
    from ldm_deploy.fileio import write_json

    config, work, names = load_config(args.config), Path(args.work), [ARG, COS, SIN, LINEAR_1, OUT]
    graphs = {"fp32": Path(args.fp32)}
    for tag in ("fixed", "unfixed") if args.unfixed else ("fixed",):
        feeders = fp16.constant_feeders
        if tag == "unfixed":
            fp16.constant_feeders = lambda *a, **k: []
        try:
            start = time.perf_counter()
            graphs[tag] = convert(graphs["fp32"], work / tag / "model.onnx", config, "unet")
            print(f"{tag}: converted in {time.perf_counter() - start:.0f} s", flush=True)
        finally:
            fp16.constant_feeders = feeders
    results = {}
    for k, t in enumerate(args.t):
        outs = {tag: run(marked(g, names, work / f"marked-{tag}"), names, t, args.size, seed=k)
                for tag, g in graphs.items()}
        for tag in [g for g in graphs if g != "fp32"]:
            d = {n: float(np.abs(outs[tag][n] - outs["fp32"][n]).max()) for n in names}
            entry = {"max_abs": d, "max_rel": {n: d[n] / float(np.abs(outs["fp32"][n]).max()) for n in names}}
            results[f"t={t} {tag}"] = entry
            print(f"t={t} {tag}: " + ", ".join(f"{n.split('/')[-1]} {v:.3g}" for n, v in d.items()), flush=True)
    write_json(Path(args.out), {"machine": machine_info(), "command": " ".join(sys.argv), "fp32_graph": args.fp32,
                                "size": args.size, "compared": names, "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
