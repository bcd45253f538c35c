"""On a GPU: the VAE decoder's fused ort-cuda graph with the NHWC residual passes (export/ort_nhwc_residual.py, what
`export --ort-cuda` writes) decodes what the graph without them decodes, under a CUDA graph as the deployed runner
runs it. CPU tests of the passes: tests/export/test_ort_nhwc_residual.py. The timing of both on SD 1.5's decoder:
scripts/vae_layout_ab.py. On an H100 with onnxruntime-gpu:

    python -m pytest -m gpu -p no:xdist tests/runtime/test_ort_cuda_vae_layout.py
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

# Both graphs run fp16 and are measured against the fp32 traced decoder (TF32 off) on the same latents. The passes
# reorder one fp16 sum per ResNet (the conv bias added with the residual in SkipGroupNorm instead of by cuDNN before
# it), so "after" differs from "before" by fp16 roundings carried through the decoder; it may be at most
# (1 + FP16_SLACK) times as far from fp32 as "before" is.
FP16_SLACK = 1.0
FP16_EPS = float(np.finfo(np.float16).eps)   # a floor: one fp16 rounding of the image's largest value


def _ab_script():
    path = Path(__file__).resolve().parents[2] / "scripts" / "vae_layout_ab.py"
    spec = importlib.util.spec_from_file_location("vae_layout_ab", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("vae_layout_ab", module)
    spec.loader.exec_module(module)
    return module


def test_vae_layout_passes_decode_as_the_fused_graph_on_cuda(tmp_path, record_property):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with a CUDA device")
    from ldm_deploy.export.ort_optimize import optimize_for_ort_cuda
    from tests.export.test_ort_optimize import make_sd_like_folder

    ab = _ab_script()
    src = ab.export_decoder(make_sd_like_folder(tmp_path / "model"), tmp_path / "fp32")
    graphs = {}
    for name, layout in (("before", False), ("after", True)):
        graphs[name] = tmp_path / f"vae.{name}.onnx"
        stats = optimize_for_ort_cuda(src, graphs[name], "vae_decoder", float16=True, vae_layout=layout)
        assert bool(stats.get("vae_layout")) == layout
    reference = ab.session(src, graph=False, tf32=False)
    errors = {}
    for seed, batch in ((0, 1), (1, 2)):
        latent = np.random.default_rng(seed).standard_normal((batch, 4, 8, 8)).astype(np.float32)
        want, _ = ab.decode(reference, latent, iters=1, warmup=0)
        scale = float(np.abs(want).max())
        for name, path in graphs.items():
            got, _ = ab.decode(ab.session(path, graph=True), latent, iters=2)
            assert np.isfinite(got).all()
            errors[f"{name}_b{batch}"] = float(np.abs(got - want).max()) / scale
        record_property(f"errors_b{batch}", errors)
        assert errors[f"after_b{batch}"] <= (1 + FP16_SLACK) * errors[f"before_b{batch}"] + FP16_EPS, errors
