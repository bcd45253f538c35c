"""Graph cleanup after tracing, and the measurements that justify it.

`cleanup` runs onnxslim: constant folding, shape inference, dead-node and redundant-op removal
(the TorchScript exporter leaves many Shape/Gather/Unsqueeze/Concat chains behind). `measure`
records node count and ONNX Runtime CPU latency, so the manifest says what cleanup bought.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx

from ldm_deploy.export import onnx_io

log = logging.getLogger(__name__)


def node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def cleanup(src: Path, dst: Path) -> dict:
    """Slim the graph at `src` into `dst`. Returns a record; on failure `dst` is a copy and the record says why."""
    import onnxslim

    before = node_count(src)
    start = time.perf_counter()
    if onnx_io.is_big(src):
        # onnxslim serializes the whole model, which fails over protobuf's 2 GB limit ("EncodeError: Failed
        # to serialize proto", measured on the SD 1.5 U-Net after 41 s holding copies of the weights): not run
        onnx_io.copy_model(src, dst)
        return {"tool": "onnxslim", "applied": False, "nodes_before": before, "nodes_after": node_count(dst),
                "seconds": round(time.perf_counter() - start, 2),
                "error": "not run: the graph is over protobuf's 2 GB limit, which onnxslim cannot serialize"}
    try:
        model = onnxslim.slim(onnx.load(str(src)))
        onnx_io.save_model(model, dst)
        ok, why = True, None
    except Exception as e:  # noqa: BLE001 - a failed cleanup leaves a valid, un-slimmed graph
        log.warning("onnxslim failed on %s (%s); keeping the traced graph", src, e)
        onnx_io.copy_model(src, dst)
        ok, why = False, f"{type(e).__name__}: {e}"[:200]
    rec = {"tool": "onnxslim", "applied": ok, "nodes_before": before, "nodes_after": node_count(dst),
           "seconds": round(time.perf_counter() - start, 2)}
    if why:
        rec["error"] = why
    return rec


def ort_session(path: Path, threads: int = 1, graph_opt: bool = True, arena: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not graph_opt:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def cast_inputs(session, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast each input to the dtype the graph declares (fp16 graphs take fp16 tensors)."""
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
             "tensor(int64)": np.int64}
    return {i.name: np.asarray(inputs[i.name]).astype(types[i.type]) for i in session.get_inputs()}


def time_ort(path: Path, inputs: dict[str, np.ndarray], runs: int = 5,
             low_memory: bool = False, threads: int = 1) -> tuple[float, dict[str, np.ndarray]]:
    """Median ORT CPU latency in ms (after one warm-up run) and the outputs of the last run.

    `threads`: ORT's intra-op threads; 1 (the default) for latencies comparable across machines, 0 for ORT's
    default (one per physical core) where only the outputs matter (the export's check run).

    `low_memory`: no graph optimizations and no memory arena. ORT CPU runs most fp16 ops through inserted
    Casts to fp32; its constant folding would store an fp32 copy of every fp16 weight next to it (the SDXL
    U-Net: 5.1 GB fp16 + 10.3 GB fp32), where unoptimized the Casts convert one weight at a time per run."""
    sess = ort_session(path, threads=threads, graph_opt=not low_memory, arena=not low_memory)
    feed = cast_inputs(sess, inputs)
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        outs = sess.run(names, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return (float(np.median(times)) if times else float("nan")), dict(zip(names, outs))
