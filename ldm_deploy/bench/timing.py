"""Time a callable: warm-ups, repeats, median and spread. No framework imports here."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    stdev_ms: float
    repeats: int
    warmup: int

    def as_dict(self) -> dict:
        return asdict(self)


def _quantile(sorted_xs: list[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def measure(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10,
            sync: Callable[[], None] | None = None) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times timed; `sync` waits for the device."""
    return from_samples(measure_samples(fn, warmup=warmup, repeats=repeats, sync=sync), warmup)


def measure_samples(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10,
                    sync: Callable[[], None] | None = None) -> list[float]:
    """As `measure`, returning the raw per-call milliseconds."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def windowed(windows: list[list[float]], warmup: int = 0) -> dict:
    """A component's Timing over samples taken in several windows (before and after the end-to-end runs),
    with each window's median: one window's median alone says only how loaded the machine was then, and
    a component timed during a burst of load elsewhere while the end-to-end runs were not (or the reverse)
    gave per-step times that did not add up to the end-to-end time (benchmarks/README.md)."""
    timing = from_samples([x for w in windows for x in w], warmup).as_dict()
    timing["windows_median_ms"] = [round(statistics.median(w), 4) for w in windows]
    return timing


def measure_within(fn: Callable[[], object], *, budget_s: float, warmup: int = 1, repeats: int = 3,
                   sync: Callable[[], None] | None = None) -> Timing:
    """As `measure`, but run fewer repeats (at least one) when `repeats` would take longer than `budget_s`.

    For slow end-to-end runs: the first timed run sets how many more fit in the budget.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    while len(samples) < repeats:
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) * 1e3)
        if sum(samples) + samples[-1] > budget_s * 1e3:
            break
    return from_samples(samples, warmup)


def from_samples(samples_ms: list[float], warmup: int = 0) -> Timing:
    """A Timing from raw per-run milliseconds."""
    xs = sorted(samples_ms)
    return Timing(
        median_ms=statistics.median(xs), p10_ms=_quantile(xs, 0.1), p90_ms=_quantile(xs, 0.9),
        mean_ms=statistics.fmean(xs), stdev_ms=statistics.stdev(xs) if len(xs) > 1 else 0.0,
        repeats=len(xs), warmup=warmup,
    )
