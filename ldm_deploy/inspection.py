"""`inspect_path`: what an artifact folder, an engine folder, one .onnx file or a diffusers model folder holds.

Reads metadata only (manifest.json, engine sidecars, ONNX graph IO without its weights, safetensors
headers and config.json files): fast on SD-sized folders, and torch-free. Every path it reads from a
manifest or sidecar, and every file it looks at, must lie inside the folder (ldm_deploy.paths.inside),
as when the artifact is loaded: a path or link leading out is refused, never reported as present.

    info = inspect_path("out/sd15-onnx")     # {"kind": "artifact", ...}
    print(format_inspection(info))
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from ldm_deploy.artifact import FORMAT_VERSION, MANIFEST, is_artifact
from ldm_deploy.errors import LdmError
from ldm_deploy.interop.layout import GRAPH_PARTS, onnx_layout
from ldm_deploy.paths import inside

KINDS = ("artifact", "engines", "onnx", "model", "onnx-folder")


def inspect_path(path: str | Path) -> dict:
    """A JSON-ready description of `path`; `kind` says which of KINDS it is."""
    path = Path(path)
    if not path.exists():
        raise LdmError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".onnx":
            return inspect_onnx(path)
        if path.name == MANIFEST:
            return inspect_artifact(path.parent)
        if path.name.endswith(".engine") or path.name.endswith(".engine.json"):
            return inspect_engines(path.parent)
    elif is_artifact(path):
        return inspect_artifact(path)
    elif any(path.glob("*.engine.json")):
        return inspect_engines(path)
    elif onnx_layout(path):
        return inspect_onnx_folder(path)
    elif (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return inspect_model(path)
    raise LdmError(f"{path} is not an artifact folder, engine folder, .onnx file or diffusers model folder",
                   hint="point at a folder holding manifest.json, *.engine.json or model_index.json, or a .onnx file")


def inspect_artifact(root: Path) -> dict:
    from ldm_deploy.artifact import Artifact

    # the artifact's structure and paths checked as every reader's (no hashes; a missing file is reported, not refused)
    art = Artifact(root, verify=False, missing_ok=True)
    components = {}
    for name, c in art.components.items():
        variants = {"fp32": {"file": c.fp32_file}} if c.fp32_file else {}
        variants.update({k: {"file": v.file, "precision": v.precision, **({"fused_ops": dict(v.fused_ops)}
                                                                          if v.fused_ops else {})}
                         for k, v in c.variants.items()})          # e.g. "ort-cuda": ORT-fused graph for CUDA
        files = [f for f in (c.file, c.external_data) if f]
        files += [f for v in c.variants.values() for f in (v.file, v.external_data) if f]
        if c.fp32_file:
            files.append(c.fp32_file)
        files = list(dict.fromkeys(files))
        components[name] = {
            "file": c.file, "precision": c.precision, "bytes": _size(root, files),
            "missing_files": [f for f in files if not (root / f).is_file()],
            "inputs": [t.to_dict() for t in c.inputs], "outputs": [t.to_dict() for t in c.outputs],
            "batch_multiplier": c.batch_multiplier, "profile": c.profile,
            "export": {k: c.export[k] for k in ("exporter", "opset", "export_seconds") if k in c.export},
            "variants": variants,
        }
    imported = art.imported
    info = {
        "kind": "artifact", "path": str(root), "format_version": FORMAT_VERSION, "created": art.created,
        "precision": art.precision,
        "variants": sorted({v for c in components.values() for v in c["variants"]}),
        "source": {"path": None if art.source_path is None else str(art.source_path), "sha256": art.source_sha256},
        "profiles": art.profiles.to_dict(), "prediction_type": art.prediction_type,
        "scaling_factor": art.scaling_factor, "scheduler": art.scheduler_config.get("_class_name"),
        "components": components, "bytes": _size(root, list(art.files)), "tools": art.tools,
        "export_config": art.export_config.get("name"),
        "imported": {k: imported.get(k) for k in ("layout", "pipeline")} if imported else None,
    }
    if (root / "engines").is_dir() and any((root / "engines").glob("*.engine.json")):
        info["engines"] = inspect_engines(inside(root, "engines"))   # not a link out of the artifact
    return info


def inspect_engines(folder: Path) -> dict:
    engines = {}
    for sidecar in sorted(folder.glob("*.engine.json")):
        sidecar = inside(folder, sidecar.name)
        try:
            s = json.loads(sidecar.read_text(encoding="utf-8"))
        except ValueError as e:
            raise LdmError(f"engine sidecar {sidecar} is not valid JSON: {e}",
                           hint="rebuild the engines with `ldm-deploy build`") from None
        if not isinstance(s, dict):
            raise LdmError(f"engine sidecar {sidecar} is not a JSON object", hint="rebuild the engines with `ldm-deploy build`")
        key, engine = s.get("key") or {}, s.get("engine") or {}
        file = inside(folder, engine.get("file", sidecar.name[: -len(".json")]), named_in=sidecar,
                      hint="rebuild the engines with `ldm-deploy build`")
        engines[s.get("component", sidecar.name.split(".")[0])] = {
            "flavour": key.get("flavour"), "tensorrt_version": key.get("tensorrt_version"),
            "targets": key.get("compute_capabilities"), "gpu": key.get("gpu"), "precision": key.get("precision"),
            "strongly_typed": key.get("strongly_typed"), "profile": key.get("profile"),
            "onnx": {k: (key.get("onnx") or {}).get(k) for k in ("file", "sha256")},
            "bytes": engine.get("bytes"), "present": file.is_file() and file.stat().st_size == engine.get("bytes"),
            "build_seconds": (s.get("build") or {}).get("seconds"), "created": (s.get("build") or {}).get("created"),
            "rebuild": s.get("rebuild"),
        }
    return {"kind": "engines", "path": str(folder), "engines": engines}


def inspect_onnx(path: Path) -> dict:
    """Graph inputs/outputs (name, dtype, shape with symbolic dims), opset, node count; weights not loaded."""
    try:
        import onnx
    except ImportError:
        return _inspect_onnx_ort(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends
        raise LdmError(f"{path} is not a readable ONNX model: {e}") from None

    def spec(vi):
        t = vi.type.tensor_type
        shape = [d.dim_param or d.dim_value if (d.dim_param or d.HasField("dim_value")) else "?" for d in t.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}

    inits = {i.name for i in model.graph.initializer}
    external = sorted({e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"})
    return {"kind": "onnx", "path": str(path), "bytes": path.stat().st_size, "external_data": external,
            "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "producer": f"{model.producer_name} {model.producer_version}".strip(), "nodes": len(model.graph.node),
            "parameters": sum(math.prod(i.dims) for i in model.graph.initializer),
            "inputs": [spec(v) for v in model.graph.input if v.name not in inits],
            "outputs": [spec(v) for v in model.graph.output]}


def _inspect_onnx_ort(path: Path) -> dict:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise LdmError(f"{path} is not a loadable ONNX model: {e}") from None
    dt = lambda t: t.replace("tensor(", "").rstrip(")").replace("float", "float32").replace("float3216", "float16")  # noqa: E731
    spec = lambda a: {"name": a.name, "dtype": dt(a.type), "shape": list(a.shape)}  # noqa: E731
    return {"kind": "onnx", "path": str(path), "bytes": path.stat().st_size,
            "inputs": [spec(a) for a in sess.get_inputs()], "outputs": [spec(a) for a in sess.get_outputs()]}


def inspect_onnx_folder(root: Path) -> dict:
    """An Optimum / Hub ONNX pipeline folder: each part's graph IO, and the command that imports it."""
    index = _read_json(root / "model_index.json") or {}
    parts = {p: inspect_onnx(root / p / "model.onnx") for p in GRAPH_PARTS if (root / p / "model.onnx").is_file()}
    return {"kind": "onnx-folder", "path": str(root), "layout": onnx_layout(root), "pipeline": index.get("_class_name"),
            "diffusers_version": index.get("_diffusers_version"), "parts": parts,
            "parameters": sum(p.get("parameters", 0) for p in parts.values()),
            "bytes": sum(p["bytes"] for p in parts.values()),
            "import": f"ldm-deploy import {root} --out ARTIFACT"}


def inspect_model(root: Path) -> dict:
    """Per part: class, parameter count and dtypes from the safetensors headers, bytes, key config values."""
    from ldm_deploy import flops

    index = _read_json(inside(root, "model_index.json")) or {}
    parts = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        sub = inside(root, sub.name)   # a part folder linked from outside the model is refused
        config = _read_json(inside(sub, "config.json")) or _read_json(inside(sub, "scheduler_config.json"))
        weights = [inside(sub, w.name) for w in
                   sorted(sub.glob("*.safetensors")) + sorted(sub.glob("*.bin")) + sorted(sub.glob("*.ckpt"))]
        entry = {"class": (config or {}).get("_class_name") or ((config or {}).get("architectures") or [None])[0]
                 or (index.get(sub.name) or [None, None])[-1],
                 "files": [w.name for w in weights], "bytes": sum(w.stat().st_size for w in weights)}
        counts = [_safetensors_params(w) for w in weights if w.suffix == ".safetensors"]
        if counts:
            entry["parameters"] = sum(c[0] for c in counts)
            entry["dtypes"] = sorted({d for c in counts for d in c[1]})
        if config and sub.name.startswith("unet"):
            size = config.get("sample_size", 64)
            entry["gflops_per_call"] = round(flops.unet_flops(config, size, size) / 1e9, 3)
            entry["latent_size"] = size
        elif config and sub.name == "text_encoder":
            entry["gflops_per_call"] = round(flops.text_encoder_flops(config) / 1e9, 3)
        for key in ("block_out_channels", "cross_attention_dim", "latent_channels", "scaling_factor",
                    "hidden_size", "num_hidden_layers", "vocab_size", "prediction_type", "num_train_timesteps"):
            if config and key in config:
                entry.setdefault("config", {})[key] = config[key]
        parts[sub.name] = entry
    return {"kind": "model", "path": str(root), "pipeline": index.get("_class_name"),
            "diffusers_version": index.get("_diffusers_version"), "parts": parts,
            "parameters": sum(p.get("parameters", 0) for p in parts.values()),
            "bytes": sum(p["bytes"] for p in parts.values())}


def _safetensors_params(path: Path) -> tuple[int, set[str]]:
    """(parameter count, dtypes) from a .safetensors header: 8-byte little-endian length + JSON."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LdmError(f"{path} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise LdmError(f"{path} has a corrupt safetensors header: {e}") from None
    tensors = [v for k, v in header.items() if k != "__metadata__"]
    return sum(math.prod(t["shape"]) for t in tensors), {t["dtype"] for t in tensors}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LdmError(f"{path} is not valid JSON: {e}") from None


def _size(root: Path, files: list[str]) -> int:
    return sum(p.stat().st_size for p in (inside(root, f) for f in files) if p.is_file())


# --- text output -------------------------------------------------------------------------------------

def format_inspection(info: dict) -> str:
    return {"artifact": _fmt_artifact, "engines": _fmt_engines, "onnx": _fmt_onnx, "model": _fmt_model,
            "onnx-folder": _fmt_onnx_folder}[info["kind"]](info)


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def _io(specs: list[dict]) -> str:
    return ", ".join(f"{s['name']} {s['dtype']}[{', '.join(str(d) for d in s['shape'])}]" for s in specs)


def _fmt_artifact(a: dict) -> str:
    p = a.get("profiles") or {}
    ranges = "  ".join(f"{k} {v['min']}..{v['max']} (opt {v['opt']})" for k, v in p.items())
    src = a.get("source") or {}
    tools = ", ".join(f"{k} {v}" for k, v in (a.get("tools") or {}).items())
    lines = [f"artifact {a['path']}  (format {a['format_version']}, created {a['created']})",
             f"  precision {a['precision']}, scheduler {a['scheduler']}, prediction {a['prediction_type']}, "
             f"scaling {a['scaling_factor']}, export config {a['export_config']}, {_mb(a['bytes'])}",
             f"  source {src.get('path')}  sha256 {str(src.get('sha256'))[:16]}...",
             f"  profiles (images, B = prompts x images): {ranges}"]
    if a.get("imported"):
        lines.append(f"  imported from an ONNX folder ({a['imported']['layout']} layout, {a['imported']['pipeline']})")
    if a["variants"]:
        lines.append(f"  variants: {', '.join(a['variants'])}")
    for name, c in a["components"].items():
        extra = f", batch x{c['batch_multiplier']}" if c["batch_multiplier"] != 1 else ""
        missing = f"  MISSING {', '.join(c['missing_files'])}" if c["missing_files"] else ""
        lines.append(f"  {name}: {c['file']} ({c['precision']}, {_mb(c['bytes'])}{extra}){missing}")
        for v, d in c["variants"].items():
            lines.append(f"    variant {v}: {d.get('file')}" + (f" ({d['precision']})" if d.get("precision") else ""))
        lines.append(f"    in:  {_io(c['inputs'])}")
        lines.append(f"    out: {_io(c['outputs'])}")
    lines.append(f"  tools: {tools}")
    if "engines" in a:
        lines.append(_fmt_engines(a["engines"]))
    return "\n".join(lines)


def _fmt_engines(e: dict) -> str:
    lines = [f"engines {e['path']}"]
    for name, s in e["engines"].items():
        state = "" if s["present"] else "  (engine file missing or wrong size)"
        lines.append(f"  {name}: {s['flavour']} {s['tensorrt_version']}, targets {', '.join(s['targets'] or [])}, "
                     f"built on {s['gpu']}, {s['precision']}, {_mb(s['bytes'])}, "
                     f"onnx sha256 {str(s['onnx']['sha256'])[:12]}...{state}")
        for inp, shapes in (s["profile"] or {}).items():
            lines.append(f"    {inp}: min {shapes['min']} opt {shapes['opt']} max {shapes['max']}")
    return "\n".join(lines)


def _fmt_onnx(o: dict) -> str:
    lines = [f"onnx {o['path']} ({_mb(o['bytes'])}"
             + (f" + external {', '.join(o['external_data'])}" if o.get("external_data") else "") + ")"]
    if "opsets" in o:
        lines.append(f"  opsets {o['opsets']}, {o['nodes']} nodes, {o['parameters']:,} parameters, "
                     f"producer {o['producer']}")
    lines += [f"  in:  {_io(o['inputs'])}", f"  out: {_io(o['outputs'])}"]
    return "\n".join(lines)


def _fmt_onnx_folder(f: dict) -> str:
    lines = [f"ONNX pipeline folder {f['path']}  ({f['layout']} layout, {f['pipeline']}, diffusers "
             f"{f['diffusers_version']}): {f['parameters']:,} parameters, {_mb(f['bytes'])}",
             f"  not an ldm-deploy artifact: import it with `{f['import']}`"]
    for name, o in f["parts"].items():
        lines += [f"  {name}: opsets {o.get('opsets')}, {o.get('nodes')} nodes",
                  f"    in:  {_io(o['inputs'])}", f"    out: {_io(o['outputs'])}"]
    return "\n".join(lines)


def _fmt_model(m: dict) -> str:
    lines = [f"model {m['path']}  ({m['pipeline']}, diffusers {m['diffusers_version']}): "
             f"{m['parameters']:,} parameters, {_mb(m['bytes'])}"]
    for name, p in m["parts"].items():
        bits = [str(p["class"])]
        if "parameters" in p:
            bits.append(f"{p['parameters']:,} params ({', '.join(p['dtypes'])})")
        if "gflops_per_call" in p:
            bits.append(f"{p['gflops_per_call']} GFLOP/call")
        if p.get("config"):
            bits.append(", ".join(f"{k}={v}" for k, v in p["config"].items()))
        lines.append(f"  {name}: {'; '.join(bits)}")
    return "\n".join(lines)
