"""The quickstart's training steps, eager vs ``model.denoiser.compile = true``, in one process.

    python bench/compile_quickstart.py                 # 200 steps each, interleaved; < 15 min on 2 cores
    python bench/compile_quickstart.py --steps 40      # a quicker look
    python bench/compile_quickstart.py --e2e           # then `minfm run recipes/quickstart.toml` both ways
    python bench/compile_quickstart.py --recipe recipes/quickstart_video.toml --steps 60   # another recipe

Two trainers from recipes/quickstart.toml, or ``--recipe`` (same seed, so the same batches), one eager and
one compiled, take alternating optimizer steps so that load from other processes hits
both alike. Reported:

- compile time: the compiled trainer's first step minus its median step (inductor's cache
  is a fresh temporary folder unless ``--warm-cache``, so this is a cold compile);
- steady-state tokens/s of both (median over the steps after ``--warmup``), and the ratio;
- compilations: dynamo's ``unique_graphs`` counter (graphs compiled, recompiles included)
  after all steps, and the frames it recompiled.

``--e2e`` also runs the whole quickstart (500 steps, validations, galleries, checkpoints)
as ``minfm run`` subprocesses, eager then compiled (cold cache), and prints both wall times;
both runs get the OpenMP wait policy ``minfm`` would pick when the bench starts (see
``wait_policy``). ``--e2e-only`` skips the interleaved steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.toml"


def trainer(recipe: Path, exp_dir: Path, compile_: bool):
    from minfm_core.engine.train import Trainer
    from minfm_core.recipe import load_recipe

    resolved = load_recipe(recipe, [
        f'run.exp_dir="{exp_dir}"', f"model.denoiser.compile={str(compile_).lower()}",
        "train.max_steps=100000", "logging.loggers=[]",
    ])
    from minfm_core.engine.runtime import init_runtime

    return Trainer(resolved, init_runtime(resolved.recipe.run.device))


def wait_policy() -> dict[str, str]:
    """The OpenMP wait policy ``minfm`` would pick now, spelled out for both end-to-end runs.

    Decided once, before this bench loads the machine: ``minfm`` decides from the load
    average at its start, which the interleaved steps just before would push up.
    """
    from minfm_core.cli.main import omp_wait_policy

    return omp_wait_policy(idle={"GOMP_SPINCOUNT": "300000"})  # libgomp's default when no policy is set


def e2e(recipe: Path, compile_: bool, out: Path, policy: dict[str, str]) -> float:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor_e2e_"), **policy)
    cmd = [sys.executable, "-m", "minfm_core.cli.main", "run", str(recipe), "--set", f'run.exp_dir="{out}"',
           "--set", f"model.denoiser.compile={str(compile_).lower()}"]
    # Output to a file, not a pipe: waiting on a pipe also waits for any process that
    # inherited it. (Some compiled runs timed here still ended a minute after their last
    # file: docs/performance.md, "An intermittent exit delay".)
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
        dt = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{log.read_text()[-4000:]}")
    return dt


def interleaved_steps(args, tmp: Path) -> None:
    """Both trainers, alternating optimizer steps; prints the step-level figures."""
    import torch
    from torch._dynamo.utils import counters

    eager, compiled = trainer(args.recipe, tmp / "eager", False), trainer(args.recipe, tmp / "compiled", True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps each, interleaved")
    counters.clear()
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    tokens: dict[str, list[float]] = {"eager": [], "compiled": []}
    for step in range(args.steps):
        for name, tr in (("compiled", compiled), ("eager", eager)):
            t0 = time.perf_counter()
            m = tr.train_step()
            times[name].append(time.perf_counter() - t0)
            tokens[name].append(m["tokens"])
        if step == 0:
            print(f"first step: compiled {times['compiled'][0]:.1f} s, eager {times['eager'][0]:.2f} s", flush=True)
        if (step + 1) % 50 == 0:
            print(f"  step {step + 1}: loss eager {m['loss']:.4f}", flush=True)
    graphs = counters["stats"]["unique_graphs"]
    w = args.warmup
    tps = {k: statistics.median(n / t for n, t in zip(tokens[k][w:], times[k][w:])) for k in times}
    med = {k: statistics.median(times[k][w:]) for k in times}
    # Per-step ratio (both saw the same load within a pair of steps), median over pairs.
    pair = statistics.median(
        (tokens["compiled"][i] / times["compiled"][i]) / (tokens["eager"][i] / times["eager"][i])
        for i in range(w, args.steps)
    )
    print(f"compile time (first step - median step): {times['compiled'][0] - med['compiled']:.1f} s")
    print(f"eager    {tps['eager']:8.0f} tokens/s  (median step {med['eager']:.3f} s)")
    print(f"compiled {tps['compiled']:8.0f} tokens/s  (median step {med['compiled']:.3f} s)")
    print(f"compiled / eager: {tps['compiled'] / tps['eager']:.2f}x (median of per-step ratios {pair:.2f}x)")
    print(f"compilations over {args.steps} steps (dynamo unique_graphs): {graphs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=RECIPE, help="the training recipe (default: the quickstart)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps each (compilations are counted over these)")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the tokens/s medians")
    ap.add_argument("--warm-cache", action="store_true", help="keep inductor's usual cache folder")
    ap.add_argument("--e2e", action="store_true", help="also time `minfm run` of the whole quickstart, both ways")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end runs")
    args = ap.parse_args()
    policy = wait_policy()
    if not args.warm_cache:  # before torch is imported: inductor reads it once
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_bench_")
    tmp = Path(tempfile.mkdtemp(prefix="compile_quickstart_"))
    if not args.e2e_only:
        interleaved_steps(args, tmp)
    if args.e2e or args.e2e_only:
        print(f"end to end with {policy or 'the OpenMP settings of this shell'}", flush=True)
        for flag in (False, True):
            dt = e2e(args.recipe, flag, tmp / f"e2e_{'compiled' if flag else 'eager'}", policy)
            print(f"minfm run {args.recipe}, compile={str(flag).lower()}: {dt / 60:.0f} min {dt % 60:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
