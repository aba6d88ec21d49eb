"""What a training run records of itself: ``metrics.jsonl``, ``loss.png``, TensorBoard.

Every step appends a line to ``metrics.jsonl`` in the run's folder (step, training
loss, learning rate, tokens/s, MFU (``flops.py``; null where the device's peak is
unknown), seconds since the start; validation loss and metrics at evaluations;
samples); a resumed run drops the lines past the step it
resumes from, so the file tells one story. ``loss.png`` is redrawn at every
checkpoint when matplotlib is installed, and TensorBoard gets the same numbers
when asked for (``tensorboard`` installed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gpt2lite.io.files import atomic_write

__all__ = ["METRICS", "PLOT", "TENSORBOARD", "RunLog", "plot_losses"]

METRICS = "metrics.jsonl"
PLOT = "loss.png"
TENSORBOARD = "tensorboard"


class RunLog:
    """The metrics file (and TensorBoard) of one run in ``out_dir``, continued from step ``start``."""

    def __init__(self, out_dir: Path, start: int, *, tensorboard: bool = False) -> None:
        """Open ``out_dir/metrics.jsonl`` for appending, dropping lines past ``start`` (a resumed run)."""
        self.path = out_dir / METRICS
        self.t0 = time.perf_counter()
        self.offset = 0.0
        kept: list[str] = []
        if start and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash
                if entry.get("step", 0) <= start:
                    kept.append(line)
                    self.offset = max(self.offset, entry.get("time", 0.0))
        with atomic_write(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("TensorBoard logging needs tensorboard: pip install tensorboard") from None
            self.writer = SummaryWriter(log_dir=str(out_dir / TENSORBOARD), purge_step=start + 1 if start else None)

    def seconds(self) -> float:
        """Seconds of training so far (a resumed run adds to the time before it)."""
        return self.offset + time.perf_counter() - self.t0

    def write(self, step: int, **values: Any) -> None:
        """One line of the log (and TensorBoard scalars for the numbers)."""
        entry = {"step": step, **values, "time": round(self.seconds(), 3)}
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, step)
                elif isinstance(value, str):
                    self.writer.add_text(name, value, step)

    def close(self) -> None:
        """Close the file (and TensorBoard's)."""
        self._file.close()
        if self.writer is not None:
            self.writer.close()


def plot_losses(out_dir: Path) -> Path | None:
    """Draw ``loss.png`` from ``metrics.jsonl``: training loss per step, validation loss at evaluations.

    Returns None when matplotlib is not installed (``pip install matplotlib``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    train, val = [], []
    for line in (out_dir / METRICS).read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if "train_loss" in entry:
            train.append((entry["step"], entry["train_loss"]))
        if "val_loss" in entry:
            val.append((entry["step"], entry["val_loss"]))
    fig = Figure(figsize=(7, 4), dpi=100)  # no pyplot: no global state, no display needed
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / PLOT
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
