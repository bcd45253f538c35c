#!/usr/bin/env bash
# The end-to-end path that exists today, on 2 CPU cores in about a minute:
# train the tiny preset on the shapes data -> export to ONNX -> validate against PyTorch ->
# (build TensorRT-for-RTX engines when that module is installed) -> generate an image, torch-free.
# `ldm-deploy demo` (issue 7) will replace this with the shipped demo model.
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${OUT:-outputs/quickstart}
mkdir -p "$OUT"
"$BIN/ldm-train" all --config training/configs/tiny.yaml --out "$OUT/run"
"$BIN/ldm-deploy" export "$OUT/run/model" --out "$OUT/onnx" --config export_configs/tiny.yaml --precision fp32
"$BIN/ldm-deploy" validate "$OUT/run/model" "$OUT/onnx"
if "$BIN/python" -c "import tensorrt_rtx_bindings" 2>/dev/null; then
  "$BIN/ldm-deploy" build "$OUT/onnx" --out "$OUT/onnx/engines" --backend tensorrt-rtx --opt-level 0
fi
"$BIN/ldm-deploy" generate "$OUT/onnx" --prompt "a small red triangle at the top left on a white background" \
  --steps 20 --guidance 5 --seed 0 --out "$OUT/image.png"
echo "quickstart outputs: $OUT (model: $OUT/run/model, artifact: $OUT/onnx, image: $OUT/image.png)"
