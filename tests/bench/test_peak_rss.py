"""A worker's peak RSS is its own, not the forking parent's (ru_maxrss survives exec on Linux)."""
import subprocess
import sys

import numpy as np

from ldm_deploy.bench.machine import peak_rss_mib


def test_child_peak_rss_is_its_own():
    big = np.ones(300 * 2**20 // 8)  # hold ~300 MiB in this process while forking
    assert peak_rss_mib() > 250
    code = "from ldm_deploy.bench.machine import peak_rss_mib; print(peak_rss_mib())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 200, child
    del big
