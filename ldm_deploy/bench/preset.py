"""Bench presets: a named, shipped run of `ldm-deploy bench` (`--preset sd15-gpu`), in presets/NAME.yaml.

A preset names the benchmark model (`prepare.model_dicts`: a seeded random-weight folder is built in
--work unless a model folder is given), how to export it when no artifact is given, and defaults for
the command's options; an option given on the command line wins over the preset's value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ldm_deploy import configfile
from ldm_deploy.configfile import bounds
from ldm_deploy.errors import UsageError
from ldm_deploy.limits import MAX_BATCH, MAX_IMAGE_SIDE

PRESETS_DIR = Path(__file__).parent / "presets"
# `ldm-deploy bench` options (argparse dests) a preset may set
OPTIONS = ("sides", "batch", "steps", "height", "width", "warmup", "repeats", "budget", "component_warmup",
           "component_repeats", "compile_budget", "side_timeout", "time_limit", "device", "note")


@dataclass(frozen=True)
class ExportSettings:
    config: str | None = None       # export config name or file; None: a static export at height x width
    precision: str | None = None    # fp16 | fp32 (None: the config's)
    vae_precision: str | None = None  # the VAE's: fp16 | fp32 (None: the config's; fp32 unless it says otherwise)
    ort_cuda: bool = False          # write the ONNX Runtime CUDA fused variants


@dataclass(frozen=True)
class BenchPreset:
    model: str                                   # prepare.model_dicts kind: tiny | sd15 | ...
    export: ExportSettings = field(default_factory=ExportSettings)
    # defaults for the command's options (None: the command's own default)
    sides: tuple[str, ...] | None = None         # plain runs only: --levers / --tuning keep their own sides
    batch: tuple[int, ...] | None = field(default=None, metadata=bounds(1, MAX_BATCH))   # plain runs only
    steps: int | None = field(default=None, metadata=bounds(1, 10_000))
    height: int | None = field(default=None, metadata=bounds(8, MAX_IMAGE_SIDE))
    width: int | None = field(default=None, metadata=bounds(8, MAX_IMAGE_SIDE))
    warmup: int | None = field(default=None, metadata=bounds(0))
    repeats: int | None = field(default=None, metadata=bounds(1))
    budget: float | None = field(default=None, metadata=bounds(0))
    component_warmup: int | None = field(default=None, metadata=bounds(0))
    component_repeats: int | None = field(default=None, metadata=bounds(1))
    compile_budget: float | None = field(default=None, metadata=bounds(0))
    side_timeout: float | None = field(default=None, metadata=bounds(1))
    time_limit: float | None = field(default=None, metadata=bounds(1))
    device: str | None = None                    # torch sides: auto | cuda | cpu
    note: str = ""

    def options(self) -> dict:
        """The command-option defaults this preset sets: {argparse dest: value}."""
        values = {n: getattr(self, n) for n in OPTIONS}
        if values["batch"] is not None:
            values["batch"] = list(values["batch"])
        return {k: v for k, v in values.items() if v not in (None, "")}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> BenchPreset:
    """A shipped preset by name (presets/NAME.yaml) or a YAML file of the same keys."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESETS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UsageError(f"unknown bench preset {name_or_path!r}",
                             hint=f"choose one of {', '.join(preset_names())} or pass a YAML file")
    return configfile.load(BenchPreset, configfile.read_mapping(path, "bench preset"), f"bench preset {path}")
