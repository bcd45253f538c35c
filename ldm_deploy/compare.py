"""Comparators: error statistics between two arrays, and the one `assert_close` every test uses.

`validate` uses `error_stats` for its table; tests use `assert_close`, whose failure message reports
max/mean abs error, max relative error and the tolerance that would have passed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ErrorStats:
    max_abs: float
    mean_abs: float
    max_rel: float      # max |a - b| / max(|b|), i.e. relative to the reference output's scale
    nan_count: int      # non-finite values in `actual`
    shape: tuple

    def as_dict(self) -> dict:
        return asdict(self)


def error_stats(actual, expected) -> ErrorStats:
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs expected {b.shape}")
    nan_count = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
    diff = np.abs(np.nan_to_num(a, nan=np.inf) - b)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    return ErrorStats(
        max_abs=max_abs,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        max_rel=max_abs / scale if scale > 0 else max_abs,
        nan_count=nan_count,
        shape=tuple(a.shape),
    )


def assert_close(actual, expected, *, atol: float = 0.0, rtol: float = 0.0, name: str = "output") -> ErrorStats:
    """Pass when max|a-b| <= atol + rtol * max|b| and `actual` is finite everywhere.

    `rtol` is relative to the reference's scale (max |expected|), not element-wise: outputs near zero
    don't make element-wise relative errors meaningless.
    """
    s = error_stats(actual, expected)
    scale = float(np.max(np.abs(np.asarray(expected, dtype=np.float64)))) if np.size(expected) else 0.0
    bound = atol + rtol * scale
    if s.nan_count or s.max_abs > bound:
        needed_rtol = s.max_abs / scale if scale else float("inf")
        raise AssertionError(
            f"{name} differs: max_abs={s.max_abs:.3e} mean_abs={s.mean_abs:.3e} max_rel={s.max_rel:.3e} "
            f"nan={s.nan_count} shape={s.shape}; allowed {bound:.3e} (atol={atol:g}, rtol={rtol:g}); "
            f"would pass with atol>={s.max_abs:.3e} or rtol>={needed_rtol:.3e}"
        )
    return s
