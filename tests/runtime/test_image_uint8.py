"""image_to_uint8 (ldm_deploy/runtime/pipeline.py): the fp16 decoder image through the 65536-entry table is to_uint8
of the same image in float32, bit for bit; non-finite values are refused as before, naming the stage."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_deploy.errors import LdmError
from ldm_deploy.runtime.pipeline import image_to_uint8, to_uint8


def test_every_finite_fp16_value_maps_as_the_float32_path():
    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = codes[np.isfinite(codes)]
    n = finite.size - finite.size % 3          # as (1, 3, 1, n / 3) images
    image = finite[:n].reshape(1, 3, 1, -1)
    np.testing.assert_array_equal(image_to_uint8(image), to_uint8(image.astype(np.float32)))


@pytest.mark.parametrize("batch", [1, 3])
def test_decoder_sized_images_match_and_keep_the_layout(batch):
    image = (np.random.default_rng(batch).standard_normal((batch, 3, 24, 40)) * 0.8).astype(np.float16)
    got = image_to_uint8(image)
    assert got.shape == (batch, 24, 40, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, to_uint8(image.astype(np.float32)))
    np.testing.assert_array_equal(image_to_uint8(image.astype(np.float32)), got)   # the float32 path, same bytes


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_fp16_is_refused_naming_the_stage(bad):
    image = np.zeros((1, 3, 4, 4), np.float16)
    image[0, 1, 2, 3] = bad
    with pytest.raises(LdmError, match=r"vae_decoder produced 1 non-finite"):
        image_to_uint8(image)


def test_host_conversion_benchmark_writes_its_file_and_refuses_a_users(tmp_path):
    """scripts/bench_image_uint8.py: its result file (format-tagged, both paths checked equal first), and a file it
    did not write left untouched, in one line with a non-zero exit."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_image_uint8.py"
    out = tmp_path / "u8.json"
    run = [sys.executable, str(script), "--batch", "1", "--size", "16", "--repeats", "2", "--out", str(out)]
    assert subprocess.run(run, capture_output=True, text=True).returncode == 0
    result = json.loads(out.read_text())
    assert result["format"] == "ldm-deploy-image-uint8" and set(result["batches"]["1"]) == {
        "float32_path_ms", "fp16_table_ms"}
    assert subprocess.run(run, capture_output=True).returncode == 0     # its own earlier result is replaced
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "numbers"}')
    done = subprocess.run(run[:-1] + [str(mine)], capture_output=True, text=True)
    assert done.returncode == 2 and mine.read_text() == '{"my": "numbers"}'
    assert len(done.stderr.strip().splitlines()) == 1 and "refusing to replace" in done.stderr
