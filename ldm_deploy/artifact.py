"""The exported artifact: read and verify `manifest.json` (torch-free).

An artifact folder is what `ldm-deploy export` writes and what the runtime and the engine builder
read: one ONNX graph per component, the tokenizer files, the scheduler config and `manifest.json`,
which records every file's sha256, the shape profiles and each graph's inputs and outputs.

    art = Artifact.open("out/sd15-onnx")          # validates the manifest and the file hashes
    art.check_shape(height=512, width=512, batch=2)
    spec = art.components["unet"]                   # ComponentSpec: file, inputs, outputs, profile
    art.file("unet")                                # Path to unet/model.onnx
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.fileio import OutputKind, sha256_regular
from ldm_deploy.paths import check_tree, inside, inside_file

FORMAT = "ldm-deploy-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder", "text_encoder_2")   # text_encoder_2: SDXL


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                  # numpy dtype name: "float32", "float16", "int32"
    shape: tuple                # ints for static axes, strings for named dynamic axes


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

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


class Artifact:
    """A verified artifact folder. `Artifact(path)` and `Artifact.open(path)` are the same."""

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            from ldm_deploy.interop.layout import refuse_onnx_folder

            refuse_onnx_folder(self.path, "an ldm-deploy artifact")
            raise not_an_artifact(self.path)
        try:
            self.manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
            raise LdmError(f"cannot read {manifest_path}: {e}", hint="re-run the export") from None
        self._check_format()
        self.components = {name: _component(name, d) for name, d in self.manifest["components"].items()}
        self.profiles = _profiles(self.manifest["profiles"], self.path)
        _check_profiles_digest(self.manifest, self.path)
        self.check_files(hashes=verify)

    @classmethod
    def open(cls, path, verify: bool = True) -> "Artifact":
        return cls(path, verify=verify)

    # -- what the runtime reads -------------------------------------------------------------------
    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def scaling_factor(self) -> float:
        return float(self.manifest["scaling_factor"])

    @property
    def prediction_type(self) -> str:
        return self.manifest["prediction_type"]

    @property
    def latent_channels(self) -> int:
        return int(self.manifest["latent_channels"])

    @property
    def vae_scale_factor(self) -> int:
        return int(self.manifest["vae_scale_factor"])

    @property
    def scheduler_config(self) -> dict:
        return dict(self.manifest["scheduler"])

    @property
    def tokenizer_dir(self) -> Path:
        folder = inside(self.path, self.manifest["tokenizer"]["dir"], named_in=self.path / MANIFEST)
        check_tree(folder, root=self.path)   # no file of it links out of the artifact
        return folder

    @property
    def model_configs(self) -> dict:
        return self.manifest["model"]

    def component(self, name: str) -> ComponentSpec:
        if name not in self.components:
            raise LdmError(f"the artifact at {self.path} has no {name!r} component "
                           f"(it has: {', '.join(self.components) or 'none'})",
                           hint=f"re-export with --components including {name}")
        return self.components[name]

    def file(self, component: str) -> Path:
        """Path of the component's ONNX graph."""
        return inside(self.path, self.component(component).file, named_in=self.path / MANIFEST)

    def check_shape(self, height: int, width: int, batch: int = 1) -> None:
        """Raise UsageError, naming the profile, when (height, width, batch) is outside the export's."""
        for what, value, rng in (("height", height, self.profiles.height), ("width", width, self.profiles.width),
                                 ("batch", batch, self.profiles.batch)):
            if not rng.min <= value <= rng.max:
                raise UsageError(f"{what} {value} is outside the artifact's {what} profile {rng}",
                                 hint=f"use a {what} in the profile, or re-export with a wider "
                                      f"`profiles.{what}` in the export config")
        f = self.vae_scale_factor
        for what, value in (("height", height), ("width", width)):
            if value % f:
                raise UsageError(f"{what} {value} is not a multiple of the VAE scale factor {f}",
                                 hint=f"use a multiple of {f}")

    # -- verification -----------------------------------------------------------------------------
    def check_files(self, hashes: bool = True) -> None:
        """Every file listed in the manifest exists and (with `hashes`) has the recorded sha256."""
        files = self.manifest["files"]
        for c in self.components.values():
            for rel in filter(None, (c.file, c.external_data)):
                if rel not in files:
                    raise LdmError(f"manifest of {self.path} lists component file {rel} without a hash",
                                   hint="re-run the export")
        for rel, digest in files.items():
            p = inside_file(self.path, rel, named_in=self.path / MANIFEST)   # no link out of the artifact
            if not p.is_file():
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
        required = ("precision", "profiles", "components", "files", "scheduler", "tokenizer",
                    "scaling_factor", "prediction_type", "latent_channels", "vae_scale_factor")
        missing = [k for k in required if k not in m]
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
    import hashlib

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


def _component(name: str, d: dict) -> ComponentSpec:
    def tensors(items):
        out = []
        for t in items:
            if not (isinstance(t["name"], str) and isinstance(t["dtype"], str) and isinstance(t["shape"], list)
                    and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in t["shape"])):
                raise TypeError(f"tensor entry {str(t)[:80]}")
            out.append(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])))
        return tuple(out)

    try:
        spec = ComponentSpec(name=name, file=d["file"], external_data=d.get("external_data"),
                             precision=d["precision"], inputs=tensors(d["inputs"]), outputs=tensors(d["outputs"]),
                             batch_multiplier=int(d.get("batch_multiplier", 1)), profile=d.get("profile", {}))
        if not isinstance(spec.file, str) or not spec.file:
            raise TypeError(f"file {spec.file!r}")
        if spec.external_data is not None and not isinstance(spec.external_data, str):
            raise TypeError(f"external_data {spec.external_data!r}")
        if not isinstance(spec.precision, str) or not isinstance(spec.profile, dict) or spec.batch_multiplier < 1:
            raise TypeError("precision / profile / batch_multiplier")
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise LdmError(f"manifest entry for component {name!r} is malformed ({e})", hint="re-run the export") from None
    return spec


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
