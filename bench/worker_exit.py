"""How often a finished 2-process gloo run with FSDP2 fails at exit: normal exit vs ``exit_worker``.

    python bench/worker_exit.py --runs 60

Each run is ``torchrun --nproc-per-node 2`` of a small worker: it shards a model with
FSDP2, runs it, destroys the process group (rank 0 then lingers 50 ms, as rank 0 does
while it writes a run's last files), and ends either through the interpreter's own
teardown ("teardown") or through ``minfm_core.cli.main.exit_worker`` ("exit_worker", what
``minfm`` does in every process of a multi-process run). The two modes alternate. A run
fails when torchrun does: a worker aborted with "terminate called without an active
exception" (SIGABRT).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

WORKER = textwrap.dedent("""
    import os, sys, time
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 64))
    dist.barrier()
    dist.destroy_process_group()
    if os.environ["RANK"] == "0":
        time.sleep(0.05)
    if sys.argv[1] == "exit_worker":
        from minfm_core.cli.main import exit_worker

        exit_worker(0)
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40, help="runs per mode")
    args = ap.parse_args()
    modes = ("teardown", "exit_worker")
    failed = dict.fromkeys(modes, 0)
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        for i in range(args.runs):
            for mode in modes:
                res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      "--nproc-per-node=2", script, mode], capture_output=True, text=True)
                if res.returncode != 0:
                    failed[mode] += 1
                    aborted = "terminate called without an active exception" in res.stderr
                    print(f"run {i + 1} {mode}: exit {res.returncode}{' (SIGABRT at exit)' if aborted else ''}",
                          flush=True)
    for mode in modes:
        print(f"{mode:12s} failed {failed[mode]} of {args.runs} runs")


if __name__ == "__main__":
    main()
