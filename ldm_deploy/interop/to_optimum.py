"""Our artifact -> an ONNX folder in the layout Optimum's `ORTStableDiffusionPipeline` and diffusers'
`OnnxStableDiffusionPipeline` load (`ldm-deploy export --layout optimum`), by adding nodes around our
graphs (no re-tracing):

    text_encoder  input_ids int32 [batch, 77] kept (diffusers feeds int32; Optimum casts to the session's type)
    unet          timestep float32 [1] (what both pipelines feed) -> Expand to [batch] ; noise_pred -> out_sample
    vae_decoder   latent -> latent_sample, image -> sample
    vae_encoder   image -> sample; Concat(mean, logvar) -> latent_parameters [B, 2C, h, w]

Beside the graphs: model_index.json (OnnxStableDiffusionPipeline, OnnxRuntimeModel parts), each part's
config.json from the manifest, tokenizer/ and scheduler/ as in the artifact.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from ldm_deploy.artifact import Artifact
from ldm_deploy.errors import LdmError
from ldm_deploy.fileio import OutputKind, atomic_dir, write_json

log = logging.getLogger(__name__)
PREFIX = "ldm_layout/"
# an existing --out is replaced only when we wrote it (marker) or it is empty, or with force
OPTIMUM_OUTPUT = OutputKind("optimum-folder", "an ONNX folder written by `ldm-deploy export --layout optimum`")
_CONFIG_PART = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}


def write_optimum_folder(artifact_dir, out, *, force: bool = False) -> Path:
    """Write `out` from the artifact at `artifact_dir` (fp32 or fp16 graphs as they are)."""
    import onnx

    from ldm_deploy.export import onnx_io
    from ldm_deploy.interop.adapt import Adapted, _rename_io

    art = Artifact.open(artifact_dir)
    out = Path(out)
    if out.resolve() == art.path.resolve():
        raise LdmError(f"--out {out} is the artifact itself", hint="write the Optimum-layout folder elsewhere")
    for c, spec in art.components.items():
        if spec.input_names and "guidance_scale" in spec.input_names:
            raise LdmError(f"{c} has CFG folded into its graph, which Optimum's pipelines cannot feed")
    model_configs = art.model_configs or {}
    source = str(art.source_path) if art.source_path else None   # the model folder it was exported from
    with atomic_dir(out, OPTIMUM_OUTPUT, inputs=[art.path, source], force=force) as tmp:
        for c in art.components:
            model = onnx.load(str(art.file(c)))
            a = Adapted(model)
            g = model.graph
            if c == "unet":
                _timestep_from_one(g, a)
                _rename_io(g, "noise_pred", "out_sample", a)
            elif c == "vae_decoder":
                _rename_io(g, "latent", "latent_sample", a)
                _rename_io(g, "image", "sample", a)
            elif c == "vae_encoder":
                _rename_io(g, "image", "sample", a)
                _concat_moments(g, a)
            onnx_io.save_model(model, tmp / c / "model.onnx")
            onnx_io.check_model(tmp / c / "model.onnx")
            cfg = model_configs.get(_CONFIG_PART[c])
            if isinstance(cfg, dict):
                write_json(tmp / c / "config.json", cfg)
            log.info("%s: %s", c, "; ".join(a.added) or "as is")
        shutil.copytree(art.tokenizer_dir, tmp / "tokenizer")
        write_json(tmp / "scheduler" / "scheduler_config.json", art.scheduler_config)
        write_json(tmp / "model_index.json", _model_index(art))
    return out


def _model_index(art: Artifact) -> dict:
    sched = art.scheduler_config.get("_class_name", "PNDMScheduler")
    # _diffusers_version: the release this layout was tested against (diffusers reads it for warnings only)
    index = {"_class_name": "OnnxStableDiffusionPipeline", "_diffusers_version": "0.39.0",
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", sched], "tokenizer": ["transformers", "CLIPTokenizer"]}
    for c in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        index[c] = ["diffusers", "OnnxRuntimeModel"] if c in art.components else [None, None]
    return index


def _timestep_from_one(g, a) -> None:
    """Our [unet_batch] timestep fed from the [1] both pipelines pass: Expand to the sample's batch."""
    from onnx import TensorProto, helper, numpy_helper

    from ldm_deploy.interop.adapt import _io, _rename

    t = _io(g.input, "timestep")
    position = list(g.input).index(t)
    internal = PREFIX + "timestep_rows"
    _rename(g, "timestep", internal)
    g.input.remove(t)
    g.input.insert(position, helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1]))
    g.initializer.append(numpy_helper.from_array(np.array([0], np.int64), PREFIX + "zero"))
    nodes = [helper.make_node("Shape", ["sample"], [PREFIX + "sample_shape"], name=PREFIX + "sample_shape"),
             helper.make_node("Gather", [PREFIX + "sample_shape", PREFIX + "zero"], [PREFIX + "rows"],
                              name=PREFIX + "rows", axis=0),
             helper.make_node("Expand", ["timestep", PREFIX + "rows"], [internal], name=PREFIX + "timestep_expand")]
    for n in reversed(nodes):
        g.node.insert(0, n)
    a.added.append("timestep float32 [1] -> Expand to [unet_batch]")


def _concat_moments(g, a) -> None:
    from onnx import helper

    from ldm_deploy.interop.adapt import _free, _io

    _free(g, "latent_parameters")              # an imported artifact keeps the original value inside
    mean, logvar = _io(g.output, "mean"), _io(g.output, "logvar")
    if mean is None or logvar is None:
        raise LdmError("the vae_encoder graph has no mean / logvar outputs")
    dims = mean.type.tensor_type.shape.dim
    c = dims[1].dim_value
    g.node.append(helper.make_node("Concat", ["mean", "logvar"], ["latent_parameters"], name=PREFIX + "moments",
                                   axis=1))
    g.output.remove(mean)
    g.output.remove(logvar)
    shape = [d.dim_param or d.dim_value for d in dims]
    shape[1] = 2 * c if c else "channels"
    g.output.append(helper.make_tensor_value_info("latent_parameters", mean.type.tensor_type.elem_type, shape))
    a.added.append("mean, logvar -> Concat -> latent_parameters")
