"""Every `ldm-deploy` subcommand (and `ldm-train`'s): --help with an example, one-line errors, exit codes
(0 ok, 1 failure, 2 usage), --quiet / --verbose before or after the subcommand, nothing written on failure."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_deploy.cli import main
from ldm_deploy.commands import COMMANDS
from ldm_deploy.errors import LdmError

# A failing invocation of each command (inputs that do not exist) and its exit code; {out} must stay unwritten.
FAILURES = {
    "export": (["{nope}", "--out", "{out}"], 1),
    "import": (["{nope}", "--out", "{out}"], 1),
    "validate": (["{nope}", "{nope}", "--components", "unet"], 1),
    "build": (["{nope}", "--out", "{out}"], 1),
    "generate": (["{nope}", "--prompt", "a red circle", "--out", "{out}"], 1),
    "bench": (["{nope}", "--out", "{out}"], (1, 2)),  # bench reports a missing MODEL_DIR as a usage error (2)
    "inspect": (["{nope}"], 1),
    "convert": (["{nope}", "--out", "{out}"], 1),
    "demo": (["--model", "{nope}", "--out", "{out}"], 1),
    "debug-precision": (["{nope}", "--write-config", "{out}"], 2),
    "triton-repo": (["{nope}", "--out", "{out}"], 1),
    "serve": (["{nope}"], 1),
    "client": (["127.0.0.1:9", "--prompt", "a red circle", "--out", "{out}"], 1),   # nothing listens on port 9
}


def _cli_name(module: str) -> str:
    """The subcommand of a command module (`debug_precision` -> `debug-precision`)."""
    return importlib.import_module(f"ldm_deploy.commands.{module}").NAME


def test_every_listed_command_exists():
    for name in COMMANDS:
        mod = importlib.import_module(f"ldm_deploy.commands.{name}")
        assert mod.NAME == name.rstrip("_").replace("_", "-") and mod.HELP and mod.EXAMPLE.startswith(f"ldm-deploy {mod.NAME}"), name
    assert set(FAILURES) == {_cli_name(c) for c in COMMANDS}


@pytest.mark.parametrize("name", COMMANDS)
def test_subcommand_conventions(name, tmp_path, capsys):
    mod = importlib.import_module(f"ldm_deploy.commands.{name}")
    name = mod.NAME
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"example:\n  {mod.EXAMPLE}" in out and "--quiet" in out and "--verbose" in out

    assert main([name, "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ldm-deploy") and "error:" in err

    argv, codes = FAILURES[name]
    codes = codes if isinstance(codes, tuple) else (codes,)
    argv = [a.format(nope=tmp_path / "missing", out=tmp_path / "out") for a in argv]
    for flags in ([], ["-q"], ["--quiet"]):                 # global flag before the subcommand
        assert main([*flags, name, *argv]) in codes, (flags, name)
        captured = capsys.readouterr()
        assert captured.err.startswith("ldm-deploy") and captured.err.count("\n") == 1, captured.err
        assert "Traceback" not in captured.err
    assert main([name, *argv, "--quiet"]) in codes             # and after it
    capsys.readouterr()
    assert not (tmp_path / "out").exists(), f"{name} wrote output on failure"
    with pytest.raises(LdmError):                            # --verbose: the exception and its traceback
        main([name, *argv, "--verbose"])


def test_top_level_help_usage_and_flags(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(_cli_name(name) in out for name in COMMANDS) and "example:" in out
    assert main([]) == 2 and "COMMAND" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["-q", "-v", "inspect", "x"]) == 2
    assert main(["inspect", "x", "-q", "-v"]) == 2
    assert main(["--version"]) == 0 and "ldm-deploy" in capsys.readouterr().out


def test_quiet_turns_progress_bars_off_and_restores_env(tmp_path, monkeypatch):
    from ldm_deploy import cli

    seen = {}

    def fake_run(args):
        seen["tqdm"] = os.environ.get("TQDM_DISABLE")
        return 0

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["inspect"].set_defaults(_run=fake_run)
    assert cli.main(["inspect", "x", "--quiet"]) == 0 and seen["tqdm"] == "1"
    assert "TQDM_DISABLE" not in os.environ
    assert cli.main(["inspect", "x"]) == 0 and seen["tqdm"] is None


def test_unexpected_exception_is_one_line(monkeypatch, capsys):
    from ldm_deploy import cli

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)

    def boom(args):
        raise RuntimeError("disk on fire\nsecond line")

    parser._subparsers._group_actions[0].choices["inspect"].set_defaults(_run=boom)
    assert cli.main(["inspect", "x"]) == 1
    err = capsys.readouterr().err
    assert err == "ldm-deploy: error: RuntimeError: disk on fire second line (rerun with --verbose for the traceback)\n"
    with pytest.raises(RuntimeError):
        cli.main(["inspect", "x", "-v"])


def test_console_scripts_end_to_end(tmp_path):
    bin_dir = Path(sys.executable).parent
    r = subprocess.run([bin_dir / "ldm-deploy", "inspect", str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stdout == ""
    r = subprocess.run([bin_dir / "ldm-deploy", "inspect"], capture_output=True, text=True)
    assert r.returncode == 2


TRAIN_STAGES = ["tokenizer", "vae", "text-encoder", "unet", "all", "eval"]


@pytest.mark.parametrize("stage", TRAIN_STAGES)
def test_ldm_train_stage_conventions(stage, tmp_path, capsys):
    from training.cli import main as train_main

    with pytest.raises(SystemExit) as e:
        train_main([stage, "--help"])
    assert e.value.code == 0 and "example: ldm-train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        train_main([stage, "--no-such-flag"])
    assert e.value.code == 2
    capsys.readouterr()
    assert train_main([stage, "--config", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ldm-train: error:") and err.count("\n") == 1


def test_debug_precision_flag_defaults_are_the_library_defaults():
    # the command repeats them so that building the parser needs no onnx (torch-free runtime, serving venv)
    from ldm_deploy.commands import debug_precision as cmd
    from ldm_deploy.export import precision

    assert (cmd.DEFAULT_TOLERANCE, cmd.DEFAULT_MARGIN) == (precision.DEFAULT_TOLERANCE, precision.DEFAULT_MARGIN)
    assert cmd.COMPONENTS == precision.COMPONENTS


def test_in_process_quiet_run_leaves_logger_levels_as_they_were(tmp_path, capsys):
    # main(["-q", ...]) in-process (tests, notebooks) must not leave our loggers at WARNING: a later
    # caplog.at_level("INFO") in the same process would miss every INFO record of ldm_deploy / training
    import logging

    from training.cli import main as train_main

    before = {n: logging.getLogger(n).level for n in ("ldm_deploy", "training")}
    assert main(["-q", "inspect", str(tmp_path / "missing")]) == 1
    assert train_main(["eval", "-q", "--out", str(tmp_path / "missing"), "--model", str(tmp_path / "nope")]) != 0
    capsys.readouterr()
    assert {n: logging.getLogger(n).level for n in ("ldm_deploy", "training")} == before
