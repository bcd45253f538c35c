"""Reading, writing and checking ONNX files, including ones over protobuf's 2 GB limit.

A graph whose weights exceed 2 GB is written as `model.onnx` plus ONE external-data file beside it,
`model.onnx.data`; checking and shape inference then go through the path, never an in-memory proto.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from ldm_deploy.errors import LdmError

PROTO_LIMIT = 2**31 - 2**24          # a little under 2 GiB: room for the graph itself


def data_file(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def external_files(path: Path) -> list[Path]:
    """External-data files a saved graph refers to."""
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for t in _all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in t.external_data if e.key == "location")
    return [path.parent / n for n in sorted(names)]


def model_bytes(path: Path) -> int:
    """Size on disk of a graph and its external data."""
    return path.stat().st_size + sum(p.stat().st_size for p in external_files(path))


def _tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in _all_tensors(model))


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def save_model(model: onnx.ModelProto, path: Path) -> Path | None:
    """Save `model` to `path`; over the limit, all weights go to `path.onnx.data`. Returns that file or None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data_file(path)
    data.unlink(missing_ok=True)
    if _tensor_bytes(model) < PROTO_LIMIT:
        onnx.save_model(model, str(path))
        return None
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024, convert_attribute=False)
    return data


def check_model(path: Path) -> None:
    """onnx.checker with strict shape inference, by path (works above 2 GB)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise LdmError(f"exported graph {path} failed the ONNX checker: {str(e).splitlines()[0]}",
                       hint="report this with the model config; try `exporter: dynamo` in the export config")
