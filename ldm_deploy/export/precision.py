"""`debug-precision`: find the layer that breaks fp16, and the export config that fixes it.

1. The fp32 graphs: a model folder is exported in fp32 into a temporary folder (`export_model`); an
   artifact must be an fp32 export of the graphs txt2img runs (`txt2img_graphs`: SD's text encoder, U-Net
   and VAE decoder; SDXL's adds text_encoder_2, and its refiner has text_encoder_2 only).
2. Representative inputs: the fp32 graphs generate images through the runtime `Pipeline` (real
   prompts, the artifact's scheduler, CFG; an SDXL artifact opens runtime/sdxl.SDXLPipeline), and a
   recording runner keeps what each component was fed: token ids of the prompts (each text encoder's),
   the U-Net's (2B) inputs at every step of the trajectory (SDXL's text_embeds and time_ids with them),
   the VAE decoder's final latents. `inputs` of them are picked evenly along the trajectory.
3. The reduced graph: the fp32 graph through the same conversion the exporter uses
   (`export/fp16.convert_to_fp16`, the config's kept ops and nodes, `FP32_INPUTS`: timestep, time_ids).
4. Polygraphy compares every shared tensor (export/layers.py): per layer max abs / relative error,
   the first node whose error exceeds the tolerance, every fp16 activation whose fp32 magnitude
   exceeds `margin * 65504`.
5. The fix: the nodes that produce those activations and the nodes that read them are kept in fp32
   (the reading nodes bring the values back into range: a normalisation, a small scale; were they
   fp16, the Cast in front of them would overflow). The candidate is converted and checked on the
   same inputs; while its outputs still fail, the first failing node is added too (a few rounds).
   `--write-config` writes the export config with `fp16_keep_nodes` for this component. On SDXL the VAE
   decoder's config also sets `vae_fp16_safe` (the export refuses an fp16 SDXL VAE without it): this run
   is the evidence that the decoder, with those nodes in fp32, is.

    report = debug_precision(PrecisionDebugConfig("models/my-sd", component="unet"))
    print(report.summary()); report.config   # the proposed ExportConfig
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ldm_deploy.artifact import Artifact, is_artifact
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.export.config import ExportConfig, load_config
from ldm_deploy.export.layers import FP16_MAX, LayerReport, compare_layers, graph_nodes, time_graph

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae_decoder", "text_encoder", "text_encoder_2")   # (repeated in commands/debug_precision.py)
SD_GRAPHS = ("text_encoder", "unet", "vae_decoder")            # what txt2img runs: SD 1.x / 2.x
SDXL_GRAPHS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")   # SDXL base; the refiner lacks text_encoder
DEFAULT_PROMPTS = ("a photograph of an astronaut riding a horse on the moon, highly detailed",
                   "a red circle and a blue square on a white background")
# validate's fp16 tolerance: max |fp16 - fp32| / max |fp32| per tensor
DEFAULT_TOLERANCE = 2e-2   # (repeated in commands/debug_precision.py, which must not import onnx)
# Activations above half the fp16 range are flagged: other prompts, seeds, sizes or a GPU's kernels
# (different accumulation order) move maxima by tens of percent, so one binade of headroom is the
# least that makes "did not overflow on these inputs" mean "will not overflow in production".
DEFAULT_MARGIN = 0.5       # (likewise)
MAX_ROUNDS = 4
REPORT_FORMAT = "ldm-deploy-precision-report"   # the --json report's "format": an earlier report may be replaced


MAX_TRAJECTORY_STEPS = 1000   # SD's training timesteps; a longer trajectory only repeats them


@dataclass(frozen=True)
class PrecisionDebugConfig:
    source: str                                 # model folder or artifact folder
    component: str = "unet"                     # unet | vae_decoder | text_encoder | text_encoder_2 (SDXL)
    inputs: int = 4                             # representative inputs compared
    precision: str = "fp16"
    tolerance: float = DEFAULT_TOLERANCE
    margin: float = DEFAULT_MARGIN
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    steps: int = 10                             # sampling steps of the trajectory the inputs come from
    guidance: float = 7.5
    seed: int = 0
    height: int | None = None                   # default: the profile's opt size
    width: int | None = None
    export_config: str | None = None            # base export config for a model folder (file or bundled name)
    device: str = "cpu"                         # cpu | cuda: ONNX Runtime provider of the comparison
    measure: bool = True                        # time the reduced graph before and after the fix

    def __post_init__(self):
        if self.component not in COMPONENTS:
            raise UsageError(f"component must be one of {', '.join(COMPONENTS)}, got {self.component!r}")
        if self.precision == "bf16":
            raise UsageError("bf16 is not an export precision of ldm-deploy (fp32 | fp16) and ONNX Runtime "
                             "lacks bf16 kernels for Conv and most SD ops; bf16 keeps fp32's exponent range, so "
                             "nothing overflows in it, only rounding", hint="use --precision fp16")
        if self.precision != "fp16":
            raise UsageError(f"precision must be fp16, got {self.precision!r}")
        if self.inputs < 1 or self.steps < 1 or not self.prompts:
            raise UsageError("--inputs and --steps must be >= 1 and at least one prompt is needed")
        # every step's U-Net inputs are kept in memory to pick from: bounded like the training timesteps
        if self.inputs > MAX_TRAJECTORY_STEPS or self.steps > MAX_TRAJECTORY_STEPS:
            raise UsageError(f"--inputs {self.inputs} / --steps {self.steps}: at most {MAX_TRAJECTORY_STEPS} "
                             "(every step's inputs are held in memory)", hint="the default 10 steps, 4 inputs suffice")
        if not 0 < self.tolerance < 1 or not 0 < self.margin <= 1:
            raise UsageError(f"tolerance must be in (0, 1) and margin in (0, 1], got {self.tolerance}, {self.margin}")
        if self.device not in ("cpu", "cuda"):
            raise UsageError(f"device must be cpu or cuda, got {self.device!r}")


@dataclass
class PrecisionReport:
    component: str
    precision: str
    tolerance: float
    margin: float
    before: LayerReport                         # fp32 vs the reduced graph as exported today
    keep_nodes: list[str]                       # the proposed fp32 nodes (empty when clean)
    after: LayerReport | None                   # graph outputs of the fixed graph (None when clean)
    config: ExportConfig                        # the export config that applies the fix
    cost: dict = field(default_factory=dict)    # node counts and latency before/after

    @property
    def clean(self) -> bool:
        return not self.keep_nodes and self.before.passed and not self.before.overflows(self.margin)

    @property
    def fixed(self) -> bool:
        return self.clean or (self.after is not None and self.after.passed)

    def as_dict(self) -> dict:
        over = self.before.overflows(self.margin)
        first = self.before.first_failure()
        return {
            "format": REPORT_FORMAT,
            "component": self.component, "precision": self.precision, "tolerance": self.tolerance,
            "margin": self.margin, "fp16_max": FP16_MAX, "inputs": self.before.inputs,
            "clean": self.clean, "fixed": self.fixed,
            "outputs_before": _outputs(self.before), "outputs_after": _outputs(self.after) if self.after else None,
            "first_failure": None if first is None else _layer(first, self.margin),
            "overflows": [_layer(s, self.margin) for s in over],
            "mask_sentinels": [s.node for s in self.before.sentinels()],
            "keep_nodes": self.keep_nodes, "cost": self.cost,
            "layers": [_layer(s, self.margin) for s in self.before.layers],
        }

    def summary(self, limit: int = 15) -> str:
        lines = [f"{self.component}: fp32 vs {self.precision} on {len(self.before.inputs)} inputs "
                 f"(tolerance {self.tolerance:g} of each tensor's max |fp32|; fp16 range {FP16_MAX:g}, "
                 f"flagged above {self.margin:g} x)"]
        lines += [f"  input {i}: {d}" for i, d in enumerate(self.before.inputs)]
        for name, s in _outputs(self.before).items():
            lines.append(f"output {name}: max rel {s['max_rel']:.2e}, non-finite {s['nonfinite']} -> "
                         f"{'ok' if s['passed'] else 'FAIL'}")
        first = self.before.first_failure()
        lines.append("first node over tolerance: " + ("none" if first is None else
                     f"#{first.order} {first.node} ({first.op}), max rel {first.max_rel:.2e}, "
                     f"non-finite {first.nonfinite}"))
        over = self.before.overflows(self.margin)
        lines.append(f"activations above {self.margin:g} x {FP16_MAX:g} in fp32 (fp16 in the reduced graph): "
                     f"{len(over) or 'none'}")
        for s in over:
            hit = s.over(FP16_MAX)
            lines.append(f"  #{s.order} {s.node} ({s.op}): max |fp32| {s.ref_max:.4g}"
                         + (f", OVERFLOWS fp16 on inputs {hit}" if hit else ", within the margin"))
        masks = self.before.sentinels()
        if masks:
            lines.append(f"mask tensors holding float32's extreme value (not overflows; fp16 stores -inf / -65504 and "
                         f"the Softmax agrees): {', '.join(s.node for s in masks)}")
        lines += ["worst layers:", self.before.table(limit)]
        if self.clean:
            inner = [s for s in self.before.layers if not s.passed and not s.sentinel]
            lines.append("clean: the outputs are within tolerance and no activation is near the fp16 range"
                         + (f"; {len(inner)} inner tensor(s) exceed the tolerance without reaching the outputs "
                            f"(first above), nothing to keep in fp32 for them" if inner else
                            ", no layer over tolerance"))
        else:
            lines.append(f"fix: keep {len(self.keep_nodes)} node(s) in fp32: " + ", ".join(self.keep_nodes))
            if self.after is not None:
                for name, s in _outputs(self.after).items():
                    lines.append(f"  after the fix, output {name}: max rel {s['max_rel']:.2e}, non-finite "
                                 f"{s['nonfinite']} -> {'ok' if s['passed'] else 'FAIL'}")
        if self.cost:
            lines.append("cost: " + ", ".join(f"{k} {v}" for k, v in self.cost.items()))
        return "\n".join(lines)


def _outputs(report: LayerReport) -> dict:
    return {s.tensor: {"max_abs": s.max_abs, "max_rel": s.max_rel, "nonfinite": s.nonfinite, "passed": s.passed}
            for s in report.layers if s.tensor in report.outputs}


def _layer(s, margin: float) -> dict:
    return {"order": s.order, "node": s.node, "op": s.op, "tensor": s.tensor, "dtype": s.dtype,
            "fp32_max": s.ref_max, "max_abs": s.max_abs, "max_rel": s.max_rel, "nonfinite": s.nonfinite,
            "passed": s.passed, "overflow_inputs": s.over(FP16_MAX), "near_inputs": s.over(margin * FP16_MAX)}


# --- the fp32 graphs and representative inputs ----------------------------------------------------
def txt2img_graphs(sdxl: bool, has_text_encoder: bool) -> tuple[str, ...]:
    """The graphs the txt2img pipeline runs: SD's three; SDXL's four (the refiner: no text_encoder)."""
    if not sdxl:
        return SD_GRAPHS
    return SDXL_GRAPHS if has_text_encoder else tuple(c for c in SDXL_GRAPHS if c != "text_encoder")


def _check_component(source: Path, component: str, graphs: tuple[str, ...], sdxl: bool) -> None:
    if component in graphs:
        return
    what = "an SDXL refiner (text_encoder_2 only)" if sdxl else "an SD 1.x / 2.x model"
    raise UsageError(f"{source} has no {component}: it is {what}, with {', '.join(graphs)}",
                     hint=f"pass --component with one of {', '.join(graphs)}")


def fp32_artifact(source: Path, config: PrecisionDebugConfig, work: Path) -> tuple[Artifact, ExportConfig, tuple]:
    """An artifact whose txt2img graphs are fp32, the export config to build on, and those graphs' names."""
    if is_artifact(source):
        artifact = Artifact.open(source)
        base = ExportConfig.from_dict(artifact.export_config, where="manifest export_config")
        sdxl = artifact.info.sdxl is not None
        graphs = txt2img_graphs(sdxl, sdxl and "text_encoder" in artifact.info.sdxl.text_encoders)   # the model's
        _check_component(source, config.component, graphs, sdxl)
        if any(c not in artifact.components or artifact.component(c).precision != "fp32" for c in graphs):
            raise UsageError(f"{source} is not an fp32 artifact of {', '.join(graphs)}: debug-precision needs "
                             "the fp32 graphs to compare against",
                             hint="pass the model folder instead, or an artifact exported with --precision fp32 "
                                  "--vae-precision fp32")
        return artifact, base, graphs
    if not source.is_dir():
        raise UsageError(f"{source} is neither a model folder nor an artifact folder")
    from ldm_deploy.export.config import default_config
    from ldm_deploy.export.exporter import export_model
    from ldm_deploy.export.sdxl import folder_is_sdxl

    sdxl = folder_is_sdxl(source)
    graphs = txt2img_graphs(sdxl, (source / "text_encoder").is_dir())
    _check_component(source, config.component, graphs, sdxl)
    if config.export_config is None and sdxl:   # the bundled `sdxl` config (fp32 VAE) at the model's native size
        native = default_config(source)
        base = load_config("sdxl").replace(height=native.height, width=native.width)
    else:
        base = load_config(config.export_config)
    fp32 = base.replace(precision="fp32", vae_precision="fp32", components=graphs, ort_cuda=False,
                        keep_fp32_unet=False, measure_runtime=False, fp16_keep_nodes={})
    return export_model(source, work / "fp32", fp32).artifact, base, graphs


class _Recorder:
    """A runner that keeps a copy of every input it is fed (the pipeline reuses its buffers)."""

    def __init__(self, runner, calls: list):
        self.runner, self.calls = runner, calls
        self.component = runner.component
        self.input_names, self.output_names = runner.input_names, runner.output_names

    def __call__(self, inputs):
        self.calls.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        return self.runner(inputs)


def representative_inputs(artifact: Artifact, config: PrecisionDebugConfig,
                          graphs: tuple[str, ...] = SD_GRAPHS) -> tuple[list[dict], list[str]]:
    """Inputs of `config.component` captured while the fp32 `graphs` generate images from real prompts
    (Pipeline.from_artifact: an SDXL artifact gives the SDXL pipeline, its conditioning and time_ids)."""
    from ldm_deploy.runtime.pipeline import Pipeline

    backend = "ort-cuda" if config.device == "cuda" else "ort-cpu"
    pipe = Pipeline.from_artifact(artifact.path, backend, components=graphs, verify=False)
    calls: dict[str, list] = {c: [] for c in graphs}
    for c in graphs:
        pipe.runners[c] = _Recorder(pipe.runners[c], calls[c])
    tokenizers = getattr(pipe, "tokenizers", None) or {"text_encoder": pipe.tokenizer}   # SDXL: one per encoder
    height = config.height or artifact.profiles.height.opt
    width = config.width or artifact.profiles.width.opt
    labels: dict[str, list[str]] = {c: [] for c in graphs}
    for p, prompt in enumerate(config.prompts):
        pipe(prompt, steps=config.steps, guidance=config.guidance, seed=config.seed + p, height=height, width=width)
        for c in graphs:
            new = calls[c][len(labels[c]):]
            labels[c] += [_label(c, feed, k, len(new), p, prompt, tokenizers.get(c), (height, width))
                          for k, feed in enumerate(new)]
    feeds, names = calls[config.component], labels[config.component]
    pick = np.unique(np.linspace(0, len(feeds) - 1, min(config.inputs, len(feeds))).round().astype(int))
    return [feeds[i] for i in pick], [names[i] for i in pick]


def _label(component: str, feed: dict, k: int, n: int, p: int, prompt: str, tokenizer, size) -> str:
    """What the k-th of the n calls of `component` while generating prompt p was fed."""
    if component == "unet":
        return f"prompt {p}, U-Net call {k + 1}/{n}, t={float(feed['timestep'][0]):.1f}"
    if component == "vae_decoder":
        return f"prompt {p}: final latents / scaling_factor ({size[0]}x{size[1]})"
    # a text encoder: the prompt, or the empty negative prompt under CFG (the SDXL base's negative is zeros
    # instead, with no encoder call)
    empty = np.asarray(tokenizer([""]), dtype=feed["input_ids"].dtype)
    if prompt and np.array_equal(feed["input_ids"], empty):
        return f"prompt {p} negative (empty)"
    return f"prompt {p}: {prompt[:40]!r}"


# --- the fix ---------------------------------------------------------------------------------------
def overflow_closure(report: LayerReport, fp32_graph: Path, margin: float) -> list[str]:
    """Nodes producing activations above margin * 65504, plus every node that reads one (graph order)."""
    model, producers = graph_nodes(fp32_graph)
    big = {s.tensor for s in report.overflows(margin)}
    keep = {producers[t][1] for t in big if t in producers}
    for node in model.graph.node:
        if any(name in big for name in node.input):
            keep.add(node.name)
    order = {node.name: i for i, node in enumerate(model.graph.node)}
    return sorted(keep, key=order.get)


def convert(fp32_graph: Path, dst: Path, config: ExportConfig, component: str, keep_nodes=()) -> Path:
    from ldm_deploy.export.fp16 import FP32_INPUTS, convert_to_fp16

    # the exporter's fp32 inputs: SDXL's time_ids sinusoid stays fp32 as in the real export
    convert_to_fp16(fp32_graph, dst, keep_ops=config.fp16_keep_ops, fp32_inputs=FP32_INPUTS,
                    keep_nodes=tuple(keep_nodes))
    return dst


def fp32_node_count(path: Path) -> int:
    """Nodes of a converted graph that compute in fp32: those with an fp32 float output, less Casts, Constants,
    Shapes and Identities (which compute nothing: an un-cleaned graph's weights reach LayerNorms through
    Identities, kept fp32 with them)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    return sum(1 for n in model.graph.node if n.op_type not in ("Cast", "Constant", "Shape", "Identity")
               and any(types.get(o) == onnx.TensorProto.FLOAT for o in n.output))


def debug_precision(config: PrecisionDebugConfig, work_dir: Path | None = None) -> PrecisionReport:
    """Compare the fp32 and fp16 graphs of one component layer by layer and propose the fp32 nodes."""
    source = Path(config.source)
    if not source.exists():
        raise UsageError(f"{source} does not exist", hint="pass a diffusers-format model folder or an artifact")
    providers = ("cuda", "cpu") if config.device == "cuda" else ("cpu",)
    with tempfile.TemporaryDirectory(prefix="ldm-precision-") as tmp:
        work = Path(work_dir or tmp)
        artifact, base, graphs = fp32_artifact(source, config, work)
        fp32_graph = artifact.file(config.component)
        feeds, labels = representative_inputs(artifact, config, graphs)
        today = base.fp16_keep_nodes.get(config.component, ())
        reduced = convert(fp32_graph, work / "fp16" / "model.onnx", base, config.component, today)
        log.info("debug-precision: %s, every shared tensor of fp32 vs fp16 on %d inputs", config.component, len(feeds))
        before = compare_layers(fp32_graph, reduced, feeds, tolerance=config.tolerance, descriptions=labels,
                                providers=providers)
        keep: list[str] = []
        after = None
        if not before.passed or before.overflows(config.margin):
            keep = [n for n in overflow_closure(before, fp32_graph, config.margin) if n not in today]
            for round_ in range(MAX_ROUNDS):
                fixed = convert(fp32_graph, work / f"fix{round_}" / "model.onnx", base, config.component,
                                (*today, *keep))
                after = compare_layers(fp32_graph, fixed, feeds, tolerance=config.tolerance, descriptions=labels,
                                       names=before.outputs, providers=providers)
                if after.passed:
                    break
                full = compare_layers(fp32_graph, fixed, feeds, tolerance=config.tolerance, providers=providers)
                first = full.first_failure()
                if first is None or first.node in keep or first.order < 0:
                    break
                keep.append(first.node)   # error without an overflow: precision loss; keep where it starts
        keep_all = [*today, *[n for n in keep if n not in today]]
        nodes = {**base.fp16_keep_nodes, config.component: keep_all}
        precision = {"vae_precision": "fp16"} if config.component.startswith("vae") else {"precision": "fp16"}
        fixed = after.passed if keep and after is not None else before.passed and not before.overflows(config.margin)
        if config.component.startswith("vae") and artifact.info.sdxl is not None and fixed:
            # the export refuses an fp16 SDXL VAE unless the config vouches for it (export/sdxl.resolve_config):
            # this run, with `keep_all` in fp32, is that evidence for the decoder (validate checks the encoder);
            # unfixed, the written config keeps the base's flag and the export refuses the fp16 VAE
            precision["vae_fp16_safe"] = True
        proposed = base.replace(**precision, fp16_keep_nodes={k: v for k, v in nodes.items() if v})
        cost = {"nodes": len(graph_nodes(fp32_graph)[0].graph.node),
                "fp32_nodes_today": fp32_node_count(reduced), "keep_nodes_added": len(keep)}
        if keep:
            fixed_graph = convert(fp32_graph, work / "final" / "model.onnx", base, config.component, keep_all)
            cost["fp32_nodes_fixed"] = fp32_node_count(fixed_graph)
        if config.measure:
            cost[f"ms_fp32_{config.device}"] = round(time_graph(fp32_graph, feeds[0], providers), 3)
            cost[f"ms_fp16_{config.device}"] = round(time_graph(reduced, feeds[0], providers), 3)
            if keep:
                cost[f"ms_fp16_fixed_{config.device}"] = round(time_graph(fixed_graph, feeds[0], providers), 3)
    return PrecisionReport(config.component, config.precision, config.tolerance, config.margin, before,
                           keep_all if keep else [], after if keep else None, proposed, cost)


def write_fix(report: PrecisionReport, path: Path, source: str) -> None:
    from ldm_deploy.export.config import write_config

    header = (f"written by `ldm-deploy debug-precision {source} --component {report.component}`:\n"
              f"keeps {len(report.keep_nodes)} {report.component} node(s) in fp32 (docs/precision.md)")
    if report.component == "vae_decoder" and report.config.vae_fp16_safe and report.fixed:
        header += (f"\nvae_fp16_safe: the fp16 decoder, with these nodes in fp32, matched fp32 on "
                   f"{len(report.before.inputs)} inputs; vae_precision also makes vae_encoder fp16, which this run "
                   "did not compare: `ldm-deploy validate` checks it")
    write_config(report.config, Path(path), header=header)


__all__ = ["PrecisionDebugConfig", "PrecisionReport", "debug_precision", "write_fix"]
