"""The exported artifact: read and verify `manifest.json` (torch-free).

An artifact folder is what `ldm-deploy export` writes and what the runtime and the engine builder
read: one ONNX graph per component, the tokenizer files, the scheduler config and `manifest.json`,
which records every file's sha256, the shape profiles and each graph's inputs and outputs.

    art = Artifact.open("out/sd15-onnx")          # validates the manifest and the file hashes
    art.check_shape(height=512, width=512, batch=2)
    spec = art.components["unet"]                   # ComponentSpec: file, inputs, outputs, profile, variants
    art.file("unet")                                # Path to unet/model.onnx
    art.info                                        # ModelInfo: what the sampling loop needs

This module is the only reader of manifest.json (tests/test_manifest_reader.py enforces it): everything else
reads the typed `Artifact`, `ComponentSpec` and `ModelInfo`. The writer, ldm_deploy/export/manifest.py,
shares the key names below (`ModelInfo.manifest_fields`, REQUIRED_KEYS).
"""
from __future__ import annotations

import hashlib
import json
import operator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.fileio import OutputKind, sha256_regular
from ldm_deploy.paths import check_tree, inside, inside_file

FORMAT = "ldm-deploy-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The component list, defined once: every graph an artifact may hold, in the order a pipeline runs them.
SD_COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")   # SD 1.x / 2.x (the export default)
COMPONENTS = SD_COMPONENTS + ("text_encoder_2",)                         # text_encoder_2: SDXL's OpenCLIP bigG
SDXL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
# A component's variants: other graphs of the same component ("variants" in its manifest entry).
ORT_CUDA_VARIANT = "ort-cuda"   # ORT-fused graph with CUDA-only contrib ops (export/ort_optimize.py writes it)
ORT_CUDA_LOOP_VARIANT = "ort-cuda-loop"   # the ort-cuda U-Net with the sampler step in it (export/step_graph.py)
# Top-level manifest keys every artifact has (the writer fills them, `Artifact` refuses a manifest without one).
REQUIRED_KEYS = ("precision", "profiles", "components", "files", "scheduler", "tokenizer",
                 "scaling_factor", "prediction_type", "latent_channels", "vae_scale_factor")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                  # numpy dtype name: "float32", "float16", "int32"
    shape: tuple                # ints for static axes, strings for named dynamic axes

    def to_dict(self) -> dict:
        """As the manifest writes it (an engine sidecar's `io` copies it)."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    @property
    def static(self) -> bool:
        return self.min == self.max

    def __str__(self) -> str:
        return f"{self.min} (static)" if self.static else f"{self.min}..{self.max} (opt {self.opt})"


@dataclass(frozen=True)
class Profiles:
    """Image-space shape ranges the graphs were exported (and engines may be built) for."""

    batch: Range                # prompts * images per prompt (B); the U-Net sees 2B under CFG
    height: Range               # pixels
    width: Range

    def to_dict(self) -> dict:
        """The manifest's `profiles` entry."""
        return {k: {"min": r.min, "opt": r.opt, "max": r.max}
                for k, r in (("batch", self.batch), ("height", self.height), ("width", self.width))}


def check_shape(profiles: Profiles | None, vae_scale_factor: int, *, height=None, width=None, batch=None,
                batch_label: str | None = None) -> None:
    """Raise UsageError, naming the profile, for a size the graphs do not take: a height or width that is not a
    positive multiple of the VAE scale factor, or a height / width / batch outside `profiles` (None: any size).
    The one shape check: `Artifact.check_shape` and the pipeline's size checks both call it."""
    f = vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if not _is_int(value) or value <= 0 or value % f:
            raise UsageError(f"{name} must be a positive multiple of {f}, got {value!r}",
                             hint=f"use a multiple of the VAE scale factor {f}")
        _check_range(name, value, profiles and getattr(profiles, name))
    if batch is not None:
        _check_range("batch", batch, profiles and profiles.batch, batch_label)


def _is_int(value) -> bool:
    """An int or numpy integer (not a bool, not a float)."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _check_range(name: str, value: int, rng: Range | None, label: str | None = None) -> None:
    if rng is not None and not rng.min <= value <= rng.max:
        hint = ("lower --num-images or re-export with a larger batch" if name == "batch"
                else f"use a {name} in the profile")
        raise UsageError(f"{label or f'{name} {value}'} is outside the artifact's profile: {name} profile {rng}",
                         hint=f"{hint}, or re-export with a wider `profiles.{name}` in the export config")


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    file: str                   # relative to the artifact folder
    external_data: str | None   # relative path of the weights file beside the graph, if any
    precision: str              # "fp32" or "fp16"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_multiplier: int       # the component's batch = batch_multiplier * B (2 for the CFG U-Net)
    profile: dict               # input name -> {"min": shape, "opt": shape, "max": shape}
    variants: Mapping[str, "ComponentSpec"] = field(default_factory=dict)   # e.g. ORT_CUDA_VARIANT: a fused graph
    fp32_file: str | None = None          # the U-Net graph before fp16 conversion (export keep_fp32_unet)
    lora_weights: Mapping | None = None   # switchable LoRA weights: {"file", "mode", "inputs": {name: {dtype, shape}}}
    export: Mapping = field(default_factory=dict)   # how it was exported (exporter, opset, cleanup, timings)
    fused_ops: Mapping = field(default_factory=dict)  # a variant's fused op counts (ORT transformer optimizer)
    record: Mapping = field(default_factory=dict)   # the entry's other keys: informative (node counts, declined
                                                    # fusions, import notes), reported, never computed with

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def variant(self, name: str | None) -> "ComponentSpec":
        """The graph to run: this one (`name` None) or its variant `name` (its own file and IO)."""
        if name is None:
            return self
        if name not in self.variants:
            raise LdmError(f"the {self.name} component has no {name!r} variant "
                           f"(it has: {', '.join(self.variants) or 'none'})",
                           hint="export with --ort-cuda, or call ldm_deploy.export.ort_optimize."
                                "add_ort_cuda_variants(ARTIFACT); variant=None runs the plain graph")
        return self.variants[name]

    def over(self, entry: Mapping) -> "ComponentSpec":
        """This component run from another graph, described as a variant entry is (its file and what differs):
        the benchmark's lever graphs (ldm_deploy/bench/prepare.py), which live outside the artifact."""
        def tensors(items):
            return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in items]

        base = {"file": self.file, "external_data": self.external_data, "precision": self.precision,
                "inputs": tensors(self.inputs), "outputs": tensors(self.outputs),
                "batch_multiplier": self.batch_multiplier, "profile": self.profile}
        return _component(self.name, {**base, **dict(entry)}, self)


@dataclass(frozen=True)
class SDXLInfo:
    """SDXL's conditioning beyond the SD fields (the manifest's `sdxl` entry; export/sdxl.py writes it)."""

    time_ids: int                          # 6: base (size, crop, target size); 5: refiner (size, crop, aesthetic)
    requires_aesthetics_score: bool        # the refiner
    force_zeros_for_empty_prompt: bool     # no negative prompt -> zero negative context and pooled embeddings
    text_encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    pooled_dim: int | None = None
    tokenizer_2: Mapping | None = None     # the manifest's tokenizer entry for text_encoder_2 (dir, ...)

    @classmethod
    def from_dict(cls, d: Mapping) -> "SDXLInfo":
        """From the manifest's `sdxl` entry or a model folder's description (training/checkpoint.py)."""
        aesthetic = bool(d.get("requires_aesthetics_score", False))
        return cls(time_ids=int(d.get("time_ids", 5 if aesthetic else 6)), requires_aesthetics_score=aesthetic,
                   force_zeros_for_empty_prompt=bool(d.get("force_zeros_for_empty_prompt", not aesthetic)),
                   text_encoders=tuple(d.get("text_encoders") or ("text_encoder", "text_encoder_2")),
                   pooled_dim=None if d.get("pooled_dim") is None else int(d["pooled_dim"]),
                   tokenizer_2=d.get("tokenizer_2") if isinstance(d.get("tokenizer_2"), dict) else None)


@dataclass(frozen=True)
class ModelInfo:
    """What the sampling loop needs to know about a model, in one frozen description.

    From an artifact: `Artifact(path).info` (the manifest); from a diffusers model folder or in-memory modules:
    `training.checkpoint.model_info(...)`. Both go through `ModelInfo.from_configs` / `from_manifest`, so the
    formulas (VAE scale factor, latent channels, prediction type) exist once.
    """

    scheduler_config: Mapping[str, Any]   # scheduler_config.json, with prediction_type filled in (read-only)
    scaling_factor: float                 # latents = VAE mean * scaling_factor (SD 0.18215, SDXL 0.13025)
    prediction_type: str                  # what the U-Net predicts: "epsilon" | "v_prediction" | "sample"
    latent_channels: int                  # U-Net in_channels (4 for SD)
    vae_scale_factor: int                 # pixels per latent: 2 ** (VAE levels - 1) (8 for SD)
    profiles: Profiles | None = None      # the sizes the graphs take; None: any (the PyTorch reference)
    sdxl: SDXLInfo | None = None          # SDXL conditioning; None for SD 1.x / 2.x

    def __post_init__(self):
        config = dict(self.scheduler_config)
        config.setdefault("prediction_type", self.prediction_type)
        object.__setattr__(self, "scheduler_config", MappingProxyType(config))

    @classmethod
    def from_configs(cls, unet: Mapping | None, vae: Mapping | None, scheduler: Mapping, *,
                     profiles: Profiles | None = None, sdxl: SDXLInfo | None = None) -> "ModelInfo":
        """From a model folder's config.json dicts (diffusers' defaults where a key is absent)."""
        vae = vae or {}
        latent = unet.get("in_channels", 4) if unet else vae.get("latent_channels", 4)
        from ldm_deploy.flops import vae_scale_factor

        return cls(scheduler_config=dict(scheduler), scaling_factor=float(vae.get("scaling_factor", 0.18215)),
                   prediction_type=scheduler.get("prediction_type", "epsilon"), latent_channels=int(latent),
                   vae_scale_factor=vae_scale_factor(vae), profiles=profiles, sdxl=sdxl)

    @classmethod
    def from_manifest(cls, m: Mapping, profiles: Profiles) -> "ModelInfo":
        """From a manifest `Artifact` has checked (REQUIRED_KEYS present, numbers typed)."""
        sdxl = m.get("sdxl")
        return cls(scheduler_config=dict(m["scheduler"]), scaling_factor=float(m["scaling_factor"]),
                   prediction_type=m["prediction_type"], latent_channels=int(m["latent_channels"]),
                   vae_scale_factor=int(m["vae_scale_factor"]), profiles=profiles,
                   sdxl=SDXLInfo.from_dict(sdxl) if isinstance(sdxl, dict) else None)

    def manifest_fields(self) -> dict:
        """The manifest's top-level sizes, as export/manifest.py writes them (the names `from_manifest` reads;
        the writer puts the scheduler config as the model folder has it under `scheduler`)."""
        return {"scaling_factor": self.scaling_factor, "prediction_type": self.prediction_type,
                "latent_channels": self.latent_channels, "vae_scale_factor": self.vae_scale_factor}

    def check_shape(self, height=None, width=None, batch=None, batch_label: str | None = None) -> None:
        check_shape(self.profiles, self.vae_scale_factor, height=height, width=width, batch=batch,
                    batch_label=batch_label)


class Artifact:
    """A verified artifact folder. `Artifact(path)` and `Artifact.open(path)` are the same.

    `verify=False` skips the sha256 of every file (the builder hashes what it builds from);
    `missing_ok=True` (inspect) accepts listed files that are absent.
    """

    def __init__(self, path, verify: bool = True, *, missing_ok: bool = False):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            from ldm_deploy.interop.layout import refuse_onnx_folder

            refuse_onnx_folder(self.path, "an ldm-deploy artifact")
            raise not_an_artifact(self.path)
        try:
            raw = manifest_path.read_bytes()
            self.manifest = json.loads(raw.decode("utf-8"))   # the raw dict: for the manifest's writers only
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
            raise LdmError(f"cannot read {manifest_path}: {e}", hint="re-run the export") from None
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()   # the artifact's identity (lists every file's hash)
        self._check_format()
        self.components = {name: _component(name, d) for name, d in self.manifest["components"].items()}
        for spec in self.components.values():   # every graph path it names stays inside the artifact
            for rel in (spec.file, spec.external_data, spec.fp32_file,
                        *(p for v in spec.variants.values() for p in (v.file, v.external_data))):
                if rel is not None:
                    _check_relative(rel, self.path)
        self.profiles = _profiles(self.manifest["profiles"], self.path)
        _check_profiles_digest(self.manifest, self.path)
        self.info = _info(self.manifest, self.profiles, self.path)
        self.check_files(hashes=verify, missing_ok=missing_ok)

    @classmethod
    def open(cls, path, verify: bool = True, *, missing_ok: bool = False) -> "Artifact":
        return cls(path, verify=verify, missing_ok=missing_ok)

    # -- what the runtime reads -------------------------------------------------------------------
    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def scaling_factor(self) -> float:
        return self.info.scaling_factor

    @property
    def prediction_type(self) -> str:
        return self.info.prediction_type

    @property
    def latent_channels(self) -> int:
        return self.info.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return self.info.vae_scale_factor

    @property
    def scheduler_config(self) -> dict:
        return dict(self.manifest["scheduler"])

    @property
    def tokenizer_dir(self) -> Path:
        return self._tokenizer_folder(self.manifest["tokenizer"])

    @property
    def tokenizer_2_dir(self) -> Path:
        """SDXL: text_encoder_2's tokenizer folder (the refiner's only one is also the manifest's `tokenizer`)."""
        sdxl = self.info.sdxl
        return self._tokenizer_folder((sdxl and sdxl.tokenizer_2) or self.manifest["tokenizer"])

    def _tokenizer_folder(self, entry) -> Path:
        folder = inside(self.path, entry.get("dir") if isinstance(entry, dict) else None, named_in=self.path / MANIFEST)
        check_tree(folder, root=self.path)   # no file of it links out of the artifact
        return folder

    @property
    def model_configs(self) -> dict:
        """part -> the source model folder's config.json dict ({} when the manifest has none)."""
        model = self.manifest.get("model")
        return model if isinstance(model, dict) else {}

    @property
    def text_vocab_size(self) -> int | None:
        """Rows of the text encoder's token embedding, when the manifest records its config."""
        te = self.model_configs.get("text_encoder")
        vocab = te.get("vocab_size") if isinstance(te, dict) else None
        return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None

    @property
    def source_path(self) -> Path | None:
        """The model folder the artifact was exported from (None when not recorded)."""
        path = (self.manifest.get("source") or {}).get("path") if isinstance(self.manifest.get("source"), dict) else None
        return Path(path) if isinstance(path, str) and path else None

    @property
    def source_sha256(self) -> str | None:
        """training.checkpoint.folder_hash of the model folder it was exported from."""
        source = self.manifest.get("source")
        digest = source.get("sha256") if isinstance(source, dict) else None
        return digest if isinstance(digest, str) else None

    @property
    def export_config(self) -> dict:
        """The resolved export config (the dict `ExportConfig.from_dict` reads); {} for an imported artifact."""
        config = self.manifest.get("export_config")
        return dict(config) if isinstance(config, dict) else {}

    @property
    def files(self) -> dict[str, str]:
        """relative path -> sha256 of every file but manifest.json."""
        return dict(self.manifest["files"])

    @property
    def created(self) -> str | None:
        """When the export wrote it (UTC, ISO 8601)."""
        return _str_or_none(self.manifest.get("created"))

    @property
    def tools(self) -> dict:
        """Package -> version of the tools that made it (ldm_deploy, torch, onnx, ...)."""
        tools = self.manifest.get("tools")
        return dict(tools) if isinstance(tools, dict) else {}

    @property
    def imported(self) -> dict | None:
        """For `ldm-deploy import`: how the ONNX folder was read (layout, pipeline, ...); None for an export."""
        entry = self.manifest.get("import")
        return dict(entry) if isinstance(entry, dict) else None

    @property
    def loras(self) -> list[dict]:
        """LoRAs merged at export (file, sha256, scale, ...); [] when none."""
        loras = self.manifest.get("loras")
        return [dict(x) for x in loras if isinstance(x, dict)] if isinstance(loras, list) else []

    def component(self, name: str) -> ComponentSpec:
        if name not in self.components:
            raise LdmError(f"the artifact at {self.path} has no {name!r} component "
                           f"(it has: {', '.join(self.components) or 'none'})",
                           hint=f"re-export with --components including {name}")
        return self.components[name]

    def file(self, component: str) -> Path:
        """Path of the component's ONNX graph."""
        return self.path_of(self.component(component).file)

    def path_of(self, rel: str | None) -> Path:
        """A path the manifest names, inside the artifact (LdmError for one leaving it)."""
        return named_path(self.path, rel)

    def check_shape(self, height: int, width: int, batch: int = 1) -> None:
        """Raise UsageError, naming the profile, when (height, width, batch) is outside the export's."""
        self.info.check_shape(height=height, width=width, batch=batch)

    # -- verification -----------------------------------------------------------------------------
    def check_files(self, hashes: bool = True, missing_ok: bool = False) -> None:
        """Every file listed in the manifest exists (unless `missing_ok`) and (with `hashes`) has the recorded
        sha256; none lies outside the artifact."""
        files = self.manifest["files"]
        for c in self.components.values():
            for rel in filter(None, (c.file, c.external_data)):
                if rel not in files:
                    raise LdmError(f"manifest of {self.path} lists component file {rel} without a hash",
                                   hint="re-run the export")
        for rel, digest in files.items():
            p = inside_file(self.path, rel, named_in=self.path / MANIFEST)   # no link out of the artifact
            if not p.is_file():
                if missing_ok:
                    continue
                raise LdmError(f"artifact file {rel} is missing from {self.path}", hint="re-run the export")
            if hashes and sha256_regular(p.resolve()) != digest:
                raise LdmError(f"artifact file {rel} in {self.path} does not match its sha256 in {MANIFEST} "
                               "(modified or corrupted)", hint="re-run the export")

    def _check_format(self) -> None:
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise LdmError(f"{self.path / MANIFEST} is not an ldm-deploy artifact manifest")
        version = m.get("format_version")
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise LdmError(f"artifact format_version {version} in {self.path} is not supported "
                           f"(this ldm-deploy reads {FORMAT_VERSION})",
                           hint="upgrade ldm-deploy" if newer else "re-export with this ldm-deploy")
        missing = [k for k in REQUIRED_KEYS if k not in m]
        if missing:
            raise LdmError(f"manifest of {self.path} lacks {', '.join(missing)}", hint="re-run the export")
        def bad(what):
            return LdmError(f"manifest of {self.path} is malformed: {what}", hint="re-run the export")

        if not isinstance(m["components"], dict) or not m["components"]:
            raise bad("`components` is not a non-empty mapping")
        unknown = [c for c in m["components"] if c not in COMPONENTS]
        if unknown:
            raise LdmError(f"manifest of {self.path} has unknown components {unknown}")
        files = m["files"]
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise bad("`files` is not a mapping of relative paths to sha256 strings")
        for rel in files:
            _check_relative(rel, self.path)
        for key in ("scheduler", "tokenizer", "profiles"):
            if not isinstance(m[key], dict):
                raise bad(f"`{key}` is not a mapping")
        if not isinstance(m["tokenizer"].get("dir"), str):
            raise bad("`tokenizer.dir` is not a folder name")
        _check_relative(m["tokenizer"]["dir"], self.path)
        if not isinstance(m["precision"], str) or not isinstance(m["prediction_type"], str):
            raise bad("`precision` / `prediction_type` are not strings")
        sf = m["scaling_factor"]
        if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not 0 < sf < float("inf"):
            raise bad(f"`scaling_factor` {sf!r} is not a positive number")
        for key in ("latent_channels", "vae_scale_factor"):
            v = m[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise bad(f"`{key}` {v!r} is not a positive integer")
        _check_numbers(m, self.path)

    def __repr__(self) -> str:
        p = self.profiles
        return (f"Artifact({str(self.path)!r}, {self.precision}, components={list(self.components)}, "
                f"batch {p.batch}, {p.height} x {p.width})")


def _check_numbers(m: dict, root: Path) -> None:
    """Sizes the runtime and `inspect` compute with, bounded (ldm_deploy/limits.py) before anything uses them."""
    from ldm_deploy import limits

    if m["latent_channels"] > limits.CONFIG_LIMITS["latent_channels"] or m["vae_scale_factor"] > 64:
        raise LdmError(f"manifest of {root} is malformed: latent_channels {m['latent_channels']} / vae_scale_factor "
                       f"{m['vae_scale_factor']} over the limits 64 / 64", hint="re-run the export")
    for part, config in (m.get("model") or {}).items() if isinstance(m.get("model"), dict) else ():
        if config is None:
            continue   # a part the model has not (an SDXL refiner's text_encoder, an imported folder's missing part)
        limits.check_model_config(config, f"manifest of {root}: model.{part}")
    s = m["scheduler"]
    limits.check_scheduler_numbers(s.get("num_train_timesteps", 1000), s.get("beta_start", 0.00085),
                                   s.get("beta_end", 0.012), f"manifest of {root}: scheduler")


def profiles_digest(m: dict) -> str:
    """sha256 of the manifest's shape profiles (top-level and per component), as the exporter wrote them."""
    covered = {"profiles": m.get("profiles"),
               "components": {name: (c or {}).get("profile") for name, c in sorted((m.get("components") or {}).items())
                              if isinstance(c, dict)}}
    return hashlib.sha256(json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_profiles_digest(m: dict, root: Path) -> None:
    """The profiles size every buffer and engine, and manifest.json is not in its own file hashes: the exporter
    records `profiles_sha256` over them, and a profile edited after export is refused. (Older artifacts
    without the key rely on the bounds of ldm_deploy/limits.py alone.)"""
    want = m.get("profiles_sha256")
    if want is not None and want != profiles_digest(m):
        raise LdmError(f"manifest of {root}: the shape profiles were edited after export "
                       "(they no longer match profiles_sha256)", hint="re-run the export with the profiles you need")


def named_path(root, rel, *, regular_file: bool = False) -> Path:
    """`root/rel` for a path the manifest of the artifact at `root` names: inside the artifact (paths.inside;
    manifest.json is not in its own hashes), and with `regular_file` a regular file where it exists."""
    check = inside_file if regular_file else inside
    return check(root, rel, named_in=Path(root) / MANIFEST)


def manifest_sha256(path) -> str | None:
    """An artifact's identity without opening it: sha256 of its manifest.json (which lists every file's hash);
    None when there is none. `Artifact(path).manifest_sha256` is the same value."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return None
    return hashlib.sha256(manifest.read_bytes()).hexdigest()


def is_artifact(path) -> bool:
    """True when `path` is a folder holding an artifact manifest (not opened or verified)."""
    return (Path(path) / MANIFEST).is_file()


def not_an_artifact(path: Path) -> LdmError:
    """The error for a folder without manifest.json: a path that does not exist, a model folder, or other."""
    if not path.exists():
        return LdmError(f"{path} does not exist", hint="check the path to the exported artifact folder")
    if not path.is_dir():
        return LdmError(f"{path} is a file, not an exported artifact folder")
    if (path / "model_index.json").is_file():
        return LdmError(f"{path} is a model folder, not an exported artifact: export it first",
                          hint=f"ldm-deploy export {path} --out DIR, then use DIR")
    return LdmError(f"{path} is not an ldm-deploy artifact: {MANIFEST} is missing",
                    hint="run `ldm-deploy export MODEL_DIR --out DIR` to make one")


def _check_relative(rel: str, root: Path) -> None:
    """Refuse manifest paths that leave the artifact folder (absolute, `..`, or a link out of it)."""
    inside(root, rel, named_in=root / MANIFEST, hint="re-run the export; never edit manifest.json by hand")


_TYPED_KEYS = {"file", "external_data", "precision", "inputs", "outputs", "batch_multiplier", "profile", "variants",
               "fp32_file", "lora_weights", "export", "fused_ops"}


def _component(name: str, d: dict, parent: ComponentSpec | None = None) -> ComponentSpec:
    """A component's manifest entry; with `parent`, one of its variants (its entry over the parent's)."""
    def tensors(items):
        out = []
        for t in items:
            if not (isinstance(t["name"], str) and isinstance(t["dtype"], str) and isinstance(t["shape"], list)
                    and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in t["shape"])):
                raise TypeError(f"tensor entry {str(t)[:80]}")
            out.append(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])))
        return tuple(out)

    what = f"component {name!r}" if parent is None else f"variant of component {name!r}"
    try:
        if not isinstance(d, dict):
            raise TypeError("not a mapping")
        lora = d.get("lora_weights")
        spec = ComponentSpec(
            name=name, file=d["file"], external_data=d.get("external_data"),
            precision=d["precision"], inputs=tensors(d["inputs"]), outputs=tensors(d["outputs"]),
            batch_multiplier=int(d.get("batch_multiplier", parent.batch_multiplier if parent else 1)),
            profile=d.get("profile", parent.profile if parent else {}), fp32_file=d.get("fp32_file"),
            lora_weights=lora if lora else None, export=d.get("export") or {}, fused_ops=d.get("fused_ops") or {},
            record={k: v for k, v in d.items() if k not in _TYPED_KEYS})
        if not isinstance(spec.file, str) or not spec.file:
            raise TypeError(f"file {spec.file!r}")
        for key in ("external_data", "fp32_file"):
            if getattr(spec, key) is not None and not isinstance(getattr(spec, key), str):
                raise TypeError(f"{key} {getattr(spec, key)!r}")
        if not isinstance(spec.precision, str) or not isinstance(spec.profile, dict) or spec.batch_multiplier < 1:
            raise TypeError("precision / profile / batch_multiplier")
        if lora and not (isinstance(lora, dict) and isinstance(lora.get("inputs"), dict)):
            raise TypeError("lora_weights is not {file, mode, inputs}")
        if not isinstance(spec.export, dict) or not isinstance(spec.fused_ops, dict):
            raise TypeError("export / fused_ops")
        variants = d.get("variants") or {}
        if parent is None and not isinstance(variants, dict):
            raise TypeError("variants is not a mapping")
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise LdmError(f"manifest entry for {what} is malformed ({e})", hint="re-run the export") from None
    if parent is None and variants:
        base = {k: v for k, v in d.items() if k != "variants"}   # a variant names what differs from the graph
        spec = replace(spec, variants={k: _component(name, {**base, **v} if isinstance(v, dict) else v, spec)
                                       for k, v in variants.items()})
    return spec


def _str_or_none(value) -> str | None:
    return value if isinstance(value, str) else None


def _info(m: dict, profiles: Profiles, root: Path) -> ModelInfo:
    """The manifest's model description; `_check_format` has typed its required keys."""
    sdxl = m.get("sdxl")
    if sdxl is not None and not isinstance(sdxl, dict):
        raise LdmError(f"manifest of {root} is malformed: `sdxl` is not a mapping", hint="re-run the export")
    try:
        return ModelInfo.from_manifest(m, profiles)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise LdmError(f"manifest of {root} is malformed: `sdxl` ({e})", hint="re-run the export") from None


def _profiles(p: dict, root: Path) -> Profiles:
    from ldm_deploy import limits

    ranges = {}
    for k in ("batch", "height", "width"):
        r = p.get(k)
        if not (isinstance(r, dict) and set(r) >= {"min", "opt", "max"}
                and all(isinstance(r[x], int) and not isinstance(r[x], bool) for x in ("min", "opt", "max"))
                and 1 <= r["min"] <= r["opt"] <= r["max"]):
            raise LdmError(f"manifest of {root} is malformed: profiles.{k} is not {{min, opt, max}} integers "
                           f"with 1 <= min <= opt <= max (got {str(r)[:80]})", hint="re-run the export")
        limits.check_profile_range(k, r["min"], r["max"], f"manifest of {root}")
        ranges[k] = Range(r["min"], r["opt"], r["max"])
    return Profiles(**ranges)


def _is_artifact(folder: Path) -> bool:
    try:
        m = json.loads((folder / MANIFEST).read_bytes()[: 1 << 24])
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT


# an existing --out is replaced only when it is an artifact (or empty), or with force
ARTIFACT_OUTPUT = OutputKind("artifact", "an ldm-deploy artifact (no manifest.json of one)", _is_artifact, marker=False)
