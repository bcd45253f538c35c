"""Export the full-size SD 1.5 architecture (random weights) in fp16 and fp32; record time and peak RSS.

    python scripts/export_sd15.py --work /tmp/sd15 --json sd15_export.json [--preset sd15] [--precisions fp16,fp32]

The model folder is built from `training.models.presets` with seeded random weights (no download),
then `export_model` runs once per precision with export_configs/sd15.yaml. Each export runs in a
child process so its peak RSS is its own. Expect minutes and ~10 GB of disk per precision.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _make_folder(preset_name: str, folder: Path) -> float:
    from training.checkpoint import Components, save_components
    from training.models.presets import build_models, preset

    start = time.perf_counter()
    p = preset(preset_name)
    unet, vae, text_encoder = build_models(p, seed=0)
    save_components(Components(unet=unet, vae=vae, text_encoder=text_encoder,
                               tokenizer_dir=ROOT / "tests" / "data" / "clip_tokenizer",
                               scheduler_config=p["scheduler"]), folder)
    return time.perf_counter() - start


def _export(model_dir: str, out: str, config_name: str, precision: str, queue) -> None:
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model

    config = load_config(config_name).replace(precision=precision)
    result = export_model(model_dir, out, config, force=True)
    art = result.artifact
    queue.put({
        "seconds": round(result.seconds, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),   # KiB on Linux
        "bytes": {name: sum((Path(out) / f).stat().st_size for f in art.files if f.startswith(name + "/"))
                  for name in art.components},
        "components": {name: dict(c.export) for name, c in art.components.items()},
    })


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ldm-sd15-export"))
    ap.add_argument("--json", type=Path, default=Path("sd15_export.json"))
    ap.add_argument("--preset", default="sd15")
    ap.add_argument("--config", default="sd15", help="export config name or file")
    ap.add_argument("--precisions", default="fp16,fp32")
    args = ap.parse_args(argv)

    folder = args.work / "model"
    record = {"preset": args.preset, "config": args.config, "python": sys.version.split()[0]}
    if not (folder / "model_index.json").is_file():
        record["make_folder_seconds"] = round(_make_folder(args.preset, folder), 1)
    ctx = mp.get_context("spawn")
    for precision in args.precisions.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=_export, args=(str(folder), str(args.work / f"onnx-{precision}"), args.config,
                                                 precision, queue))
        proc.start()
        proc.join()
        record[precision] = queue.get() if proc.exitcode == 0 else {"failed": f"exit code {proc.exitcode}"}
        print(precision, json.dumps(record[precision])[:400], flush=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
