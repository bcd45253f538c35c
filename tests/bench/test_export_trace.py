"""An export the kernel kills (the OOM killer's SIGKILL runs no handler) still says where it died: the RSS
sampler of scripts/export_memory.py writes its samples and phase marks to files as they happen, and
scripts/bench_sdxl.py's failed-step record names the signal and the last phase reached."""
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench_sdxl import _failure  # noqa: E402
from scripts.export_memory import PhaseSampler, trace_phases  # noqa: E402

# logs two phases, holds ~200 MiB in the second, and kills itself with SIGKILL inside the sampler's block once the
# sampler has recorded that memory (no timed kill point: a loaded machine only makes it wait longer)
_VICTIM = """
import logging, os, signal, sys, time
sys.path.insert(0, {root!r})
from scripts.export_memory import PhaseSampler, rss_kib
log = logging.getLogger("ldm_deploy.export.test")
with PhaseSampler(trace={trace!r}):
    log.debug("tracing the unet")
    log.info("converting\\tthe unet to fp16")
    base = rss_kib()
    big = bytearray(200 << 20)
    for i in range(0, len(big), 4096):
        big[i] = 1
    deadline = time.monotonic() + 120     # a guard against a sampler that never writes, not a kill point
    while time.monotonic() < deadline:
        lines = open({trace!r} + ".rss").read().splitlines()
        if lines and len(lines[-1].split()) == 3 and int(lines[-1].split()[1]) >= base + (150 << 10):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.01)
    sys.exit("the sampler recorded no sample with the allocation")
"""


def _killed(tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    trace = tmp_path / "export-rss"
    proc = subprocess.run([sys.executable, "-c", _VICTIM.format(root=str(ROOT), trace=str(trace))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc, trace


def test_a_killed_process_leaves_its_phases(tmp_path):
    _, trace = _killed(tmp_path)
    phases = trace_phases(trace)
    assert [p["after"] for p in phases] == ["start", "tracing the unet", "converting the unet to fp16"]
    assert phases[-1]["peak_rss_mib"] >= phases[0]["peak_rss_mib"] + 150     # the 200 MiB landed in the last phase
    assert phases[-1]["peak_anon_mib"] >= 150
    assert phases[1]["t_s"] <= phases[2]["t_s"]


def test_the_failed_step_record_names_the_kill_and_the_phase(tmp_path):
    proc, trace = _killed(tmp_path)
    record = _failure(proc, str(trace))
    assert record["error"].startswith("killed by SIGKILL (out of memory")
    assert "last phase: 'converting the unet to fp16'" in record["error"]
    assert record["rss_phases"][-1]["after"] == "converting the unet to fp16"


def test_a_failure_without_a_trace_keeps_the_stderr_tail(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "raise SystemExit('no weights in unet/')"], capture_output=True,
                          text=True)
    record = _failure(proc, str(tmp_path / "none"))
    assert record == {"error": "exit 1: no weights in unet/"}


def test_an_untraced_sampler_leaves_no_files(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with PhaseSampler() as sampler:
        pass
    assert sampler.phases()[0]["after"] == "start"
    assert list(tmp_path.iterdir()) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
