"""A tiny artifact folder made with onnx.helper: four small graphs with the manifest's names,
dtypes and dynamic axes (DESIGN.md), so engine building is tested without the exporter or torch.

Profiles: batch 1..2, height 64 (static), width 64..128 (ranged). The text encoder is fp32, the
rest follow `precision`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ldm_deploy.fileio import sha256_file, write_json

SEQ, DIM, VOCAB = 77, 32, 64
PROFILES = {"batch": {"min": 1, "opt": 1, "max": 2},
            "height": {"min": 64, "opt": 64, "max": 64},
            "width": {"min": 64, "opt": 64, "max": 128}}
_NP = {"fp16": np.float16, "fp32": np.float32}
_PROTO = {"fp16": TensorProto.FLOAT16, "fp32": TensorProto.FLOAT}
_NAME = {"fp16": "float16", "fp32": "float32"}


def _init(name, shape, dtype, rng):
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(dtype), name)


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _vi(name, proto, shape):
    return helper.make_tensor_value_info(name, proto, shape)


def text_encoder(rng):
    f = "fp32"
    return _model(
        [helper.make_node("Gather", ["emb", "input_ids"], ["h"], axis=0),
         helper.make_node("MatMul", ["h", "w"], ["last_hidden_state"])],
        [_vi("input_ids", TensorProto.INT32, ["batch", SEQ])],
        [_vi("last_hidden_state", _PROTO[f], ["batch", SEQ, DIM])],
        [_init("emb", (VOCAB, DIM), _NP[f], rng), _init("w", (DIM, DIM), _NP[f], rng)]), f


def unet(rng, p):
    t = _PROTO[p]
    return _model(
        [helper.make_node("Conv", ["sample", "cw"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Cast", ["timestep"], ["tc"], to=t),
         helper.make_node("Reshape", ["tc", "shape4"], ["t4"]),
         helper.make_node("ReduceMean", ["encoder_hidden_states", "axes12"], ["e"], keepdims=1),
         helper.make_node("Unsqueeze", ["e", "axis3"], ["e4"]),
         helper.make_node("Mul", ["t4", "tscale"], ["ts"]),
         helper.make_node("Add", ["c", "ts"], ["ct"]),
         helper.make_node("Add", ["ct", "e4"], ["noise_pred"])],
        [_vi("sample", t, ["unet_batch", 4, "latent_height", "latent_width"]),
         _vi("timestep", TensorProto.FLOAT, ["unet_batch"]),
         _vi("encoder_hidden_states", t, ["unet_batch", SEQ, DIM])],
        [_vi("noise_pred", t, ["unet_batch", 4, "latent_height", "latent_width"])],
        [_init("cw", (4, 4, 3, 3), _NP[p], rng),
         numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4"),
         numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
         numpy_helper.from_array(np.array([3], np.int64), "axis3"),
         numpy_helper.from_array(np.array(1e-3, _NP[p]), "tscale")]), p


def vae_decoder(rng, p):
    t = _PROTO[p]
    return _model(
        [helper.make_node("Conv", ["latent", "cw"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Resize", ["c", "", "scales"], ["up"], mode="nearest"),
         helper.make_node("Tanh", ["up"], ["image"])],
        [_vi("latent", t, ["batch", 4, "latent_height", "latent_width"])],
        [_vi("image", t, ["batch", 3, "height", "width"])],
        [_init("cw", (3, 4, 3, 3), _NP[p], rng),
         numpy_helper.from_array(np.array([1, 1, 8, 8], np.float32), "scales")]), p


def vae_encoder(rng, p):
    t = _PROTO[p]
    return _model(
        [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
         helper.make_node("Conv", ["pooled", "cw"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Split", ["c", "split"], ["mean", "logvar"], axis=1)],
        [_vi("image", t, ["batch", 3, "height", "width"])],
        [_vi("mean", t, ["batch", 4, "latent_height", "latent_width"]),
         _vi("logvar", t, ["batch", 4, "latent_height", "latent_width"])],
        [_init("cw", (8, 3, 3, 3), _NP[p], rng),
         numpy_helper.from_array(np.array([4, 4], np.int64), "split")]), p


def _io(model: onnx.ModelProto, precision_name) -> tuple[list, list]:
    def spec(vi):
        dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
        return {"name": vi.name, "dtype": dtype, "shape": dims}
    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def write_component(root: Path, name: str, precision: str = "fp16", seed: int = 0) -> None:
    """(Re)write one component's ONNX and its manifest entry and hash."""
    rng = np.random.default_rng(seed)
    build = {"text_encoder": lambda: text_encoder(rng), "unet": lambda: unet(rng, precision),
             "vae_decoder": lambda: vae_decoder(rng, precision), "vae_encoder": lambda: vae_encoder(rng, precision)}
    model, p = build[name]()
    rel = f"{name}/model.onnx"
    (root / name).mkdir(parents=True, exist_ok=True)
    onnx.save(model, root / rel)
    manifest_path = root / "manifest.json"
    import json
    manifest = json.loads(manifest_path.read_text())
    inputs, outputs = _io(model, p)
    manifest["components"][name] = {"file": rel, "external_data": None, "precision": p,
                                    "inputs": inputs, "outputs": outputs,
                                    "batch_multiplier": 2 if name == "unet" else 1}
    manifest["files"][rel] = sha256_file(root / rel)
    write_json(manifest_path, manifest)


def make_tiny_artifact(root: str | Path, precision: str = "fp16", seed: int = 0) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "manifest.json", {
        "format": "ldm-deploy-artifact", "format_version": 1, "created": "2026-11-28T00:00:00Z",
        "source": {"path": "tests/engine/tiny_artifact.py", "sha256": "0" * 64},
        "precision": precision, "model": {},
        "scaling_factor": 0.18215, "prediction_type": "epsilon", "latent_channels": 4, "vae_scale_factor": 8,
        "scheduler": {"_class_name": "DDIMScheduler"},
        "tokenizer": {"dir": "tokenizer", "model_max_length": SEQ, "pad_token": "<|endoftext|>"},
        "profiles": PROFILES, "components": {}, "files": {}, "tools": {},
    })
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        write_component(root, name, precision, seed)
    return root
