"""A stage's loss log: <out>/logs/<stage>.csv (one row per logged step) and its loss curve, <stage>.png."""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numpy as np


class LossLog:
    """The CSV rows (step, loss, lr, metrics...) of one stage; a resumed run keeps the rows up to its step."""

    def __init__(self, path: Path, title: str):
        self.path, self.title = Path(path), title
        self._fields: list[str] | None = None
        self._last_plot = 0.0

    def start(self, step: int) -> None:
        """Keep the CSV rows up to `step` (a resumed run rewrites what came after its checkpoint)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if step > 0 and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self._fields = list(rows[0].keys()) if rows else None
        with open(self.path, "w", newline="") as f:
            if rows:
                writer = csv.DictWriter(f, fieldnames=self._fields)
                writer.writeheader()
                writer.writerows(rows)

    def append(self, step: int, loss: float, lr: float, metrics: dict) -> None:
        row = {"step": step, "loss": f"{loss:.8g}", "lr": f"{lr:.6g}", **{k: f"{v:.6g}" for k, v in metrics.items()}}
        new = self._fields is None
        if new:
            self._fields = list(row)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def plot(self, final: bool = False) -> None:
        """Redraw <stage>.png when `final` or at most once a minute."""
        if final or time.perf_counter() - self._last_plot > 60:
            self._last_plot = time.perf_counter()
            plot_losses(self.path, self.path.with_suffix(".png"), title=self.title)


def plot_losses(csv_path: Path, png_path: Path, title: str = "loss") -> None:
    """Loss curve (raw + moving average, log scale) from a stage's CSV, written with matplotlib Agg."""
    if not Path(csv_path).is_file():
        return
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    k = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, alpha=0.35, lw=0.8, label="loss")
    ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if loss.min() > 0:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
