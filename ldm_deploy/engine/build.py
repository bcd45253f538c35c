"""Build one TensorRT engine per exported component, rebuilding only what changed.

    report = build_engines("out/tiny", "out/tiny-trt", BuildConfig(opt_level=0))

Profiles come from the artifact manifest ("profiles": batch/height/width in images): a component's
batch dimension runs from `batch.min` to `batch_multiplier * batch.max` (2B for the CFG U-Net, B
for the VAE; each can be capped), height/width are static or ranged as exported (latent dims are
the image dims / vae_scale_factor). Precision follows the ONNX types (a strongly typed network)
unless --precision asks otherwise (data-centre TensorRT only: a weakly typed network with that
precision allowed). Each engine gets a sidecar (see sidecar.py); engine and sidecar are written
atomically, engine first, so a crash never leaves a sidecar describing the wrong bytes.

TensorRT for RTX builds ahead of time for explicit target compute capabilities (recorded in the
sidecar key), never for "the current GPU". On a host whose GPU it cannot run on (a 9.0 H100/H200),
each build runs in a child process with that GPU hidden (CUDA_VISIBLE_DEVICES=""), exactly as on a
GPU-less build machine, so the local device never takes part. ONNX graphs are parsed by path, so
weights in an external-data file beside the graph (> 2 GB, SD 1.5's U-Net) are found.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import ldm_deploy
from ldm_deploy import configfile
from ldm_deploy.artifact import COMPONENTS, MANIFEST, Artifact, ComponentSpec
from ldm_deploy.configfile import bounds
from ldm_deploy.engine import refit
from ldm_deploy.engine import sidecar as sc
from ldm_deploy.engine import trt_api
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.fileio import atomic_file, check_free_space, check_out_dir, sha256_file, write_json
from ldm_deploy.limits import MAX_BATCH

log = logging.getLogger("ldm_deploy")

PRECISIONS = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class BuildConfig:
    precision: str | None = None        # None: as the ONNX types dictate (strongly typed); fp16|bf16|fp32
    backend: str | None = None          # tensorrt | tensorrt-rtx; None: what is installed (trt_api.resolve_flavour)
    opt_level: int = 3                  # builder optimization level 0 (fast build) .. 5 (slowest, best)
    workspace_mb: int | None = field(default=None, metadata=bounds(1))  # workspace memory pool limit; None: TensorRT's default (device memory)
    timing_cache: str | None = None     # file read before and written after each build (tensorrt only)
    targets: tuple[str, ...] = ()       # TensorRT for RTX compute capabilities ("8.6", "12.0"); (): portable default
    components: tuple[str, ...] = ()    # (): every component in the manifest
    unet_max_batch: int | None = field(default=None, metadata=bounds(1, 2 * MAX_BATCH))  # cap on the U-Net batch (default 2 * batch.max under CFG)
    vae_max_batch: int | None = field(default=None, metadata=bounds(1, MAX_BATCH))  # cap on the VAE decoder/encoder batch (default batch.max)
    batch: dict | None = None           # {min, opt, max} images, narrows the manifest's profile
    height: dict | None = None          # {min, opt, max} pixels, narrows the manifest's profile
    width: dict | None = None           # {min, opt, max} pixels, narrows the manifest's profile
    force: bool = False                 # rebuild even when up to date; write into an --out that holds no engines
    verbose: bool = False               # TensorRT's verbose log

    def __post_init__(self):
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if not 0 <= self.opt_level <= 5:
            raise UsageError(f"opt_level must be 0..5, not {self.opt_level}")
        for name in self.components:
            if name not in COMPONENTS:
                raise UsageError(f"unknown component {name!r}; choose from {', '.join(COMPONENTS)}")
        object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
        object.__setattr__(self, "components", tuple(self.components))

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "BuildConfig":
        if isinstance(d, dict) and isinstance(d.get("targets"), (list, tuple)):
            d = {**d, "targets": [str(t) for t in d["targets"]]}   # YAML reads `8.6` as a number
        return configfile.load(cls, d, where, kind="build config", error=UsageError)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "BuildConfig":
        return cls.from_dict(configfile.read_mapping(path, "build config"), f"build config {path}")


@dataclass
class ComponentResult:
    component: str
    status: str               # "built" | "cached"
    reason: str               # why it was (re)built, or "up to date"
    seconds: float            # build time (0 when cached)
    engine_bytes: int
    engine: Path


@dataclass
class BuildReport:
    engine_dir: Path
    flavour: str
    tensorrt_version: str
    results: list[ComponentResult] = field(default_factory=list)

    @property
    def built(self) -> list[str]:
        return [r.component for r in self.results if r.status == "built"]


# ----------------------------------------------------------------------------- profiles (pure)

def _range(spec: dict, what: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = int(spec["min"]), int(spec["opt"]), int(spec["max"])
    except (KeyError, TypeError, ValueError):
        raise LdmError(f"profile {what} must have integer min/opt/max, got {spec!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise LdmError(f"profile {what} must satisfy 1 <= min <= opt <= max, got {spec!r}")
    return lo, opt, hi


def _narrow(base: tuple[int, int, int], override: dict | None, what: str) -> tuple[int, int, int]:
    if override is None:
        return base
    lo, opt, hi = _range(override, what)
    if lo < base[0] or hi > base[2]:
        raise UsageError(f"build profile {what} {lo}..{hi} is outside the exported range {base[0]}..{base[2]}",
                         hint="re-export with a wider profile, or narrow the build profile")
    return lo, opt, hi


def component_profile(artifact: Artifact, component: str, config: BuildConfig) -> dict[str, dict[str, list[int]]]:
    """Input name -> {"min", "opt", "max"} shapes of `component`'s optimization profile."""
    prof = artifact.profiles
    entry = artifact.component(component)
    batch = _narrow((prof.batch.min, prof.batch.opt, prof.batch.max), config.batch, "batch")
    height = _narrow((prof.height.min, prof.height.opt, prof.height.max), config.height, "height")
    width = _narrow((prof.width.min, prof.width.opt, prof.width.max), config.width, "width")
    f = artifact.vae_scale_factor
    mult = entry.batch_multiplier
    b_lo, b_opt, b_hi = batch[0], mult * batch[1], mult * batch[2]
    cap = config.unet_max_batch if component == "unet" else config.vae_max_batch if component.startswith("vae") else None
    if cap is not None:
        if cap < b_lo:
            raise UsageError(f"{component} max batch {cap} is below the profile's min batch {b_lo}")
        b_hi, b_opt = min(b_hi, cap), min(b_opt, cap)
    for dim, (lo, _, hi) in {"height": height, "width": width}.items():
        if lo % f or hi % f:
            raise LdmError(f"profile {dim} {lo}..{hi} is not a multiple of the VAE scale factor {f}")
    ranges = {
        "batch": (b_lo, b_opt, b_hi),
        "height": height, "width": width,
        "latent_height": tuple(v // f for v in height), "latent_width": tuple(v // f for v in width),
    }
    out = {}
    for spec in entry.inputs:
        dims = [_dim_range(d, ranges, component, spec.name) for d in spec.shape]
        out[spec.name] = {k: [d[i] for d in dims] for i, k in enumerate(("min", "opt", "max"))}
    return out


def _dim_range(dim, ranges: dict, component: str, name: str) -> tuple[int, int, int]:
    if isinstance(dim, int):
        return dim, dim, dim
    key = str(dim).lower()
    if "batch" in key:
        return ranges["batch"]
    for label in ("latent_height", "latent_width", "height", "width"):
        if key == label or key.endswith("_" + label) or key.startswith(label):
            return ranges[label]
    raise LdmError(f"{component} input {name!r} has a dimension {dim!r} the builder cannot size "
                   "(expected an integer or a batch/height/width/latent_height/latent_width name)",
                   hint="re-export the artifact with ldm-deploy export")


def component_precision(artifact: Artifact, component: str) -> str:
    return artifact.component(component).precision or artifact.precision


# ----------------------------------------------------------------------------- keys and sidecars

def _onnx_identity(artifact_dir: Path, entry: ComponentSpec, files: dict) -> dict:
    onnx_file = artifact_dir / entry.file
    if not onnx_file.is_file():
        raise LdmError(f"{onnx_file} is missing", hint="re-export the artifact with ldm-deploy export")
    ident = {"file": entry.file, "sha256": sha256_file(onnx_file), "external_data": None}
    recorded = files.get(entry.file)
    if recorded is not None and recorded != ident["sha256"]:
        raise LdmError(f"artifact file {entry.file} in {artifact_dir} does not match its sha256 in "
                       f"{MANIFEST} (modified or corrupted)", hint="re-run the export")
    ext = entry.external_data
    if ext:
        ext_file = onnx_file.parent / ext if not (artifact_dir / ext).is_file() else artifact_dir / ext
        if not ext_file.is_file():
            raise LdmError(f"{ext_file} (external data of {entry.file}) is missing",
                           hint="re-export the artifact with ldm-deploy export")
        ident["external_data"] = {"file": str(ext_file.relative_to(artifact_dir)), "sha256": sha256_file(ext_file)}
    return ident


def _targets(trt, flavour: str, config: BuildConfig, gpu) -> tuple[list[str], str]:
    """(compute capabilities the engine will run on, GPU name or NO_GPU)."""
    gpu_name = gpu.name if gpu is not None else sc.NO_GPU
    if flavour == "tensorrt":
        if gpu is None:
            raise LdmError("TensorRT (data-centre) builds need a CUDA GPU and none was found",
                           hint="build on the target GPU, or use --backend tensorrt-rtx, which builds on a CPU")
        if config.targets and list(config.targets) != [gpu.cc]:
            raise UsageError(f"TensorRT builds for the GPU it runs on ({gpu.name}, {gpu.cc}); "
                             f"--targets {','.join(config.targets)} needs TensorRT for RTX")
        return [gpu.cc], gpu_name
    known = trt_api.rtx_targets(trt)
    if not config.targets:
        return trt_api.rtx_default_targets(trt), gpu_name
    bad = [t for t in config.targets if t not in known]
    if bad:
        raise UsageError(f"TensorRT for RTX {trt_api.version(trt)} cannot target compute capability "
                         f"{', '.join(bad)}; it supports {', '.join(known)}")
    return sorted(set(config.targets), key=lambda c: tuple(map(int, c.split(".")))), gpu_name


def _rebuild_command(artifact_dir: Path, engine_dir: Path, flavour: str, config: BuildConfig,
                     config_file: str | None) -> str:
    parts = ["ldm-deploy build", str(artifact_dir), "--out", str(engine_dir), "--backend", flavour]
    if config_file:
        parts += ["--config", str(config_file)]
    if config.precision:
        parts += ["--precision", config.precision]
    if config.opt_level != BuildConfig.opt_level:
        parts += ["--opt-level", str(config.opt_level)]
    if config.workspace_mb is not None:
        parts += ["--workspace-mb", str(config.workspace_mb)]
    if config.targets:
        parts += ["--targets", ",".join(config.targets)]
    for flag, value in (("--unet-max-batch", config.unet_max_batch), ("--vae-max-batch", config.vae_max_batch),
                        ("--timing-cache", config.timing_cache)):
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(parts)


# ----------------------------------------------------------------------------- the build

def build_engines(artifact_dir: str | Path, engine_dir: str | Path, config: BuildConfig = BuildConfig(),
                  *, config_file: str | None = None) -> BuildReport:
    """Build (or reuse) one engine per component of the artifact at `artifact_dir` into `engine_dir`."""
    artifact_dir = Path(artifact_dir).resolve()
    # structure-checked; hashes are checked per component, once, when the builder hashes each ONNX it builds from
    artifact = Artifact(artifact_dir, verify=False)
    # ARTIFACT/engines is the documented place for engines, the one folder inside the input allowed
    engine_dir = check_out_dir(engine_dir, sc.ENGINES_OUTPUT, inputs=[artifact_dir], force=config.force,
                               allow_inside=[artifact_dir / "engines"])
    trt = trt_api.load_trt(config.backend)
    flavour, version = trt_api.flavour_of(trt), trt_api.version(trt)
    from ldm_deploy.runtime.cuda import gpu_info  # noqa: PLC0415
    gpu = gpu_info()
    targets, gpu_name = _targets(trt, flavour, config, gpu)
    isolate = flavour == "tensorrt-rtx" and gpu is not None and not trt_api.supports_cc(
        flavour, gpu.compute_capability, trt)
    if isolate:
        log.info(f"TensorRT for RTX cannot run on the local {gpu.name} (compute capability {gpu.cc}); building "
                 f"ahead of time for {', '.join(targets)} in a child process with the GPU hidden")
    components = config.components or tuple(c for c in COMPONENTS if c in artifact.components)
    missing = [c for c in components if c not in artifact.components]
    if missing:
        raise UsageError(f"the artifact has no component {', '.join(missing)}; it has {', '.join(artifact.components)}")
    if config.timing_cache and flavour == "tensorrt-rtx":
        log.warning("--timing-cache is ignored: TensorRT for RTX has no timing cache (it compiles kernels "
                    "at run time; the runner's runtime_cache option keeps them)")
    rebuild = _rebuild_command(artifact_dir, engine_dir, flavour, config, config_file)
    report = BuildReport(engine_dir, flavour, version)
    keys = {}  # every key (which hashes and checks every ONNX) before any engine is written
    for component in components:
        entry = artifact.component(component)
        onnx_precision = component_precision(artifact, component)
        precision = config.precision or onnx_precision
        strongly_typed = precision == onnx_precision
        if not strongly_typed and flavour == "tensorrt-rtx":
            raise UsageError(f"TensorRT for RTX builds strongly typed networks only: {component} is "
                             f"{onnx_precision} in the ONNX, so --precision {precision} cannot apply",
                             hint=f"re-export with --precision {precision}, or drop --precision")
        key = {
            "flavour": flavour, "tensorrt_version": version,
            "compute_capabilities": targets, "gpu": gpu_name,
            "profile": component_profile(artifact, component, config),
            "precision": precision, "strongly_typed": strongly_typed,
            "onnx": _onnx_identity(artifact_dir, entry, artifact.files),
            "build_options": {"opt_level": config.opt_level, "workspace_mb": config.workspace_mb},
        }
        refit_key = refit.refit_key(artifact_dir, entry, artifact.files)
        if refit_key:   # lora_switchable artifact: a refittable engine (engine/refit.py)
            key["refit"] = refit_key
        keys[component] = key
    for component, key in keys.items():
        entry = artifact.component(component)
        reason = _why_rebuild(engine_dir, component, key, config.force)
        if reason is None:
            size = sc.engine_path(engine_dir, component).stat().st_size
            log.info(f"{component}: up to date ({size / 2**20:.1f} MiB)")
            report.results.append(ComponentResult(component, "cached", "up to date", 0.0, size,
                                                  sc.engine_path(engine_dir, component)))
            continue
        log.info(f"{component}: building ({reason})")
        check_free_space(engine_dir, _engine_bytes_estimate(artifact_dir, entry), f"the {component} engine")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ldm-refit-") as work:
            onnx_path = artifact_dir / entry.file
            if key.get("refit"):
                onnx_path = refit.refittable_onnx(artifact_dir, entry, Path(work))
            if isolate:
                data = build_engine_isolated(flavour, onnx_path, key, config, component)
            else:
                data = build_engine(trt, onnx_path, key, config, component)
        seconds = time.perf_counter() - t0
        _write(engine_dir, component, data, key, entry, artifact_dir, seconds, rebuild, config)
        log.info(f"{component}: built in {seconds:.1f} s ({len(data) / 2**20:.1f} MiB)")
        report.results.append(ComponentResult(component, "built", reason, seconds, len(data),
                                              sc.engine_path(engine_dir, component)))
    return report


def _engine_bytes_estimate(artifact_dir: Path, entry: ComponentSpec) -> int:
    """Disk an engine needs: about its ONNX weights (plus external data), and some headroom."""
    files = [artifact_dir / entry.file] + ([artifact_dir / entry.external_data] if entry.external_data else [])
    return sum(f.stat().st_size for f in files if f.is_file()) + (16 << 20)


def _why_rebuild(engine_dir: Path, component: str, key: dict, force: bool) -> str | None:
    if force:
        return "forced"
    if not sc.sidecar_path(engine_dir, component).is_file():
        return "no engine yet"
    try:
        old = sc.read_sidecar(engine_dir, component)
        sc.read_engine(engine_dir, old)
    except LdmError as e:
        return f"existing engine unusable: {e}"
    changed = sc.key_differences(old["key"], key)
    return f"changed: {', '.join(changed)}" if changed else None


def _write(engine_dir: Path, component: str, data: bytes, key: dict, entry: ComponentSpec, artifact_dir: Path,
           seconds: float, rebuild: str, config: BuildConfig) -> None:
    engine_file = sc.engine_path(engine_dir, component)
    # the old sidecar goes first: a kill between the engine's rename and the new sidecar's must not leave a
    # sidecar describing other bytes (an engine without a sidecar is "no engine yet" and gets rebuilt)
    sc.sidecar_path(engine_dir, component).unlink(missing_ok=True)
    with atomic_file(engine_file) as f:
        f.write(data)
    write_json(sc.sidecar_path(engine_dir, component), {
        "format": sc.FORMAT, "format_version": sc.FORMAT_VERSION,
        "component": component,
        "engine": {"file": engine_file.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        "key": key,
        "io": {"inputs": [t.to_dict() for t in entry.inputs], "outputs": [t.to_dict() for t in entry.outputs],
               "batch_multiplier": entry.batch_multiplier},
        "artifact": str(artifact_dir),
        "build": {"seconds": round(seconds, 3), "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "ldm_deploy": ldm_deploy.__version__, "timing_cache": config.timing_cache},
        "rebuild": rebuild,
    })


def build_engine(trt, onnx_path: Path, key: dict, config: BuildConfig, component: str) -> bytes:
    """Parse `onnx_path` and build a serialized engine for the profile and options in `key`."""
    logger = trt_api.make_logger(trt, config.verbose)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if key["strongly_typed"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise LdmError(f"TensorRT cannot parse {onnx_path}: {errors}",
                       hint="check the export with ldm-deploy validate; the op may be unsupported by this TensorRT")
    bcfg = builder.create_builder_config()
    bcfg.builder_optimization_level = config.opt_level
    if config.workspace_mb is not None:
        bcfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    if not key["strongly_typed"] and key["precision"] in ("fp16", "bf16"):
        bcfg.set_flag(getattr(trt.BuilderFlag, key["precision"].upper()))
    if key.get("refit"):
        log.info("%s: refittable (%s weights)", component,
                 refit.mark_refittable(trt, network, bcfg, key["refit"]["names"]))
    if key["flavour"] == "tensorrt-rtx":
        targets = trt_api.rtx_targets(trt)
        bcfg.num_compute_capabilities = len(key["compute_capabilities"])
        for i, cc in enumerate(key["compute_capabilities"]):
            bcfg.set_compute_capability(targets[cc], i)
    profile = builder.create_optimization_profile()
    for name, shapes in key["profile"].items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    bcfg.add_optimization_profile(profile)
    cache_file = Path(config.timing_cache) if config.timing_cache and key["flavour"] == "tensorrt" else None
    if cache_file is not None:
        cache = bcfg.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        bcfg.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt, component)
    if monitor is not None:
        bcfg.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, bcfg)
    if serialized is None and key.get("refit"):
        raise LdmError(f"TensorRT failed to build the refittable {component} engine (see the TensorRT errors above)",
                       hint="TensorRT for RTX 1.7 builds refittable engines only on the target GPU (on CPU its "
                            "Myelin compiler fails); build there, or switch LoRAs on ort-cpu / ort-cuda, or merge "
                            "them at export (export --lora)")
    if serialized is None:
        raise LdmError(f"TensorRT failed to build the {component} engine (see the TensorRT errors above)",
                       hint="try --verbose, a larger --workspace-mb, or a narrower profile")
    if cache_file is not None:
        with atomic_file(cache_file) as f:
            f.write(bytes(bcfg.get_timing_cache().serialize()))
    return bytes(serialized)


def build_engine_isolated(flavour: str, onnx_path: Path, key: dict, config: BuildConfig, component: str) -> bytes:
    """`build_engine` in a child process that sees no GPU (CUDA_VISIBLE_DEVICES=""), for TensorRT for
    RTX on a host whose GPU it does not support. Its log goes to this process's stdout/stderr."""
    with tempfile.TemporaryDirectory(prefix="ldm_trt_build_") as tmp:
        request, out = Path(tmp) / "request.json", Path(tmp) / "engine.bin"
        request.write_text(json.dumps({"flavour": flavour, "onnx": str(onnx_path), "key": key,
                                       "config": dataclasses.asdict(config), "component": component}))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        r = subprocess.run([sys.executable, "-m", "ldm_deploy.engine.build", str(request), str(out)], env=env)
        if r.returncode != 0 or not out.is_file():
            raise LdmError(f"the isolated TensorRT for RTX build of {component} failed (exit {r.returncode}; "
                           "its log is above)", hint="try --verbose, or build on a machine without this GPU")
        return out.read_bytes()


def _child_main(argv: list[str]) -> int:
    """`python -m ldm_deploy.engine.build REQUEST.json OUT.engine` (used by build_engine_isolated)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    request = json.loads(Path(argv[0]).read_text())
    try:
        trt = trt_api.load_trt(request["flavour"])
        config = BuildConfig.from_dict(request["config"])
        data = build_engine(trt, Path(request["onnx"]), request["key"], config, request["component"])
    except LdmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with atomic_file(Path(argv[1])) as f:
        f.write(data)
    return 0


def _progress_monitor(trt, component: str):
    """An IProgressMonitor logging the top two levels of build phases, when the module has one."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)
            self.depth: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self.depth[phase_name] = depth
            if depth <= 1:
                log.info(f"{component}: {'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            self.depth.pop(phase_name, None)

    return Monitor()


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
