"""runtime/lora_switch.py on the runners: OrtCudaRunner binds the switchable weights once and rewrites those
buffers in place (run for real with CPU OrtValues; on a GPU, marker `gpu`, with CUDA graphs), equal to
ort-cpu, and back to the base bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.artifact import Artifact
from ldm_deploy.compare import assert_close
from ldm_deploy.feeds import example_feeds
from ldm_deploy.runtime import lora_switch
from ldm_deploy.runtime.runners.base import open_runner
from tests.runtime.test_ort_cuda_runner import cpu_bound  # noqa: F401 (fixture)
from tests.runtime.tiny_model import export_config, make_tiny_folder

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytestmark = pytest.mark.slow      # exports the tiny U-Net twice (fp32, fp16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ldm_deploy.export.exporter import export_model
    from tests.lora_files import make_lora_files

    root = tmp_path_factory.mktemp("switch")
    folder = make_tiny_folder(root / "model")
    files = make_lora_files(folder, root / "loras")
    arts = {p: export_model(folder, root / p, export_config(p).replace(
        components=("unet",), measure_runtime=False, lora_switchable="all")).path for p in ("fp32", "fp16")}
    arts["linear"] = export_model(folder, root / "linear", export_config().replace(
        components=("text_encoder", "unet"), measure_runtime=False, lora_switchable="linear")).path
    UNET.append(Artifact.open(arts["fp32"]).component("unet"))
    return arts, files


UNET: list = []   # the fp32 artifact's U-Net ComponentSpec (filled by `setup`, which every user takes)


def unet_feeds(seed=0):
    """One CFG batch (2 rows) of float32 U-Net inputs at the profile's opt size."""
    return example_feeds(UNET[0], 1, seed, float_dtype=np.float32)


def _switch_cycle(runner, cpu, files):
    """base -> A -> B -> none on `runner`, each compared with ort-cpu holding the same LoRAs."""
    x = unet_feeds()
    base = runner(x)["noise_pred"]
    outs = {}
    for name in ("peft", "kohya", None):
        loras = [f"{files[name]}:0.8"] if name else []
        lora_switch.apply({"unet": runner}, loras)
        lora_switch.apply({"unet": cpu}, loras)
        outs[name] = runner(x)["noise_pred"]
        yield name, outs[name], cpu(x)["noise_pred"]
    assert np.array_equal(outs[None], base), "after A, B, none: the base output bit for bit"
    assert not np.array_equal(outs["peft"], base) and not np.array_equal(outs["kohya"], outs["peft"])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_bound_weights_switch_in_place(setup, cpu_bound, precision):
    arts, files = setup
    runner = cpu_bound(arts[precision], "unet")
    cpu = open_runner("ort-cpu", arts[precision], "unet")
    assert runner.base_weights and runner.input_dtypes["sample"] == np.dtype(
        "float16" if precision == "fp16" else "float32")
    runner(unet_feeds())
    held = {n: runner.last_slot.inputs[n] for n in runner.base_weights}
    ptrs = {n: v.data_ptr() for n, v in held.items()}
    for name, got, want in _switch_cycle(runner, cpu, files):
        assert_close(got, want, rtol=0, atol=0, name=f"{precision} {name}")     # same kernels, same weights
    assert all(runner.last_slot.inputs[n] is held[n] and held[n].data_ptr() == ptrs[n] for n in held), \
        "switching rewrites the bound buffers; it never rebinds"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_ort_cuda_switch(setup, precision, cuda_graph):
    arts, files = setup
    gpu = open_runner("ort-cuda", arts[precision], "unet", enable_cuda_graph=cuda_graph)
    cpu = open_runner("ort-cpu", arts[precision], "unet")
    tol = 3e-2 if precision == "fp16" else 1e-3     # as tests/runtime/test_ort_cuda_runner.py (TF32 off for fp32)
    for name, got, want in _switch_cycle(gpu, cpu, files):
        assert_close(got, want, atol=tol * float(np.abs(want).max()), name=f"{precision} {name} graph={cuda_graph}")


def test_linear_mode_takes_linear_loras_and_names_locon(setup):
    from ldm_deploy.errors import LdmError
    arts, files = setup
    runners = {c: open_runner("ort-cpu", arts["linear"], c) for c in ("text_encoder", "unet")}
    assert not any(len(w.shape) == 4 and w.shape[-1] > 1 for w in runners["unet"].base_weights.values())
    info = lora_switch.apply(runners, [f"{files['te']}:1.0"])          # q/v/fc1 of the text encoder: Linear
    assert info["changed"] == {"text_encoder": 6, "unet": 0}
    with pytest.raises(LdmError, match="Linear and 1x1 conv weights only.*--lora-switchable all"):
        lora_switch.apply(runners, [f"{files['kohya']}:1.0"])          # LoCon: 3x3 conv2


def test_bound_weights_reach_every_cuda_graph_slot(setup, cpu_bound):
    """Under CUDA graphs each input shape has its own binding (and graph); the switchable weights live in one set
    of device buffers bound in all of them, so a switch reaches every shape's graph, and a shape first seen after
    the switch runs with the switched weights too."""
    arts, files = setup
    runner = cpu_bound(arts["fp32"], "unet", enable_cuda_graph=True)
    cpu = open_runner("ort-cpu", arts["fp32"], "unet")
    one, two, three = (example_feeds(UNET[0], b, b, float_dtype=np.float32) for b in (1, 2, 3))
    base = {b: runner(x)["noise_pred"] for b, x in ((1, one), (2, two))}
    loras = [f"{files['peft']}:0.8"]
    lora_switch.apply({"unet": runner}, loras)
    lora_switch.apply({"unet": cpu}, loras)
    for b, x in ((2, two), (1, one), (3, three), (2, two)):
        got = runner(x)["noise_pred"]
        assert_close(got, cpu(x)["noise_pred"], rtol=0, atol=0, name=f"batch {b} after the switch")
        assert b not in base or not np.array_equal(got, base[b]), f"batch {b} still runs the base weights"
    slots = list(runner._slots.values())
    assert len(slots) == 3 and all(s.inputs[n] is runner._weights_dev[n] for s in slots for n in runner.base_weights)
