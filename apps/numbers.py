"""The demo's numbers and their ranges, in one place: ``minfm demo`` parses its flags with
these, and the Python entry point ``minfm_apps.demo.serve`` checks its arguments with the
same ones (a module of its own: the plugin and the app both import it)."""

from __future__ import annotations

from minfm_core.cli.argtypes import finite_float, int_in
from minfm_core.validators import MAX_BATCH, MAX_SOLVER_STEPS

NUMBERS = {
    "--port": int_in("--port", 1, 65535),
    "--queue-limit": int_in("--queue-limit", 1, 100_000),
    "--max-batch": int_in("--max-batch", 1, MAX_BATCH),
    "--batch-window-ms": finite_float("--batch-window-ms", 0.0, 60_000.0),
    "--max-steps": int_in("--max-steps", 1, MAX_SOLVER_STEPS),
}
