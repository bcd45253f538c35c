"""The U-Net's loop step graph on ONNX Runtime: the whole denoising loop without a host round trip per step.

    loader = SessionFromArtifact(artifact, "unet", provider="cuda", variant="ort-cuda-loop")
    with OrtLoopRunner(loader) as unet:
        x = unet.sample_loop(x, loop_tables("ddim", schedule), conditioning)   # n steps, one wait at the end
        out = unet(feeds)                                                      # or one plain (folded) U-Net call

The graph (export/step_graph.py, maths in runtime/device_loop.py) maps (latents, step, tables, conditioning) to
(latents_next, step_next). On CUDA the runner owns a non-blocking stream and hands it to ORT
(`user_compute_stream`, ORT's own CUDA graphs off). Per input-shape set it binds device buffers once, runs the
graph twice to let ORT allocate (writing only the outputs), then captures one run -- with
`disable_synchronize_execution_providers`, so ORT does not wait for the GPU at its end -- plus two device copies
(latents_next -> latents, step_next -> step) as a CUDA graph on that stream (runtime/cuda.py `Graph`). A loop
is then: the start latents, step 0, the tables and the conditioning copied in on the stream, the graph launched
n times, the latents copied out, one stream synchronisation. ORT's own CUDA graphs cannot do this: their replay
(`CUDAGraphManager::Replay`, core/providers/cuda/cuda_graph.cc) synchronises the stream after every launch, so
each step would wait for the GPU.

If the capture fails (ORT put a node on the CPU, or needed a fresh allocation mid-capture), the slot runs the
same launches uncaptured -- still queued back to back on the stream with no wait -- and `capture_error` says
why. Non-finite latents are found after the loop (the pipeline's check), not per step. On the CPU provider
`sample_loop` runs the same graph step by step with host arrays: the reference for the CUDA path, and what the
CPU tests run.

`__call__` is the folded U-Net's interface (sample, timestep, conditioning -> noise_pred), run as a one-step
loop with x_coeffs = 0 and out_coeffs = 1, so the pipeline's host loop (any other sampler, or a callback) runs
on the same session.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Mapping

import numpy as np

from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime import device_loop as dl
from ldm_deploy.runtime import guidance as g
from ldm_deploy.runtime.runners.ort import OrtRunner, SessionFromArtifact, _ort, run_options

NO_SYNC_KEY = "disable_synchronize_execution_providers"   # ORT run config: no stream sync at the end of Run
MAX_SLOTS = 8      # input-shape sets kept bound (each holds its buffers and, on CUDA, its captured graph)
WARMUP_RUNS = 2    # runs before a capture, so ORT's arena holds every buffer the captured run uses
_LOOP_INPUTS = (dl.LATENTS, dl.STEP, *dl.TABLES)


class _LoopSlot:
    """One input-shape set on CUDA: the IO binding, the device buffers (ORT values), the captured graph."""

    def __init__(self, binding):
        self.binding = binding
        self.values: dict[str, object] = {}   # input / output name -> CUDA OrtValue
        self.graph = None                     # runtime.cuda.Graph once captured
        self.capture_error: str | None = None

    def ptr(self, name: str) -> int:
        return int(self.values[name].data_ptr())

    def close(self) -> None:
        if self.graph is not None:
            self.graph.close()
        self.graph = None
        if self.binding is not None:
            self.binding.clear_binding_inputs()
            self.binding.clear_binding_outputs()
        self.binding = None
        self.values.clear()


class OrtLoopRunner(OrtRunner):
    """Runs a loop step graph (module docstring): `sample_loop` for the whole loop, `__call__` for one step."""

    device_loop = True

    def __init__(self, loader: SessionFromArtifact, *, capture: bool = True, output_dtype=np.float32):
        self.stream = None
        self._slots: dict[tuple, _LoopSlot] = {}
        if loader.provider == "cuda":
            from ldm_deploy.runtime import cuda

            cuda.set_device(int(loader.device_id))
            self.stream = cuda.Stream(non_blocking=True)
            loader = dataclasses.replace(loader, enable_cuda_graph=False, provider_options={
                **(loader.provider_options or {}), "user_compute_stream": str(self.stream.handle)})
        super().__init__(loader(), output_dtype=output_dtype)
        missing = [n for n in _LOOP_INPUTS if n not in self.spec.input_names]
        if missing or self.spec.output_names != [dl.LATENTS_NEXT, dl.STEP_NEXT]:
            self.close()
            raise LdmError(f"{self.model_path} is not a loop step graph (it lacks {missing or 'latents_next'})",
                           hint="export with `--device-loop`, or open it with the ort-cuda runner")
        if self.base_weights:
            self.close()
            raise UsageError("the device loop does not take switchable LoRA weights yet",
                             hint="fuse the LoRA at export, or run the pipeline's host loop (ort-cuda)")
        self.capture = bool(capture) and self.stream is not None
        self.step_inputs = list(self.spec.input_names)
        self.conditioning = [n for n in self.step_inputs if n not in _LOOP_INPUTS]
        self.input_names = [g.SAMPLE, g.TIMESTEP, *self.conditioning]   # the folded U-Net's (__call__)
        self.output_names = [g.OUTPUT]
        self.timestep_dtype = self.input_dtypes[dl.TIMESTEPS]
        self.input_dtypes.update({g.SAMPLE: np.dtype(np.float32), g.TIMESTEP: self.timestep_dtype})
        # where the sampling loops' time went (seconds, summed; one-step calls not counted): binding, warming up and
        # capturing a new shape set ("setup"), the copies in, the n launches, the wait for the GPU and the copy out
        self.loop_split = {"setup": 0.0, "upload": 0.0, "launch": 0.0, "wait": 0.0, "loops": 0, "steps": 0}

    @property
    def capture_errors(self) -> dict[tuple, str]:
        return {key: slot.capture_error for key, slot in self._slots.items() if slot.capture_error}

    @property
    def captured(self) -> int:
        return sum(slot.graph is not None for slot in self._slots.values())

    def close(self) -> None:
        for slot in self._slots.values():
            slot.close()
        self._slots.clear()
        super().close()
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close()

    # --- the interfaces ---------------------------------------------------------------------------

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One folded U-Net evaluation (the host loop's call): the guided prediction for `sample` at `timestep`."""
        self._check_open()
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise LdmError(f"{self.component} runner called without inputs {missing}")
        t = np.asarray(inputs[g.TIMESTEP]).ravel()
        if t.size and not np.all(t == t[0]):
            raise UsageError("the loop step graph takes one timestep for all rows",
                             hint="call it with equal timesteps (the pipeline always does)")
        tables = dl.single_step_tables(float(t[0]) if t.size else 0.0)
        cond = {n: inputs[n] for n in self.conditioning}
        out = self.sample_loop(inputs[g.SAMPLE], tables, cond, capture=False)
        return self._cast_out([out])

    def sample_loop(self, x: np.ndarray, tables: dl.LoopTables, conditioning: Mapping[str, np.ndarray], *,
                    capture: bool | None = None) -> np.ndarray:
        """Run `tables.steps` steps from start latents `x` (B, C, h, w) with the folded conditioning
        (encoder_hidden_states, guidance_scale, guidance_rescale, SDXL's extras); returns the final latents."""
        self._check_open()
        missing = [n for n in self.conditioning if n not in conditioning]
        if missing:
            raise LdmError(f"the device loop was called without the conditioning inputs {missing}")
        feeds = {dl.LATENTS: np.ascontiguousarray(x, np.float32), dl.STEP: np.zeros(1, np.int64),
                 **tables.feeds(self.timestep_dtype),
                 **{n: np.ascontiguousarray(conditioning[n], dtype=self.input_dtypes[n]) for n in self.conditioning}}
        if self.stream is None:
            return self._host_loop(feeds, tables.steps)
        return self._device_loop(feeds, tables.steps, self.capture if capture is None else capture)

    # --- the CPU provider: the same graph, step by step with host arrays ------------------------------

    def _host_loop(self, feeds: dict, steps: int) -> np.ndarray:
        try:
            for _ in range(steps):
                feeds[dl.LATENTS], feeds[dl.STEP] = self.session.run([dl.LATENTS_NEXT, dl.STEP_NEXT], feeds)
        except Exception as e:  # onnxruntime's own exception types: one line
            raise LdmError(f"onnxruntime failed running the loop step graph: {str(e).strip().splitlines()[0][:300]}",
                           hint="run `ldm-deploy validate` on the artifact, or re-export it") from None
        return feeds[dl.LATENTS]

    # --- CUDA: bound buffers, one captured step, n launches, one wait ---------------------------------

    def _device_loop(self, feeds: dict, steps: int, capture: bool) -> np.ndarray:
        from ldm_deploy.runtime import cuda

        made = time.perf_counter()
        slot = self._slot(feeds, capture)   # a new shape set: bound, warmed up and captured here ("setup")
        start = time.perf_counter()
        for name, array in feeds.items():
            cuda.copy_async(slot.ptr(name), array.ctypes.data, array.nbytes, self.stream, "h2d")
        uploaded = time.perf_counter()
        for _ in range(steps):
            if slot.graph is not None:
                slot.graph.launch()
            else:
                self._enqueue_step(slot)
        launched = time.perf_counter()
        out = np.empty_like(feeds[dl.LATENTS])
        cuda.copy_async(out.ctypes.data, slot.ptr(dl.LATENTS), out.nbytes, self.stream, "d2h")
        self.stream.synchronize()
        split = self.loop_split
        if steps < 2:   # a one-step call (__call__, the host loop's): not a sampling loop
            return out
        split["setup"] += start - made
        split["upload"] += uploaded - start
        split["launch"] += launched - uploaded
        split["wait"] += time.perf_counter() - launched
        split["loops"] += 1
        split["steps"] += steps
        return out

    _no_sync = None

    def _run_options(self):
        if self._no_sync is None:
            self._no_sync = run_options({NO_SYNC_KEY: 1})
        return self._no_sync

    def _enqueue_step(self, slot: _LoopSlot) -> None:
        """One step on the stream, no wait: the graph run, then latents_next -> latents and step_next -> step."""
        from ldm_deploy.runtime import cuda

        try:
            self.session.run_with_iobinding(slot.binding, self._run_options())
        except Exception as e:  # onnxruntime's own exception types
            raise LdmError(f"onnxruntime CUDA run of the loop step graph {self.model_path} failed: "
                           f"{str(e).splitlines()[0]}", hint="run the host loop (the ort-cuda runner)") from None
        latents = slot.values[dl.LATENTS]
        nbytes = int(np.prod(latents.shape())) * 4
        cuda.copy_async(slot.ptr(dl.LATENTS), slot.ptr(dl.LATENTS_NEXT), nbytes, self.stream, "d2d")
        cuda.copy_async(slot.ptr(dl.STEP), slot.ptr(dl.STEP_NEXT), 8, self.stream, "d2d")

    def _slot(self, feeds: dict, capture: bool) -> _LoopSlot:
        """The bound slot of these input shapes: made, warmed up and (if `capture`) captured on first use."""
        key = (capture, *((n, a.shape) for n, a in feeds.items()))
        slot = self._slots.get(key)
        if slot is not None:
            return slot
        if len(self._slots) >= MAX_SLOTS:   # the oldest shape set gives its buffers and graph back
            self._slots.pop(next(iter(self._slots))).close()
        ort = _ort()
        slot = self._slots[key] = _LoopSlot(self.session.io_binding())
        outputs = {dl.LATENTS_NEXT: feeds[dl.LATENTS], dl.STEP_NEXT: feeds[dl.STEP]}
        for name, array in [*feeds.items(), *outputs.items()]:
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), array.dtype, "cuda", self.device_id)
            slot.values[name] = value
            if name in outputs:
                slot.binding.bind_ortvalue_output(name, value)
            else:
                slot.binding.bind_ortvalue_input(name, value)
        self._warm_up(slot, feeds)
        if capture:
            self._capture(slot)
        return slot

    def _warm_up(self, slot: _LoopSlot, feeds: dict) -> None:
        """WARMUP_RUNS runs on these inputs (outputs only written), so the capture finds ORT's memory allocated."""
        from ldm_deploy.runtime import cuda

        for name, array in feeds.items():
            cuda.copy_async(slot.ptr(name), array.ctypes.data, array.nbytes, self.stream, "h2d")
        for _ in range(WARMUP_RUNS):
            try:
                self.session.run_with_iobinding(slot.binding, self._run_options())
            except Exception as e:  # onnxruntime's own exception types
                raise LdmError(f"onnxruntime CUDA run of the loop step graph {self.model_path} failed: "
                               f"{str(e).splitlines()[0]}", hint="run the host loop (the ort-cuda runner)") from None
        self.stream.synchronize()

    def _capture(self, slot: _LoopSlot) -> None:
        """Capture one step (run + the two copies) as a CUDA graph; on failure keep the uncaptured launches."""
        from ldm_deploy.runtime import cuda

        try:
            slot.graph = cuda.Graph(self.stream, lambda: self._enqueue_step(slot))
        except LdmError as e:
            slot.graph = None
            slot.capture_error = str(e).splitlines()[0][:300]
            try:   # a failed capture can leave the stream in an error state: make sure it still runs
                self.stream.synchronize()
            except LdmError:
                pass


def open_loop_runner(artifact, variant: str, *, device_id: int = 0, use_tf32: bool | None = None,
                     capture: bool = True, provider: str = "cuda", **loader) -> OrtLoopRunner:
    """The loop runner over `variant` of the artifact's U-Net (its loop step graph)."""
    return OrtLoopRunner(SessionFromArtifact(artifact, "unet", provider=provider, variant=variant,
                                             device_id=device_id, use_tf32=use_tf32, **loader), capture=capture)


__all__ = ["MAX_SLOTS", "NO_SYNC_KEY", "OrtLoopRunner", "open_loop_runner"]
