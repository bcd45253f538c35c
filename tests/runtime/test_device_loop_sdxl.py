"""The device loop on SDXL, on CPU: the tiny SDXL base's U-Net folded and wrapped into the loop step graph (its
text_embeds / time_ids stay conditioning inputs) gives, through SDXLPipeline, the host loop's latents, for a whole
run and for the base's half of a base -> refiner hand-off (the tables of a sliced schedule). The CUDA capture is
SD's (tests/runtime/test_ort_cuda_device_loop.py); the SDXL U-Net on a GPU was not run with it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from ldm_deploy.runtime import device_loop as dl
from ldm_deploy.runtime.sdxl import SDXLPipeline
from tests.runtime.tiny_sdxl import make_tiny_sdxl

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow   # one tiny SDXL export (~30 s on 2 cores) sets up the module

SIZE = 32


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(host-loop pipeline, the same runners with the loop runner as U-Net) over one tiny SDXL export."""
    from ldm_deploy.export import onnx_io
    from ldm_deploy.export.cfg_fold import fold_cfg
    from ldm_deploy.export.config import ExportConfig, Range
    from ldm_deploy.export.exporter import export_model
    from ldm_deploy.export.ort_optimize import variant_entry
    from ldm_deploy.export.step_graph import add_loop_step
    from ldm_deploy.runtime.runners.ort import SessionFromArtifact
    from ldm_deploy.runtime.runners.ort_loop import OrtLoopRunner

    root = tmp_path_factory.mktemp("sdxl-loop")
    cfg = ExportConfig(name="tiny-sdxl", batch=Range(1, 1, 2), height=Range(SIZE, SIZE, SIZE),
                       width=Range(SIZE, SIZE, SIZE), measure_runtime=False)
    art = export_model(make_tiny_sdxl(root / "base"), root / "onnx", cfg).path
    model = add_loop_step(fold_cfg(onnx.load(str(art / "unet" / "model.onnx"))))
    path = root / "loop" / "unet" / "model.loop.onnx"
    onnx_io.save_model(model, path)
    entry = variant_entry(root / "loop", path, {"precision": "fp32", "fused_ops": {}, "nodes_before": 0,
                                                "nodes_after": 0, "seconds": 0, "cfg_folded": True})
    host = SDXLPipeline.from_artifact(art)
    loop = OrtLoopRunner(SessionFromArtifact(art, "unet", graph=("loop", path, entry)))
    assert {"text_embeds", "time_ids"} <= set(loop.conditioning)
    device = SDXLPipeline(host.tokenizers, {**host.runners, "unet": loop}, host.info, backend="ort-cpu")
    yield host, device
    loop.close()
    host.close()


def _final_latents(pipe, **kw) -> tuple[np.ndarray, dict]:
    result = pipe(["a red circle", "a green square"], negative_prompt=["blurry", ""], seed=7, height=SIZE,
                  width=SIZE, decode=False, **kw)
    return np.asarray(result.latents), result.timings


# euler is SDXL's own scheduler; ddim on an SDXL config takes DDIMScheduler's default clip_sample (True), whose clamp
# is not linear: the pipeline declines the device loop for it (tests/runtime/test_device_loop.py)
@pytest.mark.parametrize("scheduler,handoff", [("euler", None), ("euler", 0.6)])
def test_sdxl_device_loop_equals_the_host_loop(pipes, scheduler, handoff):
    host, device = pipes
    kw = dict(steps=6, guidance=5.0, scheduler=scheduler, **({"denoising_end": handoff} if handoff else {}))
    want, host_timings = _final_latents(host, **kw)
    got, timings = _final_latents(device, **kw)
    assert timings.get("device_loop") and not host_timings.get("device_loop")
    assert timings["unet_calls"] == host_timings["unet_calls"] == (6 if handoff is None else 3)   # 0.6 of 6 steps
    assert got.shape == want.shape and np.isfinite(got).all()
    # the same graph ops and float32 update order: only ORT's own scheduling of the sums may differ
    assert np.abs(got - want).max() <= 1e-5 * float(np.abs(want).max()), (scheduler, handoff)


def test_sdxl_tables_of_a_sliced_schedule_are_its_steps(pipes):
    host, _ = pipes
    _, stage = host.stage_schedule("euler", 10, denoising_end=0.5)
    tables = dl.loop_tables("euler", stage)
    assert tables.steps == len(stage.timesteps) < 10
    np.testing.assert_array_equal(tables.timesteps, stage.timesteps.astype(np.float32))
