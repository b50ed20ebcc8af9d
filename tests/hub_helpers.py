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



_RUNNER = r"""
import json, sys
sys.path.insert(0, "tests")
from cli_capture import call_main
print("MINFM-RESULTS " + json.dumps([call_main(args) for args in json.loads(sys.argv[1])]))
"""


def main_in_process(env: dict, *cases: list[str], hub_only: bool = True,
                    timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run each ``minfm ARGS`` through ``minfm_core.cli.main.main`` in one Python process.

    The process gets the test Hub's environment before huggingface_hub is imported, and
    torch is imported once for all cases. Each result carries that call's own exit code,
    stdout and stderr; the process's leftover stderr (e.g. logging) is appended to every
    result, so a leaked token is seen there too.
    """
    full = {**env, **({"MINFM_DISABLE_PLUGINS": only_hub_plugin()} if hub_only else {})}
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps([list(c) for c in cases])],
                          capture_output=True, text=True, env=full, cwd=ROOT, timeout=timeout)
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("MINFM-RESULTS ")]
    assert proc.returncode == 0 and marker, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    results = json.loads(marker[-1][len("MINFM-RESULTS "):])
    return [subprocess.CompletedProcess(list(c), rc, out, err + proc.stderr)
            for c, (rc, out, err) in zip(cases, results)]


def tiny_recipe_text(**sample: object) -> str:
    """The resolved tests/recipes/tiny.toml as a repo's recipe.toml (no extends: self-contained)."""
    import tomli_w

    from minfm_core.recipe import load_recipe

    data = load_recipe(ROOT / "tests" / "recipes" / "tiny.toml").to_dict()
    data.setdefault("sample", {}).update(sample)
    return tomli_w.dumps(data)


def tiny_denoiser_weights(recipe_text: str, tmp: Path) -> bytes:
    """Valid ``model.safetensors`` bytes for the denoiser of ``recipe_text``."""
    from minfm_core.checkpoint import build_denoiser

    (tmp / "recipe.toml").write_text(recipe_text)
    model = build_denoiser(tmp / "recipe.toml")  # uninitialised storage: may hold NaN, which loaders refuse
    g = torch.Generator().manual_seed(0)
    weights = {k: (torch.randn(v.shape, generator=g) * 0.02).to(v.dtype) if v.is_floating_point() else v
               for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "w.safetensors")
    return (tmp / "w.safetensors").read_bytes()
