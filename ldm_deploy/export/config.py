"""Export configuration: a frozen dataclass loaded from `export_configs/NAME.yaml`.

Profiles are in image space (pixels) and in prompts*images (B): the U-Net graph's batch axis is 2B
under classifier-free guidance. Height and width are static in the graphs when min == max (faster
and what TensorRT likes best); otherwise they are dynamic axes and the ranges go to the manifest.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ldm_deploy import configfile
from ldm_deploy.artifact import COMPONENTS as ALL_COMPONENTS, SD_COMPONENTS as COMPONENTS
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.flops import vae_scale_factor
from ldm_deploy.limits import MAX_BATCH, MAX_IMAGE_SIDE

log = logging.getLogger(__name__)

# COMPONENTS (the default: SD's four) and ALL_COMPONENTS (+ SDXL's text_encoder_2) are the artifact's list
PRECISIONS = ("fp32", "fp16")
EXPORTERS = ("torchscript", "dynamo")
SWITCHABLE = (None, "linear", "all")          # lora_switchable
PROFILE_KEYS = ("batch", "height", "width")   # under `profiles:` in the YAML


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise UsageError(f"profile range needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    @property
    def static(self) -> bool:
        return self.min == self.max

    @classmethod
    def from_config(cls, value, where: str, error=LdmError) -> "Range":
        """`64` (static) or `{min, max, opt}` (opt defaults to min), within limits.py's batch / image bounds."""
        if isinstance(value, Range):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            value = {"min": value, "max": value}
        if not isinstance(value, dict) or "min" not in value or "max" not in value:
            raise error(f"{where} must be an integer or a mapping with min, max and optional opt")
        r = configfile.load(cls, {"opt": value["min"], **value}, where, error=error)
        top = MAX_BATCH if where.endswith("batch") else MAX_IMAGE_SIDE
        if r.max > top:
            raise error(f"{where}.max = {r.max} is over ldm-deploy's limit of {top}")
        return r


# Keys left out of the cache key while off (false / None), each with the keys that only matter when it is on, so
# artifacts exported before the key existed stay cached (ort_cuda_fold_cfg only shapes the ort-cuda variant).
_OFF_KEYS = {"ort_cuda": ("ort_cuda", "ort_cuda_fold_cfg"), "ort_cuda_device_loop": ("ort_cuda_device_loop",),
             "vae_fp16_safe": ("vae_fp16_safe",), "lora_switchable": ("lora_switchable",)}


def canonical_key(settings: dict) -> str:
    """The cache key of an export config mapping (ExportConfig.to_dict, or the manifest's `export_config`): its
    canonical JSON without the name and without the keys that are off (_OFF_KEYS)."""
    d = {k: v for k, v in settings.items() if k != "name"}
    for key, drop in _OFF_KEYS.items():
        if not d.get(key):
            for name in drop:
                d.pop(name, None)
    return json.dumps(d, sort_keys=True)


@dataclass(frozen=True)
class ExportConfig:
    name: str = "custom"                        # recorded in the manifest
    components: tuple[str, ...] = COMPONENTS     # which graphs to export
    precision: str = "fp32"                     # fp32 | fp16: U-Net and text encoder
    # The SD VAE overflows in fp16 (black images), so the VAE stays fp32 unless asked; None = fp32.
    vae_precision: str | None = None
    batch: Range = Range(1, 1, 4)               # B (prompts * images); U-Net batch is 2B (CFG)
    height: Range = Range(512, 512, 512)        # pixels; static when min == max
    width: Range = Range(512, 512, 512)
    opset: int = 17
    exporter: str = "torchscript"               # torchscript (fast, opset 17) | dynamo (opset >= 18); see docs/export.md
    optimize: bool = True                       # onnxslim: constant folding, shape inference, dead-node removal
    keep_fp32_unet: bool = False                # fp16 exports also keep unet/model_fp32.onnx (for ORT fusions)
    ort_cuda: bool = False                      # also write <component>/model.ort-cuda.onnx (ORT CUDA fusions)
    ort_cuda_fold_cfg: bool = True              # ... with CFG folded into the U-Net variant (export/cfg_fold.py)
    ort_cuda_device_loop: bool = False          # ... and unet/model.ort-cuda-loop.onnx: the sampler step in the graph
    #                                             (export/step_graph.py), for the device loop (runners/ort_loop.py)
    pooled_output: bool = False                 # text encoder also returns pooler_output
    vae_fp16_safe: bool = False                 # SDXL: the folder's VAE is fp16-safe (sdxl-vae-fp16-fix), so
    #                                             vae_precision fp16 is allowed (SDXL's own VAE overflows)
    # U-Net / text encoder weights as graph inputs so LoRAs switch at run time (export/lora.py): None (off),
    # "linear" (Linear + 1x1 conv weights: what LoRAs touch by default) or "all" (+ 3x3 convs for LoCon;
    # slower on ORT CPU, which loses its constant-weight conv optimizations: docs/lora.md)
    lora_switchable: str | None = None
    measure_runtime: bool = True                # time ORT CPU before/after cleanup into the manifest
    # Ops left in fp32 (with casts around them) in fp16 graphs: normalisations and softmax.
    fp16_keep_ops: tuple[str, ...] = ("InstanceNormalization", "GroupNormalization", "LayerNormalization",
                                      "Softmax")
    # Nodes kept in fp32 per component, by node name in the fp32 graph: {unet: [names], vae_decoder: [...]}
    # (SDXL's text_encoder_2 too).
    # Written by `ldm-deploy debug-precision --write-config` (docs/precision.md); empty = none.
    fp16_keep_nodes: dict = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        unknown = [c for c in self.components if c not in ALL_COMPONENTS]
        if unknown or not self.components:
            raise UsageError(f"unknown components {unknown}; choose from {', '.join(ALL_COMPONENTS)}")
        for key in ("precision", "vae_precision"):
            value = getattr(self, key)
            if value is not None and value not in PRECISIONS:
                raise UsageError(f"{key} must be one of {', '.join(PRECISIONS)}, got {value!r}")
        bad = [k for k, v in self.fp16_keep_nodes.items() if k not in ALL_COMPONENTS or isinstance(v, str)
               or not all(isinstance(n, str) for n in v)]
        if bad:
            raise UsageError(f"fp16_keep_nodes must map components ({', '.join(ALL_COMPONENTS)}) to lists of node "
                             f"names; bad entry {bad[0]!r}")
        if self.exporter not in EXPORTERS:
            raise UsageError(f"exporter must be one of {', '.join(EXPORTERS)}, got {self.exporter!r}")
        if self.opset < 17:
            raise UsageError(f"opset must be >= 17, got {self.opset}")
        if self.lora_switchable not in SWITCHABLE:
            raise UsageError(f"lora_switchable must be one of {', '.join(map(str, SWITCHABLE))}, "
                             f"got {self.lora_switchable!r}")
        if self.lora_switchable and self.exporter != "torchscript":
            raise UsageError("lora_switchable needs the torchscript exporter", hint="set `exporter: torchscript`")
        if self.ort_cuda_device_loop and not (self.ort_cuda and self.ort_cuda_fold_cfg and "unet" in self.components):
            raise UsageError("the device-loop U-Net is made from the ort-cuda U-Net variant with CFG folded in",
                             hint="export the unet with --ort-cuda (and without --no-cfg-fold)")
        if self.ort_cuda_device_loop and self.lora_switchable:
            raise UsageError("the device-loop U-Net does not take switchable LoRA weights",
                             hint="fuse the LoRA at export instead, or drop lora_switchable")
        if self.exporter == "dynamo" and self.opset < 18:
            raise UsageError("the dynamo exporter needs opset >= 18 (its opset-17 down-conversion writes "
                             "invalid Split nodes)", hint="set `opset: 18` or `exporter: torchscript`")

    def component_precision(self, component: str) -> str:
        if component.startswith("vae"):
            return self.vae_precision or "fp32"
        return self.precision

    @property
    def static_size(self) -> bool:
        return self.height.static and self.width.static

    def replace(self, **changes) -> "ExportConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["components"] = list(self.components)
        d["fp16_keep_ops"] = list(self.fp16_keep_ops)
        d["fp16_keep_nodes"] = {k: list(v) for k, v in self.fp16_keep_nodes.items() if v}
        if not d["fp16_keep_nodes"]:
            d.pop("fp16_keep_nodes")   # keeps configs (and cached artifacts) from before the key unchanged
        d["profiles"] = {k: d.pop(k) for k in ("batch", "height", "width")}
        return d

    def key(self) -> str:
        """Canonical JSON of everything that changes the exported graphs (the cache compares it)."""
        return canonical_key(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict, where: str = "export config") -> "ExportConfig":
        """A config mapping (the YAML file, the manifest's `export_config`) through the strict loader; its
        `profiles` section holds the batch / height / width ranges."""
        if not isinstance(d, dict):
            raise LdmError(f"{where} must hold a mapping of export settings")
        d = dict(d)
        profiles = d.pop("profiles", {}) or {}
        if not isinstance(profiles, dict):
            raise LdmError(f"{where}: `profiles` must be a mapping of batch/height/width ranges")
        unknown = [f"profiles.{k}" for k in profiles if k not in PROFILE_KEYS]
        if unknown:
            raise LdmError(f"{where}: unknown keys {', '.join(sorted(unknown))}",
                           hint="allowed in profiles: batch, height, width")
        twice = [k for k in PROFILE_KEYS if k in d and k in profiles]
        if twice:
            raise LdmError(f"{where}: {twice[0]} is given both at the top level and under profiles; keep one")
        profiles = {**{k: d.pop(k) for k in PROFILE_KEYS if k in d}, **profiles}   # top-level ranges: older files
        nodes = d.get("fp16_keep_nodes")
        if isinstance(nodes, dict):   # lists of node names -> tuples (a string is refused by __post_init__)
            d["fp16_keep_nodes"] = {c: names if isinstance(names, str) else tuple(names or ())
                                    for c, names in nodes.items()}
        try:
            ranges = {k: Range.from_config(v, f"{where}: profiles.{k}") for k, v in profiles.items()}
            return configfile.load(cls, {**d, **ranges}, where)
        except UsageError as e:      # __post_init__'s checks: name the file
            raise UsageError(f"{where}: {e}") from None


def load_config(path_or_name: str | Path | None) -> ExportConfig:
    """Load `path` (a YAML file) or a bundled name from `export_configs/` (tiny, demo, sd15, sd21, sdxl).

    None gives the built-in defaults (512x512); `default_config(model_dir)` sizes them to the model."""
    if path_or_name is None:
        return ExportConfig()
    path = Path(path_or_name)
    if not path.is_file():
        bundled = Path(__file__).resolve().parents[2] / "export_configs" / f"{path_or_name}.yaml"
        if not bundled.is_file():
            raise LdmError(f"export config {path_or_name} not found",
                           hint="pass a YAML file or one of: tiny, demo, sd15, sd21, sdxl")
        path = bundled
    data = configfile.read_mapping(path, "export config")
    data.setdefault("name", path.stem)
    return ExportConfig.from_dict(data, where=str(path))


DEFAULT_SIZE = 512  # pixels, when the model folder does not say (no unet/config.json sample_size)


def native_size(model_dir: str | Path) -> tuple[int, int] | None:
    """(height, width) the model was trained at, as diffusers' pipelines default to it: the U-Net's
    `sample_size` x the VAE scale factor (flops.vae_scale_factor); None when unknown."""
    sample = (_part_config(model_dir, "unet") or {}).get("sample_size")
    factor = vae_scale_factor(_part_config(model_dir, "vae"))
    if isinstance(sample, int) and not isinstance(sample, bool) and sample > 0:
        return sample * factor, sample * factor
    if (isinstance(sample, list) and len(sample) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in sample)):
        return sample[0] * factor, sample[1] * factor  # diffusers allows [height, width]
    return None


def _part_config(model_dir: str | Path, part: str) -> dict | None:
    """`part/config.json` as a dict, None when missing or unreadable (the export reports those)."""
    try:
        obj = json.loads((Path(model_dir) / part / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def default_config(model_dir: str | Path) -> ExportConfig:
    """The export config without `--config`: built-in defaults with a static profile at the model's
    native size (U-Net sample_size x VAE scale factor, diffusers' default height/width), else 512."""
    size = native_size(model_dir)
    if size is None:
        if _part_config(model_dir, "unet") is not None:  # (a missing/bad config gets the export's error)
            log.warning("%s/unet/config.json gives no sample_size: exporting a %dx%d profile", model_dir,
                        DEFAULT_SIZE, DEFAULT_SIZE)
        size = (DEFAULT_SIZE, DEFAULT_SIZE)
    h, w = size
    return ExportConfig(name="default", height=Range(h, h, h), width=Range(w, w, w))


def write_config(config: ExportConfig, path: Path,
                 header: str = "the resolved export config this artifact was made with") -> None:
    import yaml

    from ldm_deploy.fileio import atomic_file

    with atomic_file(path, "w") as f:
        f.write("".join(f"# {line}\n" for line in header.splitlines()))
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)


__all__ = ["ExportConfig", "Range", "load_config", "default_config", "native_size", "write_config", "COMPONENTS"]
