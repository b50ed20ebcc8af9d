"""Helpers shared by the hub tests: tiny model folders and a CLI runner against the test Hub."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_minfmTestTokenDoNotLeak0123456789"


def only_hub_plugin() -> str:
    """MINFM_DISABLE_PLUGINS value that leaves only the hub plugin (tests stay fast and isolated)."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="minfm")} - {"hub"}
    return ",".join(sorted(names))


def hub_cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``minfm ARGS`` in a subprocess with the test Hub's environment."""
    full = {**env, "MINFM_DISABLE_PLUGINS": only_hub_plugin()}
    return subprocess.run([sys.executable, "-m", "minfm_core.cli.main", *args], capture_output=True, text=True,
                          env=full, cwd=ROOT, timeout=timeout)


def hub_python(env: dict, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {**env, "MINFM_DISABLE_PLUGINS": only_hub_plugin()}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=ROOT,
                          timeout=timeout)


def tiny_weights(seed: int, n: int = 4, dim: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.weight": torch.randn(dim, dim, generator=g) for i in range(n)}


def make_model_folder(path: Path, seed: int = 0, ema: bool = True, extras: bool = True) -> Path:
    """A hub folder: model (+ ema) safetensors, recipe.toml, metrics.jsonl, samples.png."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(tiny_weights(seed), path / "model.safetensors", metadata={"format": "pt"})
    if ema:
        save_file(tiny_weights(seed + 100), path / "ema.safetensors", metadata={"format": "pt"})
    if extras:
        (path / "recipe.toml").write_text(
            'job = "train"\n[model.denoiser]\nname = "flux"\nflavor = "flux-debug"\n'
            '[model.vae]\nname = "identity"\n[data]\nname = "imagenet"\n'
            '[train]\nmax_steps = 400\nlr = 0.001\ninit_from = "hf://base-org/base-model@v2"\n'
        )
        (path / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) + "\n" for s in (10, 20))
        )
        from PIL import Image

        Image.new("RGB", (8, 8), (255, 0, 0)).save(path / "samples.png")
    return path


def tree_bytes(folder: Path, exclude: tuple[str, ...] = (".cache", "minfm_source.json")) -> dict[str, bytes]:
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not rel.startswith(exclude):
            out[rel] = p.read_bytes()
    return out


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``minfm: error:`` line of a failed command (asserts exit 2, no traceback).

    Progress lines may come before it (a push lists its files); the error is one line, last.
    """
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in lines if ln.startswith("minfm: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    return errors[0]


def env_for(server, tmp_path: Path, name: str = "home") -> dict:
    return server.env(tmp_path / name, token=TOKEN)

