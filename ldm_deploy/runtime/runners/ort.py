"""ONNX Runtime runners: CPU (the default backend) and CUDA (IO binding, optional CUDA graphs).

Both map `dict[str, ndarray] -> dict[str, ndarray]` with input/output names and dtypes from the
artifact manifest: inputs are cast to the manifest dtype (an fp16 U-Net gets fp16 `sample`), outputs
come back as float32 unless `output_dtype=None` asks for the manifest dtype.

`OrtCudaRunner` keeps device buffers between calls: each input lives in a CUDA `OrtValue` that is
updated in place (`update_inplace`), an input passed as the very same numpy object as last call (the
text embeddings during the denoising loop) is not uploaded again, and outputs are written into
preallocated device buffers. With `enable_cuda_graph=True` ORT captures the first run as a CUDA graph
and replays it; that needs every shape to stay the same, so a shape change is an error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ldm_deploy.errors import LdmError, UsageError

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise LdmError(f"onnxruntime is not installed: {e}", hint="pip install onnxruntime") from None
    return onnxruntime


def component_spec(artifact, component: str) -> tuple[Path, dict]:
    """(path of the component's model.onnx, its manifest entry) from an Artifact or an artifact dir."""
    if isinstance(artifact, (str, os.PathLike)):
        from ldm_deploy.artifact import Artifact
        artifact = Artifact.open(artifact)
    artifact.component(component)  # raises LdmError naming what the artifact has
    spec = artifact.manifest["components"][component]
    return Path(artifact.path) / spec["file"], spec


class OrtCpuRunner:
    """One artifact component on ONNX Runtime's CPUExecutionProvider."""

    providers: list = ["CPUExecutionProvider"]

    def __init__(self, artifact, component: str, *, graph_optimization_level: str = "all",
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 output_dtype=np.float32, session_options: Mapping | None = None):
        ort = _ort()
        self.component = component
        self.model_path, self.spec = component_spec(artifact, component)
        self.input_names = [i["name"] for i in self.spec["inputs"]]
        self.output_names = [o["name"] for o in self.spec["outputs"]]
        self.input_dtypes = {i["name"]: np.dtype(i["dtype"]) for i in self.spec["inputs"]}
        self.output_dtype = None if output_dtype is None else np.dtype(output_dtype)
        if graph_optimization_level not in _OPT_LEVELS:
            raise UsageError(f"unknown graph_optimization_level {graph_optimization_level!r}; "
                             f"choose one of: {', '.join(_OPT_LEVELS)}")
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[graph_optimization_level])
        if intra_op_threads:
            so.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads:
            so.inter_op_num_threads = int(inter_op_threads)
        for key, value in (session_options or {}).items():
            so.add_session_config_entry(key, str(value))
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=so, providers=self._providers())
        except Exception as e:  # onnxruntime raises its own exception types
            raise LdmError(f"onnxruntime could not load {self.model_path}: {str(e).splitlines()[0]}",
                           hint="run `ldm-deploy validate` on the artifact, or re-export it") from None
        graph_inputs = {i.name for i in self.session.get_inputs()}
        missing = [n for n in self.input_names if n not in graph_inputs]
        if missing:
            raise LdmError(f"{self.model_path} lacks the inputs {missing} its manifest lists",
                           hint="the manifest and the ONNX file disagree; re-export the artifact")

    def _providers(self) -> list:
        return list(self.providers)

    def _feeds(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise LdmError(f"{self.component} runner called without inputs {missing}")
        return {n: np.ascontiguousarray(inputs[n], dtype=self.input_dtypes[n]) for n in self.input_names}

    def _cast_out(self, arrays) -> dict[str, np.ndarray]:
        if self.output_dtype is None:
            return dict(zip(self.output_names, arrays))
        return {n: np.asarray(a).astype(self.output_dtype, copy=False) for n, a in zip(self.output_names, arrays)}

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._cast_out(self.session.run(self.output_names, self._feeds(inputs)))


class OrtCudaRunner(OrtCpuRunner):
    """One artifact component on CUDAExecutionProvider with device-resident, reused IO buffers."""

    def __init__(self, artifact, component: str, *, device_id: int = 0, enable_cuda_graph: bool = False,
                 reuse_unchanged_inputs: bool = True, cuda_options: Mapping | None = None, **opts):
        ort = _ort()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise LdmError("onnxruntime has no CUDAExecutionProvider here",
                           hint="pip install 'ldm-deploy[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU")
        self.device_id = int(device_id)
        self.enable_cuda_graph = bool(enable_cuda_graph)
        self.reuse_unchanged_inputs = bool(reuse_unchanged_inputs)
        self.cuda_options = {"device_id": str(self.device_id), **{k: str(v) for k, v in (cuda_options or {}).items()}}
        if self.enable_cuda_graph:
            self.cuda_options["enable_cuda_graph"] = "1"
        super().__init__(artifact, component, **opts)
        self.binding = self.session.io_binding()
        self._in: dict[str, object] = {}       # name -> device OrtValue
        self._in_src: dict[str, np.ndarray] = {}  # name -> the numpy array last uploaded (identity check)
        self._out: dict[str, object] = {}      # name -> device OrtValue (preallocated)
        self._out_shapes: dict[tuple, dict[str, tuple]] = {}

    def _providers(self) -> list:
        return [("CUDAExecutionProvider", self.cuda_options), "CPUExecutionProvider"]

    def _device_value(self, shape, dtype):
        ort = _ort()
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", self.device_id)

    def _bind_input(self, name: str, value: np.ndarray) -> None:
        held = self._in.get(name)
        if held is not None and self._in_src.get(name) is value and self.reuse_unchanged_inputs:
            return  # the same array object as last call: its device copy is current
        array = np.ascontiguousarray(value, dtype=self.input_dtypes[name])
        if held is None or tuple(held.shape()) != array.shape:
            if held is not None and self.enable_cuda_graph:
                raise LdmError(f"{self.component} input {name!r} changed shape {tuple(held.shape())} -> {array.shape} "
                               "under a captured CUDA graph", hint="CUDA graphs need static shapes; open a new runner "
                               "for each shape or pass enable_cuda_graph=False")
            held = self._device_value(array.shape, array.dtype)
            self._in[name] = held
            self.binding.bind_ortvalue_input(name, held)
        held.update_inplace(array)
        self._in_src[name] = value

    def _output_shapes(self, key: tuple, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple] | None:
        """Output shapes for these input shapes: learned from an earlier run, or from the manifest's
        symbolic dims when every output dim is named by an input dim (the U-Net); else None."""
        if key in self._out_shapes:
            return self._out_shapes[key]
        dims: dict[str, int] = {}
        for spec in self.spec["inputs"]:
            for d, size in zip(spec["shape"], np.shape(feeds[spec["name"]])):
                if isinstance(d, str):
                    dims[d] = int(size)
        shapes = {}
        for spec in self.spec["outputs"]:
            if not all(isinstance(d, int) or d in dims for d in spec["shape"]):
                return None
            shapes[spec["name"]] = tuple(d if isinstance(d, int) else dims[d] for d in spec["shape"])
        self._out_shapes[key] = shapes
        return shapes

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise LdmError(f"{self.component} runner called without inputs {missing}")
        for name in self.input_names:
            self._bind_input(name, inputs[name])
        key = tuple((n, tuple(np.shape(inputs[n]))) for n in self.input_names)
        shapes = self._output_shapes(key, inputs)
        if shapes is None:
            # First call with these shapes and outputs we can't size: let ORT allocate, then learn the
            # shapes so later calls write into our own buffers. (ORT's CUDA EP runs once normally
            # before it captures a CUDA graph, so the capture sees the preallocated buffers.)
            for name in self.output_names:
                self.binding.bind_output(name, "cuda", self.device_id)
                self._out.pop(name, None)
            self._run()
            values = self.binding.get_outputs()
            self._out_shapes[key] = {n: tuple(v.shape()) for n, v in zip(self.output_names, values)}
            arrays = [v.numpy() for v in values]
            self._ensure_outputs(self._out_shapes[key])
            return self._cast_out(arrays)
        self._ensure_outputs(shapes)
        self._run()
        return self._cast_out([self._out[n].numpy() for n in self.output_names])

    def _ensure_outputs(self, shapes: dict[str, tuple]) -> None:
        out_dtypes = {o["name"]: np.dtype(o["dtype"]) for o in self.spec["outputs"]}
        for name in self.output_names:
            held = self._out.get(name)
            if held is None or tuple(held.shape()) != shapes[name]:
                if held is not None and self.enable_cuda_graph:
                    raise LdmError(f"{self.component} output {name!r} changed shape under a captured CUDA graph",
                                   hint="CUDA graphs need static shapes; pass enable_cuda_graph=False")
                held = self._device_value(shapes[name], out_dtypes[name])
                self._out[name] = held
                self.binding.bind_ortvalue_output(name, held)

    def _run(self) -> None:
        self.binding.synchronize_inputs()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
