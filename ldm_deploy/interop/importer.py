"""`import_onnx_folder`: an Optimum / Hub ONNX Stable Diffusion folder -> a verified ldm-deploy artifact.

Needs `onnx` (the [train] extra) and onnxruntime; no torch. Per component: load the graph (with its
external data: Optimum's `model.onnx_data`, the Hub's `weights.pb`), add the adapter nodes of
`adapt.py`, save it (weights inline, or in one `model.onnx.data` above 2 GB), run the ONNX checker
and one ORT CPU run at the profile's opt shapes (finite outputs). The manifest gets the hashes, the
graphs' own IO, profiles derived from their input shapes, the scheduler and tokenizer configs and,
per component, the list of added nodes. The folder is built beside `out` and renamed into place.

    result = import_onnx_folder("sd15-optimum", "out/sd15")   # then Pipeline.from_artifact("out/sd15")
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm_deploy.artifact import (
    ARTIFACT_OUTPUT, FORMAT, FORMAT_VERSION, Artifact, ModelInfo, is_artifact, profiles_digest,
)
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.flops import vae_scale_factor
from ldm_deploy.fileio import atomic_dir, check_free_space, check_out_dir, write_json
from ldm_deploy.interop.layout import GRAPH_PARTS, onnx_layout

log = logging.getLogger(__name__)

TEXT_LENGTH = 77
DEFAULT_BATCH = (1, 1, 4)
SD_SCALING_FACTOR = 0.18215     # what OnnxStableDiffusionPipeline hard-codes when vae config is absent


@dataclass
class ImportResult:
    path: Path
    cached: bool
    artifact: Artifact
    seconds: float
    skipped: dict            # component -> why it was left out


@dataclass(frozen=True)
class _Folder:
    path: Path
    layout: str
    index: dict
    configs: dict            # "unet" / "vae" / "text_encoder" -> config.json dict (or None)
    scheduler: dict
    tokenizer_dir: Path


def read_folder(src) -> _Folder:
    src = Path(src)
    if not src.is_dir():
        raise LdmError(f"{src} is not a folder")
    if is_artifact(src):
        raise UsageError(f"{src} is already an ldm-deploy artifact", hint="use it directly; import is for "
                         "Optimum / Hub ONNX folders")
    layout = onnx_layout(src)
    if layout is None:
        hint = ("it looks like a diffusers PyTorch folder: use `ldm-deploy export` instead"
                if (src / "unet" / "config.json").is_file() else
                "import expects model_index.json and unet/model.onnx, text_encoder/model.onnx, vae_decoder/model.onnx")
        raise LdmError(f"{src} is not an ONNX Stable Diffusion folder (no model_index.json beside "
                       "<part>/model.onnx)", hint=hint)
    sched = _json(src / "scheduler" / "scheduler_config.json")
    if sched is None:
        raise LdmError(f"{src} has no scheduler/scheduler_config.json", hint="the artifact needs the scheduler config")
    tok = src / "tokenizer"
    if not tok.is_dir() or not any((tok / n).is_file() for n in ("vocab.json", "tokenizer.json")):
        raise LdmError(f"{src} has no tokenizer/ folder with vocab.json or tokenizer.json",
                       hint="the artifact needs the tokenizer files")
    configs = {"unet": _json(src / "unet" / "config.json"),
               "vae": _json(src / "vae_decoder" / "config.json") or _json(src / "vae_encoder" / "config.json"),
               "text_encoder": _json(src / "text_encoder" / "config.json")}
    return _Folder(src, layout, _json(src / "model_index.json") or {}, configs, sched, tok)


def import_onnx_folder(src, out, *, components=None, batch=None, height=None, width=None,
                       force: bool = False) -> ImportResult:
    """Import `src` into the artifact folder `out`; batch/height/width are (min, opt, max) or None (derived)."""
    try:
        import onnx  # noqa: F401 - only to refuse early, with the fix, when it is missing
    except ImportError:
        raise LdmError("`ldm-deploy import` needs the onnx package",
                       hint="pip install 'ldm-deploy[train]' (or just `pip install onnx`; torch is not needed)") from None

    from ldm_deploy.export import manifest as mf

    start = time.perf_counter()
    folder = read_folder(src)
    from ldm_deploy.paths import check_tree

    check_tree(folder.path)   # hashed and read below: no link out of it, no FIFO / device (which would hang)
    out = Path(out)
    wanted = _wanted_components(folder, out, components)
    # a folder we did not write is refused before the source is hashed and its graphs are read
    check_out_dir(out, ARTIFACT_OUTPUT, inputs=[folder.path], force=force)
    source_sha = _folder_sha256(folder.path)
    graphs, skipped = _adapted_graphs(folder, wanted, optional_encoder=components is None)
    profiles = _profiles(folder, graphs, batch, height, width)
    settings = {"layout": folder.layout, "components": list(graphs), "profiles": profiles}
    if not force and is_artifact(out):
        cached = _cached(out, source_sha, settings)
        if cached is not None:
            return ImportResult(out, True, cached, time.perf_counter() - start, skipped)
    check_free_space(out.parent if out.parent.exists() else Path.cwd(),
                     sum(p.stat().st_size for p in folder.path.rglob("*") if p.is_file()) + (64 << 20), "the import")

    f = _vae_scale_factor(folder)
    with atomic_dir(out, ARTIFACT_OUTPUT, inputs=[folder.path], force=force) as tmp:
        entries = {c: _write_component(tmp, c, adapted, folder, profiles, f) for c, adapted in graphs.items()}
        tokenizer = mf.copy_tokenizer(folder.tokenizer_dir, tmp / "tokenizer")
        write_json(tmp / "scheduler" / "scheduler_config.json", folder.scheduler)
        mf.write_manifest(tmp, _manifest(tmp, folder, source_sha, entries, tokenizer, profiles, settings, skipped))
    artifact = Artifact.open(out, verify=False)
    seconds = time.perf_counter() - start
    log.info("imported %s (%s layout) -> %s in %.1f s", folder.path, folder.layout, out, seconds)
    return ImportResult(out, False, artifact, seconds, skipped)


def _wanted_components(folder: _Folder, out: Path, components) -> list[str]:
    """The components to import (default: every graph present); refuses an `out` inside the source, an unknown
    name, and a folder without the three text-to-image graphs."""
    if out.resolve() == folder.path.resolve() or folder.path.resolve() in out.resolve().parents:
        raise UsageError(f"--out {out} is the source folder or inside it", hint="write the artifact elsewhere")
    present = [c for c in GRAPH_PARTS if (folder.path / c / "model.onnx").is_file()]
    wanted = list(components or present)
    unknown = [c for c in wanted if c not in GRAPH_PARTS]
    if unknown:
        raise UsageError(f"unknown components {unknown}; choose from {', '.join(GRAPH_PARTS)}")
    missing = [c for c in wanted if c not in present] + \
        [c for c in ("text_encoder", "unet", "vae_decoder") if c not in wanted and components is None]
    if missing:
        raise LdmError(f"{folder.path} lacks {', '.join(sorted(set(missing)))}/model.onnx",
                       hint="text-to-image needs text_encoder, unet and vae_decoder")
    return wanted


def _adapted_graphs(folder: _Folder, wanted: list[str], optional_encoder: bool) -> tuple[dict, dict]:
    """The graphs in without their weights, adapted (the weights are read only when the artifact is written):
    ({component: Adapted}, {component left out: why}). Only an optional vae_encoder may be left out."""
    import onnx

    from ldm_deploy.interop.adapt import adapt

    graphs, skipped = {}, {}
    for c in wanted:
        try:
            model = onnx.load(str(folder.path / c / "model.onnx"), load_external_data=False)
        except Exception as e:  # protobuf DecodeError, missing external data, ...
            raise LdmError(f"{folder.path / c / 'model.onnx'} is not a readable ONNX graph "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:200]})",
                           hint="re-download or re-export the folder") from None
        try:
            graphs[c] = adapt(c, model)
        except LdmError as e:
            if c == "vae_encoder" and optional_encoder:   # optional: txt2img works without it
                skipped[c] = str(e)
                log.warning("vae_encoder left out (img2img unavailable): %s", e)
                continue
            raise LdmError(f"{folder.path / c / 'model.onnx'}: {e}") from None
    return graphs, skipped


def _write_component(tmp: Path, c: str, adapted, folder: _Folder, profiles: dict, f: int) -> dict:
    """Write one adapted graph with its weights into the artifact being built, check and run it once; its
    manifest entry."""
    import onnx

    from ldm_deploy.export import manifest as mf
    from ldm_deploy.export import onnx_io

    path = tmp / c / "model.onnx"
    _check_external_locations(adapted.model, folder.path / c)
    try:   # external weights (Optimum's model.onnx_data, the Hub's weights.pb) join the graph here
        onnx.load_external_data_for_model(adapted.model, str(folder.path / c))
    except (OSError, ValueError) as e:
        raise LdmError(f"cannot read the external weights of {folder.path / c / 'model.onnx'}: {e}",
                       hint="re-download the folder; every file the graph names must be beside it") from None
    data = onnx_io.save_model(adapted.model, path)
    onnx_io.check_model(path)
    ins, outs = mf.graph_io(path)
    profile = _component_profile(c, ins, profiles, f)
    _smoke_run(path, c, {name: shapes["opt"] for name, shapes in profile.items()}, folder)
    log.info("%s: %s", c, "; ".join(adapted.added) or "used as is")
    return {
        "file": f"{c}/model.onnx", "external_data": f"{c}/{data.name}" if data else None,
        "precision": "fp16" if any(t["dtype"] == "float16" for t in ins + outs) else "fp32",
        "inputs": ins, "outputs": outs, "batch_multiplier": 2 if c == "unet" else 1,
        "profile": profile,
        "import": {"file": f"{c}/model.onnx", "added": adapted.added},
    }


# --- metadata -------------------------------------------------------------------------------------------
def _manifest(root: Path, folder: _Folder, source_sha: str, entries: dict, tokenizer: dict, profiles: dict,
              settings: dict, skipped: dict) -> dict:
    from ldm_deploy.export import manifest as mf

    unet_in = {t["name"]: t for t in entries["unet"]["inputs"]} if "unet" in entries else {}
    vae = folder.configs["vae"] or {}
    channels = (unet_in.get("sample") or {}).get("shape", [None, None])[1]
    if not isinstance(channels, int):
        channels = int((folder.configs["unet"] or {}).get("in_channels", vae.get("latent_channels", 4)))
    info = ModelInfo(folder.scheduler, scaling_factor=float(vae.get("scaling_factor", SD_SCALING_FACTOR)),
                     prediction_type=folder.scheduler.get("prediction_type", "epsilon"), latent_channels=channels,
                     vae_scale_factor=_vae_scale_factor(folder))
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {"path": str(folder.path.resolve()), "sha256": source_sha},
        "precision": entries.get("unet", next(iter(entries.values())))["precision"],
        "model": folder.configs,
        **info.manifest_fields(),        # the names Artifact reads back
        "scheduler": folder.scheduler,
        "tokenizer": tokenizer,
        "profiles": profiles,
        "components": entries,
        "files": mf.file_hashes(root),
        "tools": mf.tool_versions(),
        "import": {**settings, "pipeline": folder.index.get("_class_name"),
                   "diffusers_version": folder.index.get("_diffusers_version"), "skipped": skipped},
    }
    manifest["profiles_sha256"] = profiles_digest(manifest)   # the profiles' integrity, as export's manifests
    return manifest


def _check_external_locations(model, folder: Path) -> None:
    """Every external-data `location` a graph names (Optimum's model.onnx_data, the Hub's weights.pb) is a
    regular file inside the graph's own folder: no absolute path, no `..`, no link out (paths.inside)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from ldm_deploy.paths import inside_file

    seen = set()
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location not in seen:
            seen.add(location)
            inside_file(folder, location, named_in=folder / "model.onnx",
                        hint="re-download the folder; a graph's external weights must lie beside it")


def _vae_scale_factor(folder: _Folder) -> int:
    return vae_scale_factor(folder.configs["vae"])


def _profiles(folder: _Folder, graphs: dict, batch, height, width) -> dict:
    """Image-space ranges: the graphs' static sizes where they have them, else the given or a default
    range around the native size (U-Net sample_size x VAE scale factor, what diffusers defaults to)."""
    f = _vae_scale_factor(folder)
    static = {}
    if "unet" in graphs:
        sample = next(v for v in graphs["unet"].model.graph.input if v.name == "sample")
        dims = sample.type.tensor_type.shape.dim
        static = {"height": dims[2].dim_value * f or None, "width": dims[3].dim_value * f or None}
    size = (folder.configs["unet"] or {}).get("sample_size", 64)
    native = (size[0] if isinstance(size, (list, tuple)) else int(size)) * f
    out = {"batch": _range("batch", batch or DEFAULT_BATCH, 1)}
    for what, given in (("height", height), ("width", width)):
        fixed = static.get(what)
        if fixed and given and tuple(given) != (fixed,) * 3:
            raise UsageError(f"the graphs have a static {what} of {fixed}; --{what} {given} does not fit it")
        rng = (fixed,) * 3 if fixed else given or (max(f, native // 2 // f * f), native, native * 2)
        out[what] = _range(what, rng, f)
    return out


def _range(what: str, rng, multiple: int) -> dict:
    from ldm_deploy import limits

    lo, opt, hi = (int(v) for v in rng)
    if not 1 <= lo <= opt <= hi:
        raise UsageError(f"{what} range {lo}:{opt}:{hi} needs 1 <= min <= opt <= max")
    top = limits.MAX_BATCH if what == "batch" else limits.MAX_IMAGE_SIDE
    if hi > top:
        raise UsageError(f"{what} range {lo}:{opt}:{hi}: max {hi} is over ldm-deploy's limit of {top}",
                         hint=f"give a {what} max of at most {top}")
    bad = [v for v in (lo, opt, hi) if v % multiple]
    if bad:
        raise UsageError(f"{what} values {bad} are not multiples of the VAE scale factor {multiple}")
    return {"min": lo, "opt": opt, "max": hi}


def _component_profile(component: str, inputs: list[dict], profiles: dict, f: int) -> dict:
    """Concrete min/opt/max shapes per input (the engine builder's optimization profile)."""
    out = {}
    for k in ("min", "opt", "max"):
        b, h, w = (profiles[x][k] for x in ("batch", "height", "width"))
        for t in inputs:
            shape = list(t["shape"])
            n = 2 * b if component == "unet" else b
            if t["name"] == "input_ids":
                concrete = [n, TEXT_LENGTH]
            elif t["name"] == "timestep":
                concrete = [n]
            elif t["name"] == "encoder_hidden_states":
                concrete = [n, TEXT_LENGTH, shape[2]]
            elif t["name"] == "image":
                concrete = [n, 3, h, w]
            else:                                   # sample / latent
                concrete = [n, shape[1], h // f, w // f]
            out.setdefault(t["name"], {})[k] = concrete
    return out


def _smoke_run(path: Path, component: str, shapes: dict, folder: _Folder) -> None:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs = sess.run(None, random_inputs(sess, shapes, folder))
    except Exception as e:  # ORT raises its own types
        raise LdmError(f"the imported {component} graph does not run on ONNX Runtime CPU: "
                       f"{' '.join(str(e).split())[:300]}", hint="report this with the folder's origin") from None
    bad = sum(int(np.size(o) - np.count_nonzero(np.isfinite(o))) for o in outs)
    if bad:
        raise LdmError(f"the imported {component} graph gives {bad} non-finite values on random inputs",
                       hint="an fp16 VAE overflows: import a folder with an fp32 VAE")


def random_inputs(sess, shapes: dict, folder: _Folder | None = None, seed: int = 0) -> dict:
    """Random inputs in each input's natural range, typed as the session declares."""
    rng = np.random.default_rng(seed)
    vocab = int(((folder.configs["text_encoder"] if folder else None) or {}).get("vocab_size", 1000))
    feed = {}
    for i in sess.get_inputs():
        shape = tuple(shapes[i.name])
        if i.name == "input_ids":
            a = rng.integers(0, vocab, size=shape)
        elif i.name == "timestep":
            a = np.full(shape, rng.uniform(0, 999))            # one timestep for every row, as the pipeline
        elif i.name == "image":
            a = rng.uniform(-1, 1, size=shape)
        else:
            a = rng.standard_normal(shape)
        feed[i.name] = a.astype({"tensor(int32)": np.int32, "tensor(int64)": np.int64,
                                 "tensor(float16)": np.float16}.get(i.type, np.float32))
    return feed


def _cached(out: Path, source_sha: str, settings: dict) -> Artifact | None:
    try:
        artifact = Artifact.open(out, verify=True)
    except LdmError:
        return None
    same = artifact.source_sha256 == source_sha and \
        {k: (artifact.imported or {}).get(k) for k in settings} == settings
    return artifact if same else None


def _folder_sha256(folder: Path) -> str:
    """sha256 over the folder's files' relative paths and contents."""
    from ldm_deploy.export.manifest import file_hashes

    return hashlib.sha256(json.dumps(file_hashes(folder), sort_keys=True).encode()).hexdigest()


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LdmError(f"{path} is not valid JSON: {e}") from None
    return d if isinstance(d, dict) else None
