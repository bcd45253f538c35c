"""Per-op-type profiles from real traces: ONNX Runtime's profiler on the tiny U-Net (CPU) and torch.profiler on the
same module; the bucketing of kernel names from cuDNN / cuBLAS / ORT / inductor; the worker's compile deadline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ldm_deploy.bench.profile import BUCKETS, bucket_of, parse_ort_trace, profile_table, reading, summarize
from ldm_deploy.errors import LdmError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ldm_deploy.bench.prepare import export_for_bench, random_model_folder

    work = tmp_path_factory.mktemp("profile")
    model, _ = random_model_folder("tiny", work / "model")
    export_for_bench(model, work / "onnx", batch_max=1)
    return model, work / "onnx"


@pytest.mark.parametrize("name, bucket", [
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("GroupNormNHWCSumKernel", "groupnorm"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half>", "groupnorm"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize", "gemm"),
    ("void onnxruntime::cuda::_BinaryElementWise<__half>", "elementwise"),
    ("void onnxruntime::cuda::_UnaryElementWise<float, __half, OP_Cast<float, __half>>", "layout_cast"),
    ("void cudnn::ops::nchwToNhwcKernel<__half>", "layout_cast"),
    ("Memcpy HtoD (Pageable -> Device)", "memcpy"),
    ("triton_poi_fused_add_convolution_silu_12", "elementwise"),
    ("triton_poi_fused_convolution_0", "layout_cast"),
    ("triton_red_fused_native_group_norm_3", "groupnorm"),
    ("triton_tem_fused_convolution_4", "convolution"),
    ("triton_tem_fused_addmm_7", "gemm"),
    ("aten::copy_", "layout_cast"),
    ("something_unheard_of", "other"),
])
def test_bucket_of_kernel_names(name, bucket):
    assert bucket_of(name) == bucket


# Kernel names recorded by CUPTI on an H100 (benchmarks/profiles/h100-sd15-unet-profile.json, SD 1.5 U-Net step, ORT
# ort-cuda and torch.compile reduce-overhead): cuBLAS(Lt) on Hopper names its GEMMs nvjet_*, a bias epilogue
# included; ORT's biasSplitGeluKernel computes GELU; cuDNN's op_generic_tensor_kernel is ORT's conv bias add.
@pytest.mark.parametrize("name, bucket", [
    ("nvjet_sm90_hsh_320x128_64x3_1x2_h_bz_coopB_NNT", "gemm"),
    ("nvjet_sm90_hsh_160x64_64x6_1x2_h_bz_NNN", "gemm"),
    ("nvjet_sm90_hsh_168x128_64x5_1x2_h_bz_coopA_bias_TNN", "gemm"),
    ("nvjet_sm90_hsh_80x128_64x8_2x1_v_bz_bias_TNN", "gemm"),
    ("void onnxruntime::contrib::cuda::biasSplitGeluKernel<__half, 1280, 256>(__half const*, __half const*, __half*)",
     "elementwise"),
    ("void op_generic_tensor_kernel<4, __half, float, __half, 256, (cudnnGenericOp_t)0, (cudnnNanPropagation_t)0, 0>"
     "(cudnnTensorStruct, __half*, cudnnTensorStruct, __", "elementwise"),
    ("void onnxruntime::cuda::Transpose3DKernel<short, 32u>(long, long, long, short const*, short*)", "layout_cast"),
    ("void onnxruntime::contrib::cuda::GroupNormNHWCScaleKernel<__half, 2>(__half*, __half const*, __half const*, "
     "float const*, float const*, __half const*, float con", "groupnorm"),
    ("void onnxruntime::cuda::cuApplyLayerNorm<__half, float, __half, false>(__half*, float*, float*, __half const*, "
     "int, int, float, __half const*, __half const*, in", "groupnorm"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x192x64_warpgroupsize2x1x1_g1_execute_"
     "segment_k_off_kernel__5x_cudnn", "convolution"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0",
     "attention"),
    ("triton_per_fused_add_clone_convolution_native_group_norm_silu_10", "groupnorm"),
    ("triton_poi_fused_gelu_mul_split_view_15", "elementwise"),
    # other GEMM spellings of cuBLAS / CUTLASS / inductor
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas",
     "gemm"),
    ("cutlass3x_sm90_tensorop_h64x128x16gemm_f16_f16_f32_f16_f16_128x128x64_1x1x1_0_tnn_align8_warpspecialized", "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, __half, __half, __half>", "gemm"),
    ("triton_tem_fused_mm_5", "gemm"),
    ("extern_kernels.mm", "gemm"),
])
def test_bucket_of_recorded_h100_kernel_names(name, bucket):
    assert bucket_of(name) == bucket


def test_rebucket_moves_listed_kernels_and_keeps_the_total():
    """A profile stored before bucket_of knew nvjet_* (its `top` list files them under other / elementwise; the H100
    run of 2026-12-06, kept as test data): rebucket moves exactly the listed kernels' time, the buckets still add
    up, and a second pass moves nothing."""
    from ldm_deploy.bench.profile import rebucket

    stored = json.loads((Path(__file__).resolve().parents[1] / "data" /
                         "h100-sd15-unet-profile-2026-12-06.json").read_text())
    for entry in stored["batches"].values():
        for p in entry["profiles"]:
            r = rebucket(p)
            nvjet = sum(t["ms_per_call"] for t in p["top"] if t["name"].startswith("nvjet"))
            assert nvjet > 0 and r["buckets"]["gemm"]["ms_per_call"] == pytest.approx(
                p["buckets"]["gemm"]["ms_per_call"] + nvjet, abs=1e-3)
            total = lambda q: sum(b["ms_per_call"] for b in q["buckets"].values())  # noqa: E731
            assert total(r) == pytest.approx(total(p), abs=1e-3)
            assert all(t["bucket"] == bucket_of(t["name"]) for t in r["top"])
            assert rebucket(r)["rebucketed"]["moved"] == []


def test_summarize_keeps_the_largest_names_of_every_bucket():
    events = [{"name": f"nvjet_sm90_hsh_{i}", "dur_us": 100.0 + i} for i in range(12)]
    events += [{"name": "flash_fwd_kernel", "dur_us": 50.0}, {"name": "mystery_kernel", "dur_us": 5.0}]
    s = summarize(events, wall_ms=5.0, calls=1, source="cupti-kernels", top=3, overlap=False, per_bucket=10)
    assert len(s["top"]) == 3 and set(s["top_by_bucket"]) == {"gemm", "attention", "other"}
    assert [e["name"] for e in s["top_by_bucket"]["gemm"]] == [f"nvjet_sm90_hsh_{i}" for i in range(11, 1, -1)]
    assert s["top_by_bucket"]["other"] == [{"name": "mystery_kernel", "ms_per_call": 0.005, "events_per_call": 1.0}]


def test_op_type_wins_over_the_node_name():
    assert bucket_of("/down_blocks.0/attentions.0/Softmax", "Softmax") == "attention"
    assert bucket_of("/conv_in/Conv", "NhwcConv") == "convolution"
    assert bucket_of("anything", "SkipGroupNorm") == "groupnorm"


def test_summarize_overlapping_kernels_and_gaps():
    # two calls, 10 ms wall each; kernels overlap on two streams within each call
    events = []
    for call in range(2):
        base = call * 10_000.0
        events += [{"name": "sm90_xmma_fprop_implicit_gemm", "ts_us": base, "dur_us": 4000.0},
                   {"name": "flash_fwd_kernel", "ts_us": base + 2000.0, "dur_us": 4000.0}]   # overlaps 2 ms
    s = summarize(events, wall_ms=20.0, calls=2, source="cupti-kernels")
    assert s["busy_ms_per_call"] == pytest.approx(6.0)        # union: 0..6 ms
    assert s["buckets"]["gaps"]["ms_per_call"] == pytest.approx(4.0)
    # the 6 ms busy are split in proportion to the summed durations (4 + 4)
    assert s["buckets"]["convolution"]["ms_per_call"] == pytest.approx(3.0)
    assert s["buckets"]["attention"]["ms_per_call"] == pytest.approx(3.0)
    assert sum(b["ms_per_call"] for b in s["buckets"].values()) == pytest.approx(10.0)
    assert s["buckets"]["gaps"]["share"] == pytest.approx(0.4)


def test_ort_cpu_profile_of_the_tiny_unet(tiny):
    """A real ONNX Runtime trace: every node of the kept runs lands in a bucket, warm-up runs are dropped, and
    the buckets plus the gaps make up the wall time."""
    from ldm_deploy.bench.profile import profile_ort

    p = profile_ort(tiny[1], batch=1, iters=3, warmup=2, threads=1)
    assert p["source"] == "onnxruntime-nodes" and p["calls"] == 3 and p["unet_rows"] == 2
    assert p["nodes_per_call"]["Conv"] > 0 and p["buckets"]["convolution"]["ms_per_call"] > 0
    assert p["buckets"]["gemm"]["ms_per_call"] > 0 and p["buckets"]["layout_cast"]["events_per_call"] > 0
    total = sum(b["ms_per_call"] for b in p["buckets"].values())
    # nodes run one after another: buckets + gaps = the runs' wall time (rounding of 9 values at 1e-4 ms)
    assert total == pytest.approx(p["wall_ms_per_call"], abs=1e-3)
    assert p["events_per_call"] == pytest.approx(sum(p["nodes_per_call"].values()))


def test_ort_profile_of_a_lever_graph(tiny, tmp_path):
    """`levers_dir`: the profiled graph is a lever graph of the benchmark's folder (registered as bench/prepare.py
    registers them), here the artifact's own plain U-Net under another name, so ORT CPU runs it."""
    from ldm_deploy.bench.prepare import LEVERS_FILE
    from ldm_deploy.bench.profile import profile_ort
    from ldm_deploy.fileio import write_json

    unet = json.loads((tiny[1] / "manifest.json").read_text())["components"]["unet"]
    write_json(tmp_path / LEVERS_FILE, {"artifact": str(tiny[1]), "graphs": {"lever-x": {
        "file": unet["file"], "in_artifact": True, "inputs": unet["inputs"], "outputs": unet["outputs"]}}})
    p = profile_ort(tiny[1], batch=1, iters=2, warmup=1, threads=1, variant="lever-x", levers_dir=tmp_path)
    assert p["variant"] == "lever-x" and p["model"] == str(tiny[1] / unet["file"])
    assert p["nodes_per_call"]["Conv"] > 0
    with pytest.raises(LdmError, match="no lever graph 'lever-y'"):
        profile_ort(tiny[1], batch=1, iters=1, warmup=0, variant="lever-y", levers_dir=tmp_path)


def test_parse_ort_trace_drops_warmup_runs(tmp_path):
    trace = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
             {"cat": "Node", "name": "a_kernel_time", "ts": 10, "dur": 50, "args": {"op_name": "Conv"}},
             {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
             {"cat": "Node", "name": "b_kernel_time", "ts": 210, "dur": 30, "args": {"op_name": "MatMul"}},
             {"cat": "Node", "name": "b_fence_before", "ts": 209, "dur": 1, "args": {"op_name": "MatMul"}}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    nodes, kernels, wall, runs = parse_ort_trace(path, skip_runs=1)
    assert [n["name"] for n in nodes] == ["b"] and nodes[0]["op_type"] == "MatMul"
    assert kernels == [] and wall == pytest.approx(0.1) and runs == 1


def test_torch_cpu_profile_and_table(tiny):
    from ldm_deploy.bench.profile import profile_ort, profile_torch

    t = profile_torch(tiny[0], batch=1, device="cpu", iters=2, warmup=1)
    assert t["source"] == "torch-cpu-ops" and t["mode"] == "eager" and t["dtype"] == "fp32"
    assert t["buckets"]["convolution"]["ms_per_call"] > 0 and t["buckets"]["groupnorm"]["ms_per_call"] > 0
    assert t["attention"]["used"] == {"flash (CPU)": t["attention"]["used"]["flash (CPU)"]}
    o = profile_ort(tiny[1], batch=1, iters=2, warmup=1, threads=1)
    table = profile_table([o, t])
    assert table.count("\n") == len(BUCKETS) + 3 and "torch eager (fp32, torch-cpu-ops)" in table
    lines = reading(o, t)
    assert lines[0].startswith("step wall")


def test_vae_decoder_profiles_on_cpu(tiny, tmp_path):
    """`component="vae_decoder"`: one decode of B latents on both sides, bucketed like the U-Net's; the script
    passes `--component` to its children and says what was profiled."""
    from ldm_deploy.bench.profile import profile_ort, profile_torch

    o = profile_ort(tiny[1], batch=2, iters=2, warmup=1, threads=1, component="vae_decoder")
    t = profile_torch(tiny[0], batch=2, device="cpu", iters=2, warmup=1, component="vae_decoder")
    for p in (o, t):
        assert p["component"] == "vae_decoder" and "unet_rows" not in p and p["batch"] == 2
        assert p["buckets"]["convolution"]["ms_per_call"] > 0
    assert o["model"].endswith("vae_decoder/model.onnx") and "ms per VAE decode" in profile_table([o, t])
    with pytest.raises(LdmError, match="cannot profile component 'text_encoder'"):
        profile_ort(tiny[1], component="text_encoder")
    out, md = tmp_path / "v.json", tmp_path / "v.md"
    proc = subprocess.run([sys.executable, "scripts/profile_unet.py", "--artifact", str(tiny[1]), "--model-dir",
                           str(tiny[0]), "--component", "vae_decoder", "--device", "cpu", "--iters", "1", "--warmup",
                           "1", "--threads", "1", "--out", str(out), "--md", str(md)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["component"] == "vae_decoder"
    assert all(p["component"] == "vae_decoder" for p in data["batches"]["1"]["profiles"])
    assert "VAE decode at B=1" in md.read_text()


def test_profile_script_writes_json_and_markdown(tiny, tmp_path):
    out, md, docs = tmp_path / "p.json", tmp_path / "p.md", tmp_path / "doc.md"
    docs.write_text("# perf\n<!-- profile:start -->\nold\n<!-- profile:end -->\ntail\n")
    proc = subprocess.run([sys.executable, "scripts/profile_unet.py", "--artifact", str(tiny[1]), "--model-dir",
                           str(tiny[0]), "--device", "cpu", "--iters", "2", "--warmup", "1", "--threads", "1",
                           "--out", str(out), "--md", str(md)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    profiles = data["batches"]["1"]["profiles"]
    assert [p["side"] for p in profiles] == ["onnxruntime", "torch"] and all(p["status"] == "ok" for p in profiles)
    assert "| convolution |" in md.read_text() and "Reading (ONNX Runtime against torch eager)" in md.read_text()
    proc = subprocess.run([sys.executable, "scripts/profile_unet.py", "--render", str(out), "--docs", str(docs)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = docs.read_text()
    assert "old" not in text and "| gaps |" in text and text.endswith("<!-- profile:end -->\ntail\n")


def test_deadline_records_a_timeout_and_ends_the_process_group(tmp_path):
    """A block that never finishes (an Event nobody sets) under `deadline`: the worker writes the record with
    status timeout and exits, and the child it started (standing in for a compile worker) goes with it."""
    result, pidfile = tmp_path / "result.json", tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import subprocess, sys, threading
        from ldm_deploy.bench import worker
        worker._CASE.update(result={str(result)!r}, side="torch-compile-max-autotune", batch=1, start=0.0)
        child = subprocess.Popen([sys.executable, "-c", "import threading; threading.Event().wait()"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        with worker.deadline(0.5, {{"compile": {{"mode": "max-autotune"}}}}, what="torch.compile mode=max-autotune"):
            threading.Event().wait()
    """)
    proc = subprocess.run([sys.executable, "-c", code], start_new_session=True, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9   # SIGKILL of its own group
    record = json.loads(result.read_text())
    assert record["status"] == "timeout" and record["side"] == "torch-compile-max-autotune"
    assert record["error"] == "torch.compile mode=max-autotune did not finish within 0.5 s (timeout after 0.5 s)"
    assert record["compile"] == {"mode": "max-autotune"}
    child = int(pidfile.read_text())

    def running(pid: int) -> bool:   # a SIGKILLed child is gone, or a zombie until its new parent reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False

    for _ in range(200):   # SIGKILL is delivered asynchronously: wait for it to land
        if not running(child):
            break
        time.sleep(0.05)
    assert not running(child)


def test_gpu_perf_run_script_parses_and_refuses_an_unknown_part():
    """The GPU plan's shell script: valid bash, and a wrong part name is a usage error before anything runs
    (`bash scripts/gpu_perf_run.sh --tiny all` is its full CPU smoke test, minutes long)."""
    assert subprocess.run(["bash", "-n", "scripts/gpu_perf_run.sh"]).returncode == 0
    proc = subprocess.run(["bash", "scripts/gpu_perf_run.sh", "--tiny", "part9"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": "/nonexistent-not-created",
                               "WORK": "/nonexistent-not-created"})
    assert proc.returncode == 2 and "usage: bash scripts/gpu_perf_run.sh" in proc.stderr
