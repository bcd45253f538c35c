"""The runtime never imports torch, onnx or `training`: a fresh interpreter whose import system refuses them
generates images from a tiny artifact, through the API and through `ldm-deploy generate`, and opens the
ORT CUDA runner's variant choice (`pip install 'ldm-deploy[gpu]'` has no onnx)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from ldm_deploy.runtime.image import read_png_metadata
from tests.runtime.tiny_model import tiny_artifact, tiny_folder  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]

BLOCK_TORCH = textwrap.dedent("""
    import sys

    BLOCKED = ("torch", "onnx", "training")   # onnxruntime is allowed: only these names and their submodules

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in the torch-free runtime test")
            return None

    sys.meta_path.insert(0, NoTorch())
""")


def run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(BLOCK_TORCH + textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_generate_api_without_torch(tiny_artifact, tmp_path):
    proc = run_blocked(f"""
        import numpy as np
        from ldm_deploy.runtime.pipeline import Pipeline
        from ldm_deploy.runtime.image import save_images
        pipe = Pipeline.from_artifact({str(tiny_artifact)!r})
        res = pipe("a red circle", steps=3, seed=0, num_images=2)
        init = res.images[0]
        res2 = pipe("a red circle", image=init, strength=0.5, steps=4, seed=1)
        save_images(res.images, {str(tmp_path / "out")!r}, res.params)
        assert res.images.shape == (2, 32, 32, 3) and res2.images.shape == (1, 32, 32, 3)
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], sorted(sys.modules)
        print("OK", sorted(res.timings))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


def test_generate_cli_without_torch_is_reproducible(tiny_artifact, tmp_path):
    args = ["generate", str(tiny_artifact), "--prompt", "a red circle", "--steps", "3", "--seed", "42",
            "--scheduler", "euler", "-q"]
    code = """
        from ldm_deploy.cli import main
        rc = main({args!r})
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], sorted(sys.modules)
        sys.exit(rc)
    """
    for name in ("a.png", "b.png"):
        proc = run_blocked(code.format(args=args + ["--out", str(tmp_path / name)]), tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert str(tmp_path / name) in proc.stdout  # names listed at the end
    a, b = (tmp_path / "a.png").read_bytes(), (tmp_path / "b.png").read_bytes()
    assert a == b  # same seed -> byte-identical PNG
    meta = read_png_metadata(tmp_path / "a.png")
    assert meta["prompt"] == "a red circle" and meta["seed"] == "42" and meta["scheduler"] == "euler"
    assert meta["size"] == "32x32" and meta["backend"] == "ort-cpu" and len(meta["artifact_hash"]) == 64
    assert json.loads(meta["parameters"])["steps"] == 3 and "ldm_deploy_version" in meta


def test_ort_cuda_variant_choice_without_onnx(tiny_artifact, tmp_path):
    """OrtCudaRunner's default variant="auto" looks the ort-cuda variant up in the manifest: no onnx import."""
    proc = run_blocked(f"""
        from ldm_deploy.artifact import Artifact
        from ldm_deploy.runtime.runners.ort import SessionFromArtifact
        # the CUDA session itself needs a GPU: only the choice OrtCudaRunner's loader makes
        loader = SessionFromArtifact({str(tiny_artifact)!r}, "unet", provider="cuda", variant="auto")
        print("VARIANT", loader.choose_variant(Artifact.open({str(tiny_artifact)!r})))
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], sorted(sys.modules)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "VARIANT None" in proc.stdout   # the tiny artifact has no ort-cuda variant


def test_generate_cli_latents_dir_and_errors(tiny_artifact, tmp_path):
    from ldm_deploy.cli import main

    z = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    out = tmp_path / "imgs"
    rc = main(["generate", str(tiny_artifact), "--prompt", "x", "--num-images", "2", "--steps", "2", "-q",
               "--latents", str(tmp_path / "z.npy"), "--out", str(out)])
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["image-0000.png", "image-0001.png"]
    assert main(["generate", str(tiny_artifact), "--prompt", "x", "--steps", "0", "--out", str(tmp_path / "c.png")]) == 2
    assert main(["generate", str(tiny_artifact), "--prompt", "x", "--height", "256", "--out", str(tmp_path / "c.png")]) == 2
    assert main(["generate", str(tiny_artifact), "--prompt", "x", "--num-images", "2", "--out", str(tmp_path / "c.png")]) == 2
