"""SDXL on ONNX Runtime CUDA with the fused variants (`export --ort-cuda`), on tiny SDXL folders: each fused
component (U-Net with CFG folded in, both text encoders, the fp32 VAE decoder) against the plain graph on the
same GPU, CUDA-graph replays, and SDXLPipeline end to end (base, and base + refiner hand-off) on ort-cuda with
the variants and the CUDA graph against ort-cpu over the plain graphs. The CPU side (variants written, fusions,
IO, the fold's parity) is tests/export/test_ort_cuda_sdxl.py. On an H100 with onnxruntime-gpu:

    python -m pytest -m gpu -p no:xdist tests/runtime/test_ort_cuda_sdxl_gpu.py
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.export.config import ExportConfig, Range
from ldm_deploy.export.exporter import export_model
from ldm_deploy.runtime.runners.base import open_runner, takes_guidance
from tests.runtime.tiny_sdxl import sdxl_folders  # noqa: F401 (fixture)

pytest.importorskip("diffusers")
pytestmark = pytest.mark.gpu

HAS_ONNXSLIM = importlib.util.find_spec("onnxslim") is not None   # GPU images may lack it: export uncleaned
SIZE, GUIDANCE = 32, 5.0
PROMPT, NEGATIVE = "a red circle on a blue square", "blurry"
CONFIG = ExportConfig(name="tiny-sdxl", batch=Range(1, 1, 2), height=Range(SIZE, SIZE, SIZE),
                      width=Range(SIZE, SIZE, SIZE), measure_runtime=False, optimize=HAS_ONNXSLIM, ort_cuda=True)


@pytest.fixture(scope="module")
def artifacts(sdxl_folders, tmp_path_factory) -> dict:
    """base fp32 / fp16 and refiner fp16 (VAE fp32, as SDXL's), each with the ort-cuda variants."""
    from ldm_deploy.export.ort_optimize import add_ort_cuda_variants

    root = tmp_path_factory.mktemp("sdxl-ort-cuda-gpu")
    base, refiner = sdxl_folders
    out = {"base-fp32": export_model(base, root / "base-fp32", CONFIG).path,
           "base-fp16": export_model(base, root / "base-fp16", CONFIG.replace(precision="fp16")).path,
           "refiner-fp16": export_model(refiner, root / "refiner-fp16", CONFIG.replace(precision="fp16")).path}
    # text_encoder_2's fused variant is not written by --ort-cuda (it failed here on an H100, 2026-12-06: fp32
    # max abs 1.1, CUDA-graph capture refused); the component test still builds and checks it, the pipeline
    # tests run what an export holds (its plain graph)
    # (made from an fp32 graph: the fp32 base's; fp16 exports keep none for it)
    import shutil

    te2 = shutil.copytree(out["base-fp32"], root / "base-fp32-te2")
    add_ort_cuda_variants(te2, ["text_encoder_2"])
    return {**out, "base-fp32+te2": te2}


def _feeds(artifact, component: str, seed: int) -> dict:
    """float32 feeds at the static size; the U-Net's 2B rows repeat latents / timesteps over the CFG halves, and
    its halves' text_embeds / time_ids differ (a negative prompt, negative micro-conditioning)."""
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.export.cfg_fold import symmetric_unet_inputs
    from ldm_deploy.feeds import example_feeds

    spec = Artifact.open(artifact).component(component)
    x = example_feeds(spec, 1, seed, vocab_size=999, float_dtype=np.float32)
    if component == "unet":
        x = symmetric_unet_inputs(x)
        n = x["time_ids"].shape[1]
        x["time_ids"] = np.array([[512, 768, 8, 4, 2.5, 32][:n], [1024, 1024, 0, 0, 6.0, 1024][:n]], np.float32)
    return x


@pytest.mark.parametrize("which", ["base-fp32", "base-fp16", "refiner-fp16"])
@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2", "unet", "vae_decoder"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_fused_sdxl_variant_equals_plain_on_cuda(artifacts, which, component, cuda_graph):
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.export.cfg_fold import folded_inputs, reference_cfg

    if component == "text_encoder_2" and which != "base-fp32":
        pytest.skip("text_encoder_2's fused variant is made from an fp32 graph: only the fp32 base has one")
    art = artifacts[f"{which}+te2" if component == "text_encoder_2" else which]
    if component not in Artifact.open(art).components:
        pytest.skip(f"{which} has no {component}")
    plain = open_runner("ort-cuda", art, component, variant=None)
    fused = open_runner("ort-cuda", art, component, enable_cuda_graph=cuda_graph)   # variant "auto"
    assert fused.variant == "ort-cuda"
    folded = takes_guidance(fused)
    assert folded == (component == "unet")
    half = fused.spec.precision == "fp16"
    # as test_ort_cuda_runner.py: fp16 3e-2 of the output's scale; fp32 graphs under TF32 (an fp16 export's VAE)
    # 5e-3, else 1e-3; the folded U-Net's g (cond - uncond) doubles it
    tol = 3e-2 if half else (5e-3 if fused.use_tf32 else 1e-3)
    for seed in (0, 1, 2):      # run 1 captures (with graphs), 2 and 3 replay with new inputs
        x = _feeds(art, component, seed)
        want = plain(x)
        if folded:
            x = folded_inputs(x, GUIDANCE)
            want = {"noise_pred": reference_cfg(want["noise_pred"], 1, GUIDANCE)}
        got = fused(x)
        for k, v in want.items():
            assert_close(got[k], v, atol=(2 if folded else 1) * tol * float(np.abs(v).max()),
                         name=f"{which} {component} {k} graph={cuda_graph} seed {seed}")
    plain.close()
    fused.close()


_CPU: dict = {}


def _cpu(artifacts, key: str, **kw):
    from ldm_deploy.runtime.pipeline import Pipeline

    if key not in _CPU:
        _CPU[key] = Pipeline.from_artifact(artifacts["base-fp16"], backend="ort-cpu")(PROMPT, **kw)
    return _CPU[key]


def _plain_cuda(artifacts, key: str, **kw):
    from ldm_deploy.runtime.pipeline import Pipeline

    if key not in _CPU:
        pipe = Pipeline.from_artifact(artifacts["base-fp16"], backend="ort-cuda", variant=None)
        _CPU[key] = pipe(PROMPT, **kw)
        pipe.close()
    return _CPU[key]


def _diff(a, b) -> int:
    return int(np.abs(a.images.astype(np.int16) - b.images.astype(np.int16)).max())


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_sdxl_pipeline_fused_on_cuda_matches_plain(artifacts, graph, negative, record_property):
    """SDXLPipeline picks the fused variants (variant "auto") with IO binding and the CUDA graph; no negative
    prompt exercises SDXL's zero negative rows. Against the plain graphs on the same GPU: what the fusions, the
    folded CFG and the graph capture change. (On an H100, 2026-12-06, both the fused and the plain CUDA runs
    of this tiny fp16 model were 58-135 levels from ORT CPU, 18-19 from each other: the CPU comparison is
    test_sdxl_pipeline_plain_on_cuda_matches_cpu's.)"""
    from ldm_deploy.runtime.pipeline import Pipeline
    from ldm_deploy.runtime.sdxl import SDXLPipeline

    kw = dict(negative_prompt=negative, steps=20, guidance=GUIDANCE, seed=0)
    plain = _plain_cuda(artifacts, f"plain-cuda-{negative}", **kw)
    pipe = Pipeline.from_artifact(artifacts["base-fp16"], backend="ort-cuda", enable_cuda_graph=graph)
    assert isinstance(pipe, SDXLPipeline)
    assert {c: r.variant for c, r in pipe.runners.items() if c != "vae_encoder"} == {
        "text_encoder": "ort-cuda", "text_encoder_2": None, "unet": "ort-cuda", "vae_decoder": "ort-cuda"}
    assert takes_guidance(pipe.runners["unet"]) and pipe.runners["vae_decoder"].spec.precision == "fp32"
    pipe(PROMPT, negative_prompt=negative, steps=2, seed=1, guidance=GUIDANCE)   # warm-up (and capture)
    gpu = pipe(PROMPT, **kw)
    pipe.close()
    record_property("fused_vs_plain_cuda_max_abs_pixel_diff", _diff(gpu, plain))
    record_property("max_abs_pixel_diff_vs_cpu", _diff(gpu, _cpu(artifacts, f"base-{negative}", **kw)))
    assert plain.images.std() > 10, "the reference image is flat: the comparison would say nothing"
    # 8-bit images after 20 guided steps of an fp16 U-Net, fused against plain kernels (test_ort_cuda_gpu.py's
    # bound): a wrong binding, a stale CUDA-graph input or a swapped CFG half moves whole regions by > 100 levels
    assert _diff(gpu, plain) <= 64, f"max abs pixel difference {_diff(gpu, plain)} > 64 vs the plain graphs"


@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_sdxl_pipeline_plain_on_cuda_matches_cpu(artifacts, negative, record_property):
    """The plain graphs on CUDA against ORT CPU, SD 1.5's bound (test_ort_cuda_gpu.py, where the tiny model's
    CUDA run is within 1 level). Failed on an H100 on 2026-12-06 (135 levels without a negative prompt, 76
    with): open; test_sdxl_plain_component_on_cuda_matches_cpu says which component drifts."""
    kw = dict(negative_prompt=negative, steps=20, guidance=GUIDANCE, seed=0)
    cpu, plain = _cpu(artifacts, f"base-{negative}", **kw), _plain_cuda(artifacts, f"plain-cuda-{negative}", **kw)
    record_property("max_abs_pixel_diff", _diff(plain, cpu))
    assert cpu.images.std() > 10, "the reference image is flat: the comparison would say nothing"
    assert _diff(plain, cpu) <= 64, f"max abs pixel difference {_diff(plain, cpu)} > 64 vs ort-cpu"


@pytest.mark.parametrize("tf32", [None, False])
@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2", "unet", "vae_decoder"])
def test_sdxl_plain_component_on_cuda_matches_cpu(artifacts, component, tf32, record_property):
    """Each plain graph of the fp16 base export on CUDA (no variant, no graph) against ORT CPU on the same feeds;
    `tf32=None` is the runner's default (TF32 on for the fp32 VAE of an fp16 export), False turns it off."""
    cpu = open_runner("ort-cpu", artifacts["base-fp16"], component)
    gpu = open_runner("ort-cuda", artifacts["base-fp16"], component, variant=None, use_tf32=tf32)
    record_property("use_tf32", gpu.use_tf32)
    worst = {}
    for seed in (0, 1):
        x = _feeds(artifacts["base-fp16"], component, seed)
        want, got = cpu(x), gpu(x)
        for k, v in want.items():
            scale = float(np.abs(v).max())
            worst[k] = max(worst.get(k, 0.0), float(np.abs(got[k] - v).max()) / scale)
    record_property("max_rel_to_scale", worst)
    cpu.close()
    gpu.close()
    # fp16 kernels (cuBLAS accumulates in fp32) against ORT CPU's fp16-rounded tensors: 3e-2 of the output's
    # scale, test_runners.py's fp16 bound; TF32 on an fp32 graph rounds inputs to 10 mantissa bits, within it too
    assert max(worst.values()) <= 3e-2, worst


def test_sdxl_base_then_refiner_fused_on_cuda_matches_plain(artifacts, record_property):
    """The hand-off on the fused graphs: base (denoising_end) then refiner (denoising_start, aesthetic-score
    time_ids in both CFG halves), CUDA graphs on, against the same two stages over the plain graphs on the same
    GPU (the bound and the reason as test_sdxl_pipeline_fused_on_cuda_matches_plain); ORT CPU recorded."""
    from ldm_deploy.runtime.pipeline import Pipeline

    steps, split = 20, 0.7
    images = {}
    runs = {"ort-cpu": ("ort-cpu", {}), "plain": ("ort-cuda", {"variant": None}),
            "fused": ("ort-cuda", {"enable_cuda_graph": True})}
    for name, (backend, opts) in runs.items():
        base = Pipeline.from_artifact(artifacts["base-fp16"], backend=backend, **opts)
        refiner = Pipeline.from_artifact(artifacts["refiner-fp16"], backend=backend, **opts)
        if name == "fused":
            assert takes_guidance(refiner.runners["unet"]) and refiner.runners["unet"].variant == "ort-cuda"
        kw = dict(negative_prompt=NEGATIVE, steps=steps, guidance=GUIDANCE)
        lat = base(PROMPT, seed=0, denoising_end=split, decode=False, **kw).latents
        images[name] = refiner(PROMPT, init_latents=lat, denoising_start=split, **kw).images.astype(np.int16)
        base.close()
        refiner.close()
    diff = int(np.abs(images["fused"] - images["plain"]).max())
    record_property("fused_vs_plain_cuda_max_abs_pixel_diff", diff)
    record_property("vs_cpu_max_abs_pixel_diff", {k: int(np.abs(images[k] - images["ort-cpu"]).max())
                                                  for k in ("plain", "fused")})
    assert diff <= 64, f"max abs pixel difference {diff} > 64 vs the plain graphs"


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2", "unet"])
def test_sdxl_plain_layers_on_cuda_track_cpu(artifacts, component, record_property):
    """Where the plain fp16 graphs on CUDA part from ORT CPU, layer by layer (Polygraphy, export/layers.py): every
    shared tensor of the fp16 graph, on CUDA and on ORT CPU, against the fp32 graph on ORT CPU on the same feeds.
    ORT CPU runs most ops in fp32 between fp16-rounded tensors, CUDA runs fp16 kernels (fp32 accumulation), so
    CUDA may be a few times further from fp32, not more: the first tensor where its error exceeds MARGIN x the
    CPU's (and 1e-3 of the tensor's scale) is named, with the op, in the failure and in the record."""
    from ldm_deploy.artifact import Artifact
    from ldm_deploy.export.layers import compare_layers

    MARGIN = 8.0
    fp32, fp16 = (Artifact.open(artifacts[k]).file(component) for k in ("base-fp32", "base-fp16"))
    feeds = [_feeds(artifacts["base-fp16"], component, seed) for seed in (0, 1)]
    kw = {"tolerance": 3e-2, "labels": ("fp32-ort-cpu", "fp16")}
    cpu = compare_layers(fp32, fp16, feeds, providers=("cpu",), **kw)
    cuda = compare_layers(fp32, fp16, feeds, providers=("cuda", "cpu"), **kw)
    on_cpu = {s.tensor: s.max_rel for s in cpu.layers}
    worse = [(s.order, s.node, s.op, s.tensor, s.max_rel, on_cpu.get(s.tensor, 0.0)) for s in cuda.layers
             if s.max_rel > max(MARGIN * on_cpu.get(s.tensor, 0.0), 1e-3)]
    outputs = {s.tensor: (s.max_rel, on_cpu.get(s.tensor)) for s in cuda.layers if s.tensor in cuda.outputs}
    record_property("outputs_rel_cuda_cpu", outputs)
    record_property("first_worse", worse[:12])
    record_property("tensors", len(cuda.layers))
    assert not worse, (f"{component}: {len(worse)} tensors on CUDA further from fp32 than {MARGIN}x ORT CPU; first "
                       f"#{worse[0][0]} {worse[0][1]} ({worse[0][2]}) {worse[0][3]}: {worse[0][4]:.3g} vs {worse[0][5]:.3g}")
