"""On a GPU: the U-Net graph levers of `bench --tuning` (ldm_deploy/export/ort_fp16_norm.py passes on the fused
ort-cuda variant) compute what the ort-cuda variant computes, under CUDA graphs as the bench runs them. CPU tests
of the passes (counts, bit-exactness with contrib stand-ins): tests/export/test_ort_fp16_norm.py. On an H100 with
onnxruntime-gpu:

    python -m pytest -m gpu -p no:xdist tests/runtime/test_ort_cuda_norm_layout.py
"""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.compare import assert_close
from ldm_deploy.runtime.runners.base import open_runner, takes_guidance
from tests.runtime.test_ort_cuda_runner import SPECS, artifacts, feeds  # noqa: F401  (module fixture and its specs)

pytestmark = pytest.mark.gpu

GUIDANCE = 7.5
# The passes only move elements (Casts fp16 -> fp16, Transpose -> Reshape -> Transpose chains folded into a Reshape
# of the same bytes), so the kernels downstream see the same values: the outputs are expected bit-identical
# (recorded as `bit_identical`). The bound admits the one legitimate difference, cuDNN / cuBLAS choosing another
# algorithm in the second session (EXHAUSTIVE search is timing-based): fp16 results rounded differently, unit
# roundoff 2^-11 ~ 4.9e-4 relative, amplified up to 1 + 2 x 7.5 = 16x by the folded guidance combination
# (uncond + 7.5 (cond - uncond)): 16 x 4.9e-4 ~ 7.8e-3 -> 1e-2 of the output's largest magnitude.
TOL = 1e-2


def test_norm_layout_levers_match_ort_cuda(artifacts, tmp_path, record_property):  # noqa: F811
    from ldm_deploy.bench.ort_side import _open_runner
    from ldm_deploy.bench.prepare import add_tuning_variants
    from ldm_deploy.bench.spec import TUNING
    from ldm_deploy.export.cfg_fold import folded_inputs

    art = artifacts["fp16"]
    manifest = (art / "manifest.json").read_bytes()
    done = add_tuning_variants(art, tmp_path / "levers")
    assert (art / "manifest.json").read_bytes() == manifest
    record_property("pass_stats", {k: {s: v[s] for s in ("casts", "transposes")} for k, v in done.items()})
    reference = open_runner("ort-cuda", art, "unet", variant="auto", enable_cuda_graph=True)
    assert takes_guidance(reference)
    inputs = [folded_inputs(feeds("unet", seed=seed), GUIDANCE) for seed in (0, 1, 2)]
    want = [reference(x)["noise_pred"].copy() for x in inputs]
    reference.close()
    identical = {}
    for side, (_, tuning) in TUNING.items():
        if not tuning.get("graph"):
            continue
        lever = _open_runner("ort-cuda", art, "unet", {"graph": tuning["graph"], "enable_cuda_graph": True},
                             tmp_path / "levers")
        assert lever.variant == tuning["graph"] and takes_guidance(lever)
        identical[side] = True
        for seed, (x, v) in enumerate(zip(inputs, want)):   # call 1 captures the CUDA graph, 2 and 3 replay it
            got = lever(x)["noise_pred"]
            identical[side] &= bool(np.array_equal(got, v))
            assert_close(got, v, atol=TOL * float(np.abs(v).max()), name=f"{side} seed {seed}")
        lever.close()
    record_property("bit_identical", identical)
