"""TorchRunner: the PyTorch modules behind the same Runner contract as the exported graphs.

`TorchRunner(components_or_model_folder, component)` maps the same names the ONNX graphs use
(text_encoder: input_ids -> last_hidden_state; unet: sample/timestep/encoder_hidden_states -> noise_pred;
vae_decoder: latent -> image; vae_encoder: image -> mean/logvar), so the numpy pipeline runs the
PyTorch reference through the very loop it runs the deployed artifact with:

    ref = pipeline_from_model_folder("models/tiny")            # PyTorch, CPU, fp32
    dep = Pipeline.from_artifact("out/tiny-onnx")               # ONNX Runtime
    ref("a cat", latents=z).images  vs  dep("a cat", latents=z).images

Modules may be ours (training.models) or diffusers/transformers ones; outputs that are output objects
(`.sample`, `.latent_dist`, `.last_hidden_state`) are unwrapped. SDXL models (a text_encoder_2) use the
SDXL graphs' names (ldm_deploy/export/sdxl.py): penultimate hidden states, text_embeds, time_ids.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ldm_deploy.errors import LdmError

IO = {
    "text_encoder": (["input_ids"], ["last_hidden_state"]),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["noise_pred"]),
    "vae_decoder": (["latent"], ["image"]),
    "vae_encoder": (["image"], ["mean", "logvar"]),
}
SDXL_IO = {
    "text_encoder": (["input_ids"], ["penultimate_hidden_state"]),
    "text_encoder_2": (["input_ids"], ["penultimate_hidden_state", "text_embeds"]),
    "unet": (["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"], ["noise_pred"]),
}
_PART = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae",
         "text_encoder_2": "text_encoder_2"}


def _components(source, dtype):
    if hasattr(source, "source_path"):  # an Artifact: the reference is the model folder it was exported from
        if source.source_path is None:
            raise LdmError(f"the artifact at {source.path} does not record its source model folder",
                           hint="pass the model folder to TorchRunner directly")
        source = source.source_path
        if not source.is_dir():
            raise LdmError(f"the artifact's source model folder {source} is gone",
                           hint="pass the model folder to TorchRunner directly")
    if isinstance(source, (str, os.PathLike)):
        from training.checkpoint import load_components
        return load_components(Path(source), dtype=dtype)
    return source


def _part(components, name: str):
    if isinstance(components, Mapping):
        return components.get(name) if name == "text_encoder_2" else components[name]
    return getattr(components, name, None)


class TorchRunner:
    """One PyTorch module as a Runner: numpy in, numpy out (float32 unless `output_dtype=None`)."""

    def __init__(self, components_or_model_folder, component: str, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, output_dtype=np.float32):
        if component not in IO and component not in SDXL_IO:
            raise LdmError(f"unknown component {component!r}; choose one of: {', '.join(IO)}, text_encoder_2")
        self.component = component
        comps = _components(components_or_model_folder, dtype)
        self.sdxl = _part(comps, "text_encoder_2") is not None
        io = SDXL_IO if self.sdxl and component in SDXL_IO else IO
        self.input_names, self.output_names = (list(x) for x in io[component])
        self.device = torch.device(device)
        self.dtype = dtype
        self.output_dtype = None if output_dtype is None else np.dtype(output_dtype)
        module = _part(comps, _PART[component])
        if module is None:
            raise LdmError(f"the model has no {_PART[component]} to run the {component} with")
        self.module = module.to(device=self.device, dtype=dtype).eval()

    def _tensor(self, x: np.ndarray, dtype=None) -> torch.Tensor:
        x = np.ascontiguousarray(x)
        if not x.flags.writeable:   # the pipeline freezes its text embeddings; torch wants a writable buffer
            x = x.copy()
        return torch.from_numpy(x).to(self.device, dtype or self.dtype)

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise LdmError(f"{self.component} runner called without inputs {missing}")
        outs = getattr(self, f"_run_{self.component}")(inputs)
        result = {}
        for name, t in zip(self.output_names, outs):
            a = t.detach().float().cpu().numpy() if self.output_dtype is not None else t.detach().cpu().numpy()
            result[name] = a.astype(self.output_dtype, copy=False) if self.output_dtype is not None else a
        return result

    def _run_text_encoder(self, inputs):
        if self.sdxl:   # SDXL: the penultimate hidden states, no final LayerNorm
            return [self.module(self._tensor(inputs["input_ids"], torch.long), output_hidden_states=True).hidden_states[-2]]
        out = self.module(self._tensor(inputs["input_ids"], torch.long))
        return [out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]]

    def _run_text_encoder_2(self, inputs):
        out = self.module(self._tensor(inputs["input_ids"], torch.long), output_hidden_states=True)
        return [out.hidden_states[-2], out.text_embeds]

    def _run_unet(self, inputs):
        extra = ()
        if self.sdxl:
            extra = (self._tensor(inputs["text_embeds"]), self._tensor(inputs["time_ids"], torch.float32))
        out = self.module(self._tensor(inputs["sample"]), self._tensor(inputs["timestep"], torch.float32),
                          self._tensor(inputs["encoder_hidden_states"]), *extra)
        return [out.sample if hasattr(out, "sample") else out]

    def _run_vae_decoder(self, inputs):
        out = self.module.decode(self._tensor(inputs["latent"]))
        return [out.sample if hasattr(out, "sample") else out]

    def _run_vae_encoder(self, inputs):
        x = self._tensor(inputs["image"])
        if hasattr(self.module, "encode_moments"):
            return list(self.module.encode_moments(x))
        dist = self.module.encode(x)
        dist = dist.latent_dist if hasattr(dist, "latent_dist") else dist
        return [dist.mean, dist.logvar]


def pipeline_from_model_folder(folder, device: str = "cpu", dtype: torch.dtype = torch.float32,
                               components=None, profiles=None):
    """The numpy Pipeline over TorchRunners of a diffusers-format model folder (the PyTorch reference).

    `components` (a training.checkpoint.Components or a dict with unet/vae/text_encoder) skips loading;
    `profiles` (ldm_deploy.artifact.Profiles) bounds the sizes as an artifact's do (None: any size).
    """
    from ldm_deploy.runtime.pipeline import Pipeline
    from ldm_deploy.runtime.tokenizer import ClipTokenizer
    from training.checkpoint import model_info

    folder = Path(folder)
    comps = components if components is not None else _components(folder, dtype)
    info = model_info(folder, profiles=profiles)
    if _part(comps, "text_encoder_2") is not None:
        return _sdxl_pipeline(folder, comps, info, device, dtype)
    runners = {c: TorchRunner(comps, c, device=device, dtype=dtype) for c in IO}
    return Pipeline(ClipTokenizer.from_dir(folder / "tokenizer"), runners, info, backend="torch")


def _sdxl_pipeline(folder: Path, comps, info, device, dtype):
    """runtime.sdxl.SDXLPipeline over TorchRunners of an SDXL model folder (base or refiner)."""
    from ldm_deploy.artifact import SDXL_COMPONENTS
    from ldm_deploy.runtime.sdxl import SDXLPipeline
    from ldm_deploy.runtime.tokenizer import ClipTokenizer

    names = [c for c in SDXL_COMPONENTS if _part(comps, _PART[c]) is not None]
    runners = {c: TorchRunner(comps, c, device=device, dtype=dtype) for c in names}
    tokenizers = {c: ClipTokenizer.from_dir(folder / ("tokenizer" if c == "text_encoder" else "tokenizer_2"))
                  for c in ("text_encoder", "text_encoder_2") if c in runners}
    return SDXLPipeline(tokenizers, runners, info, backend="torch")
