"""Issue 17: numbers from files and flags are range-checked before anything is allocated (ldm_deploy/limits.py),
and the functional slips found on the way stay fixed. Every CLI case runs in a fresh process with a timeout
(a hang fails as a timeout) and must end in one line on stderr with the documented exit code.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ldm_deploy.errors import LdmError, UsageError
from tests.reliability.conftest import REPO, argv_of, cli, env

FAST = ["--steps", "2", "--height", "32", "--width", "32", "--seed", "0"]


def _edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------ numbers from flags

@pytest.mark.parametrize("threads", ["100000", "-4", "0"])
def test_threads_out_of_range_is_refused(artifact, tmp_path, threads):
    out = tmp_path / "x.png"
    ran = cli("generate", artifact, "--prompt", "a", *FAST, "--threads", threads, "--out", out, timeout=60)
    ran.assert_clean_failure(2, r"--threads must be an integer from 1 to \d+")
    assert not out.exists()


@pytest.mark.parametrize("seed", ["-1", str(2**63)])
def test_seed_out_of_range_is_a_usage_error(artifact, tmp_path, seed):
    ran = cli("generate", artifact, "--prompt", "a", "--steps", "2", "--seed", seed, "--out", tmp_path / "x.png")
    ran.assert_clean_failure(2, "seed must be an integer from 0 to 2\\*\\*63-1")


def test_seed_api_bound(artifact):
    from ldm_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline.from_artifact(artifact)
    for bad in (-1, 2**63, 1.5):
        with pytest.raises(UsageError, match="seed must be an integer"):
            pipe("a", steps=1, seed=bad, height=32, width=32)


def test_threads_api_bound():
    from ldm_deploy.limits import THREADS_PER_CORE, check_threads

    top = THREADS_PER_CORE * (os.cpu_count() or 1)
    assert check_threads(top) == top
    for bad in (top + 1, -4, 0, 2.5, True):
        with pytest.raises(UsageError):
            check_threads(bad)


# ------------------------------------------------------------------------------------ numbers from files

SCHEDULER_EDITS = {
    "T 1e8 cosine": ({"num_train_timesteps": 10**8, "beta_schedule": "squaredcos_cap_v2"}, "num_train_timesteps"),
    "T 1e9": ({"num_train_timesteps": 10**9}, "num_train_timesteps"),
    "T 0": ({"num_train_timesteps": 0}, "num_train_timesteps"),
    "beta_end < beta_start": ({"beta_start": 0.012, "beta_end": 0.00085}, "beta_end .* < beta_start"),
    "negative betas": ({"beta_start": -0.5, "beta_end": -0.1}, "beta_start = -0.5"),
    "trained betas out of range": ({"trained_betas": [2.0] * 1000}, "trained_betas holds values outside"),
}


@pytest.mark.parametrize("case", list(SCHEDULER_EDITS))
def test_manifest_scheduler_numbers_are_refused(artifact_copy, tmp_path, case):
    changes, match = SCHEDULER_EDITS[case]
    _edit_json(artifact_copy / "manifest.json", lambda m: m["scheduler"].update(changes))
    out = tmp_path / "x.png"
    ran = cli("generate", artifact_copy, "--prompt", "a", *FAST, "--scheduler", "ddim", "--out", out, timeout=60)
    ran.assert_clean_failure(1, match)
    assert not out.exists()


def test_scheduler_numbers_api():
    from ldm_deploy.runtime import schedulers as sch

    with pytest.raises(LdmError, match="num_train_timesteps"):
        sch.make_schedule("euler", {"num_train_timesteps": 10**9}, 10)
    with pytest.raises(LdmError, match="beta_end 0.001 < beta_start 0.01"):
        sch.make_schedule("ddim", {"beta_start": 0.01, "beta_end": 0.001}, 10)
    assert len(sch.make_schedule("ddim", {"num_train_timesteps": 100_000}, 10).timesteps) == 10   # the limit itself


@pytest.mark.parametrize("axis, value", [("height", 99992), ("width", 99992), ("batch", 10**6)])
def test_widened_manifest_profiles_are_refused(artifact_copy, tmp_path, axis, value):
    _edit_json(artifact_copy / "manifest.json", lambda m: m["profiles"][axis].update(max=value, opt=value))
    out = tmp_path / "x.png"
    flags = [f for f in FAST if f not in ("--height", "--width", "32")] + ["--seed", "0"]
    ran = cli("generate", artifact_copy, "--prompt", "a", *flags, "--out", out, timeout=60)
    ran.assert_clean_failure(1, f"profiles.{axis} max {value} is over ldm-deploy's limit")
    assert not out.exists()


def test_profiles_edited_after_export_are_refused(artifact_copy, tmp_path):
    """Inside the limits, a widened profile is caught by the manifest's profiles_sha256 (the exporter writes it)."""
    assert "profiles_sha256" in json.loads((artifact_copy / "manifest.json").read_text())
    _edit_json(artifact_copy / "manifest.json", lambda m: m["profiles"]["height"].update(max=128))
    out = tmp_path / "x.png"
    ran = cli("generate", artifact_copy, "--prompt", "a", "--steps", "2", "--height", "128", "--width", "32",
              "--out", out, timeout=60)
    ran.assert_clean_failure(1, "shape profiles were edited after export")
    assert not out.exists()


CONFIG_EDITS = {   # the cases, through the CLI: model folder part, changes, message
    "1e6 channels": ("unet", {"block_out_channels": [10**6, 10**6]}, "block_out_channels"),
    "1e9 vocabulary": ("text_encoder", {"vocab_size": 10**9}, "vocab_size"),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_config_sizes_are_refused_before_building(folder_copy, tmp_path, case):
    part, changes, match = CONFIG_EDITS[case]
    _edit_json(folder_copy / part / "config.json", lambda c: c.update(changes))
    out = tmp_path / "onnx"
    ran = cli("export", folder_copy, "--out", out, timeout=120)
    ran.assert_clean_failure(1, match)
    assert not out.exists()


@pytest.mark.parametrize("layers", [10**6, 10**9])
def test_inspect_flop_model_is_bounded(folder_copy, layers):
    """`inspect` of a model folder runs the FLOP model over the config: it hung on layers_per_block 1e9."""
    _edit_json(folder_copy / "unet" / "config.json", lambda c: c.update(layers_per_block=layers))
    cli("inspect", folder_copy, timeout=30).assert_clean_failure(1, "layers_per_block")


MORE_CONFIG_EDITS = {   # the same checks on more keys, in-process
    "vae channels": ("vae", {"block_out_channels": [16, 32, 10**7, 32]}, "block_out_channels"),
    "heads 0": ("unet", {"attention_head_dim": 0}, "attention_head_dim"),
    "sample_size 1e9": ("unet", {"sample_size": 10**9}, "sample_size"),
    "positions 1e9": ("text_encoder", {"max_position_embeddings": 10**9}, "max_position_embeddings"),
    "layers 1e6": ("text_encoder", {"num_hidden_layers": 10**6}, "num_hidden_layers"),
    "layers_per_block 1e6": ("unet", {"layers_per_block": 10**6}, "layers_per_block"),
    "channels not an int": ("unet", {"block_out_channels": ["32", 64]}, "block_out_channels"),
    "too many parameters": ("unet", {"block_out_channels": [8192] * 8, "layers_per_block": 32,
                                     "down_block_types": ["DownBlock2D"] * 8, "up_block_types": ["UpBlock2D"] * 8,
                                     "attention_head_dim": 8}, "parameters, over ldm-deploy's limit"),
}


@pytest.mark.parametrize("case", list(MORE_CONFIG_EDITS))
def test_config_sizes_api(model_folder, case):
    from training.checkpoint import build_for_loading

    part, changes, match = MORE_CONFIG_EDITS[case]
    config = {**json.loads((model_folder / part / "config.json").read_text()), **changes}
    with pytest.raises(LdmError, match=match):
        build_for_loading(part, config)


def test_artifact_model_configs_are_bounded(artifact_copy):
    from ldm_deploy.artifact import Artifact

    _edit_json(artifact_copy / "manifest.json", lambda m: m["model"]["text_encoder"].update(vocab_size=10**9))
    with pytest.raises(LdmError, match="model.text_encoder: vocab_size = 1000000000 is outside"):
        Artifact.open(artifact_copy, verify=False)


def test_training_configs_are_bounded():
    from training.models.config import UNetConfig, VAEConfig
    from training.models.presets import preset

    tiny = preset("tiny")
    with pytest.raises(LdmError, match="layers_per_block"):
        UNetConfig.from_dict({**tiny["unet"], "layers_per_block": 10**6})
    with pytest.raises(LdmError, match="block_out_channels"):
        VAEConfig.from_dict({**tiny["vae"], "block_out_channels": [10**6] * len(tiny["vae"]["block_out_channels"])})
    UNetConfig.from_dict(tiny["unet"])   # the presets stay inside


def test_parameter_estimate_tracks_the_real_count(model_folder):
    """The estimate the cap applies to is the model's weight count within a few percent (biases, norms left out)."""
    from ldm_deploy.inspection import inspect_model
    from ldm_deploy.limits import estimated_parameters

    parts = inspect_model(model_folder)["parts"]
    for part in ("unet", "vae", "text_encoder"):
        config = json.loads((model_folder / part / "config.json").read_text())
        assert 0.9 < estimated_parameters(config) / parts[part]["parameters"] < 1.1, part


# ------------------------------------------------------------------------------------ functional slips

def test_steps_equal_to_the_training_timesteps():
    """Leading spacing + steps_offset reaches t = T (diffusers indexes past its table): refused up front,
    with the largest step count that works, which then runs to the end."""
    from ldm_deploy.runtime import schedulers as sch

    cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
           "set_alpha_to_one": False, "skip_prk_steps": True, "timestep_spacing": "leading"}
    for name in ("ddim", "pndm", "ddpm", "euler", "lms"):
        with pytest.raises(UsageError, match="at most 999 steps"):
            sch.make_schedule(name, cfg, 1000)
    schedule = sch.make_schedule("ddim", cfg, 999)
    x = sch.sample("ddim", lambda x, t: 0.1 * x, np.ones((1, 4, 2, 2), np.float32), schedule)
    assert np.isfinite(x).all()
    assert len(sch.make_schedule("dpmpp-2m", cfg, 1000).timesteps) == 1000


def test_steps_equal_to_T_through_the_cli(artifact, tmp_path):
    ran = cli("generate", artifact, "--prompt", "a", "--steps", "1000", "--scheduler", "ddim", "--height", "32",
              "--width", "32", "--out", tmp_path / "x.png")
    ran.assert_clean_failure(2, "at most 999 steps")


def test_a_250_character_out_name_works(artifact, tmp_path):
    out = tmp_path / ("a" * 246 + ".png")
    ran = cli("generate", artifact, "--prompt", "a", *FAST, "--out", out)
    assert ran.rc == 0, ran.stderr
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_temporary_names_fit_name_max(tmp_path):
    from ldm_deploy.fileio import NAME_MAX, _prefix, atomic_dir, atomic_file

    for n in (1, 200, 255):
        name = "\u00e9" * (n // 2) if n > 1 else "x"        # 2-byte characters: NAME_MAX counts bytes
        assert len((_prefix(tmp_path / name) + "abcdefgh.tmp").encode()) <= NAME_MAX
    name = "b" * 255
    with atomic_file(tmp_path / name) as f:
        f.write(b"ok")
    with atomic_dir(tmp_path / ("d" * 255)) as d:
        (d / "f").write_text("ok")
    assert (tmp_path / name).read_bytes() == b"ok" and (tmp_path / ("d" * 255) / "f").is_file()


OUT_CASES = {
    "jpg": ("x.jpg", "writes PNG only", False),
    "existing dir named .png": ("d.png", "is an existing directory", True),
    "file where a folder is wanted": ("afile", "exists and is not a directory", True),
}


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_generate_out_is_checked_before_work(artifact, tmp_path, case):
    name, match, make = OUT_CASES[case]
    out = tmp_path / name
    if make:
        out.mkdir() if name.endswith(".png") else out.write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    ran = cli("generate", artifact, "--prompt", "a", *FAST, "--out", out)
    line = ran.assert_clean_failure(2, match)
    assert ".tmp" not in line and sorted(p.name for p in tmp_path.rglob("*")) == before


def test_strength_without_image_is_refused(artifact, tmp_path):
    ran = cli("generate", artifact, "--prompt", "a", *FAST, "--strength", "0.3", "--out", tmp_path / "x.png")
    ran.assert_clean_failure(2, "--strength applies to img2img only")


def test_init_image_not_a_multiple_of_8(artifact, tmp_path):
    from PIL import Image

    init = tmp_path / "init.png"
    Image.fromarray(np.full((42, 60, 3), 90, np.uint8)).save(init)
    out = tmp_path / "x.png"
    ran = cli("generate", artifact, "--prompt", "a", "--steps", "2", "--image", init, "--out", out)
    ran.assert_clean_failure(2, r"init image .* is 60x42; .*--resize to scale it to 64x40")
    ran = cli("generate", artifact, "--prompt", "a", "--steps", "2", "--image", init, "--resize", "--out", out)
    assert ran.rc == 0, ran.stderr
    with Image.open(out) as im:
        assert im.size == (64, 40)


def test_tensorrt_hint_names_the_real_flag(artifact, tmp_path):
    ran = cli("generate", artifact, "--prompt", "a", *FAST, "--backend", "tensorrt", "--out", tmp_path / "x.png")
    line = ran.assert_clean_failure(2, "--engine-dir ENGINE_DIR")
    assert "--engines" not in line


def test_paths_that_are_not_artifacts_say_what_they_are(artifact, model_folder, tmp_path):
    out = tmp_path / "x.png"
    cli("generate", tmp_path / "typo", "--prompt", "a", "--out", out).assert_clean_failure(1, "typo does not exist")
    cli("generate", model_folder, "--prompt", "a", "--out", out).assert_clean_failure(
        1, "is a model folder, not an exported artifact: export it first")
    cli("validate", artifact, model_folder, timeout=120).assert_clean_failure(2, "arguments swapped")
    cli("validate", tmp_path / "typo", artifact, timeout=120).assert_clean_failure(1, "typo does not exist")
    cli("inspect", tmp_path / "typo").assert_clean_failure(1)


def test_inspect_json_into_a_closed_pipe(artifact):
    proc = subprocess.Popen(argv_of("inspect", artifact, "--json"), env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()                                   # `| head -1`
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode in (0, 141), (proc.returncode, err)


def test_quiet_stderr_is_one_line_even_when_numpy_warns(artifact_copy, tmp_path):
    """Negative betas made numpy warn ten lines before the error; with -q (and no PYTHONWARNINGS from the
    environment) stderr is the one error line."""
    _edit_json(artifact_copy / "manifest.json", lambda m: m["scheduler"].update(beta_start=-0.5, beta_end=-0.1))
    quiet_env = {k: v for k, v in env().items() if k != "PYTHONWARNINGS"}
    p = subprocess.run(argv_of("generate", artifact_copy, "--prompt", "a", *FAST, "--out", tmp_path / "x.png"),
                       env=quiet_env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_quiet_silences_library_warnings(capsys, monkeypatch):
    import warnings

    from ldm_deploy.cli import configure_output

    monkeypatch.setenv("TQDM_DISABLE", "0")          # restored after the test
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")               # what an interpreter without -q would show
        configure_output(quiet=True, verbose=False)
        with np.errstate(all="warn"):
            np.float32(1) / np.float32(0)             # a numpy RuntimeWarning
        warnings.warn("a library's warning", UserWarning)
    assert [str(w.message) for w in shown] == []


def test_outputs_respect_the_umask(tmp_path):
    from ldm_deploy.fileio import atomic_dir, atomic_file

    old = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "f.bin") as f:
            f.write(b"x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "g").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


def test_generated_png_is_world_readable_under_umask_022(artifact, tmp_path):
    out = tmp_path / "x.png"
    p = subprocess.run(argv_of("generate", artifact, "--prompt", "a", *FAST, "--out", out), env=env(), cwd=REPO,
                       capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.umask(0o022))
    assert p.returncode == 0, p.stderr
    assert out.stat().st_mode & 0o777 == 0o644


def test_ldm_train_has_quiet_and_verbose(tmp_path):
    ran = cli("-q", "vae", "--config", "no-such-config", "--out", tmp_path / "r", module="training.cli", timeout=60)
    ran.assert_clean_failure(1)
    ran = cli("vae", "-v", "-q", "--out", tmp_path / "r", module="training.cli", timeout=60)
    assert ran.rc == 2 and not (tmp_path / "r").exists()


def test_no_substitute_exporter_in_the_test_helpers():
    import tests.runtime.tiny_model as tiny

    assert not hasattr(tiny, "export_fallback") and not hasattr(tiny, "export_any")
