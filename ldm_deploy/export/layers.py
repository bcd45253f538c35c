"""Per-layer comparison of two ONNX graphs of one component, done by Polygraphy.

Polygraphy's three nouns do the work: its ONNX loader `ModifyOutputs` marks every intermediate tensor
the two graphs share as a graph output, `OnnxrtRunner` (or `TrtRunner` for a TensorRT engine) runs each
graph, and `Comparator.run` / `Comparator.compare_accuracy` compare every marked tensor with a
tolerance per output. What we add is the bookkeeping an fp16 hunt needs: the producing node and op
type of each tensor, the topological order (so "the first node that goes wrong" means something), the
fp32 magnitude of each activation against the fp16 range, and aggregation over several inputs.

The tolerance is relative to the reference tensor's scale, as everywhere in ldm-deploy
(`compare.error_stats`): a tensor fails when max |test - ref| > tolerance * max |ref|, or when the
test graph makes a non-finite value. It reaches Polygraphy as a per-output absolute tolerance
(`atol={name: tolerance * max|ref|}`) with `check_error_stat="max"` and `rtol=0`: Polygraphy's own
relative error is element-wise (|a - b| / |b|), which is meaningless for activations that cross zero.

    report = compare_layers(fp32_path, fp16_path, feeds, tolerance=2e-2)
    print(report.table()); report.first_failure(); report.overflows(margin=0.5)
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ldm_deploy.export import onnx_io

FP16_MAX = float(np.finfo(np.float16).max)   # 65504, the largest finite float16
SENTINEL = 1e38             # |x| above this is float32's max used as "infinity" (attention masks)


@dataclass
class LayerStat:
    order: int                  # index of the producing node in the reference graph (topological order)
    tensor: str
    node: str
    op: str
    dtype: str                  # the tensor's dtype in the test graph ("float16", "float32", ...)
    ref_max: float = 0.0        # max |reference| over all inputs
    max_abs: float = 0.0        # max |test - reference| over all inputs (inf where test is non-finite)
    max_rel: float = 0.0        # max over inputs of max_abs / max |reference|
    nonfinite: int = 0          # non-finite values the test graph produced, over all inputs
    passed: bool = True         # Polygraphy's verdict, on every input
    input_max: list[float] = field(default_factory=list)   # max |reference| per input

    @property
    def sentinel(self) -> bool:
        """Holds float32's extreme value on purpose: an attention mask's `finfo(float32).min` ("-inf").
        fp16 stores it as -inf / -65504 and the Softmax after it gives the same result, so such a
        tensor is neither an overflow nor an error (the outputs' comparison still covers it)."""
        return self.ref_max >= SENTINEL

    def over(self, limit: float) -> list[int]:
        """Inputs on which the reference activation's magnitude exceeds `limit`."""
        return [i for i, m in enumerate(self.input_max) if m > limit]


@dataclass
class LayerReport:
    reference: str              # what ran the reference graph, e.g. "fp32 graph on onnxruntime (cpu)"
    test: str
    tolerance: float
    inputs: list[str]           # one description per input
    outputs: list[str]          # the graphs' own outputs
    layers: list[LayerStat]     # float tensors shared by both graphs, in topological order

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.layers if s.tensor in self.outputs)

    def first_failure(self) -> LayerStat | None:
        """The earliest tensor (topological order) whose error exceeds the tolerance."""
        return next((s for s in self.layers if not s.passed and not s.sentinel), None)

    def overflows(self, margin: float = 1.0) -> list[LayerStat]:
        """fp16 tensors of the test graph whose fp32 magnitude exceeds margin * 65504 on some input."""
        return [s for s in self.layers if s.dtype == "float16" and s.ref_max > margin * FP16_MAX and not s.sentinel]

    def sentinels(self) -> list[LayerStat]:
        return [s for s in self.layers if s.sentinel]

    def as_dict(self) -> dict:
        d = asdict(self)
        first = self.first_failure()
        d["passed"] = self.passed
        d["first_failure"] = None if first is None else asdict(first)
        return d

    def table(self, limit: int = 15) -> str:
        """The worst `limit` layers by relative error, in graph order."""
        ranked = sorted((s for s in self.layers if not s.sentinel), key=lambda s: -s.max_rel)
        worst = sorted(ranked[:limit], key=lambda s: s.order)
        head = ("#", "node", "op", "dtype", "max |fp32|", "max abs", "max rel", "non-finite", "result")
        rows = [(str(s.order), s.node, s.op, s.dtype, f"{s.ref_max:.3g}", f"{s.max_abs:.2e}", f"{s.max_rel:.2e}",
                 str(s.nonfinite), "ok" if s.passed else "FAIL") for s in worst]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *rows])


def graph_nodes(path: Path):
    """(tensor -> (order, node name, op type)) for every node output of the graph at `path`."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    producers = {}
    for i, node in enumerate(model.graph.node):
        for out in node.output:
            if out:
                producers[out] = (i, node.name, node.op_type)
    return model, producers


def mark_shared(reference: Path, test: Path, work: Path, names: Sequence[str] | None = None
                ) -> tuple[Path, Path, list[str], dict]:
    """Copies of both graphs with every shared tensor (or just `names`) marked as an output, by Polygraphy."""
    import onnx
    from polygraphy.backend.onnx import ModifyOutputs
    from polygraphy.backend.onnx import util as onnx_util

    ref_model, producers = graph_nodes(reference)
    outputs = [o.name for o in ref_model.graph.output]
    if names is None:
        test_model = onnx.load(str(test), load_external_data=False)
        in_test = set(onnx_util.all_tensor_names(test_model)) | {o.name for o in test_model.graph.output}
        names = [t for t in onnx_util.all_tensor_names(ref_model) if t in in_test]
        names += [o for o in outputs if o not in names]
    marked = []
    for src, tag in ((reference, "reference"), (test, "test")):
        model = onnx.load(str(src))     # with its weights: the marked copy is a complete graph
        model = ModifyOutputs(model, outputs=list(names))()
        dst = work / tag / "model.onnx"
        onnx_io.save_model(model, dst)
        marked.append(dst)
    return marked[0], marked[1], list(names), {"producers": producers, "outputs": outputs}


def ort_runner(path: Path, name: str, providers: Sequence[str] = ("cpu",)):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(path), providers=list(providers))(), name=name)


def trt_runner(path: Path, name: str, fp16: bool):  # pragma: no cover - needs a GPU TensorRT supports
    """Polygraphy's TensorRT runner over an engine it builds from the marked ONNX graph."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, TrtRunner

    return TrtRunner(EngineFromNetwork(NetworkFromOnnxPath(str(path)), config=CreateConfig(fp16=fp16)), name=name)


@contextlib.contextmanager
def quiet_polygraphy():
    """Polygraphy logs one line per compared tensor; keep only its critical errors."""
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    import warnings
    warnings.filterwarnings("ignore", message="invalid value encountered", module="polygraphy")
    try:
        yield
    finally:
        G_LOGGER.module_severity = old


def compare_layers(reference: Path, test: Path, feeds: Sequence[dict[str, np.ndarray]], *, tolerance: float,
                   descriptions: Sequence[str] | None = None, names: Sequence[str] | None = None,
                   providers: Sequence[str] = ("cpu",), test_runner: Callable | None = None,
                   labels: tuple[str, str] = ("fp32", "fp16"),
                   reference_providers: Sequence[str] = ("cpu",)) -> LayerReport:
    """Run both graphs on each feed with all shared tensors marked, compare them with Polygraphy.

    `test_runner(marked_path, name)` builds the test side's Polygraphy runner (default: ONNX Runtime
    on `providers`); the reference runs on ONNX Runtime on `reference_providers` (the CPU: fp32 without
    TF32, the same on every machine). Feeds are run one at a time so only
    one input's activations are held in memory.
    """
    from polygraphy.comparator import Comparator, CompareFunc

    with tempfile.TemporaryDirectory(prefix="ldm-layers-") as tmp, quiet_polygraphy():
        ref_path, test_path, names, info = mark_shared(Path(reference), Path(test), Path(tmp), names)
        runners = [ort_runner(ref_path, labels[0], reference_providers),
                   (test_runner or (lambda p, n: ort_runner(p, n, providers)))(test_path, labels[1])]
        stats: dict[str, LayerStat] = {}
        for feed in feeds:
            results = Comparator.run(runners, data_loader=[feed])
            ref_out, test_out = results[0][1][0], results[1][1][0]
            scales = {n: float(np.max(np.abs(np.asarray(a, np.float64)))) if np.size(a) else 0.0
                      for n, a in ref_out.items() if np.issubdtype(np.asarray(a).dtype, np.floating)}
            # the scale-relative tolerance, per output, as Polygraphy's absolute tolerance
            func = CompareFunc.simple(atol={n: tolerance * s for n, s in scales.items()}, rtol=0.0,
                                      check_error_stat="max")
            accuracy = Comparator.compare_accuracy(results, compare_func=func)
            verdicts = accuracy[0][(labels[0], labels[1])][0]
            for tensor, scale in scales.items():
                if tensor not in test_out:
                    continue
                s = stats.get(tensor)
                if s is None:
                    order, node, op = info["producers"].get(tensor, (-1, tensor, "Input"))
                    s = stats[tensor] = LayerStat(order, tensor, node, op, np.asarray(test_out[tensor]).dtype.name)
                got = np.asarray(test_out[tensor])
                nonfinite = int(got.size - np.count_nonzero(np.isfinite(got)))
                verdict = verdicts.get(tensor)
                max_abs = float("inf") if nonfinite else float(verdict.max_absdiff) if verdict is not None else 0.0
                s.ref_max = max(s.ref_max, scale)
                s.input_max.append(scale)
                s.max_abs = max(s.max_abs, max_abs)
                s.max_rel = max(s.max_rel, max_abs / scale if scale > 0 else max_abs)
                s.nonfinite += nonfinite
                s.passed = s.passed and nonfinite == 0 and (verdict is None or bool(verdict))
            del results, ref_out, test_out
    layers = sorted(stats.values(), key=lambda s: s.order)
    return LayerReport(reference=f"{labels[0]}: {Path(reference).name}", test=f"{labels[1]}: {Path(test).name}",
                       tolerance=tolerance,
                       inputs=list(descriptions) if descriptions else [f"input {i}" for i in range(len(feeds))],
                       outputs=info["outputs"], layers=layers)


def time_graph(path: Path, feed: dict[str, np.ndarray], providers: Sequence[str] = ("cpu",), runs: int = 5) -> float:
    """Median latency in ms of the unmarked graph at `path` (after one warm-up run), through Polygraphy's runner."""
    import time

    with quiet_polygraphy():
        runner = ort_runner(path, "timing", providers)
    types = {i.name: np.float16 if i.type == "tensor(float16)" else None for i in runner._sess.get_inputs()}
    feed = {k: v.astype(types[k]) if types.get(k) else v for k, v in feed.items()}
    with quiet_polygraphy(), runner:
        runner.infer(feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            runner.infer(feed)
            times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))
