"""Benchmarks: per-component and end-to-end latency, memory, and the FLOP-floor view.

`timing.py` measures a callable (warm-ups, repeats, median and spread); `machine.py` says where the
numbers came from; `sides.py` builds each compared side (PyTorch eager / compile, ONNX Runtime CPU /
CUDA, TensorRT) behind one small interface; `report.py` writes JSON, a PNG chart and the README table.
"""
