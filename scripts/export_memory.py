"""Where the export's host memory goes: resident set size per export phase, on SDXL-shaped models of any size.

    python scripts/export_memory.py --work /tmp/xl-mem --scale quarter            # U-Net 849 M params (SDXL: 2.57 B)
    python scripts/export_memory.py --work /tmp/xl-mem --scale sdxl --size 1024   # full size: check free memory first

Builds an SDXL-layout random-weight folder (saved in fp16, as bench_sdxl.py does) unless --work has one,
then exports it in a child process (fp16 U-Net and text encoders, fp32 VAE decoder, static size, batch 1)
while a separate process samples the child's VmRSS and RssAnon every 20 ms. Prints, for each log line of
the export (DEBUG included), the highest RSS seen until the next one, then the child's VmHWM. --json
writes the same.

Scales (U-Net transformer layers per level, OpenCLIP-bigG layers; U-Net parameters): sdxl = the hub's
configs (1, 2, 10; 32; 2.57 B), half = (1, 2, 4; 16; 1.32 B), quarter = (1, 1, 2; 8; 849 M), eighth =
quarter with block_out_channels (320, 640, 640) and bigG at 4 layers (336 M).
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALES = {
    "sdxl": {},
    "half": {"unet": {"transformer_layers_per_block": [1, 2, 4]}, "text_encoder_2": {"num_hidden_layers": 16}},
    "quarter": {"unet": {"transformer_layers_per_block": [1, 1, 2]}, "text_encoder_2": {"num_hidden_layers": 8}},
    "eighth": {"unet": {"transformer_layers_per_block": [1, 1, 2], "block_out_channels": [320, 640, 640],
                        "attention_head_dim": [5, 10, 10]},
               "text_encoder_2": {"num_hidden_layers": 4}},
}


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def make_folder(scale: str, folder: Path) -> dict:
    from ldm_deploy.bench.prepare import TOKENIZER
    from training.checkpoint import Components, save_components
    from training.convert_sdxl import sdxl_tokenizer_2
    from training.models.presets import build_all, preset

    p = preset("sdxl")
    for part, over in SCALES[scale].items():
        p[part] = {**p[part], **over}
    for key in ("text_encoder", "text_encoder_2"):
        p[key] = {**p[key], "vocab_size": 49408}
    m = build_all(p, seed=0)
    params = {k: sum(t.numel() for t in v.parameters()) for k, v in m.items() if v is not None}
    tok2 = sdxl_tokenizer_2(TOKENIZER, folder.parent / f"{folder.name}.tok")
    save_components(Components(unet=m["unet"], vae=m["vae"], text_encoder=m["text_encoder"],
                               text_encoder_2=m["text_encoder_2"], tokenizer_dir=TOKENIZER, tokenizer_2_dir=tok2,
                               scheduler_config=p["scheduler"], model_index=p["model_index"]), folder, fp16=True)
    return {"params": params, "peak_rss_mib": round(rss_kib("VmHWM") / 1024)}


_SAMPLER = """
import os, sys, time
pid, path = int(sys.argv[1]), sys.argv[2]
with open(path, "w") as out:
    while os.path.exists(f"/proc/{pid}"):
        try:
            with open(f"/proc/{pid}/status") as f:
                kib = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith(("VmRSS:", "RssAnon:"))}
        except (OSError, ValueError):
            break
        if "VmRSS" not in kib:      # the process has exited (a zombie has no memory lines)
            break
        out.write(f"{time.monotonic():.3f} {kib['VmRSS']} {kib['RssAnon']}\\n")
        out.flush()
        time.sleep(0.02)
"""


class PhaseSampler:
    """VmRSS of this process sampled every 20 ms by a separate process (a thread would stall while torch or
    onnx hold the GIL); every ldm_deploy log record (DEBUG included) starts a phase. `phases()`: per phase,
    the log line that started it, its start time and the highest RSS sampled in it, and the highest anonymous
    part of it (RssAnon: RSS less the mapped file pages, e.g. of safetensors weights being read, which the
    kernel can drop under pressure).

    With `trace` (a path prefix) the samples and the phase marks go to `<trace>.rss` and `<trace>.marks` as they
    happen and stay there, so a process the kernel kills (the OOM killer sends SIGKILL: no handler runs) still
    leaves the phases it reached: `trace_phases(trace)` reads them back."""

    def __init__(self, trace: Path | None = None):
        import tempfile

        self._keep = trace is not None
        base = Path(trace) if trace is not None else Path(tempfile.mkstemp(prefix="rss-")[1])
        self._file, self._marks = Path(f"{base}.rss"), Path(f"{base}.marks")
        self._marks.write_text("")
        self._start = time.monotonic()
        self._mark("start", self._start)
        sampler = self

        class Mark(logging.Handler):
            def emit(self, record):
                sampler._mark(record.getMessage()[:110], time.monotonic())

        self._handler = Mark(logging.DEBUG)
        if not self._keep:
            base.unlink(missing_ok=True)

    def _mark(self, message: str, t: float) -> None:
        with open(self._marks, "a") as f:          # one line per mark, flushed at once: survives a SIGKILL
            f.write(f"{t:.3f}\t{' '.join(message.split())}\n")

    def __enter__(self):
        import os

        logger = logging.getLogger("ldm_deploy")
        self._level = logger.level
        logger.addHandler(self._handler)
        logger.setLevel(logging.DEBUG)
        self._proc = subprocess.Popen([sys.executable, "-c", _SAMPLER, str(os.getpid()), str(self._file)])
        return self

    def __exit__(self, *exc):
        time.sleep(0.1)
        self._proc.terminate()
        self._proc.wait()
        logger = logging.getLogger("ldm_deploy")
        logger.removeHandler(self._handler)
        logger.setLevel(self._level)
        self._phases = _phases(self._marks, self._file)
        if not self._keep:
            self._file.unlink(missing_ok=True)
            self._marks.unlink(missing_ok=True)

    def phases(self) -> list[dict]:
        return self._phases


def trace_phases(trace: Path) -> list[dict]:
    """The phases a `PhaseSampler(trace=...)` recorded, read from its files: what is left of a killed export
    (the last phase is where it died)."""
    return _phases(Path(f"{trace}.marks"), Path(f"{trace}.rss"))


def _phases(marks_file: Path, samples_file: Path) -> list[dict]:
    marks = [(m, float(t)) for t, m in (ln.split("\t", 1) for ln in marks_file.read_text().splitlines() if "\t" in ln)]
    samples = [tuple(map(float, ln.split())) for ln in samples_file.read_text().splitlines()
               if len(ln.split()) == 3] if samples_file.is_file() else []
    if not marks:
        return []
    t0 = marks[0][1]
    ends = [t for _, t in marks[1:]] + [float("inf")]
    return [{"after": m, "t_s": round(start - t0, 1),
             "peak_rss_mib": round(max((r for t, r, _ in samples if start <= t < end), default=0.0) / 1024),
             "peak_anon_mib": round(max((a for t, _, a in samples if start <= t < end), default=0.0) / 1024)}
            for (m, start), end in zip(marks, ends)]


def export(folder: Path, out: Path, size: int, proto_limit_mb: int = 0) -> dict:
    """The export of bench_sdxl.py step 2, with an RSS sampler and the log lines as phase marks."""
    from ldm_deploy.export import onnx_io
    from ldm_deploy.export.config import ExportConfig, Range
    from ldm_deploy.export.exporter import export_model

    if proto_limit_mb:   # take the > 2 GB path (external data, streamed conversion) at a smaller size
        onnx_io.PROTO_LIMIT = proto_limit_mb << 20
    cfg = ExportConfig(name="mem", precision="fp16", batch=Range(1, 1, 1), height=Range(size, size, size),
                       width=Range(size, size, size), measure_runtime=False,
                       components=("text_encoder", "text_encoder_2", "unet", "vae_decoder"))
    start = time.perf_counter()
    with PhaseSampler() as sampler:
        export_model(folder, out, cfg, force=True)
    return {"seconds": round(time.perf_counter() - start, 1), "vmhwm_mib": round(rss_kib("VmHWM") / 1024),
            "phases": sampler.phases()}


def child(step: str, **kwargs) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); import scripts.export_memory as b; "
            f"from pathlib import Path; kw = json.loads(sys.argv[1]); "
            f"kw = {{k: Path(v) if k in ('folder', 'out') else v for k, v in kw.items()}}; "
            f"print('RESULT ' + json.dumps(b.{step}(**kw)))")
    args = json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()})
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{step} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--scale", choices=sorted(SCALES), default="quarter")
    ap.add_argument("--size", type=int, default=512, help="static image size of the export")
    ap.add_argument("--proto-limit-mb", type=int, default=0,
                    help="treat graphs over this many MB as over protobuf's 2 GB limit "
                         "(SDXL's code path at small scale)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    folder = args.work / f"model-{args.scale}"
    result = {"scale": args.scale, "size": args.size}
    if not (folder / "model_index.json").is_file():
        args.work.mkdir(parents=True, exist_ok=True)
        result["folder"] = child("make_folder", scale=args.scale, folder=folder)
        print(f"folder: {result['folder']}")
    result["export"] = child("export", folder=folder, out=args.work / f"onnx-{args.scale}", size=args.size,
                               proto_limit_mb=args.proto_limit_mb)
    for p in result["export"]["phases"]:
        print(f"{p['t_s']:8.1f} s {p['peak_rss_mib']:8d} MiB RSS {p['peak_anon_mib']:8d} MiB anon  {p['after']}")
    print(f"export {result['export']['seconds']} s, VmHWM {result['export']['vmhwm_mib']} MiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
