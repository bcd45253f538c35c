"""TensorRT runner: one engine, one execution context, buffers allocated once, one CUDA stream.

    with TensorRTRunner("out/tiny-trt", "unet") as runner:     # an engine dir (or an artifact + engine_dir=)
        out = runner({"sample": x, "timestep": t, "encoder_hidden_states": e})   # {"noise_pred": ...}

Split as ort.py is: `EngineFromSidecar` finds, checks and deserializes the engine; the runner creates the
context, buffers and stream over it and frees them in `close()`. Loading checks the sidecar first (TensorRT version, GPU compute capability, ONNX hash, engine
bytes) and refuses with the command that rebuilds. Device buffers are sized once for the profile's
max shapes; each call checks the shapes against the profile, writes inputs into pinned host
buffers in place, copies them up, runs `execute_async_v3` on the runner's stream, copies the
outputs down once and returns float32 copies. `cuda_graph=True` replays a CUDA graph per input
shape set (TensorRT for RTX: its own whole-graph capture).

The planning (tensor descriptions, shape checks, buffer sizes) is plain Python over the engine's
API and is tested with a fake engine on CPU; the CUDA part is thin.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ldm_deploy.artifact import is_artifact
from ldm_deploy.engine import sidecar as sc
from ldm_deploy.engine import trt_api
from ldm_deploy.errors import LdmError, UsageError

log = logging.getLogger("ldm_deploy")

# TensorRT DataType name -> numpy dtype (bf16 has no numpy dtype)
_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64,
           "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


@dataclass(frozen=True)
class TensorIO:
    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]                      # engine shape, -1 where dynamic
    profile: tuple[tuple[int, ...], ...] | None  # inputs: (min, opt, max) shapes of the profile


# ----------------------------------------------------------------------------- planning (pure)

def describe_engine(engine, trt, profile_index: int = 0) -> list[TensorIO]:
    """The engine's I/O tensors, in engine order, with dtypes and profile ranges."""
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype_name = engine.get_tensor_dtype(name).name
        if dtype_name not in _DTYPES:
            raise LdmError(f"engine tensor {name!r} has type {dtype_name}, which numpy cannot hold",
                           hint="export with --precision fp16 or fp32")
        profile = None
        if is_input:
            profile = tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, profile_index))
        out.append(TensorIO(name, is_input, np.dtype(_DTYPES[dtype_name]),
                            tuple(int(d) for d in engine.get_tensor_shape(name)), profile))
    return out


def profile_text(tensors: list[TensorIO]) -> str:
    """One line: every input's profile range, e.g. "sample (1,4,8,8)..(4,4,8,16)"."""
    def fmt(s):
        return "(" + ",".join(map(str, s)) + ")"
    return "; ".join(f"{t.name} {fmt(t.profile[0])}..{fmt(t.profile[2])}" for t in tensors if t.is_input)


def select_shapes(tensors: list[TensorIO], inputs: Mapping[str, np.ndarray], component: str) -> dict[str, tuple]:
    """Input name -> shape for this call, after checking names, ranks and the profile."""
    wanted = [t for t in tensors if t.is_input]
    names = {t.name for t in wanted}
    missing = sorted(names - set(inputs))
    extra = sorted(set(inputs) - names)
    if missing or extra:
        raise UsageError(f"{component} engine takes inputs {sorted(names)}; missing {missing}, unexpected {extra}")
    shapes = {}
    for t in wanted:
        shape = tuple(int(d) for d in np.shape(inputs[t.name]))
        lo, _, hi = t.profile
        if len(shape) != len(lo):
            raise UsageError(f"{component} input {t.name!r} has rank {len(shape)} {shape}, the engine expects "
                             f"rank {len(lo)}")
        bad = [i for i, (s, a, b) in enumerate(zip(shape, lo, hi)) if not a <= s <= b]
        if bad:
            dims = ", ".join(f"dim {i} = {shape[i]} not in {lo[i]}..{hi[i]}" for i in bad)
            raise UsageError(f"{component} input {t.name!r} shape {shape} is outside the engine's optimization "
                             f"profile ({dims}); profile: {profile_text(tensors)}",
                             hint="use a shape inside the profile, or rebuild the engine with a wider "
                                  "profile (export/build config `profiles`)")
        shapes[t.name] = shape
    return shapes


def max_input_shapes(tensors: list[TensorIO]) -> dict[str, tuple]:
    return {t.name: t.profile[2] for t in tensors if t.is_input}


def plan_buffers(tensors: list[TensorIO], shapes: Mapping[str, tuple]) -> dict[str, int]:
    """Tensor name -> bytes to allocate, from each tensor's (max) shape in `shapes`."""
    sizes = {}
    for t in tensors:
        shape = shapes.get(t.name)
        if shape is None or any(int(d) < 0 for d in shape):
            raise LdmError(f"engine tensor {t.name!r} has no concrete shape {shape} for the profile's max",
                           hint="the engine has data-dependent output shapes, which this runner does not support")
        sizes[t.name] = int(np.prod(shape, dtype=np.int64)) * t.dtype.itemsize
    return sizes


def resolve_output_shapes(context, tensors: list[TensorIO], input_shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """Set `input_shapes` on the context; return every tensor's shape (inputs and inferred outputs)."""
    for name, shape in input_shapes.items():
        if not context.set_input_shape(name, shape):
            raise LdmError(f"TensorRT rejected shape {shape} for input {name!r}")
    shapes = dict(input_shapes)
    for t in tensors:
        if not t.is_input:
            shapes[t.name] = tuple(int(d) for d in context.get_tensor_shape(t.name))
    return shapes


# ----------------------------------------------------------------------------- locating engines

def locate(source, component: str, engine_dir=None) -> tuple[Path, Path | None]:
    """(engine dir, artifact dir or None) from an Artifact, an artifact path or an engine dir."""
    path = Path(getattr(source, "path", source))
    if engine_dir is not None:
        return Path(engine_dir), path if is_artifact(path) else None
    if sc.sidecar_path(path, component).is_file():
        return path, None
    if is_artifact(path):
        if sc.sidecar_path(path / "engines", component).is_file():
            return path / "engines", path
        raise UsageError(f"{path} is an ONNX artifact; the tensorrt backend needs its engines",
                         hint=f"build them with `ldm-deploy build {path} --out ENGINE_DIR` and pass "
                              "engine_dir=ENGINE_DIR (CLI: --engine-dir ENGINE_DIR)")
    raise LdmError(f"no {component} engine in {path} ({sc.sidecar_path(path, component).name} is missing)",
                   hint=f"build it: ldm-deploy build ARTIFACT_DIR --out {path}")


def current_onnx_sha256(artifact_dir: Path | None, sidecar: dict) -> str | None:
    """The ONNX hash the artifact now records (its manifest), or None when the artifact is gone."""
    artifact_dir = artifact_dir or (Path(sidecar["artifact"]) if sidecar.get("artifact") else None)
    if artifact_dir is None or not is_artifact(artifact_dir):
        log.debug("artifact for %s not found; ONNX hash not checked", sidecar["component"])
        return None
    from ldm_deploy.artifact import Artifact  # noqa: PLC0415
    artifact = Artifact(artifact_dir, verify=False)
    spec = artifact.components.get(sidecar["component"])
    return None if spec is None else artifact.files.get(spec.file)


# ----------------------------------------------------------------------------- the engine loader

@dataclass
class LoadedEngine:
    """What `EngineFromSidecar()` loaded: the deserialized engine and what the runner needs beside it."""
    engine: object
    runtime: object          # trt.Runtime: must outlive the engine
    logger: object
    trt: object              # the tensorrt module of the engine's flavour
    flavour: str             # "tensorrt" | "tensorrt-rtx"
    sidecar: dict
    engine_dir: Path
    artifact_dir: Path | None


@dataclass(frozen=True)
class EngineFromSidecar:
    """Finds, checks and deserializes one component's engine (Polygraphy's `EngineFromBytes`, plus our
    sidecar check): `EngineFromSidecar("out/tiny-trt", "unet")()` -> `LoadedEngine`. The sidecar is checked
    first (TensorRT version, GPU compute capability, the artifact's current ONNX hash unless `check_onnx`
    is off, engine bytes) and a mismatch refused with the command that rebuilds."""
    source: object
    component: str
    engine_dir: object = None
    device: int = 0
    check_onnx: bool = True
    verbose: bool = False

    def __call__(self) -> LoadedEngine:
        from ldm_deploy.runtime import cuda  # noqa: PLC0415
        engine_dir, artifact_dir = locate(self.source, self.component, self.engine_dir)
        sidecar = sc.read_sidecar(engine_dir, self.component)
        trt = trt_api.load_trt(sidecar["key"]["flavour"])
        gpu = cuda.gpu_info(self.device)
        env = sc.Environment(trt_api.flavour_of(trt), trt_api.version(trt),
                             gpu.name if gpu else None, gpu.cc if gpu else None)
        onnx_sha = current_onnx_sha256(artifact_dir, sidecar) if self.check_onnx else None
        sc.check_loadable(sidecar, env, onnx_sha)
        data = sc.read_engine(engine_dir, sidecar)

        cuda.set_device(self.device)
        logger = trt_api.make_logger(trt, self.verbose)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise LdmError(f"TensorRT could not deserialize {engine_dir / sidecar['engine']['file']} "
                           "(see the TensorRT error above)", hint=f"rebuild it: {sc.rebuild_command(sidecar)}")
        return LoadedEngine(engine, runtime, logger, trt, env.flavour, sidecar, engine_dir, artifact_dir)


# ----------------------------------------------------------------------------- the runner

class TensorRTRunner:
    """Runner contract (runners/base.py) over one TensorRT engine (backend "tensorrt"): `source` is an engine
    dir, or an artifact (+ `engine_dir`). Holds an execution context, buffers and a stream until `close()`."""

    def __init__(self, source, component: str, *, engine_dir=None, device: int = 0, cuda_graph: bool = False,
                 runtime_cache: str | None = None, output_dtype=np.float32):
        self._start(EngineFromSidecar(source, component, engine_dir, device)(), component, cuda_graph=cuda_graph,
                    runtime_cache=runtime_cache, output_dtype=output_dtype)

    @classmethod
    def from_engine(cls, loaded: LoadedEngine, component: str, *, cuda_graph: bool = False,
                    runtime_cache: str | None = None, output_dtype=np.float32) -> "TensorRTRunner":
        """A runner over an engine `EngineFromSidecar` loaded (e.g. with check_onnx=False or verbose=True)."""
        runner = cls.__new__(cls)
        runner._start(loaded, component, cuda_graph=cuda_graph, runtime_cache=runtime_cache,
                      output_dtype=output_dtype)
        return runner

    def _start(self, loaded: LoadedEngine, component: str, *, cuda_graph: bool, runtime_cache, output_dtype) -> None:
        from ldm_deploy.runtime import cuda  # noqa: PLC0415
        self.component = component
        self._cuda = cuda
        self.engine_dir, self.sidecar = loaded.engine_dir, loaded.sidecar
        self._logger, self._runtime, self.engine = loaded.logger, loaded.runtime, loaded.engine
        trt = loaded.trt
        self.flavour = loaded.flavour
        self._runtime_cache_file = Path(runtime_cache) if runtime_cache else None
        self.context = self._create_context(trt, cuda_graph)
        self.tensors = describe_engine(self.engine, trt)
        self.input_names = [t.name for t in self.tensors if t.is_input]
        self.output_names = [t.name for t in self.tensors if not t.is_input]
        self.output_dtype = output_dtype
        self.cuda_graph = bool(cuda_graph)
        self._graphs = {} if cuda_graph and self.flavour == "tensorrt" else None

        self.stream = cuda.Stream()
        self._allocate()
        # a refittable engine of a lora_switchable artifact (engine/refit.py): LoRAs switch by refitting
        self.base_weights, self.weights, self._refitter = {}, {}, None
        artifact_dir = loaded.artifact_dir or (Path(self.sidecar["artifact"]) if self.sidecar.get("artifact") else None)
        if self.sidecar["key"].get("refit") and artifact_dir is not None:
            from ldm_deploy.artifact import Artifact
            from ldm_deploy.engine.refit import Refitter
            from ldm_deploy.runtime import lora_switch

            artifact = Artifact.open(artifact_dir, verify=False)
            self.base_weights = lora_switch.load_base(artifact, artifact.component(component))
            self.weights = dict(self.base_weights)
            self._refitter = Refitter(trt, self.engine, self._logger)
        log.debug(f"{component}: TensorRT engine loaded, {sum(self._sizes.values()) / 2**20:.1f} MiB of I/O "
                  f"buffers; profile: {profile_text(self.tensors)}")

    def close(self) -> None:
        """Free the CUDA graphs, the buffers and the stream, then the context and the engine (in that order:
        TensorRT wants a context destroyed before its engine). Calling the runner afterwards is an error;
        closing twice is a no-op."""
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.synchronize()
        for graph in (getattr(self, "_graphs", None) or {}).values():
            graph.close()
        if getattr(self, "_graphs", None):
            self._graphs.clear()
        for buffers in (getattr(self, "_device", None), getattr(self, "_host", None)):
            for buf in (buffers or {}).values():
                buf.close()
            if buffers:
                buffers.clear()
        if stream is not None:
            stream.close()
        self.stream = None
        self._refitter = None
        self.context = None
        self.engine = None
        self._runtime = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> int:
        """Refit the engine with the switchable weights that changed (runtime/lora_switch.py); returns how many."""
        changed = {n: w for n, w in weights.items() if w is not self.weights[n]}
        if changed:
            self.stream.synchronize()
            self._refitter.apply(changed)
            self.weights.update(changed)
            if self._graphs:
                for graph in self._graphs.values():
                    graph.close()
                self._graphs.clear()   # captured graphs may hold the old weights' addresses: re-capture
        return len(changed)

    def _allocate(self) -> None:
        """Device and pinned host buffers for the profile's max shapes, bound to the context once."""
        cuda = self._cuda
        self.context.set_optimization_profile_async(0, self.stream.handle)
        max_shapes = resolve_output_shapes(self.context, self.tensors, max_input_shapes(self.tensors))
        self._sizes = plan_buffers(self.tensors, max_shapes)
        self._device = {name: cuda.DeviceBuffer(n) for name, n in self._sizes.items()}
        self._host = {name: cuda.PinnedBuffer(n) for name, n in self._sizes.items()}
        for name, buf in self._device.items():
            self.context.set_tensor_address(name, buf.ptr)

    def _create_context(self, trt, cuda_graph: bool):
        if self.flavour != "tensorrt-rtx":
            return self.engine.create_execution_context()
        config = self.engine.create_runtime_config()
        if cuda_graph:
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        if self._runtime_cache_file is not None:
            self._runtime_cache = config.create_runtime_cache()
            if self._runtime_cache_file.is_file():
                if not self._runtime_cache.deserialize(self._runtime_cache_file.read_bytes()):
                    log.warning(f"runtime cache {self._runtime_cache_file} does not match this GPU/driver; "
                                "starting a new one")
            config.set_runtime_cache(self._runtime_cache)
        return self.engine.create_execution_context(config)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.context is None:
            raise LdmError(f"the {self.component} runner is closed", hint="open a new runner")
        shapes = select_shapes(self.tensors, inputs, self.component)
        shapes = resolve_output_shapes(self.context, self.tensors, shapes)
        nbytes = {t.name: int(np.prod(shapes[t.name], dtype=np.int64)) * t.dtype.itemsize for t in self.tensors}
        for t in self.tensors:
            if t.is_input:  # write in place into the pinned buffer (casts to the engine dtype)
                self._host[t.name].view(t.dtype, shapes[t.name])[...] = inputs[t.name]

        def enqueue():
            for t in self.tensors:
                if t.is_input:
                    self._cuda.copy_to_device(self._device[t.name], self._host[t.name], nbytes[t.name], self.stream)
            if not self.context.execute_async_v3(self.stream.handle):
                raise LdmError(f"TensorRT failed to run the {self.component} engine (see the error above)")
            for t in self.tensors:
                if not t.is_input:
                    self._cuda.copy_to_host(self._host[t.name], self._device[t.name], nbytes[t.name], self.stream)

        key = tuple(shapes[n] for n in self.input_names)
        if self._graphs is None:
            enqueue()
        elif key in self._graphs:
            self._graphs[key].launch()
        else:  # first call at these shapes runs normally (TensorRT allocates lazily), then is captured
            enqueue()
            self.stream.synchronize()
            self._graphs[key] = self._cuda.Graph(self.stream, enqueue)
        self.stream.synchronize()
        out = {}
        for t in self.tensors:
            if not t.is_input:
                view = self._host[t.name].view(t.dtype, shapes[t.name])
                out[t.name] = view.astype(self.output_dtype or t.dtype, copy=True)
        return out

    def save_runtime_cache(self) -> None:
        """TensorRT for RTX: write the JIT-compiled kernels to the runtime_cache file for the next start."""
        if self._runtime_cache_file is None or getattr(self, "_runtime_cache", None) is None:
            return
        from ldm_deploy.fileio import atomic_file  # noqa: PLC0415
        with atomic_file(self._runtime_cache_file) as f:
            f.write(bytes(self._runtime_cache.serialize()))

    def __repr__(self) -> str:
        key = self.sidecar["key"]
        return (f"TensorRTRunner({self.component!r}, {key['flavour']} {key['tensorrt_version']}, "
                f"{key['precision']}, profile: {profile_text(self.tensors)})")
