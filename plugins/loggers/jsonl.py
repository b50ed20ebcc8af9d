"""``jsonl``: ``<run_dir>/metrics.jsonl`` (one object per log call) and a ``loss.png`` curve.

Each line is ``{"step": s, "time": unix_seconds, <metric>: value, ...}``, flushed as written
(non-finite values are written as NaN/Infinity, which Python's json reads back). When a run
resumes from a checkpoint, lines at or after its first logged step are left over from the
interrupted run; they are dropped so the file reads as one uninterrupted run.

The curve plots every metric whose name ends in ``loss`` against the step (raw and smoothed).
It is drawn with matplotlib's Agg canvas, imported only when drawing; without matplotlib the
metrics are still written and a warning says the plot is skipped.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from minfm_core.errors import MinfmWarning, terminal_safe
from minfm_core.safepath import write_atomic, write_text_atomic
from minfm_core.textfiles import read_bounded

from .base import Logger, is_finite, writing
from .configs import METRICS_FILE, PLOT_FILE, JsonlConfig

#: Largest metrics.jsonl a resumed run reads back (a line per step: ~100 M steps).
MAX_METRICS_BYTES = 16 << 30


class JsonlLogger(Logger):
    def __init__(self, cfg: JsonlConfig, run_dir: str) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.plot_path = self.run_dir / PLOT_FILE
        self._file = None
        self._curves: dict[str, list[tuple[int, float]]] = {}
        self._calls = 0
        self._warned = False

    def _open(self, first_step: int) -> None:
        kept = []
        if self.path.exists():
            # the file may hold what no logger wrote (a download, a hand edit): only object lines
            # with an integer step are kept, everything else is dropped like a line a crash cut short
            raw = read_bounded(self.path, str(self.path), MAX_METRICS_BYTES)  # a FIFO there hung the run
            lines = raw.decode("utf-8", errors="replace").splitlines()
            for line in lines:
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(row, dict) and type(row.get("step")) is int and row["step"] < first_step:
                    kept.append(row)
            if len(kept) != len(lines):
                write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        for row in kept:
            self._remember(row["step"], row)
        self._file = self.path.open("a", encoding="utf-8")

    def _remember(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if key.endswith("loss") and is_finite(value):
                self._curves.setdefault(key, []).append((step, float(value)))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        metrics = self._scalars(metrics)
        if self._file is None:
            with writing("jsonl", self.path):
                self._open(step)
        row = {"step": int(step), "time": round(time.time(), 3), **metrics}
        with writing("jsonl", self.path):
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        self._remember(step, metrics)
        self._calls += 1
        if self.cfg.plot_every and self._calls % self.cfg.plot_every == 0:
            self.plot()

    def plot(self) -> Path | None:
        """Draw ``loss.png`` now; returns its path, or None when there is nothing to draw."""
        if not self._curves:
            return None
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            if not self._warned:
                warnings.warn("jsonl logger: matplotlib is not installed; loss.png is not drawn", MinfmWarning, stacklevel=2)
                self._warned = True
            return None
        # Figure + Agg canvas directly: no pyplot, so no global backend or state is touched.
        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for key, points in sorted(self._curves.items()):
            steps = [s for s, _ in points]
            values = [v for _, v in points]
            if len(points) > 20:
                (line,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _smooth(values), color=line.get_color(), linewidth=1.6, label=f"{key} (smoothed)")
            else:
                ax.plot(steps, values, marker="o", markersize=3, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(terminal_safe(self.run_dir.name))  # a control character is no glyph: shown escaped
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        # readers (the gallery server) never see half a file
        with writing("jsonl", self.plot_path):
            write_atomic(self.plot_path, lambda tmp: fig.savefig(tmp, format="png"))
        return self.plot_path

    def close(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            with writing("jsonl", self.path):
                f.close()  # flushes what is buffered; the file is closed even when that fails
        self.plot()


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def build(cfg: JsonlConfig, *, run_dir: str, rank: int = 0, recipe: dict | None = None) -> Logger:
    return JsonlLogger(cfg, run_dir) if rank == 0 else Logger()
