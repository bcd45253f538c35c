"""Pickles: refused by default, and with the opt-in read with torch.load(weights_only=True), so a
pickle whose `__reduce__` runs a command never runs it, through the library and the CLI.

Loading a legitimate .ckpt / .bin with the opt-in: tests/training/test_convert_original.py
(test_ckpt_needs_opt_in_and_loads_weights_only) and tests/training/test_checkpoint.py
(test_pickle_with_opt_in_loads_weights_only).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ldm_deploy.errors import LdmError
from tests.reliability.conftest import cli


class Payload:
    """Unpickling this runs `touch MARKER` (what an attacker's checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_ckpt(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.w": torch.zeros(1), "x": Payload(marker)}}, path)
    assert not marker.exists()  # saving does not run it
    return path, marker


def test_pickle_refused_without_opt_in(evil_ckpt):
    from training.checkpoint import load_state_dict_file

    path, marker = evil_ckpt
    with pytest.raises(LdmError, match="pickle file .* refusing it"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_malicious_pickle_does_not_run_even_with_opt_in(evil_ckpt):
    from training.checkpoint import load_state_dict_file

    path, marker = evil_ckpt
    with pytest.raises(LdmError, match=r"weights_only=True"):
        load_state_dict_file(path, allow_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize("opt_in", [False, True])
def test_convert_cli_never_runs_the_payload(evil_ckpt, tmp_path, opt_in):
    path, marker = evil_ckpt
    out = tmp_path / "model"
    flags = ["--allow-pickle"] if opt_in else []
    tokenizer = Path(__file__).resolve().parents[1] / "data" / "clip_tokenizer"
    ran = cli("convert", path, "--out", out, "--config", "tiny", "--tokenizer", tokenizer, *flags, timeout=120)
    ran.assert_clean_failure(1, "weights_only=True" if opt_in else "pickle file .* refusing it")
    assert not marker.exists()
    assert not out.exists()
