"""What one benchmark run measures: a frozen spec shared by the harness, its side workers and the CLI.

A *side* is one way of running the same model (PyTorch eager / compile, ONNX Runtime CPU / CUDA,
TensorRT). Each (side, batch) runs in its own subprocess so host memory and the CUDA context are
its own; the results of all sides go into one JSON file (format below, `harness.py`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ldm_deploy import configfile
from ldm_deploy.configfile import bounds
from ldm_deploy.errors import UsageError
from ldm_deploy.limits import MAX_BATCH

# torch.compile recipes: side -> (mode, channels_last). Each compiles the U-Net, the text encoder and the VAE
# decoder the same way (so end to end compares like with like) within BenchSpec.compile_budget_s.
COMPILE_SIDES = {
    "torch-compile": ("default", False),
    "torch-compile-ro": ("reduce-overhead", True),
    "torch-compile-max-autotune-no-cg": ("max-autotune-no-cudagraphs", True),
    "torch-compile-max-autotune": ("max-autotune", True),
}
TORCH_SIDES = ("torch-eager-fp32", "torch-eager-fp16", *COMPILE_SIDES)
# The strongest PyTorch recipes, for the GPU preset and the lever run's references.
STRONG_TORCH_SIDES = ("torch-compile-ro", "torch-compile-max-autotune-no-cg", "torch-compile-max-autotune")
# The GPU speed levers, added one at a time to the U-Net (it is ~95 % of a run); the text encoder and the
# VAE decoder run as on `ort-cuda` in every row, so a row's change is its lever's alone. The last step,
# folding CFG into the graph, is `ort-cuda` itself. side -> (what it adds, U-Net options): the production
# runner options (variant, enable_cuda_graph) plus the bench-only knobs ldm_deploy/bench/ort_side.py assembles
# from the session loader: `io_binding: False` (session.run with host arrays) and `graph`, a lever graph that
# ldm_deploy.bench.prepare.add_lever_variants writes into the benchmark's folder (BenchSpec.levers_dir).
LEVERS = {
    "ort-cuda-l0-fp32": ("fp32 plain graph (TF32 on), session.run with host arrays, no CUDA graph",
                         {"graph": "lever-fp32", "io_binding": False, "enable_cuda_graph": False}),
    "ort-cuda-l1-fp16": ("+ fp16 weights and activations (the exported fp16 graph)",
                         {"variant": None, "io_binding": False, "enable_cuda_graph": False}),
    "ort-cuda-l2-iobinding": ("+ IO binding (device-resident inputs and outputs, unchanged inputs not re-sent)",
                              {"variant": None, "enable_cuda_graph": False}),
    "ort-cuda-l3-cuda-graph": ("+ CUDA graph (one launch per step)", {"variant": None, "enable_cuda_graph": True}),
    "ort-cuda-l4-fusions": ("+ ORT transformer fusions: fused attention, GroupNorm/SkipGroupNorm, BiasSplitGelu, "
                            "BiasAdd (convolutions still NCHW)",
                            {"graph": "lever-fused-nchw", "enable_cuda_graph": True}),
    "ort-cuda-l5-nhwc": ("+ NHWC convolutions", {"graph": "lever-fused", "enable_cuda_graph": True}),
}
LEVER_FINAL = ("ort-cuda", "+ classifier-free guidance folded into the graph (= ort-cuda)")
# what a lever run compares the ladder with: the full path (the last rung), the full path less one lever,
# and PyTorch
LEVER_REFERENCES = ("ort-cuda", "ort-cuda-no-graph", "ort-cuda-plain", "torch-eager-fp16", "torch-compile",
                    "torch-compile-ro")
# Levers from the U-Net profile (docs/performance.md), each one change on top of `ort-cuda`: ONNX Runtime CUDA
# provider options (cuDNN convolution search / workspace / layout / bias fusion, TF32, the attention kernel
# of the fused MultiHeadAttention: `sdpa_kernel` bit flags, AttentionBackend in ORT's attention_common.h)
# and CUDA graphs over all three components. side -> (what it changes, {"provider_options": for every
# runner's CUDA provider, "graph_all": CUDA graphs on the text encoder and VAE decoder too, "graph": a U-Net
# graph of the benchmark's folder (BenchSpec.levers_dir) in place of the ort-cuda variant}). They are
# bench-only: ldm_deploy/bench/ort_side.py hands them to the session loader; the production runner has none.
SDPA_KERNEL = {"flash": 1, "efficient": 2, "cudnn-flash": 8, "math": 16}
TUNING = {
    "ort-cuda-graph-all": ("CUDA graphs on all three components (text encoder, U-Net, VAE decoder)",
                           {"graph_all": True}),
    "ort-cuda-conv-heuristic": ("cuDNN convolution algorithm search HEURISTIC",
                                {"provider_options": {"cudnn_conv_algo_search": "HEURISTIC"}}),
    "ort-cuda-conv-default-algo": ("cuDNN convolution algorithm search DEFAULT (no search)",
                                   {"provider_options": {"cudnn_conv_algo_search": "DEFAULT"}}),
    "ort-cuda-conv-small-workspace": ("cuDNN convolution workspace capped (cudnn_conv_use_max_workspace=0)",
                                      {"provider_options": {"cudnn_conv_use_max_workspace": "0"}}),
    "ort-cuda-prefer-nhwc": ("ORT's NHWC layout transformer for the remaining NCHW ops (prefer_nhwc=1)",
                             {"provider_options": {"prefer_nhwc": "1"}}),
    "ort-cuda-fuse-conv-bias": ("cuDNN frontend conv + bias fusion (fuse_conv_bias=1)",
                                {"provider_options": {"fuse_conv_bias": "1"}}),
    "ort-cuda-no-tf32": ("TF32 off for the fp32 parts (use_tf32=0)", {"provider_options": {"use_tf32": "0"}}),
    **{f"ort-cuda-attn-{name}": (f"attention kernel pinned to {name} (sdpa_kernel={flag})",
                                 {"provider_options": {"sdpa_kernel": str(flag)}})
       for name, flag in SDPA_KERNEL.items() if name != "math"},
    # graph levers: the ort-cuda U-Net rewritten by ldm_deploy/export/ort_fp16_norm.py, written into the
    # benchmark's own folder (prepare.add_tuning_variants, prepare.TUNING_GRAPHS), run by the U-Net only
    "ort-cuda-fp16-norm": ("GroupNorm / SkipGroupNorm fed fp16 directly, no-op Casts removed (U-Net graph pass)",
                           {"graph": "tuning-fp16-norm"}),
    "ort-cuda-fold-transposes": ("NHWC<->NCHW Transpose -> Reshape -> Transpose chains at the transformer blocks "
                                 "folded into one Reshape (U-Net graph pass)", {"graph": "tuning-fold-transposes"}),
    "ort-cuda-norm-layout": ("both U-Net graph passes (fp16 norm + folded transposes)",
                             {"graph": "tuning-norm-layout"}),
    "ort-cuda-conv-bias-norm": ("each convolution's bias moved into the SkipGroupNorm that reads its output "
                                "(no separate cuDNN bias-add kernel; U-Net graph pass)",
                                {"graph": "tuning-conv-bias-norm"}),
    "ort-cuda-all-graph-passes": ("the three U-Net graph passes together (fp16 norm, folded transposes, conv "
                                  "bias into the norm)", {"graph": "tuning-all-passes"}),
    # the loop on the device (runtime/device_loop.py, runners/ort_loop.py): the sampler's update in the U-Net
    # graph, one CUDA graph per step captured outside ORT, no host wait between steps; CUDA graphs on the text
    # encoder and VAE decoder too (the strongest deployed configuration, as torch-compile-ro compiles all three)
    "ort-cuda-device-loop": ("the denoising loop on the device: DDIM update in the U-Net graph, each step one "
                             "CUDA graph launch, no host wait between steps; CUDA graphs on all components",
                             {"graph": "tuning-device-loop", "device_loop": True, "graph_all": True}),
    "ort-cuda-device-loop-all-passes": ("ort-cuda-device-loop on the U-Net with the three graph passes",
                                        {"graph": "tuning-device-loop-all-passes", "device_loop": True,
                                         "graph_all": True}),
    "ort-cuda-device-loop-nhwc": ("ort-cuda-device-loop-all-passes with the U-Net's residual adds and skip-connection "
                                  "Concats kept in NHWC too (export/ort_nhwc_residual.py)",
                                  {"graph": "tuning-device-loop-nhwc", "device_loop": True, "graph_all": True}),
}
# the profile-lever run (`ldm-deploy bench --tuning`), most telling first so
# a run cut short by its time budget keeps them: the deployed path, the strongest one-line PyTorch recipe
# and eager, then each lever on ort-cuda. (cuDNN's EXHAUSTIVE search is ORT's default: ort-cuda runs it.)
TUNING_RUN = ("ort-cuda", "torch-compile-ro", "torch-eager-fp16", *TUNING)
ORT_SIDES = (("ort-cpu", "ort-cpu-no-spin", "ort-cuda", "ort-cuda-no-graph", "ort-cuda-plain") + tuple(LEVERS)
             + tuple(TUNING))
SIDES = TORCH_SIDES + ORT_SIDES + ("tensorrt",)
# What each side is, for the JSON, the chart and the table.
SIDE_NOTES = {
    "torch-eager-fp32": "PyTorch eager, fp32, SDPA attention",
    "torch-eager-fp16": "PyTorch eager, fp16 (.half()), SDPA attention; CUDA only",
    "torch-compile": "torch.compile default mode on U-Net, text encoder and VAE decoder; fp16 on CUDA, fp32 on CPU",
    "torch-compile-ro": "torch.compile mode=reduce-overhead (CUDA graphs), channels_last U-Net and VAE; "
                        "text encoder and VAE decoder compiled the same way",
    "torch-compile-max-autotune-no-cg": "torch.compile mode=max-autotune-no-cudagraphs, channels_last; "
                                        "text encoder and VAE decoder compiled the same way",
    "torch-compile-max-autotune": "torch.compile mode=max-autotune (autotuned kernels + CUDA graphs), channels_last; "
                                  "text encoder and VAE decoder compiled the same way",
    "ort-cpu": "ldm-deploy Pipeline, ONNX Runtime CPUExecutionProvider",
    "ort-cpu-no-spin": "as ort-cpu with intra-op thread spinning off (three sessions' pools share the cores)",
    "ort-cuda": "ldm-deploy Pipeline, ONNX Runtime CUDA: IO binding, CUDA graphs, fused variant when present",
    "ort-cuda-no-graph": "as ort-cuda without CUDA graphs",
    "ort-cuda-plain": "as ort-cuda on the plain graphs (no ORT transformer fusions)",
    "tensorrt": "ldm-deploy Pipeline, TensorRT engines",
    **{side: f"lever ladder, U-Net: {what}" for side, (what, _) in LEVERS.items()},
    **{side: f"ort-cuda with one profile lever: {what}" for side, (what, _) in TUNING.items()},
}
FORMAT = "ldm-deploy-bench"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BenchSpec:
    model_dir: str | None = None        # diffusers model folder: the torch sides load it
    artifact: str | None = None         # exported artifact: the ORT / TensorRT sides run it
    sides: tuple[str, ...] = ("ort-cpu", "torch-eager-fp32", "torch-compile")
    batches: tuple[int, ...] = field(default=(1,), metadata=bounds(1, MAX_BATCH))  # B (prompts * images); the U-Net runs at 2B under CFG
    steps: int = 50                     # denoising steps per image
    guidance: float = 7.5               # CFG scale (> 1: one U-Net call at 2B per step)
    height: int | None = None           # pixels; None: the artifact profile's opt, else unet sample_size * 8
    width: int | None = None
    scheduler: str = "ddim"             # every side runs DDIM (eta 0) with the same timesteps
    prompt: str = "a photograph of an astronaut riding a horse on the moon"
    warmup: int = 1                     # untimed end-to-end runs before the timed ones
    repeats: int = 3                    # timed end-to-end runs (fewer when e2e_budget_s would be exceeded)
    e2e_budget_s: float = 120.0         # cap on the timed end-to-end runs of one (side, batch)
    component_warmup: int = 3           # per-component timings (text encoder, U-Net step, VAE decode)
    component_repeats: int = 10
    device: str = "auto"                # torch sides: auto (cuda when available) | cuda | cpu
    threads: int | None = None          # CPU threads for ort-cpu and torch-on-CPU (None: library default)
    engine_dir: str | None = None       # tensorrt: engines folder (default ARTIFACT/engines)
    levers_dir: str | None = None       # the lever / graph-tuning sides' U-Net graphs (prepare.add_lever_variants,
                                        # add_tuning_variants; never the artifact)
    timeout_s: float = 900.0            # one (side, batch) subprocess is killed after this long
    compile_budget_s: float = 300.0     # torch.compile sides: all compiles of a side; past it the side is
                                        # recorded as status "timeout" ("compile did not finish within N s")
    timing_slack: float = 0.25          # flag a record whose steps x U-Net step + text encoder + VAE decoder
                                        # exceeds end to end by more than this fraction (harness.timing_check)
    total_budget_s: float | None = None  # no (side, batch) starts after this many seconds of the run
    note: str = ""                      # free text stored in the JSON (e.g. "2 shared cores, busy machine")

    def __post_init__(self):
        unknown = [s for s in self.sides if s not in SIDES]
        if unknown or not self.sides:
            raise UsageError(f"unknown sides {unknown}; choose from {', '.join(SIDES)}")
        if not self.batches or any(int(b) < 1 for b in self.batches):
            raise UsageError(f"batches must be positive integers, got {list(self.batches)}")
        if self.steps < 1 or self.repeats < 1 or self.component_repeats < 1:
            raise UsageError("steps, repeats and component_repeats must be >= 1")
        if self.compile_budget_s <= 0 or self.timing_slack < 0:
            raise UsageError("compile_budget_s must be > 0 and timing_slack >= 0")
        if self.warmup < 0 or self.component_warmup < 0:
            raise UsageError("warm-up counts must be >= 0")
        if self.device not in ("auto", "cuda", "cpu"):
            raise UsageError(f"device must be auto, cuda or cpu, got {self.device!r}")
        for h in (self.height, self.width):
            if h is not None and (h <= 0 or h % 8):
                raise UsageError(f"height/width must be positive multiples of 8, got {h}")

    def replace(self, **changes) -> "BenchSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sides"], d["batches"] = list(self.sides), list(self.batches)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "BenchSpec":
        return configfile.load(cls, d, where, kind="bench spec", error=UsageError)
