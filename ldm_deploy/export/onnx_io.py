"""Reading, writing and checking ONNX files, including ones over protobuf's 2 GB limit.

A graph whose weights exceed 2 GB is written as `model.onnx` plus ONE external-data file beside it,
`model.onnx.data`; checking and shape inference then go through the path, never an in-memory proto.
Such graphs are also copied and converted tensor by tensor (`save_streamed`): the proto is loaded without
its weights, and each weight is read, (converted,) written and dropped in turn, so host memory holds one
tensor at a time instead of the whole model (the SDXL U-Net is 10.3 GB in fp32).
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import external_data_helper as xdh

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


def rewrite_model(src: str | Path, dst: str | Path, transform) -> dict:
    """Load `src` with its weights, apply `transform(model) -> stats` in place, and write `dst` (+ `dst.data` past
    protobuf's 2 GB) through a temporary folder beside it, so a failure leaves no half-written graph (`dst` may be
    `src`). Returns the stats with the seconds taken and whether the weights went to external data."""
    import time

    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=True)
    stats = dict(transform(model) or {})
    data = write_model(model, dst)
    stats.update(seconds=round(time.perf_counter() - t0, 2), external_data=data is not None)
    return stats


def write_model(model: onnx.ModelProto, dst: str | Path) -> Path | None:
    """Write `model` to `dst` (+ `dst.data` past protobuf's 2 GB) through a temporary folder beside it, then move
    graph and data into place, so a failure leaves no half-written graph. Returns the data file, or None."""
    import shutil

    dst = Path(dst)
    work = dst.parent / f".{dst.name}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    data = save_model(model, work / dst.name)
    data_file(dst).unlink(missing_ok=True)
    if data is not None:
        data.replace(data_file(dst))
    (work / dst.name).replace(dst)
    shutil.rmtree(work, ignore_errors=True)
    return data


def is_big(path: Path) -> bool:
    """True when the graph at `path` with its weights is over the limit: it cannot be one in-memory proto
    (onnxslim, which serializes the whole model, fails on it: "EncodeError: Failed to serialize proto")."""
    return model_bytes(path) >= PROTO_LIMIT


def load_lazy(path: Path) -> onnx.ModelProto:
    """The graph at `path` with its external weights left on disk (read them with `read_tensor`)."""
    return onnx.load(str(path), load_external_data=False)


def read_tensor(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    """The raw bytes of an external tensor, read from its file under `base_dir` (the tensor is not changed)."""
    probe = onnx.TensorProto()
    probe.name = tensor.name
    probe.data_location = onnx.TensorProto.EXTERNAL
    probe.external_data.extend(tensor.external_data)
    xdh.load_external_data_for_tensor(probe, str(base_dir))
    return probe.raw_data


def save_streamed(model: onnx.ModelProto, path: Path, base_dir: Path,
                  to_fp16: Callable[[np.ndarray], np.ndarray] | None = None) -> Path | None:
    """`save_model(model, path)` for a `model` loaded by `load_lazy` from a file in `base_dir`, one tensor at a time.

    Each external tensor is read from `base_dir`, written and dropped. `to_fp16` (an fp32 -> fp16 array
    function) converts the tensors a converter retyped FLOAT16 whose stored data is still fp32 (4 bytes an
    element). The files written are byte for byte those `save_model` writes after `onnx.load` with the
    weights: the same inline/external decision, tensor order, offsets and size threshold (onnx's own
    `set_external_data` / `save_external_data`, tensor by tensor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data_file(path)
    data.unlink(missing_ok=True)
    pending = {id(t): t for t in _all_tensors(model) if xdh.uses_external_data(t)}
    total = sum(_stored_length(t, base_dir) for t in pending.values()) + \
        sum(len(t.raw_data) for t in _all_tensors(model) if id(t) not in pending)

    def load(tensor):
        raw = read_tensor(tensor, base_dir)
        if _from_fp32(tensor, len(raw)):
            if to_fp16 is None:
                raise ValueError(f"tensor {tensor.name} is typed float16 but holds float32 data")
            raw = to_fp16(np.frombuffer(raw, dtype=np.float32)).astype(np.float16).tobytes()
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = raw

    if total < PROTO_LIMIT:          # small enough for one proto: all inline, as save_model does
        for t in pending.values():
            load(t)
        onnx.save_model(model, str(path))
        return None
    data.touch()
    # save_model(save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=1024,
    # convert_attribute=False): the initializers in onnx's order, each written as soon as it is loaded
    for t in xdh._get_initializer_tensors(model):
        if pending.pop(id(t), None) is not None:
            load(t)
        if t.HasField("raw_data") and sys.getsizeof(t.raw_data) >= 1024:
            xdh.set_external_data(t, data.name)
            xdh.save_external_data(t, str(path.parent))
            t.ClearField("raw_data")
    for t in pending.values():       # external attribute tensors (none in traced graphs) go inline, as in save_model
        load(t)
    onnx.save_model(model, str(path))
    return data


def copy_model(src: Path, dst: Path) -> Path | None:
    """`save_model(onnx.load(src), dst)` (weights inline, or in one `dst.data` over the limit), tensor by tensor."""
    return save_streamed(load_lazy(src), dst, src.parent)


def _from_fp32(tensor: onnx.TensorProto, length: int) -> bool:
    n = int(np.prod(tensor.dims, dtype=np.int64))
    return tensor.data_type == onnx.TensorProto.FLOAT16 and n > 0 and length == 4 * n


def _stored_length(tensor: onnx.TensorProto, base_dir: Path) -> int:
    """Bytes the tensor will hold once loaded (after an fp32 -> fp16 conversion `_from_fp32` asks for)."""
    entry = {e.key: e.value for e in tensor.external_data}
    if "length" in entry:
        length = int(entry["length"])
    else:                # the TorchScript exporter writes one file per tensor, without offset or length
        length = (base_dir / entry["location"]).stat().st_size - int(entry.get("offset", 0))
    return length // 2 if _from_fp32(tensor, length) else length


def check_model(path: Path) -> None:
    """onnx.checker with strict shape inference, by path (works above 2 GB)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise LdmError(f"exported graph {path} failed the ONNX checker: {str(e).splitlines()[0]}",
                       hint="report this with the model config; try `exporter: dynamo` in the export config")


def trim_heap() -> None:
    """Return freed heap pages to the system (glibc `malloc_trim`; a no-op elsewhere). Freed tensors under
    glibc's mmap threshold stay in the heap otherwise, and count in the resident set of the next phase."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
