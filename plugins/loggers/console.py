"""``console``: one plain-text progress line per log call (no tty tricks: CI logs stay readable).

    step 120/500 [#####---------------] 24% | loss 0.4123 | lr 3.00e-04 | gnorm 0.851 | 1.23k tok/s | MFU 12.3% | 0:01:23<0:04:10
"""

from __future__ import annotations

import sys
import time

from .base import Logger, is_finite, writing
from .configs import ConsoleConfig

#: The trainer's usual metrics, shown first, in this order, with their own formats.
_KNOWN = {
    "loss": lambda v: f"loss {v:.4f}",
    "lr": lambda v: f"lr {v:.2e}",
    "grad_norm": lambda v: f"gnorm {v:.3g}",
    "tokens_per_sec": lambda v: f"{human(v)} tok/s",
    "mfu": lambda v: f"MFU {100 * v:.1f}%",
}


def human(n: float) -> str:
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}"
    return f"{n:.0f}"


def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ConsoleLogger(Logger):
    def __init__(self, cfg: ConsoleConfig) -> None:
        self.cfg = cfg
        self._start: tuple[int, float] | None = None  # (step, time) of the first log call

    def _stream(self):
        return sys.stdout if self.cfg.stream == "stdout" else sys.stderr

    def format(self, step: int, metrics: dict[str, float], now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        if self._start is None:
            self._start = (step, now)
        total = self.total_steps
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        if total:
            frac = min(1.0, max(0.0, step / total))
            bar = ""
            if self.cfg.bar_width:
                done = round(frac * self.cfg.bar_width)
                bar = "[" + "#" * done + "-" * (self.cfg.bar_width - done) + "] "
            parts[0] += f" {bar}{100 * frac:.0f}%"
        for key, fmt in _KNOWN.items():
            if key in metrics:
                v = metrics[key]
                parts.append(fmt(v) if is_finite(v) else f"{key} {v}")
        parts += [f"{k} {_short(v)}" for k, v in metrics.items() if k not in _KNOWN]
        step0, t0 = self._start
        elapsed = now - t0
        if total and step > step0 and elapsed > 0:
            eta = (total - step) * elapsed / (step - step0)
            parts.append(f"{clock(elapsed)}<{clock(eta)}")
        else:
            parts.append(clock(elapsed))
        return " | ".join(parts)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        line = self.format(step, self._scalars(metrics))
        with writing("console", self.cfg.stream):  # stdout sent to a file on a full disk
            print(line, file=self._stream(), flush=True)


def _short(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def build(cfg: ConsoleConfig, *, run_dir: str, rank: int = 0, recipe: dict | None = None) -> Logger:
    return ConsoleLogger(cfg) if rank == 0 else Logger()
