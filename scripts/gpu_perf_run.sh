#!/usr/bin/env bash
# Issue 23's GPU measurements in at most three device commands of < 9.5 minutes each (one H100, onnxruntime-gpu,
# torch with CUDA). Each part reuses WORK (the random-weight SD 1.5 folder and its fp16 export with the ORT CUDA
# fused variants), so on a machine kept warm only the first part exports.
#
#   bash scripts/gpu_perf_run.sh part1    # B=1: ort-cuda, torch.compile reduce-overhead + channels_last, eager fp16,
#                                         #      then every profile lever on ort-cuda (spec.TUNING)       ~9 min
#   bash scripts/gpu_perf_run.sh part2    # B=4: the core sides, the device loop (with and without the U-Net passes);
#                                         #      per-op-type U-Net profiles at B=1 and B=4 (ORT vs inductor);
#                                         #      a U-Net call alone against inside the loop (loop_vs_alone.py);
#                                         #      the VAE decoder with / without the NHWC passes (vae_layout_ab.py);
#                                         #      the VAE decoder's per-op profile at B=1                      ~9 min
#   bash scripts/gpu_perf_run.sh part3    # the demo model (8 images, 25 steps): U-Net-only vs all-component CUDA
#                                         #      graphs and its step profile; then B=1 max-autotune-no-cudagraphs
#                                         #      and max-autotune (+ channels_last) within a compile budget each  ~8 min
#   bash scripts/gpu_perf_run.sh --tiny all   # the same commands on the tiny preset, CPU: a smoke test
#
# Results go to $OUT (default ./gpu-perf-out): part1.json part2.json part3.json profile.json profile.md loop.json
# vae-ab.json vae-profile.json vae-profile.md demo.json
# demo-profile.json demo-profile.md and a log per part -- at most 8 files per part, none deeper than $OUT. Each part stops starting sides after its time limit
# (they are recorded as skipped), so a slow export costs sides, not the whole part.
#
# Environment: PYTHON (default python3; PYTHONPATH may point at an onnxruntime-gpu install), WORK (default
# build/gpu-perf: git-ignored, kept between device calls on a warm machine), OUT, PART_LIMIT_S (default 480:
# no side starts after it; one started late gets at most 60 s more), SIDES_B1 / SIDES_B4 (override part1's /
# part2's side lists, e.g. to rerun the sides a slow export left skipped), PART2_PROFILE=0 (part2 without the
# per-op profiles, when they were measured before: its sides get the whole limit), PART2_VAE_PROFILE=0 (part2 without
# the VAE decoder's per-op profile).
set -euo pipefail
cd "$(dirname "$0")/.."

TINY=0
if [[ "${1:-}" == "--tiny" ]]; then TINY=1; shift; fi
PART="${1:-}"
case "$PART" in
  part1|part2|part3|all) ;;
  *) echo "usage: bash scripts/gpu_perf_run.sh [--tiny] part1|part2|part3|all" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-gpu-perf-out}"
WORK="${WORK:-build/gpu-perf}"
LIMIT="${PART_LIMIT_S:-480}"
mkdir -p "$OUT" "$WORK"

if [[ $TINY == 1 ]]; then
  WORK="$WORK/tiny"
  COMMON=(--preset tiny-quick --work "$WORK" --repeats 1 --budget 10 --compile-budget 120 --side-timeout 300)
  PROFILE_ARGS=(--device cpu --torch eager --iters 2 --warmup 1 --threads 1)
  ARTIFACT="$WORK/tiny-onnx-fp16"
  LOOP_STEPS=2
else
  COMMON=(--preset sd15-gpu --work "$WORK" --repeats 3 --budget 20)
  PROFILE_ARGS=(--torch reduce-overhead --compile-budget 150 --iters 10 --warmup 3)
  ARTIFACT="$WORK/sd15-onnx-fp16"
  LOOP_STEPS=50
fi
CORE="ort-cuda,torch-compile-ro,torch-eager-fp16"
LEVERS=$("$PYTHON" -c "from ldm_deploy.bench.spec import TUNING; print(','.join(TUNING))")

part1() {   # B=1: the core sides, then each profile lever on ort-cuda
  "$PYTHON" -m ldm_deploy.cli bench "${COMMON[@]}" --tuning --batch 1 --sides "${SIDES_B1:-$CORE,$LEVERS}" \
    --levers-dir "$WORK/tuning-levers" --time-limit "$LIMIT" --out "$OUT/part1.json" 2>&1 | tee "$OUT/part1.log"
}

part2() {   # B=4 core sides + the device loop + CUDA graphs everywhere (about half the limit), then the profiles
  local bench_limit=$((LIMIT / 2))
  [[ ${PART2_PROFILE:-1} == 0 ]] && bench_limit=$((LIMIT - 60))   # profiles measured before: the sides get the time
  "$PYTHON" -m ldm_deploy.cli bench "${COMMON[@]}" --tuning --batch 4 \
    --sides "${SIDES_B4:-ort-cuda,ort-cuda-device-loop-nhwc,torch-compile-ro,ort-cuda-device-loop,torch-eager-fp16}" \
    --levers-dir "$WORK/tuning-levers" --time-limit $bench_limit --out "$OUT/part2.json" 2>&1 | tee "$OUT/part2.log" \
    || echo "bench exited $?: profiles next"
  [[ ${PART2_PROFILE:-1} == 0 ]] || "$PYTHON" scripts/profile_unet.py --artifact "$ARTIFACT" --batch 1 4 \
    "${PROFILE_ARGS[@]}" --note "scripts/gpu_perf_run.sh part2" --out "$OUT/profile.json" --md "$OUT/profile.md" \
    2>&1 | tee -a "$OUT/part2.log"
  # where a U-Net call's time goes alone against inside the loop (the 2026-12-07 run: +4.2 ms a call at B=4)
  "$PYTHON" scripts/loop_vs_alone.py --artifact "$ARTIFACT" --batch 1 4 --steps $LOOP_STEPS --out "$OUT/loop.json" \
    2>&1 | tee -a "$OUT/part2.log" || echo "loop_vs_alone exited $?"
  # the VAE decoder with and without the NHWC residual passes (2026-12-07: 10.04 -> 9.78 ms B=1, 32.8 -> 29.3 ms B=4)
  [[ $TINY == 1 ]] || "$PYTHON" scripts/vae_layout_ab.py --model-dir "$WORK/sd15-model" --work "$WORK/vae-ab" \
    --batch 1 4 --out "$OUT/vae-ab.json" 2>&1 | tee -a "$OUT/part2.log" || echo "vae_layout_ab exited $?"
  # the VAE decoder, per op type (2026-12-07: our fp16 decode 15-17 ms against reduce-overhead's 9.5 ms at B=1)
  [[ ${PART2_VAE_PROFILE:-1} == 0 ]] || "$PYTHON" scripts/profile_unet.py --artifact "$ARTIFACT" --component vae_decoder \
    --batch 1 "${PROFILE_ARGS[@]}" --note "scripts/gpu_perf_run.sh part2, VAE decoder" --out "$OUT/vae-profile.json" \
    --md "$OUT/vae-profile.md" 2>&1 | tee -a "$OUT/part2.log" || echo "VAE profile exited $?"
}

part3() {   # the launch-bound demo model, then the autotuning recipes at B=1, each within its compile budget
  local budget=200 demo_batch=8 demo_steps=25
  [[ $TINY == 1 ]] && budget=120 && demo_batch=2 && demo_steps=2
  local demo_sides="ort-cuda,ort-cuda-no-graph,ort-cuda-graph-all"
  [[ $TINY == 1 ]] && demo_sides="ort-cpu,$demo_sides"
  "$PYTHON" -m ldm_deploy.cli bench models/shapes-demo --sides "$demo_sides" --steps $demo_steps --batch $demo_batch \
    --warmup 1 --repeats 3 --budget 20 --work "$WORK/demo-onnx" --note "demo model, scripts/gpu_perf_run.sh part3" \
    --out "$OUT/demo.json" 2>&1 | tee "$OUT/part3.log" || echo "demo bench exited $?"
  "$PYTHON" scripts/profile_unet.py --artifact "$WORK/demo-onnx" --batch $demo_batch --torch none --iters 10 --warmup 3 \
    --note "demo model" --out "$OUT/demo-profile.json" --md "$OUT/demo-profile.md" 2>&1 | tee -a "$OUT/part3.log" \
    || echo "demo profile exited $?"
  "$PYTHON" -m ldm_deploy.cli bench "${COMMON[@]}" --batch 1 \
    --sides "torch-compile-max-autotune-no-cg,torch-compile-max-autotune" --compile-budget "$budget" \
    --side-timeout $((budget + 150)) --time-limit $((LIMIT - 60)) --out "$OUT/part3.json" 2>&1 | tee -a "$OUT/part3.log"
}

case "$PART" in
  part1) part1 ;;
  part2) part2 ;;
  part3) part3 ;;
  all) part1; part2; part3 ;;
esac
