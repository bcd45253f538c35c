"""TensorRT engines: module choice (trt_api), building (build), the sidecar beside each engine (sidecar).

Nothing here imports TensorRT, CUDA or torch at import time; see docs/tensorrt.md.
"""
