"""Where a U-Net step's time goes, per op type: ONNX Runtime's profile of the deployed graph beside torch.profiler's
of the PyTorch module, on the same shapes, in the same buckets.

    ort = profile_ort(artifact, batch=1, backend="ort-cuda")          # {"source", "wall_ms", "buckets", "top", ...}
    pt = profile_torch(model_dir, batch=1, mode="reduce-overhead", channels_last=True)
    print(profile_table([ort, pt]))

Sources of the events:
- `onnxruntime-nodes`: ONNX Runtime's own profiler (`SessionOptions.enable_profiling`), one event per graph
  node with its op type. On the CPU a node's time is its compute; on CUDA it is the host time of the
  launch, so on a GPU the kernels come from CUPTI instead:
- `cupti-kernels`: the GPU kernels (and memcpy/memset) of the profiled calls, recorded by CUPTI through
  torch.profiler (CUPTI sees every kernel of the process, ORT's included); the ORT node profile is kept
  beside it for the node count per op type. `onnxruntime-kernels` when ORT's own trace has kernel events.
- `torch-cpu-ops`: torch.profiler's CPU ops, each op's self time (children excluded) so nothing counts twice.

Buckets (BUCKETS): convolution, attention, GroupNorm (and LayerNorm), GEMM, elementwise, layout transforms and
casts, memcpy, other, and gaps: the calls' wall time not covered by any event (GPU idle between kernels:
launch / host cost; on the CPU, framework time between ops). Per call, in ms, and as a share of the wall
time. A kernel's bucket comes from its ORT op type, else from its name (`bucket_of`: cuDNN / cuBLAS /
CUTLASS / flash / inductor's triton_* names).
"""
from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from ldm_deploy.errors import UsageError

PROFILED = ("unet", "vae_decoder")   # the components a profile can time: a U-Net CFG step, a VAE decode
BUCKETS = ("convolution", "attention", "groupnorm", "gemm", "elementwise", "layout_cast", "memcpy", "other", "gaps")
BUCKET_NOTES = {
    "convolution": "Conv / NhwcConv / cuDNN fprop / implicit GEMM / inductor conv templates",
    "attention": "fused attention (MultiHeadAttention, flash / memory-efficient / cuDNN SDPA), softmax",
    "groupnorm": "GroupNorm, SkipGroupNorm, LayerNorm (and their reductions)",
    "gemm": "MatMul / Gemm (cuBLAS, CUTLASS, inductor mm templates): projections, feed-forward",
    "elementwise": "adds, muls, SiLU / GELU, bias adds, inductor pointwise kernels",
    "layout_cast": "Transpose / NCHW<->NHWC, Cast, copies, Concat / Split / Slice / Reshape, Resize",
    "memcpy": "host<->device and device<->device copies, memsets",
    "other": "anything not matched above",
    "gaps": "wall time with no event running (GPU idle: launch / host cost)",
}

_OP_TYPES = {
    "convolution": {"Conv", "NhwcConv", "FusedConv", "ConvTranspose", "QLinearConv"},
    "attention": {"Attention", "MultiHeadAttention", "PackedAttention", "PackedMultiHeadAttention",
                  "GroupQueryAttention", "Softmax", "SoftmaxCrossEntropy"},
    "groupnorm": {"GroupNorm", "SkipGroupNorm", "GroupNormalization", "LayerNormalization", "SkipLayerNormalization",
                  "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "InstanceNormalization",
                  "BatchNormalization"},
    "gemm": {"MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "MatMulInteger", "QuickGemm"},
    "layout_cast": {"Transpose", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice",
                    "Gather", "Expand", "Shape", "Pad", "Resize", "Upsample", "Identity", "Tile", "DepthToSpace",
                    "ReorderInput", "ReorderOutput"},
    "memcpy": {"MemcpyToHost", "MemcpyFromHost"},
    "elementwise": {"Add", "Sub", "Mul", "Div", "Sigmoid", "Silu", "QuickGelu", "Gelu", "FastGelu", "BiasGelu",
                    "BiasSplitGelu", "BiasAdd", "Erf", "Sqrt", "Pow", "Tanh", "Neg", "Exp", "Sin", "Cos", "Where",
                    "Clip", "Relu", "ReduceMean", "ReduceSum", "Equal", "Less", "Greater", "Not", "Abs",
                    "Reciprocal", "Max", "Min", "Floor", "Ceil", "Round", "Range", "ConstantOfShape", "Trilu"},
}
_BY_OP_TYPE = {op: bucket for bucket, ops in _OP_TYPES.items() for op in ops}
# kernel / op names -> bucket, first match wins (conv before layout: cuDNN conv kernels name their nhwc layout;
# attention before GEMM: flash kernels are GEMMs inside)
_NAME_RULES = (
    ("memcpy", re.compile(r"^mem(cpy|set)|memcpy|memset", re.I)),   # CUPTI's copies; aten::copy_ is a layout copy
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa|softmax|mha_", re.I)),
    ("groupnorm", re.compile(r"group_?norm|layer_?norm|instance_?norm|batch_?norm|rowwisemoments|"
                             r"computefusedparams|welford", re.I)),
    ("convolution", re.compile(r"conv|fprop|implicit_?gemm|implicit_convolve|winograd|dgrad|wgrad|mkldnn", re.I)),
    # cuBLAS(Lt) on Hopper names its kernels nvjet_* (a GEMM with a bias epilogue ends in `_bias_TNN`: still a
    # GEMM); older ones sm80/sm90_xmma_gemm_*, ampere_*gemm*, gemv*, cublasLt epilogue / split-K reductions;
    # inductor calls cuBLAS through extern_kernels.mm/bmm/addmm or generates triton_tem_*mm* templates
    ("gemm", re.compile(r"nvjet|gemm|gemv|cublas|cutlass|matmul|aten::(mm|bmm|addmm|baddbmm|linear)$|triton_tem_|"
                        r"extern_kernels\.(mm|bmm|addmm|baddbmm)|_mm_|splitk|xmma", re.I)),
    # activations before layout: ORT's biasSplitGeluKernel names a split but computes GELU; cuDNN's
    # op_generic_tensor_kernel is cudnnOpTensor / cudnnAddTensor (ORT's conv bias add)
    ("elementwise", re.compile(r"gelu|silu|swish|sigmoid|op_generic_tensor|optensor|addtensor", re.I)),
    ("layout_cast", re.compile(r"transpose|permute|nchw|nhwc|cast|copy|convert|contiguous|concat|aten::cat$|"
                               r"_cat_|pad|upsample|resize|slice|split|gather|expand|aten::(view|reshape|chunk|"
                               r"unflatten|flatten|as_strided|empty|empty_strided|t|to|_to_copy|narrow|select|"
                               r"unsqueeze|squeeze|"
                               r"clone|repeat|_unsafe_view|split_with_sizes)$", re.I)),
    ("elementwise", re.compile(r"elementwise|triton_(poi|red|per)_|vectorized|unrolled|binary|unary|silu|gelu|"
                               r"sigmoid|bias|aten::(add|sub|mul|div|neg|exp|sin|cos|pow|sqrt|rsqrt|mean|sum|"
                               r"clamp|round|full|fill_|zero_|arange|ones|zeros)_?$|reduce|fill", re.I)),
)


_TRITON = re.compile(r"^triton_(poi|red|per)_fused_?(.*?)(_\d+)?$")
_COMPUTE = re.compile(r"add|mul|sub|div|silu|gelu|sigmoid|tanh|exp|mean|sum|pow|sqrt|erf|neg|relu|where|clamp|var")


def bucket_of(name: str, op_type: str | None = None) -> str:
    """The bucket of one event: its ONNX op type when known, else its kernel / op name. Inductor's pointwise /
    reduction kernels are named after the aten ops they fuse: GroupNorm / softmax by those names, any
    arithmetic makes them elementwise (a conv's bias epilogue included), else they only move data (layout)."""
    if op_type and op_type in _BY_OP_TYPE:
        return _BY_OP_TYPE[op_type]
    triton = _TRITON.match(name)
    if triton:
        ops = triton.group(2)
        if re.search(r"group_norm|layer_norm", ops):
            return "groupnorm"
        if "softmax" in ops:
            return "attention"
        return "elementwise" if _COMPUTE.search(ops) else "layout_cast"
    for bucket, pattern in _NAME_RULES:
        if pattern.search(name):
            return bucket
    return "other"


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time with at least one event running."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def summarize(events: list[dict], wall_ms: float, calls: int, source: str, top: int = 15,
              overlap: bool = True, per_bucket: int = 10) -> dict:
    """Bucket `events` ({"name", "op_type"?, "dur_us", "ts_us"?}) of `calls` calls that took `wall_ms` in all.
    `overlap`: events may run concurrently (GPU kernels on streams): busy time is the union of their intervals
    and each bucket's share of it is split in proportion to the summed durations; otherwise (sequential CPU
    ops / nodes) busy time is the sum. `top`: the largest kernels / ops overall; `top_by_bucket`: the
    `per_bucket` largest of each bucket, so a stored profile shows what each bucket holds (and can be
    re-bucketed when `bucket_of` learns a name, `rebucket`)."""
    calls = max(1, int(calls))
    sums: dict[str, float] = {b: 0.0 for b in BUCKETS if b != "gaps"}
    counts: dict[str, int] = {b: 0 for b in sums}
    names: dict[tuple[str, str], list] = {}
    for e in events:
        bucket = bucket_of(e["name"], e.get("op_type"))
        sums[bucket] += e["dur_us"]
        counts[bucket] += 1
        key = (e.get("op_type") or e["name"], bucket)
        names.setdefault(key, [0.0, 0])
        names[key][0] += e["dur_us"]
        names[key][1] += 1
    summed = sum(sums.values())
    if overlap and events and all("ts_us" in e for e in events):
        busy = _busy_us([(e["ts_us"], e["ts_us"] + e["dur_us"]) for e in events])
    else:
        busy = summed
    scale = busy / summed if summed else 0.0
    wall_us = wall_ms * 1e3
    gaps = max(0.0, wall_us - busy)
    per_call = {b: sums[b] * scale / calls / 1e3 for b in sums}
    per_call["gaps"] = gaps / calls / 1e3
    denominator = max(wall_us, busy) / calls / 1e3 or 1.0

    def entry(n, v):
        return {"name": n[:160], "ms_per_call": round(v[0] * scale / calls / 1e3, 4),
                "events_per_call": round(v[1] / calls, 1)}

    ranked = sorted(names.items(), key=lambda kv: -kv[1][0])
    by_bucket: dict[str, list] = {}
    for (n, b), v in ranked:
        if len(by_bucket.setdefault(b, [])) < per_bucket:
            by_bucket[b].append(entry(n, v))
    return {
        "source": source, "calls": calls, "wall_ms_per_call": round(wall_ms / calls, 4),
        "busy_ms_per_call": round(busy / calls / 1e3, 4), "events_per_call": round(len(events) / calls, 1),
        "buckets": {b: {"ms_per_call": round(per_call[b], 4), "share": round(per_call[b] / denominator, 4),
                        "events_per_call": round(counts.get(b, 0) / calls, 1)} for b in BUCKETS},
        "top": [{**entry(n, v), "bucket": b} for (n, b), v in ranked[:top]],
        "top_by_bucket": {b: by_bucket[b] for b in BUCKETS if b in by_bucket},
    }


def rebucket(profile: dict) -> dict:
    """`profile` (a stored summarize() result) with its listed kernels put in the buckets `bucket_of` gives them
    now: each `top` / `top_by_bucket` entry whose bucket changed moves its ms and events from the old bucket to
    the new one. Exact for the listed kernels; kernels a profile did not list stay where they were (a profile
    with only the overall `top` list, older than `top_by_bucket`, gives a lower bound for the buckets that
    gain). Returns a copy with `rebucketed`: what moved, and from which lists."""
    import copy

    p = copy.deepcopy(profile)
    if p.get("top_by_bucket"):
        listed = [{**e, "bucket": b} for b, entries in p["top_by_bucket"].items() for e in entries]
    else:
        listed = list(p.get("top") or [])
    moved: list[dict] = []
    for e in listed:
        new = bucket_of(e["name"], e["name"])   # node profiles list op types, kernel profiles kernel names
        if new == e["bucket"] or e["name"] in {m["name"] for m in moved}:
            continue
        for key in ("ms_per_call", "events_per_call"):
            p["buckets"][e["bucket"]][key] = round(p["buckets"][e["bucket"]][key] - e[key], 4)
            p["buckets"][new][key] = round(p["buckets"][new][key] + e[key], 4)
        moved.append({"name": e["name"], "from": e["bucket"], "to": new, "ms_per_call": e["ms_per_call"]})
    denominator = max(p["wall_ms_per_call"], p.get("busy_ms_per_call", 0.0)) or 1.0
    for b in p["buckets"].values():
        b["share"] = round(b["ms_per_call"] / denominator, 4)
    for e in p.get("top") or []:
        e["bucket"] = bucket_of(e["name"], e["name"])
    if p.get("top_by_bucket"):
        lists: dict[str, list] = {}
        for e in listed:
            lists.setdefault(bucket_of(e["name"], e["name"]), []).append(
                {k: v for k, v in e.items() if k != "bucket"})
        p["top_by_bucket"] = {b: sorted(lists[b], key=lambda x: -x["ms_per_call"]) for b in BUCKETS if b in lists}
    p["rebucketed"] = {"moved": moved, "lists": "top_by_bucket" if profile.get("top_by_bucket") else "top"}
    return p


def parse_ort_trace(path: str | Path, skip_runs: int = 0) -> tuple[list[dict], list[dict], float, int]:
    """ONNX Runtime's JSON profile -> (node events, kernel events, wall ms of the kept runs, kept runs).

    Runs are the trace's `model_run` events; the first `skip_runs` (warm-ups) are dropped with every event
    inside them. Node events are `cat: Node` `*_kernel_time` events (op type in args.op_name); kernel events
    are `cat: Kernel` events, present when the ORT build records GPU kernels."""
    trace = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(trace, dict):
        trace = trace.get("traceEvents", [])
    runs = sorted((e for e in trace if e.get("name") == "model_run" and "dur" in e), key=lambda e: e["ts"])
    kept = runs[skip_runs:]
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in kept]

    def inside(e) -> bool:
        return any(a <= e["ts"] <= b for a, b in windows)

    nodes = [{"name": e["name"][: -len("_kernel_time")], "op_type": (e.get("args") or {}).get("op_name"),
              "dur_us": float(e["dur"]), "ts_us": float(e["ts"]),
              "provider": (e.get("args") or {}).get("provider")}
             for e in trace if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
             and "dur" in e and inside(e)]
    kernels = [{"name": e["name"], "dur_us": float(e["dur"]), "ts_us": float(e["ts"])}
               for e in trace if e.get("cat") == "Kernel" and "dur" in e and inside(e)]
    return nodes, kernels, sum(r["dur"] for r in kept) / 1e3, len(kept)


def _unet_feeds(spec, batch: int, height: int, width: int, hidden: int, guidance: float = 7.5) -> dict:
    """Inputs of one CFG U-Net step at the manifest's dtypes: 2B rows, or B latents for a CFG-folded graph."""
    rng = np.random.default_rng(0)
    dtypes = {i.name: np.dtype(i.dtype) for i in spec.inputs}
    folded = "guidance_scale" in dtypes
    rows = batch if folded else 2 * batch
    feeds = {"sample": rng.standard_normal((rows, 4, height // 8, width // 8)),
             "timestep": np.full((rows,), 500.0),
             "encoder_hidden_states": rng.standard_normal((2 * batch, 77, hidden)) * 0.5}
    if folded:
        feeds["guidance_scale"] = np.array([guidance])
        feeds["guidance_rescale"] = np.zeros(1)
    shapes = {i.name: list(i.shape) for i in spec.inputs}
    if "sample" in shapes and isinstance(shapes["sample"][1], int):
        feeds["sample"] = rng.standard_normal((rows, shapes["sample"][1], height // 8, width // 8))
    return {n: np.ascontiguousarray(feeds[n], dtype=dtypes[n]) for n in dtypes}


def _feeds(art, component: str, spec, batch: int, height: int, width: int) -> dict:
    """The profiled call's inputs: a U-Net CFG step's, or a VAE decode's."""
    if component == "unet":
        configs = art.model_configs
        hidden = int(configs["unet"].get("cross_attention_dim") or configs["text_encoder"]["hidden_size"])
        return _unet_feeds(spec, batch, height, width, hidden)
    return _vae_feeds(spec, batch, height, width)


def _vae_feeds(spec, batch: int, height: int, width: int) -> dict:
    """The VAE decoder's input: B latents at the manifest's dtype (channels from its shape, else 4)."""
    shape = next(list(i.shape) for i in spec.inputs if i.name == "latent")
    channels = shape[1] if isinstance(shape[1], int) else 4
    latent = np.random.default_rng(0).standard_normal((batch, channels, height // 8, width // 8))
    return {"latent": np.ascontiguousarray(latent, dtype=np.dtype(spec.inputs[0].dtype))}


def _cupti_profile(run, iters: int):
    """Run `run` `iters` times under torch.profiler with CUDA activity: (kernel events, wall ms)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            run()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    kernels = [{"name": e.name, "dur_us": float(e.time_range.end - e.time_range.start),
                "ts_us": float(e.time_range.start)}
               for e in prof.events() if e.device_type == DeviceType.CUDA]
    return kernels, wall_ms


def profile_ort(artifact, *, batch: int = 1, height: int | None = None, width: int | None = None,
                backend: str = "ort-cpu", variant: str | None = "auto", provider_options: dict | None = None,
                iters: int = 10, warmup: int = 3, threads: int | None = None, levers_dir=None,
                component: str = "unet") -> dict:
    """Profile the deployed U-Net step (or, `component` "vae_decoder", one VAE decode of B latents) with ONNX
    Runtime's profiler (and CUPTI kernels on CUDA when torch is there). `variant` "auto" runs the ort-cuda fused
    graph on CUDA when the artifact has it; with `levers_dir`, `variant` names a U-Net lever graph of the
    benchmark's folder instead (bench/prepare.py, e.g. "tuning-fold-transposes")."""
    import onnxruntime as ort

    from ldm_deploy.artifact import Artifact

    art = Artifact.open(artifact, verify=False)
    cuda = backend == "ort-cuda"
    variant, model_path, spec = _graph(art, component, variant, cuda, levers_dir)
    height = height or art.profiles.height.opt
    width = width or art.profiles.width.opt
    feeds = _feeds(art, component, spec, batch, int(height), int(width))
    with tempfile.TemporaryDirectory(prefix="ldm-profile-") as tmp:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        if threads:
            so.intra_op_num_threads = int(threads)
        options = {"device_id": "0", "use_tf32": "1", **{k: str(v) for k, v in (provider_options or {}).items()}}
        providers = ([("CUDAExecutionProvider", options), "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"])
        session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        if cuda and "CUDAExecutionProvider" not in session.get_providers():
            raise RuntimeError("the CUDA execution provider did not load")
        names = [o.name for o in session.get_outputs()]
        if cuda:   # device-resident inputs and outputs, as the deployed runner binds them
            binding = session.io_binding()
            for name, value in feeds.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
            for name in names:
                binding.bind_output(name, "cuda", 0)

            def run():
                session.run_with_iobinding(binding)
        else:
            def run():
                session.run(names, feeds)
        for _ in range(warmup):
            run()
        kernels, wall_cupti, cupti_error = [], None, None
        if cuda:
            try:
                kernels, wall_cupti = _cupti_profile(run, iters)
            except Exception as e:  # noqa: BLE001 - no torch / CUPTI here: the node profile still stands
                cupti_error = f"{type(e).__name__}: {str(e).strip()[:200]}"
                for _ in range(iters):
                    run()
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                run()
            wall_cupti = (time.perf_counter() - t0) * 1e3
        trace = session.end_profiling()
        nodes, ort_kernels, wall_ms, runs = parse_ort_trace(trace, skip_runs=warmup)
    if ort_kernels:
        result = summarize(ort_kernels, wall_ms, runs, "onnxruntime-kernels")
    elif kernels:
        result = summarize(kernels, wall_cupti, iters, "cupti-kernels")
    else:
        result = summarize(nodes, wall_ms, runs, "onnxruntime-nodes", overlap=False)
        if cuda:
            result["caveat"] = ("no GPU kernel events from CUPTI (" + (cupti_error or "none recorded") + "): node "
                                "times are host launch times, not GPU time")
    node_types: dict[str, int] = {}
    for n in nodes:
        node_types[n["op_type"] or "?"] = node_types.get(n["op_type"] or "?", 0) + 1
    result.update(side="onnxruntime", backend=backend, variant=variant, model=str(model_path), batch=batch,
                  component=component, height=int(height), width=int(width),
                  **({"unet_rows": 2 * batch} if component == "unet" else {}), dtype=spec.precision,
                  provider_options=provider_options or {}, cfg_folded="guidance_scale" in feeds,
                  nodes_per_call={k: round(v / max(1, runs), 1) for k, v in sorted(node_types.items())},
                  host_wall_ms_per_call=round(wall_cupti / iters, 4) if wall_cupti else None)
    return result


def _graph(art, component: str, variant, cuda: bool, levers_dir=None) -> tuple:
    """(variant, graph path, ComponentSpec) of the component to profile: an artifact variant ("auto": the ort-cuda
    fused graph on CUDA when listed), or with `levers_dir` the U-Net lever graph `variant` of that benchmark folder."""
    from ldm_deploy.artifact import ORT_CUDA_VARIANT
    from ldm_deploy.runtime.runners.ort import component_spec

    if component not in PROFILED:
        raise UsageError(f"cannot profile component {component!r}; choose one of {', '.join(PROFILED)}")
    if levers_dir is not None:
        if component != "unet":
            raise UsageError("lever graphs are U-Net graphs; --levers-dir profiles the unet only")
        from ldm_deploy.bench.prepare import lever_graph

        variant, model_path, entry = lever_graph(levers_dir, variant)
        return variant, model_path, art.component("unet").over(entry)
    if variant == "auto":
        variant = ORT_CUDA_VARIANT if cuda and ORT_CUDA_VARIANT in art.component(component).variants else None
    return (variant, *component_spec(art, component, variant))


def profile_torch(model_dir, *, batch: int = 1, height: int | None = None, width: int | None = None,
                  device: str = "auto", mode: str | None = None, channels_last: bool = False, iters: int = 10,
                  warmup: int = 3, compile_budget_s: float | None = None, on_timeout_record: dict | None = None,
                  on_timeout_path: str | None = None, component: str = "unet") -> dict:
    """torch.profiler over the PyTorch U-Net step (our module, SDPA attention, CFG as one 2B batch) or, `component`
    "vae_decoder", one VAE decode of B latents; eager (`mode` None) or torch.compile(mode=...). On CUDA the buckets
    are the GPU kernels (fp16); on the CPU the ops' self times (fp32). `compile_budget_s`: past it,
    `on_timeout_record` (with the torch part marked timeout) is written to `on_timeout_path` and the process exits
    (worker.deadline)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from ldm_deploy.bench.torch_side import TorchTxt2Img, sdpa_backends
    from ldm_deploy.bench.worker import deadline
    from ldm_deploy.runtime.tokenizer import ClipTokenizer
    from training.checkpoint import load_components
    from training.models.attention import attention_backend

    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    comps = load_components(model_dir)
    pipe = TorchTxt2Img(comps, ClipTokenizer.from_dir(comps.tokenizer_dir), comps.scheduler_config, dev, dtype,
                        steps=50)
    size = 8 * int(pipe.unet.config.sample_size)
    height, width = int(height or size), int(width or height or size)
    result = {"side": "torch", "device": str(dev), "dtype": "fp16" if cuda else "fp32", "batch": batch,
              "component": component, "height": height, "width": width,
              **({"unet_rows": 2 * batch} if component == "unet" else {}), "torch": torch.__version__,
              "mode": mode or "eager", "channels_last": channels_last}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.inference_mode(), attention_backend("sdpa"):
        step = _torch_call(pipe, component, torch.randn((batch, pipe.in_channels, height // 8, width // 8),
                                                        device=dev, dtype=dtype))

        result["attention"] = sdpa_backends(step)
        if mode:
            pipe.compile(mode, channels_last)
            t0 = time.perf_counter()
            with deadline(compile_budget_s or 1e9, {**(on_timeout_record or {}), "torch": result},
                          what=f"torch.compile mode={mode}", result_path=on_timeout_path):
                step()
                sync()
            result["compile_s"] = round(time.perf_counter() - t0, 2)
        elif channels_last:
            (pipe.unet if component == "unet" else pipe.vae).to(memory_format=torch.channels_last)
        for _ in range(warmup):
            step()
        sync()
        if cuda:
            kernels, wall_ms = _cupti_profile(step, iters)
            result.update(summarize(kernels, wall_ms, iters, "cupti-kernels"))
        else:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(iters):
                    step()
                wall_ms = (time.perf_counter() - t0) * 1e3
            ops = [{"name": e.name, "dur_us": float(e.self_cpu_time_total)}
                   for e in prof.events() if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0]
            result.update(summarize(ops, wall_ms, iters, "torch-cpu-ops", overlap=False))
    return result


def _torch_call(pipe, component: str, x):
    """The profiled torch call on latents x (B, C, h, w): a U-Net CFG step at mid-schedule, or a VAE decode."""
    if component != "unet":
        return lambda: pipe.decode(x)
    batch = x.shape[0]
    emb = pipe.encode_text([""] * batch + ["a photograph of an astronaut riding a horse"] * batch)
    t_mid = pipe.steps[len(pipe.steps) // 2][0]
    return lambda: pipe.unet_step(x, t_mid, emb, 7.5)


def profile_table(profiles: list[dict]) -> str:
    """Markdown: one column per profile (ms per U-Net step, or VAE decode, and share of its wall time), one row per
    bucket."""
    def head(p):
        variant = p.get("variant") if p.get("variant") not in (None, p.get("backend")) else None
        what = (f"ORT {p.get('backend')}{' ' + variant if variant else ''}" if p.get("side") == "onnxruntime"
                else f"torch {p.get('mode')}{' + channels_last' if p.get('channels_last') else ''}")
        return f"{what} ({p.get('dtype')}, {p['source']})"

    per = "VAE decode" if profiles and profiles[0].get("component") == "vae_decoder" else "U-Net step"
    lines = [f"| bucket (ms per {per}) | " + " | ".join(head(p) for p in profiles) + " | what |",
             "|---|" + "--:|" * len(profiles) + "---|"]
    for b in BUCKETS:
        cells = [f"{p['buckets'][b]['ms_per_call']:.3f} ({p['buckets'][b]['share']:.0%})" for p in profiles]
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {BUCKET_NOTES[b]} |")
    lines.append("| **wall** | " + " | ".join(f"**{p['wall_ms_per_call']:.3f}**" for p in profiles) + " | per call, "
                 "profiler on |")
    lines.append("| events per step | " + " | ".join(f"{p['events_per_call']:.0f}" for p in profiles) + " | kernels / "
                 "nodes / ops |")
    return "\n".join(lines)


def reading(deployed: dict, reference: dict) -> list[str]:
    """Where two profiles of the same step differ, largest first: one line per bucket that differs by more
    than 3 % of the reference's wall time."""
    diff = {b: deployed["buckets"][b]["ms_per_call"] - reference["buckets"][b]["ms_per_call"] for b in BUCKETS}
    total = deployed["wall_ms_per_call"] - reference["wall_ms_per_call"]
    lines = [f"step wall {deployed['wall_ms_per_call']:.3f} ms against {reference['wall_ms_per_call']:.3f} ms "
             f"({total:+.3f} ms, profiler on)"]
    if deployed.get("busy_ms_per_call") is not None and reference.get("busy_ms_per_call") is not None:
        busy = deployed["busy_ms_per_call"] - reference["busy_ms_per_call"]
        lines.append(f"busy (kernel time, gaps excluded): {deployed['busy_ms_per_call']:.3f} ms against "
                     f"{reference['busy_ms_per_call']:.3f} ms ({busy:+.3f} ms)")
    for b, d in sorted(diff.items(), key=lambda kv: -abs(kv[1])):
        if abs(d) > 0.03 * reference["wall_ms_per_call"]:
            lines.append(f"{b}: {deployed['buckets'][b]['ms_per_call']:.3f} ms against "
                         f"{reference['buckets'][b]['ms_per_call']:.3f} ms ({d:+.3f} ms)")
    return lines
