"""ONNX Runtime, split as Polygraphy splits it: a session loader, and small runners over what it loads.

    session = SessionFromArtifact(artifact, "unet", provider="cuda", enable_cuda_graph=True)()   # build
    with OrtBoundRunner(session) as runner:                                                     # bind, run
        out = runner({"sample": x, "timestep": t, "encoder_hidden_states": e})

`SessionFromArtifact` (Polygraphy's `SessionFromOnnx`) picks the component's graph (the plain one, a named
manifest variant, or "auto": the ONNX Runtime CUDA fused graph `model.ort-cuda.onnx` that `export --ort-cuda`
writes, see ldm_deploy/export/ort_optimize.py) and builds the configured `InferenceSession`: providers and
their options, graph optimisation level, threads, CUDA graph, device. Calling it returns an `OrtSession`
(the session, the manifest entry it runs, the choices made). `OrtRunner` runs one with `session.run` and
host arrays; `OrtBoundRunner` with IO binding and device-resident buffers. Both map `dict[str, ndarray] ->
dict[str, ndarray]` with names and dtypes from the manifest (inputs cast to its dtype, outputs float32
unless `output_dtype=None`), and release the session with `close()` / a `with` block.

`open_runner("ort-cpu" | "ort-cuda", ...)` (runners/base.py) is the production path, `OrtCpuRunner` /
`OrtCudaRunner`: they take only what a user of `generate`, serving or the Python API sets (threads, device
id, CUDA graph, variant, TF32, output dtype). The loader's other settings (session config entries, extra CUDA
provider options, a graph outside the artifact) and a CUDA session run without IO binding (`OrtRunner`
over it) are the benchmark's levers, assembled in ldm_deploy/bench/ort_side.py.

`OrtBoundRunner` keeps device buffers between calls: each input lives in a CUDA `OrtValue` that is updated
in place (`update_inplace`, host -> device), an input equal to what was uploaded last call (the text
embeddings during the denoising loop) is not uploaded again -- an input whose values changed on
`VOLATILE_AFTER` calls in a row (the latents) is then uploaded without the compare -- and outputs are
written into preallocated device buffers. With `enable_cuda_graph=True` a CUDA graph holds the device
addresses of every bound input and output, so each input-shape set gets its own IO binding and buffers and
its own ORT graph id (run option `gpu_graph_id`, 1, 2, ... in order of first use): that shape's first
`run_with_iobinding` runs once for allocations and captures, later calls with it replay, and alternating
shapes (a server's batches of 1..max rows) each keep their graph. At most `max_cuda_graphs` shapes get one
(default MAX_CUDA_GRAPHS, or the artifact's batch-size range when wider); further shapes run without a graph
(`gpu_graph_id` -1, counted in `ungraphed_calls`) rather than fail. The switchable LoRA weights live in one set
of device buffers bound in every slot. The CPU runner never picks a variant by itself (the fused graphs'
contrib ops have CUDA kernels only).

Defaults measured on real runs:
- `allow_spinning=None`: intra-op thread spinning off on machines with at most `FEW_CORES` cores. The
  pipeline holds three sessions, each with a thread pool as wide as the machine; spinning workers of one
  keep burning the cores the next one (and numpy's scheduler) needs. On 2 cores turning it off made the
  demo ~25 % faster at batch 1 (benchmarks/README.md, `ort-cpu-no-spin`); `True`/`False` force it.
- `use_tf32=None` (CUDA): TF32 tensor-core math (ORT's own default) off when the artifact was exported
  fp32 -- that export is the accuracy choice, and TF32 (10-bit mantissa, unit roundoff 2^-11) moved the
  tiny VAE decoder 1.3e-3 (plain) / 2.1e-3 (fused) max-relative from ORT CPU on an H200, over the 1e-3
  fp32 parity tolerance -- and on for an fp16 export's fp32 components (the VAE), where speed was asked
  for. `True`/`False` force it; `runner.use_tf32` says which ran.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ldm_deploy.artifact import ORT_CUDA_VARIANT, ComponentSpec
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime import lora_switch

MAX_CUDA_GRAPHS = 8  # CUDA graphs a bound runner keeps by default (or the artifact's batch-size range, if wider)
GRAPH_ID_KEY = "gpu_graph_id"   # ORT run config key: the CUDA graph a run captures / replays, -1 none
VOLATILE_AFTER = 3   # an input new on this many calls in a row is uploaded without comparing from then on
FEW_CORES = 4      # at most this many cores: intra-op spinning off by default (see the module docstring)
SPINNING_KEY = "session.intra_op.allow_spinning"

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
_PROVIDERS = ("cpu", "cuda")


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise LdmError(f"onnxruntime is not installed: {e}", hint="pip install onnxruntime") from None
    return onnxruntime


def run_options(entries: Mapping[str, Any]):
    """An onnxruntime RunOptions carrying these run config entries (values as strings)."""
    options = _ort().RunOptions()
    for key, value in entries.items():
        options.add_run_config_entry(key, str(value))
    return options


def _open(artifact):
    if isinstance(artifact, (str, os.PathLike)):
        from ldm_deploy.artifact import Artifact
        artifact = Artifact.open(artifact)
    return artifact


def component_spec(artifact, component: str, variant: str | None = None) -> tuple[Path, ComponentSpec]:
    """(path of the graph to run, its ComponentSpec: file/inputs/outputs/...) from an Artifact or an artifact dir.

    `variant` names an entry of the component's `variants` (e.g. "ort-cuda"); its file and IO replace
    the plain graph's. A missing variant is an error; pick "auto" handling in the caller.
    """
    artifact = _open(artifact)
    spec = artifact.component(component).variant(variant)  # LdmError naming what the artifact has
    return artifact.path_of(spec.file), spec


# ----------------------------------------------------------------------------- the session loader

@dataclass
class OrtSession:
    """What `SessionFromArtifact()` loaded: the session and the facts a runner feeds it by."""
    session: Any                     # onnxruntime.InferenceSession
    component: str
    model_path: Path                 # the graph file the session runs
    spec: dict                       # its manifest entry (a variant's file and IO merged in)
    variant: str | None              # the variant that runs (None: the plain graph)
    vae_scale_factor: int
    base_weights: dict               # switchable LoRA weights (runtime/lora_switch.py), {} when none
    allow_spinning: bool
    device_id: int | None = None     # CUDA device; None on the CPU provider
    enable_cuda_graph: bool = False
    cuda_options: dict = field(default_factory=dict)   # the CUDA provider options in effect
    use_tf32: bool | None = None     # None on the CPU provider
    profiles: Any = None             # the artifact's Profiles (batch/height/width ranges), None when it has none


@dataclass(frozen=True)
class SessionFromArtifact:
    """Builds and configures the ONNX Runtime session of one artifact component (Polygraphy's loader noun):
    `SessionFromArtifact(artifact, "unet", provider="cuda")()` -> `OrtSession`.

    `variant`: None runs the plain graph, a name a manifest variant, "auto" the "ort-cuda" fused variant when
    the manifest lists one (CUDA provider only; the CPU provider runs the plain graph). `graph` replaces the
    artifact's graph with `(name, path, entry)`: a file outside the artifact with its manifest-style entry (inputs,
    outputs, precision) -- the benchmark's lever graphs, which live in the benchmark's own folder.
    `session_options` are session config entries (an explicit SPINNING_KEY wins over `allow_spinning`);
    `provider_options` extra CUDA provider options (an explicit "use_tf32" wins over `use_tf32`)."""
    artifact: Any
    component: str
    provider: str = "cpu"
    variant: str | None = None
    graph: tuple | None = None       # (name, path, entry): a graph outside the artifact
    device_id: int = 0
    enable_cuda_graph: bool = False
    use_tf32: bool | None = None
    graph_optimization_level: str = "all"
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    allow_spinning: bool | None = None
    session_options: Mapping | None = None
    provider_options: Mapping | None = None

    def __call__(self) -> OrtSession:
        ort = _ort()
        if self.provider not in _PROVIDERS:
            raise UsageError(f"unknown provider {self.provider!r}; choose one of: {', '.join(_PROVIDERS)}")
        cuda = self.provider == "cuda"
        if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise LdmError("onnxruntime has no CUDAExecutionProvider here",
                           hint="pip install 'ldm-deploy[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU")
        artifact = _open(self.artifact)
        variant, model_path, spec = self._graph(artifact)
        so, allow_spinning = self._session_options(ort)
        loaded = OrtSession(None, self.component, model_path, spec, variant,
                            artifact.vae_scale_factor, {}, allow_spinning, profiles=artifact.profiles)
        if cuda:
            loaded.cuda_options = self._cuda_options(artifact)
            loaded.device_id, loaded.enable_cuda_graph = int(self.device_id), bool(self.enable_cuda_graph)
            loaded.use_tf32 = loaded.cuda_options["use_tf32"] not in ("0", "False", "false")
        try:
            loaded.session = ort.InferenceSession(str(model_path), sess_options=so,
                                                  providers=self._providers(loaded.cuda_options if cuda else None))
        except Exception as e:  # onnxruntime raises its own exception types
            raise LdmError(f"onnxruntime could not load {model_path}: {str(e).splitlines()[0]}",
                           hint="run `ldm-deploy validate` on the artifact, or re-export it") from None
        if cuda:
            self._check_provider(loaded.session, model_path)
        graph_inputs = {i.name for i in loaded.session.get_inputs()}
        missing = [name for name in spec.input_names if name not in graph_inputs]
        if missing:
            raise LdmError(f"{model_path} lacks the inputs {missing} its manifest lists",
                           hint="the manifest and the ONNX file disagree; re-export the artifact")
        # lora_switchable artifacts: the weights LoRAs touch are graph inputs (runtime/lora_switch.py)
        loaded.base_weights = lora_switch.load_base(artifact, spec)
        fused = (spec.lora_weights or {}).get("fused") or {}   # a fused variant's weight inputs
        bad = sorted(n for n, e in fused.items() if n not in graph_inputs
                     or (isinstance(e, dict) and e.get("weight") not in loaded.base_weights))
        if bad:
            raise LdmError(f"{model_path} and its manifest disagree on the switchable weight input {bad[0]!r}",
                           hint="re-export the artifact")
        return loaded

    def _graph(self, artifact) -> tuple[str | None, Path, dict]:
        """(variant name, graph file, its manifest entry): the `graph` given, else the artifact's choice."""
        if self.graph is None:
            variant = self.choose_variant(artifact)
            return (variant, *component_spec(artifact, self.component, variant))
        artifact.component(self.component)   # raises LdmError naming what the artifact has
        name, path, entry = self.graph
        return name, Path(path), artifact.component(self.component).over(entry)

    def _session_options(self, ort):
        """(SessionOptions, whether intra-op threads spin)."""
        if self.graph_optimization_level not in _OPT_LEVELS:
            raise UsageError(f"unknown graph_optimization_level {self.graph_optimization_level!r}; "
                             f"choose one of: {', '.join(_OPT_LEVELS)}")
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[self.graph_optimization_level])
        from ldm_deploy.limits import check_threads

        if self.intra_op_threads:   # None or 0: onnxruntime's default (one per core)
            so.intra_op_num_threads = check_threads(self.intra_op_threads, "intra_op_threads")
        if self.inter_op_threads:
            so.inter_op_num_threads = check_threads(self.inter_op_threads, "inter_op_threads")
        allow_spinning = self.allow_spinning
        if allow_spinning is None:
            allow_spinning = (os.cpu_count() or 1) > FEW_CORES
        entries = dict(self.session_options or {})
        entries.setdefault(SPINNING_KEY, "1" if allow_spinning else "0")   # an explicit key wins
        for key, value in entries.items():
            so.add_session_config_entry(key, str(value))
        return so, str(entries[SPINNING_KEY]) != "0"

    def _cuda_options(self, artifact) -> dict:
        """The CUDA provider options: device, CUDA graph, TF32 (see the module docstring), extra options."""
        options = {"device_id": str(int(self.device_id)),
                   **{k: str(v) for k, v in (self.provider_options or {}).items()}}
        if self.enable_cuda_graph:
            options["enable_cuda_graph"] = "1"
        use_tf32 = self.use_tf32
        if use_tf32 is None:   # off for an fp32 export (its parity is the point), ORT's default (on) otherwise
            use_tf32 = artifact.precision != "fp32"
        options.setdefault("use_tf32", "1" if use_tf32 else "0")   # an explicit provider option wins
        return options

    def choose_variant(self, artifact) -> str | None:
        """The manifest variant this loader runs: "auto" is "ort-cuda" when listed and the provider is CUDA."""
        if self.variant != "auto":
            return self.variant
        # not ldm_deploy.export.ort_optimize's constant: that module needs onnx
        has = ORT_CUDA_VARIANT in artifact.component(self.component).variants
        return ORT_CUDA_VARIANT if self.provider == "cuda" and has else None

    def _providers(self, cuda_options: dict | None) -> list:
        if cuda_options is None:
            return ["CPUExecutionProvider"]
        return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]

    def _check_provider(self, session, model_path) -> None:
        """ORT falls back to the CPU silently when the CUDA libraries fail to load: refuse that."""
        if "CUDAExecutionProvider" not in session.get_providers():
            raise LdmError(f"the CUDA execution provider did not load for {model_path}",
                           hint="check the CUDA/cuDNN libraries onnxruntime-gpu needs "
                                "(onnxruntime.preload_dlls(), or the ORT log above)")


# ----------------------------------------------------------------------------- the runners

class OrtRunner:
    """Runs a loaded session with `session.run` and host arrays (ORT copies every input in and every output
    out each call). The CPU runner; over a CUDA session, the benchmark's "no IO binding" rung."""

    io_binding = False

    def __init__(self, loaded: OrtSession, *, output_dtype=np.float32):
        if loaded.enable_cuda_graph and not self.io_binding:
            raise UsageError("a session with enable_cuda_graph=True needs IO binding (OrtBoundRunner): a CUDA "
                             "graph replays bound device buffers")
        self.loaded = loaded
        self.session = loaded.session
        self.component = loaded.component
        self.model_path, self.spec, self.variant = loaded.model_path, loaded.spec, loaded.variant
        self.vae_scale_factor = loaded.vae_scale_factor
        self.allow_spinning = loaded.allow_spinning
        self.device_id, self.enable_cuda_graph = loaded.device_id, loaded.enable_cuda_graph
        self.cuda_options, self.use_tf32 = loaded.cuda_options, loaded.use_tf32
        self.input_names = self.spec.input_names
        self.output_names = self.spec.output_names
        self.input_dtypes = {i.name: np.dtype(i.dtype) for i in self.spec.inputs}
        self.output_dtype = None if output_dtype is None else np.dtype(output_dtype)
        self.base_weights = loaded.base_weights
        self.weights = dict(self.base_weights)
        # the graph inputs the weights feed: themselves, or their fused forms in an ort-cuda variant
        self.weight_feeds = lora_switch.WeightFeeds((self.spec.lora_weights or {}).get("fused"))
        self._fed: dict[str, np.ndarray] | None = None   # weight inputs of the next session.run (made on first use)

    # --- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the session (and, bound, the device buffers); calling the runner afterwards is an error.
        Closing twice is a no-op."""
        self.session = None
        self.loaded = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.session is None:
            raise LdmError(f"the {self.component} runner is closed", hint="open a new runner")

    # --- running -------------------------------------------------------------------------------------

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> int:
        """Replace the switchable weights (name -> array in the graph's dtype); returns how many changed."""
        changed = [n for n, w in weights.items() if w is not self.weights[n]]
        for name in changed:
            self.weights[name] = weights[name]
        if self._fed is not None and changed:
            self._fed.update(self.weight_feeds(self.weights, changed))
        return len(changed)

    def _feeds(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise LdmError(f"{self.component} runner called without inputs {missing}")
        feeds = {n: np.ascontiguousarray(inputs[n], dtype=self.input_dtypes[n]) for n in self.input_names}
        if self._fed is None:
            self._fed = self.weight_feeds(self.weights)
        feeds.update(self._fed)
        return feeds

    def _cast_out(self, arrays) -> dict[str, np.ndarray]:
        if self.output_dtype is None:
            return dict(zip(self.output_names, arrays))
        return {n: np.asarray(a).astype(self.output_dtype, copy=False) for n, a in zip(self.output_names, arrays)}

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        feeds = self._feeds(inputs)
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as e:  # onnxruntime's own exception types: one line, not a traceback
            raise LdmError(f"onnxruntime failed running {self.component}: {str(e).strip().splitlines()[0][:300]}",
                           hint="run `ldm-deploy validate` on the artifact, or re-export it") from None
        return self._cast_out(outputs)


class _Slot:
    """One IO binding and the device buffers bound in it: the inputs (the switchable weights' buffers are
    shared by every slot), the preallocated outputs, and what the input buffers hold (to skip uploads).
    `graph_id`: the ORT CUDA graph it captures and replays (`gpu_graph_id`, >= 1), -1 for a slot that runs
    without a graph (past `max_cuda_graphs`), None without CUDA graphs."""

    def __init__(self, binding, graph_id: int | None, run_options=None):
        self.binding = binding
        self.graph_id = graph_id
        self.run_options = run_options              # RunOptions carrying gpu_graph_id (None: ORT's default)
        self.inputs: dict[str, object] = {}         # name -> device OrtValue (bound once per shape)
        self.in_host: dict[str, np.ndarray] = {}    # name -> host copy of what the device buffer holds
        self.in_frozen: dict[str, np.ndarray] = {}  # name -> the read-only caller array last uploaded
        self.changed: dict[str, int] = {}           # name -> calls in a row on which its values changed
        self.volatile: set[str] = set()             # inputs no longer compared (changed VOLATILE_AFTER calls in a row)
        self.outputs: dict[str, object] = {}        # name -> device OrtValue (preallocated)

    def clear(self) -> None:
        if self.binding is not None:
            self.binding.clear_binding_inputs()
            self.binding.clear_binding_outputs()
        self.binding = None
        for held in (self.inputs, self.in_host, self.in_frozen, self.changed, self.outputs):
            held.clear()
        self.volatile.clear()


class OrtBoundRunner(OrtRunner):
    """Runs a loaded CUDA session with IO binding: device-resident, reused input and output buffers.

    Without CUDA graphs one binding serves every shape (re-bound when the shapes change). With them each
    input-shape set gets a slot of its own -- an IO binding, input and output buffers, and an ORT CUDA graph
    id -- captured on that shape's first use and replayed on every later call with it, so alternating batch
    sizes (a server's batcher) keep their graphs. `max_cuda_graphs` bounds the graphs (each holds its own
    buffers and graph memory); calls with shapes past it run without a graph (`gpu_graph_id` -1) in one shared
    binding, counted in `ungraphed_calls`. None: MAX_CUDA_GRAPHS, or the artifact's batch-size range if wider."""

    io_binding = True

    def __init__(self, loaded: OrtSession, *, output_dtype=np.float32, max_cuda_graphs: int | None = None):
        if loaded.device_id is None:
            raise UsageError(f"IO binding needs a CUDA session; {loaded.model_path} was loaded on the CPU provider",
                             hint="SessionFromArtifact(..., provider='cuda'), or OrtRunner for a CPU session")
        if max_cuda_graphs is None:
            batch = loaded.profiles.batch if loaded.profiles is not None else None
            max_cuda_graphs = max(MAX_CUDA_GRAPHS, batch.max - batch.min + 1 if batch is not None else 0)
        elif isinstance(max_cuda_graphs, bool) or not isinstance(max_cuda_graphs, int) or max_cuda_graphs < 1:
            raise UsageError(f"max_cuda_graphs must be an integer >= 1, got {max_cuda_graphs!r}")
        super().__init__(loaded, output_dtype=output_dtype)
        self.max_cuda_graphs = max_cuda_graphs
        self._slots: dict[tuple, _Slot] = {}       # input-shape key -> its slot (CUDA graphs only)
        self._weights_dev: dict[str, object] = {}  # switchable weight -> its device buffer, bound in every slot
        self._out_shapes: dict[tuple, dict[str, tuple]] = {}
        self._runs = 0
        self.ungraphed_calls = 0                   # CUDA-graph runner calls run without a graph (past the bound)
        self._uploaded = False
        self._sync = None                          # host->device copy fence (see _sync_uploads)
        # where a call's time goes, summed over calls (seconds): binding and uploading the inputs ("prepare"),
        # the run with its stream sync ("run": the GPU work, replayed or launched), the outputs to host ("fetch");
        # a shape's probe call (outputs not sizable from the manifest, ORT allocates) is not counted
        self.call_split = {"prepare": 0.0, "run": 0.0, "fetch": 0.0, "calls": 0}
        # the one re-bound slot: every call without CUDA graphs, the shapes past the bound with them
        self._slot = self._spare = self._new_slot(-1 if self.enable_cuda_graph else None)

    @property
    def last_slot(self) -> _Slot:
        """The slot the last call ran in: its IO binding, device input / output buffers and upload state."""
        return self._slot

    @property
    def cuda_graphs(self) -> dict[tuple, int]:
        """Input-shape key -> the ORT CUDA graph id of its slot (captured on the slot's first run)."""
        return {key: slot.graph_id for key, slot in self._slots.items()}

    def _new_slot(self, graph_id: int | None) -> _Slot:
        options = None if graph_id is None else run_options({GRAPH_ID_KEY: graph_id})
        slot = _Slot(self.session.io_binding(), graph_id, options)
        for name, held in self._weights_dev.items():   # the shared weight buffers: one copy, every graph reads it
            slot.inputs[name] = held
            slot.binding.bind_ortvalue_input(name, held)
        return slot

    def _slot_for(self, key: tuple) -> _Slot:
        """The slot a call with these input shapes runs in: without CUDA graphs the one binding; with them the
        shape's own slot, made on its first use (graph ids 1, 2, ... in that order), or the shared ungraphed one
        once `max_cuda_graphs` shapes have theirs."""
        if not self.enable_cuda_graph:
            return self._spare
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) < self.max_cuda_graphs:
                # ORT reserves gpu_graph_id 0 for its own default capture (onnxruntime_run_options_config_keys.h)
                slot = self._slots[key] = self._new_slot(len(self._slots) + 1)
            else:
                slot = self._spare
        if slot.graph_id == -1:
            self.ungraphed_calls += 1
        return slot

    def close(self) -> None:
        """Free every slot's device buffers and binding, the weight buffers, then the session."""
        for slot in (self._spare, *self._slots.values()):
            slot.clear()
        self._slots.clear()
        self._weights_dev.clear()
        super().close()

    _weights_bound = False

    def _bind_weights(self, names) -> None:
        """Upload the switchable weights `names` (their graph inputs: a fused variant's derived tensors) into their
        device buffers: allocated once and bound in every slot, then rewritten in place, so the bindings and the
        captured CUDA graphs (which hold the addresses) stay valid and every graph reads the new weights."""
        slots = (self._spare, *self._slots.values())
        # the weights' graph inputs (a fused variant's: made here and dropped once uploaded)
        for name, array in self.weight_feeds.items(self.weights, names):
            array = np.ascontiguousarray(array)
            held = self._weights_dev.get(name)
            if held is None:
                held = self._weights_dev[name] = self._device_value(array.shape, array.dtype)
                for slot in slots:
                    slot.inputs[name] = held
                    slot.binding.bind_ortvalue_input(name, held)
            held.update_inplace(array)
        self._weights_bound = True
        self._uploaded = True

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> int:
        changed = [n for n, w in weights.items() if w is not self.weights[n]]
        for name in changed:
            self.weights[name] = weights[name]
        if self._weights_bound and changed:
            self._bind_weights(changed)
            self._sync_uploads()
        return len(changed)

    def _device_value(self, shape, dtype):
        ort = _ort()
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype), "cuda", self.device_id)

    def _bind_input(self, name: str, value: np.ndarray) -> None:
        slot = self._slot
        if slot.in_frozen.get(name) is value and name in slot.in_host:
            return  # the same read-only array as last call (the pipeline's text embeddings): no cast, no compare
        array = np.ascontiguousarray(value, dtype=self.input_dtypes[name])
        held = slot.inputs.get(name)
        if held is None or tuple(held.shape()) != array.shape:
            if held is not None and slot.graph_id is not None and slot.graph_id >= 0:
                raise LdmError(f"{self.component} input {name!r} changed shape {tuple(held.shape())} -> {array.shape} "
                               f"in the slot of CUDA graph {slot.graph_id}", hint="this is a bug in ldm-deploy; "
                               "pass enable_cuda_graph=False meanwhile")
            held = self._device_value(array.shape, array.dtype)
            slot.inputs[name] = held
            slot.in_host.pop(name, None)
            slot.in_frozen.pop(name, None)
            slot.changed.pop(name, None)
            slot.volatile.discard(name)
            slot.binding.bind_ortvalue_input(name, held)
        elif name in slot.in_host and np.array_equal(slot.in_host[name], array):
            slot.changed[name] = 0
            if isinstance(value, np.ndarray) and not value.flags.writeable:
                # the next request's embeddings: equal values in a new read-only array. Remember it, so its
                # remaining steps skip by identity instead of casting and comparing every step (on an H100 that
                # cost 0.8 ms a step at B=1 and 2.8 ms at B=4 inside the pipeline, scripts/loop_vs_alone.py)
                slot.in_frozen[name] = value
            return  # the device copy already holds these values (e.g. the text embeddings every step)
        held.update_inplace(array)
        self._uploaded = True
        if name not in slot.volatile:
            if name in slot.in_host:   # compared and found different
                slot.changed[name] = slot.changed.get(name, 0) + 1
                if slot.changed[name] >= VOLATILE_AFTER:
                    # new values every call (the latents, the timestep): stop paying a compare and a host copy
                    slot.volatile.add(name)
                    slot.in_host.pop(name)
                    slot.in_frozen.pop(name, None)
                    return
            slot.in_host[name] = array.copy() if array is value else array
            # A read-only array is taken as unchanged while it is passed again (its owner promises so by
            # making it read-only); keeping a reference to it is then safe, unlike to a reused buffer.
            frozen = isinstance(value, np.ndarray) and not value.flags.writeable
            slot.in_frozen[name] = value if frozen else None

    def _sync_uploads(self) -> None:
        """`update_inplace` is a cudaMemcpy from pageable memory on the legacy default stream, which may
        return before its DMA lands, and ORT computes on a non-blocking stream: wait for the copy (a
        few microseconds) so the run never reads a half-written input. Needs cuda-bindings; without
        it ORT's own stream synchronisation is all there is."""
        if self._sync is None:
            self._sync = False
            values = [*self._slot.inputs.values(), *self._weights_dev.values()]
            if any(v.device_name().lower() == "cuda" for v in values):
                try:
                    from cuda.bindings import runtime as cudart
                    self._sync = lambda: cudart.cudaStreamSynchronize(0)
                except ImportError:
                    pass
        if self._sync:
            self._sync()

    def _output_shapes(self, key: tuple, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple] | None:
        """Output shapes for these input shapes: learned from an earlier run, or from the manifest's
        symbolic dims when every output dim is named by an input dim, or is an image dim of a latent
        one (image_height = vae_scale_factor * latent_height); else None."""
        if key in self._out_shapes:
            return self._out_shapes[key]
        dims: dict[str, int] = {}
        for spec in self.spec.inputs:
            for d, size in zip(spec.shape, np.shape(feeds[spec.name])):
                if isinstance(d, str):
                    dims[d] = int(size)
        for axis in ("height", "width"):
            if f"latent_{axis}" in dims:
                dims.setdefault(f"image_{axis}", dims[f"latent_{axis}"] * self.vae_scale_factor)
            if f"image_{axis}" in dims and dims[f"image_{axis}"] % self.vae_scale_factor == 0:
                dims.setdefault(f"latent_{axis}", dims[f"image_{axis}"] // self.vae_scale_factor)
        shapes = {}
        for spec in self.spec.outputs:
            if not all(isinstance(d, int) or d in dims for d in spec.shape):
                return None
            shapes[spec.name] = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
        self._out_shapes[key] = shapes
        return shapes

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise LdmError(f"{self.component} runner called without inputs {missing}")
        start = time.perf_counter()
        key = tuple((n, tuple(np.shape(inputs[n]))) for n in self.input_names)
        self._slot = slot = self._slot_for(key)
        self._uploaded = False
        if self.weights and not self._weights_bound:
            self._bind_weights(self.weights)
        for name in self.input_names:
            self._bind_input(name, inputs[name])
        if self._uploaded:
            self._sync_uploads()
        shapes = self._output_shapes(key, inputs)
        if shapes is None:
            # First call with these shapes and outputs we can't size from the manifest: let ORT allocate,
            # learn the shapes, and write into our own buffers from the next call on. Under CUDA graphs
            # this probe runs with gpu_graph_id -1 (no capture: a capture records the output addresses,
            # and ORT-allocated ones would not stay ours); the slot's next call captures with our buffers bound.
            for name in self.output_names:
                slot.binding.bind_output(name, "cuda", self.device_id)
                slot.outputs.pop(name, None)
            self._run(capture=False)
            values = slot.binding.get_outputs()
            self._out_shapes[key] = {n: tuple(v.shape()) for n, v in zip(self.output_names, values)}
            arrays = [v.numpy() for v in values]
            self._ensure_outputs(self._out_shapes[key])
            return self._cast_out(arrays)
        self._ensure_outputs(shapes)
        ran = time.perf_counter()
        self._run()
        fetched = time.perf_counter()
        out = self._cast_out([self._host(slot.outputs[n]) for n in self.output_names])
        split = self.call_split
        split["prepare"] += ran - start
        split["run"] += fetched - ran
        split["fetch"] += time.perf_counter() - fetched
        split["calls"] += 1
        return out

    @staticmethod
    def _host(value) -> np.ndarray:
        """A host array the next run cannot overwrite (a CPU OrtValue's numpy() is a view of its buffer;
        a CUDA one's is already a fresh copy)."""
        array = value.numpy()
        return array.copy() if value.device_name().lower() == "cpu" else array

    def _ensure_outputs(self, shapes: dict[str, tuple]) -> None:
        slot = self._slot
        out_dtypes = {o.name: np.dtype(o.dtype) for o in self.spec.outputs}
        for name in self.output_names:
            held = slot.outputs.get(name)
            if held is None or tuple(held.shape()) != shapes[name]:
                if held is not None and slot.graph_id is not None and slot.graph_id >= 0:
                    raise LdmError(f"{self.component} output {name!r} changed shape in the slot of CUDA graph "
                                   f"{slot.graph_id}", hint="this is a bug in ldm-deploy; pass "
                                   "enable_cuda_graph=False meanwhile")
                held = self._device_value(shapes[name], out_dtypes[name])
                slot.outputs[name] = held
                slot.binding.bind_ortvalue_output(name, held)

    def _run(self, capture: bool = True) -> None:
        """Run the active slot's binding. Under CUDA graphs its RunOptions carry the slot's `gpu_graph_id`
        (onnxruntime/core/session/onnxruntime_run_options_config_keys.h, kOrtRunOptionsConfigCudaGraphAnnotation:
        an integer per graph; -1 runs without capture or replay; 0 is ORT's own default id, "not expected" from
        users). ORT's CUDA EP keeps one captured graph per id, with a per-id count of regular runs before its
        capture (cuda_execution_provider.h, `graph_id_to_run_count_` / `min_num_runs_before_cuda_graph_capture_`,
        so the allocations are made before capturing), and replays an id's graph from then on. An id is only
        ever run with its slot's bindings, so whichever call of that shape captures, the addresses it records
        stay the slot's."""
        slot = self._slot
        slot.binding.synchronize_inputs()
        options = slot.run_options
        if self.enable_cuda_graph and not capture:
            options = self._no_graph_options()   # this run neither captures nor replays
        try:
            self.session.run_with_iobinding(slot.binding, options)
        except Exception as e:  # onnxruntime raises its own exception types
            graphed = self.enable_cuda_graph and options is slot.run_options and slot.graph_id != -1
            what = f"CUDA graph {slot.graph_id} capture/replay" if graphed else "run"
            raise LdmError(f"onnxruntime CUDA {what} of {self.model_path} failed: {str(e).splitlines()[0]}",
                           hint="retry with enable_cuda_graph=False / variant=None to narrow it down") from None
        slot.binding.synchronize_outputs()
        self._runs += 1

    _no_graph = None

    def _no_graph_options(self):
        if self._no_graph is None:
            self._no_graph = run_options({GRAPH_ID_KEY: -1})
        return self._no_graph


# ----------------------------------------------------------------------------- production (open_runner)

class OrtCpuRunner(OrtRunner):
    """One artifact component on ONNX Runtime's CPUExecutionProvider (backend "ort-cpu")."""

    def __init__(self, artifact, component: str, *, intra_op_threads: int | None = None,
                 inter_op_threads: int | None = None, allow_spinning: bool | None = None,
                 graph_optimization_level: str = "all", output_dtype=np.float32):
        super().__init__(SessionFromArtifact(artifact, component, intra_op_threads=intra_op_threads,
                                             inter_op_threads=inter_op_threads, allow_spinning=allow_spinning,
                                             graph_optimization_level=graph_optimization_level)(),
                         output_dtype=output_dtype)


class OrtCudaRunner(OrtBoundRunner):
    """One artifact component on CUDAExecutionProvider with IO binding (backend "ort-cuda")."""

    def __init__(self, artifact, component: str, *, device_id: int = 0, enable_cuda_graph: bool = False,
                 variant: str | None = "auto", use_tf32: bool | None = None, output_dtype=np.float32,
                 max_cuda_graphs: int | None = None):
        super().__init__(SessionFromArtifact(artifact, component, provider="cuda", variant=variant,
                                             device_id=device_id, enable_cuda_graph=enable_cuda_graph,
                                             use_tf32=use_tf32)(),
                         output_dtype=output_dtype, max_cuda_graphs=max_cuda_graphs)
