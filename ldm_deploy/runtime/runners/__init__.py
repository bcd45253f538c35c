"""Backend runners: one small class per backend, all with the same call (see base.py)."""
from ldm_deploy.runtime.runners.base import BACKENDS, Runner, open_runner  # noqa: F401
