"""On a GPU: the U-Net graph levers of `bench --tuning` (ldm_deploy/export/ort_fp16_norm.py passes on the fused
ort-cuda variant) compute what the ort-cuda variant computes, under CUDA graphs as the bench runs them. CPU tests
of the passes (counts, bit-exactness with contrib stand-ins): tests/export/test_ort_fp16_norm.py. On an H100 with
onnxruntime-gpu:

    python -m pytest -m gpu -p no:xdist tests/runtime/test_ort_cuda_norm_layout.py
"""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.runtime.runners.base import open_runner, takes_guidance
from tests.runtime.test_ort_cuda_runner import SPECS, artifacts, feeds  # noqa: F401  (module fixture and its specs)

pytestmark = pytest.mark.gpu

GUIDANCE = 7.5
# The passes only move elements (Casts fp16 -> fp16, Transpose -> Reshape -> Transpose chains folded into a Reshape
# of the same bytes), so the kernels downstream see the same values, and bit-identical outputs are expected
# (recorded as `bit_identical`). They are not required: the reference itself is not bit-reproducible on a GPU (ORT's
# fused GroupNorm sums with atomics, and cuDNN's EXHAUSTIVE algorithm search is timing-based, so a second session
# may pick another algorithm), and one fp16 ulp moved early is carried and amplified through the network and the
# folded guidance combination (uncond + 7.5 (cond - uncond)) by an amount no per-op bound states. What the lever
# must not do is compute a worse U-Net: so both are measured against the fp32 U-Net (TF32 off) on the same inputs,
# and the lever's error may exceed the reference's own fp16 error by at most FP16_SLACK of it. A second reference
# session gives the run-to-run spread (recorded beside).
FP16_SLACK = 2.0


def _max_err(got, want) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


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
    inputs = [folded_inputs(feeds("unet", seed=seed), GUIDANCE) for seed in (0, 1, 2)]
    exact = open_runner("ort-cuda", artifacts["fp32"], "unet", variant="auto", use_tf32=False)
    assert takes_guidance(exact)
    truth = [exact(x)["noise_pred"].astype(np.float64) for x in inputs]
    exact.close()
    runs = []
    for _ in range(2):   # two reference sessions: the run-to-run spread
        reference = open_runner("ort-cuda", art, "unet", variant="auto", enable_cuda_graph=True)
        assert takes_guidance(reference)
        runs.append([reference(x)["noise_pred"].copy() for x in inputs])
        reference.close()
    want = runs[0]
    ref_err = max(_max_err(v, t) for v, t in zip(want, truth))
    record_property("reference_vs_fp32", ref_err)
    record_property("reference_rerun_spread", max(_max_err(a, b) for a, b in zip(runs[1], want)))
    identical, errors = {}, {}
    for side, (_, tuning) in TUNING.items():
        if not tuning.get("graph"):
            continue
        # a loop step graph (the device-loop sides) runs as one folded U-Net call here (x' = 0 x + 1 out)
        knobs = {"graph": tuning["graph"], "enable_cuda_graph": True, "device_loop": bool(tuning.get("device_loop"))}
        lever = _open_runner("ort-cuda", art, "unet", knobs, tmp_path / "levers")
        assert lever.variant == tuning["graph"] and takes_guidance(lever)
        got = [lever(x)["noise_pred"].copy() for x in inputs]   # call 1 captures the CUDA graph, 2 and 3 replay it
        lever.close()
        identical[side] = all(np.array_equal(g, v) for g, v in zip(got, want))
        errors[side] = max(_max_err(g, t) for g, t in zip(got, truth))
    record_property("bit_identical", identical)
    record_property("lever_vs_fp32", errors)
    worse = {side: e for side, e in errors.items() if e > (1 + FP16_SLACK) * ref_err}
    assert not worse, f"levers further from the fp32 U-Net than (1 + {FP16_SLACK}) x the reference's {ref_err:.3g}: {worse}"
