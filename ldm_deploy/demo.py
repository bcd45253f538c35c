"""`run_demo`: the shipped shapes model from model folder to a captioned image grid, in one call.

    export (cached by source hash + config) -> open the pipeline on a backend -> generate one image per
    prompt (seen and held-out colour/shape/position combinations) -> read each image back with the shapes
    analyser -> check one prompt against the PyTorch reference through the same numpy loop -> write
    grid.png, images/*.png and report.json.

The PyTorch parity check and the export need torch (`ldm-deploy[train]`); both are imported lazily, so
`import ldm_deploy.demo` stays torch-free.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ldm_deploy.errors import LdmError, UsageError

log = logging.getLogger(__name__)

MODEL_ENV = "LDM_DEPLOY_DEMO_MODEL"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "shapes-demo"
BACKEND_CHOICES = ("auto", "ort-cpu", "ort-cuda")
SEEN_PROMPTS = (  # combinations the model trained on (none is in shapes.HOLDOUT; a test checks)
    "a large red circle in the center on a white background",
    "a medium blue square at the top left on a yellow background",
    "a small purple triangle at the bottom right on a white background",
    "a large yellow star on the left on a blue background",
)
N_HOLDOUT = 4  # held-out (colour, shape, position) triples from shapes.holdout_prompts


@dataclass(frozen=True)
class DemoConfig:
    model: str | Path | None = None      # model folder; None: $LDM_DEPLOY_DEMO_MODEL, else models/shapes-demo
    out: str | Path = "outputs/demo"     # grid.png, images/, report.json and the ONNX artifact (onnx/)
    backend: str = "auto"                # auto (ort-cuda when onnxruntime has CUDA, else ort-cpu) | ort-cpu | ort-cuda
    steps: int = 25                      # denoising steps per image
    guidance: float = 5.0                # classifier-free guidance scale
    scheduler: str | None = None         # default: the model's (DDIM for the shapes model)
    prompts: tuple[str, ...] | None = None  # default: SEEN_PROMPTS + N_HOLDOUT held-out prompts
    seed: int = 0                        # image i uses seed + i
    parity: bool = True                  # compare prompt 0 with the PyTorch reference (needs torch)
    export_config: str = "demo"          # bundled name or YAML path (export_configs/demo.yaml)
    progress: bool = True                # tqdm bars
    force: bool = False                  # re-export, replacing an out/onnx that is not an artifact


@dataclass
class DemoResult:
    out: Path
    grid: Path
    images: list[Path]
    report_path: Path
    report: dict = field(default_factory=dict)


def resolve_model(model: str | Path | None = None) -> Path:
    """`model`, else $LDM_DEPLOY_DEMO_MODEL, else <repo>/models/shapes-demo; LdmError when it is not there."""
    chosen = model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    where = "--model" if model else MODEL_ENV if os.environ.get(MODEL_ENV) else "the default"
    path = Path(chosen)
    if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
        raise LdmError(f"demo model folder {path} ({where}) does not exist or is not a diffusers model folder",
                       hint=f"pass --model DIR or set {MODEL_ENV}; train one with "
                            "`ldm-train all --config shapes --out runs/shapes` (model in runs/shapes/model)")
    return path


def resolve_backend(backend: str) -> str:
    if backend not in BACKEND_CHOICES:
        raise UsageError(f"unknown demo backend {backend!r}; choose one of: {', '.join(BACKEND_CHOICES)}")
    if backend != "auto":
        return backend
    try:
        import onnxruntime as ort
    except ImportError:
        return "ort-cpu"
    return "ort-cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "ort-cpu"


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"prompts file {path} does not exist") from None
    prompts = tuple(s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#"))
    if not prompts:
        raise UsageError(f"prompts file {path} holds no prompt", hint="write one prompt per line")
    return prompts


def parse_caption(prompt: str) -> dict | None:
    """Attributes of a shapes caption ('a small red triangle at the top left on a white background'),
    or None for any other text (then the analyser's reading is reported without a score)."""
    from training.data import shapes

    phrases = {v: k for k, v in shapes.POSITION_PHRASE.items()}
    alt = lambda names: "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))  # noqa: E731
    m = re.fullmatch(rf"a ({alt(shapes.SIZES)}) ({alt(shapes.COLOUR_NAMES)}) ({alt(shapes.SHAPES)}) "
                     rf"({alt(phrases)}) on a ({alt(shapes.BACKGROUNDS)}) background", prompt.strip().lower())
    if not m:
        return None
    size, colour, shape, phrase, background = m.groups()
    return {"size": size, "colour": colour, "shape": shape, "position": phrases[phrase], "background": background}


def demo_prompts(prompts: tuple[str, ...] | None = None) -> list[dict]:
    """[{prompt, attrs (or None), split: seen | holdout | custom}] for the demo grid."""
    from training.data.shapes import HOLDOUT, holdout_prompts

    if prompts is None:
        rows = [{"prompt": p, "attrs": parse_caption(p), "split": "seen"} for p in SEEN_PROMPTS]
        rows += [{"prompt": p, "attrs": a, "split": "holdout"} for p, a in holdout_prompts(N_HOLDOUT, seed=0)]
        return rows
    rows = []
    for p in prompts:
        attrs = parse_caption(p)
        split = "custom" if attrs is None else (
            "holdout" if (attrs["colour"], attrs["shape"], attrs["position"]) in HOLDOUT else "seen")
        rows.append({"prompt": p, "attrs": attrs, "split": split})
    return rows


def run_demo(config: DemoConfig = DemoConfig()) -> DemoResult:
    """Export (cached), generate, analyse, check parity and write the outputs; returns where they went."""
    from ldm_deploy import __version__
    from ldm_deploy.fileio import write_json
    from ldm_deploy.runtime.image import make_grid, save_png

    if config.steps <= 0:
        raise UsageError(f"steps must be a positive integer, got {config.steps}")
    model = resolve_model(config.model)
    backend = resolve_backend(config.backend)
    rows = demo_prompts(config.prompts)
    out = Path(config.out)
    report: dict = {"ldm_deploy": __version__, "model": str(model), "backend": backend, "steps": config.steps,
                    "guidance": config.guidance, "seed": config.seed, "timings": {}}

    # 1. export (reused when the model folder's hash and the export config match)
    artifact_dir, exported = _export(model, out / "onnx", config.export_config, config.force)
    report["artifact"] = str(artifact_dir)
    report["timings"].update(export_s=round(exported.seconds, 3), export_cached=exported.cached)

    # 2. load
    from ldm_deploy.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.from_artifact(artifact_dir, backend=backend)
    report["timings"]["load_s"] = round(time.perf_counter() - t0, 3)
    report["scheduler"] = config.scheduler or _scheduler_name(pipe)
    size = _native_size(model, pipe)
    report["height"] = report["width"] = size

    # 3. generate + analyse
    images, paths, per_image, first = [], [], [], None
    with pipe, _bar(len(rows), "generating", "image", config.progress) as bar:   # closes the runners after
        t_all = time.perf_counter()
        for i, row in enumerate(rows):
            result, path, record = _generate_and_read(pipe, i, row, config, size, out / "images")
            images.append(result.images[0])
            paths.append(path)
            per_image.append(record)
            first = first or result
            bar.update(1)
        gen_s = time.perf_counter() - t_all
    report["timings"].update(generate_s=round(gen_s, 3), images_per_s=round(len(rows) / gen_s, 3))
    report["images"] = per_image
    report["accuracy"] = _accuracy(per_image)

    # 4. parity of prompt 0 against the PyTorch reference, through the same loop and start latents
    if config.parity:
        report["parity"] = _parity(model, pipe.info.profiles, rows[0]["prompt"], config, first)

    # 5. outputs
    grid_path = out / "grid.png"
    captions = [f"{r['prompt']} [{r['split']}]" for r in rows]
    save_png(make_grid(np.stack(images), captions, pad=4), grid_path,
             {"prompt": [r["prompt"] for r in rows], "steps": config.steps, "guidance": config.guidance,
              "backend": backend, "seed": config.seed})
    report_path = out / "report.json"
    write_json(report_path, report)
    return DemoResult(out=out, grid=grid_path, images=paths, report_path=report_path, report=report)


def _generate_and_read(pipe, i: int, row: dict, config: DemoConfig, size: int, folder: Path):
    """Image i of the demo: generated, saved as folder/NN-<prompt>.png, read back by the shapes analyser.
    Returns (result, png path, the report's record for it)."""
    from ldm_deploy.runtime.image import save_png
    from training.data.analyser import analyse, score

    result = pipe(row["prompt"], steps=config.steps, guidance=config.guidance,
                  scheduler=config.scheduler, seed=config.seed + i, height=size, width=size)
    analysis = analyse(result.images[0])
    reading = {k: analysis[k] for k in ("shape", "colour", "position", "size", "background")}
    path = save_png(result.images[0], folder / f"{i:02d}-{_slug(row['prompt'])}.png",
                    dict(result.params, split=row["split"]))
    record = {"index": i, "prompt": row["prompt"], "split": row["split"], "seed": config.seed + i,
              "file": str(path), "seconds": round(result.timings["total"], 4),
              "unet_ms_per_step": round(1e3 * result.timings.get("unet_per_step", 0.0), 3),
              "analysis": reading,
              "score": score(row["attrs"], analysis) if row["attrs"] else None}
    return result, path, record


def _export(model: Path, artifact_dir: Path, export_config: str, force: bool = False):
    try:
        from ldm_deploy.export.config import load_config
        from ldm_deploy.export.exporter import export_model
    except ImportError as e:
        raise LdmError(f"the demo's export step needs the PyTorch side: {e}",
                       hint="pip install torch 'ldm-deploy[train]' (or run `make demo`)") from None
    config = load_config(export_config)
    result = export_model(model, artifact_dir, config, force=force)
    log.debug("export %s: %s (%.1f s)", "reused (cached)" if result.cached else "done", artifact_dir, result.seconds)
    return artifact_dir, result


def _native_size(model: Path, pipe) -> int:
    """The size the model was trained at (U-Net sample_size x VAE factor) when the artifact's profile
    allows it, else the profile's opt size."""
    import json

    from ldm_deploy.artifact import Range

    any_size = Range(1, 512, 1 << 30)
    profile, width = (getattr(pipe.profiles, k, None) or any_size for k in ("height", "width"))
    try:
        sample = json.loads((model / "unet" / "config.json").read_text(encoding="utf-8"))["sample_size"]
        size = int(sample if isinstance(sample, int) else sample[0]) * pipe.vae_scale_factor
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return int(profile.opt)
    fits = all(p.min <= size <= p.max for p in (profile, width))
    return size if fits else int(min(profile.opt, width.opt))


def _scheduler_name(pipe) -> str:
    from ldm_deploy.runtime.schedulers import default_name

    return default_name(pipe.scheduler_config)


def _parity(model: Path, profiles, prompt: str, config: DemoConfig, actual) -> dict:
    """Prompt 0 on the PyTorch reference (same loop, seed and so start latents) vs the deployed result."""
    from ldm_deploy.compare import error_stats

    try:
        from training.runner import pipeline_from_model_folder
    except ImportError as e:
        raise LdmError(f"the parity check needs torch: {e}", hint="install torch or pass --no-parity") from None
    ref = pipeline_from_model_folder(model, profiles=profiles)
    kwargs = dict(steps=config.steps, guidance=config.guidance, scheduler=config.scheduler, seed=config.seed,
                  height=actual.params["height"], width=actual.params["width"])
    t0 = time.perf_counter()
    expected = ref(prompt, **kwargs)
    torch_s = time.perf_counter() - t0
    pixel = np.abs(actual.images.astype(np.int16) - expected.images.astype(np.int16))
    return {"prompt": prompt, "seed": config.seed, "reference": "training.runner.TorchRunner (fp32, CPU)",
            "max_abs_pixel_diff": int(pixel.max()), "mean_abs_pixel_diff": round(float(pixel.mean()), 4),
            "latents": error_stats(actual.latents, expected.latents).as_dict(),
            "torch_seconds": round(torch_s, 3)}


def _accuracy(per_image: list[dict]) -> dict:
    """Fraction of images whose analysed attribute matches the prompt, per split and attribute."""
    out = {}
    for split in ("seen", "holdout", "custom"):
        scored = [r["score"] for r in per_image if r["split"] == split and r["score"]]
        if scored:
            out[split] = {"n": len(scored), **{k: round(sum(s[k] for s in scored) / len(scored), 3)
                                                for k in scored[0]}}
    return out


def _slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


class _bar:
    """tqdm when `enabled`, else a no-op with the same update()."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool):
        self.tqdm = None
        if enabled:
            from tqdm import tqdm
            self.tqdm = tqdm(total=total, desc=desc, unit=unit)

    def update(self, n: int) -> None:
        if self.tqdm is not None:
            self.tqdm.update(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tqdm is not None:
            self.tqdm.close()
