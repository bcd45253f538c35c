"""The base-weights file a switchable artifact's manifest names (`lora_weights.file`) stays inside the
artifact (ldm_deploy/paths.py), like every other path read from the manifest."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ldm_deploy.errors import LdmError
from ldm_deploy.runtime import lora_switch

safetensors_numpy = pytest.importorskip("safetensors.numpy")


@pytest.mark.parametrize("rel", ["../lora_base.safetensors", "/abs/lora_base.safetensors", "unet/link.safetensors"])
def test_base_file_outside_the_artifact_is_refused(tmp_path, rel):
    art = tmp_path / "art"
    (art / "unet").mkdir(parents=True)
    outside = tmp_path / "lora_base.safetensors"
    safetensors_numpy.save_file({"w": np.zeros(2, np.float32)}, str(outside))
    (art / "unet" / "link.safetensors").symlink_to(outside)
    if rel.startswith("/abs"):
        rel = str(outside)
    spec = SimpleNamespace(lora_weights={"file": rel, "inputs": ["w"]})   # an artifact.ComponentSpec's field
    with pytest.raises(LdmError, match="outside|not inside"):
        lora_switch.load_base(SimpleNamespace(path=art), spec)


def test_base_file_inside_is_read(tmp_path):
    art = tmp_path / "art"
    (art / "unet").mkdir(parents=True)
    safetensors_numpy.save_file({"w": np.ones(2, np.float32)}, str(art / "unet" / "lora_base.safetensors"))
    spec = SimpleNamespace(lora_weights={"file": "unet/lora_base.safetensors", "inputs": ["w"]})
    got = lora_switch.load_base(SimpleNamespace(path=Path(art)), spec)
    assert np.array_equal(got["w"], np.ones(2, np.float32))
