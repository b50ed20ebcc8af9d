"""``minfm run`` / ``train``: run a recipe's job, on one process or many.

``--nproc-per-node N`` re-launches this command through torch.distributed's launcher
on this host; under ``torchrun`` (``LOCAL_RANK`` set) the command runs as it is.
A train job's launcher holds the run-dir lock for its workers, and the workers die
with it (see minfm_core/runlock.py and docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .. import runlock
from ..errors import MinfmError, RecipeError, terminal_safe
from ..launch_env import launch_env
from ..recipe import load_recipe
from ..recipe.checks import job_checks
from ..safepath import missing_folder
from ..engine.stop_signal import STOPPED_EXIT_CODE
from ..validators import MAX_GUIDANCE, MAX_SAMPLES, MAX_SEED, MAX_SOLVER_STEPS
from .argtypes import (add_allow_pickle_flag, add_allowed_host_flag, finite_float, host_allowed, host_arg, host_name, is_loopback,
                       int_in, listen_family, non_empty, nprocs, prompt_arg, sample_size)


def register(sub) -> None:
    from .argtypes import add_recipe_args

    for name, helptext in (("run", "run the recipe's job (train or sample)"), ("train", "train, whatever the recipe's job")):
        p = sub.add_parser(name, help=helptext)
        add_recipe_args(p)
        p.add_argument("--nproc-per-node", type=nprocs, default=1, metavar="N", help="processes on this host (default 1)")
        p.set_defaults(func=run, job=None if name == "run" else name)

    p = sub.add_parser("sample", help="sample images or clips from a run, checkpoint or hf:// model")
    p.add_argument("source", type=non_empty("SRC"), help="run dir, checkpoint dir, model folder (model.safetensors + recipe.toml), "
                                  "or hf://org/name[@rev]")
    p.add_argument("--prompt", action="append", type=prompt_arg("--prompt"), help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="text file, one prompt per line")
    p.add_argument("--out", type=non_empty("--out"), help="output folder (default: <source>/samples_cli; <run>/samples_cli for a checkpoint "
                   "<run>/checkpoints/step_N; ./samples/<org>--<name> for hf://)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the samples in --out even when they were drawn for another request")
    p.add_argument("--seed", type=int_in("--seed", 0, MAX_SEED), help="base seed (image k of prompt i uses seed + i * n + k)")
    p.add_argument("--steps", type=int_in("--steps", 1, MAX_SOLVER_STEPS), help="solver steps")
    p.add_argument("--cfg", type=finite_float("--cfg", 0.0, MAX_GUIDANCE), help="guidance scale")
    p.add_argument("--size", type=sample_size("--size"),
                   help="HEIGHTxWIDTH for images, FRAMESxHEIGHTxWIDTH for clips, e.g. 256x256 or 17x256x256")
    p.add_argument("--fps", type=int_in("--fps", 1, 60), help="frames per second of written clips (default 8; images ignore it)")
    p.add_argument("--n", type=int_in("--n", 1, MAX_SAMPLES), help="samples per prompt")
    p.add_argument("--npz", action="store_true",
                   help="also write samples.npz: uint8 (N, H, W, 3) images or (N, F, H, W, 3) clips, prompt-major")
    p.add_argument("--no-ema", action="store_true", help="use raw weights even when EMA weights exist")
    add_allow_pickle_flag(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the model's recipe")
    p.add_argument("--nproc-per-node", type=nprocs, default=1, metavar="N", help="processes on this host")
    p.set_defaults(func=sample)

    p = sub.add_parser("serve", help="browse a run's galleries on a loopback web server")
    p.add_argument("exp_dir", type=non_empty("EXP_DIR"), help="run directory")
    p.add_argument("--host", default="127.0.0.1", type=host_arg, help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int_in("--port", 0, 65535), default=8000, help="port (0: any free one; default 8000)")
    add_allowed_host_flag(p)
    p.set_defaults(func=serve)


def sample(args) -> int:
    if args.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return relaunch(args.nproc_per_node, strip_nproc(sys.argv[1:]))
    if runlock.LAUNCHER_ENV in os.environ and "LOCAL_RANK" in os.environ:
        runlock.die_with_launcher()
    launch_env()  # a malformed RANK / WORLD_SIZE / LOCAL_RANK stops here, before the source is opened
    from ..engine.sample import sample_cli

    return sample_cli(args)


#: Types ``minfm serve`` states itself rather than trusting the host's mimetypes tables,
#: which may lack WebP or name MP4 otherwise: a browser plays a clip only with the right one.
SERVE_TYPES = {".html": "text/html; charset=utf-8", ".png": "image/png", ".jpg": "image/jpeg",
               ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif", ".mp4": "video/mp4",
               ".json": "application/json", ".jsonl": "text/plain; charset=utf-8"}


class _Slice:
    """At most ``left`` bytes of an open file, for copyfileobj."""

    def __init__(self, f, left: int) -> None:
        self.f, self.left = f, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.f.close()


def gallery_server(root, host: str, port: int, allowed_hosts: tuple[str, ...] | list[str] = ()):
    """A threading HTTP server for ``root`` (not yet serving; the caller runs serve_forever).

    Files are served as by ``python -m http.server``, with the types above and single byte
    ranges (``Range: bytes=a-b``): some players (Safari's, among others) fetch an MP4 only
    in ranges and will not play a clip from a server that ignores them.
    """
    import functools
    import http.server
    import re

    base = http.server.SimpleHTTPRequestHandler
    # At most 18 digits a bound (a file's size fits in 63 bits): a longer number is no range we
    # can serve, and int() of a 5,000-digit one raises.
    one_range = re.compile(r"bytes=(\d{0,18})-(\d{0,18})")

    class Handler(base):
        extensions_map = {**base.extensions_map, **SERVE_TYPES}

        def send_head(self):
            host_header = self.headers.get("Host") or ""
            if local_only and not host_allowed(host_header, allowed_hosts):  # DNS rebinding
                self.send_error(403, f"Host {host_name(host_header)!r} not allowed: this server answers loopback "
                                     "names only (minfm serve --allowed-host NAME adds one)")
                return None
            m = one_range.fullmatch((self.headers.get("Range") or "").strip())
            path = self.translate_path(self.path)
            if "\0" in path:  # an encoded NUL: open() would raise in the handler thread
                self.send_error(400, "Bad request")
                return None
            real = os.path.realpath(path)
            # Nothing outside the run folder, followed links included; nothing but files and
            # folders (a FIFO would hold this thread forever).
            if (real != top and not real.startswith(top + os.sep)) or (
                    os.path.exists(real) and not (os.path.isfile(real) or os.path.isdir(real))):
                self.send_error(404, "File not found")
                return None
            backwards = m is not None and bool(m[1] and m[2]) and int(m[2]) < int(m[1])
            if not m or not (m[1] or m[2]) or backwards or not os.path.isfile(path) or self.path.endswith("/"):
                # No range, several, an invalid one (RFC 9110: ignored), or a folder: the whole answer.
                return super().send_head()
            try:
                f = open(path, "rb")
            except OSError:
                self.send_error(404, "File not found")
                return None
            size = os.fstat(f.fileno()).st_size
            if m[1]:
                start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
            else:  # "bytes=-n": the last n bytes
                start, end = max(0, size - int(m[2])), size - 1
            if start > end:
                f.close()
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(206)
            self.send_header("Content-Type", self.guess_type(path))
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            f.seek(start)
            return _Slice(f, end - start + 1)

    top = os.path.realpath(root)
    local_only = is_loopback(host)
    handler = functools.partial(Handler, directory=str(root))
    # the host's own family: "::1" or another IPv6 address needs an AF_INET6 socket
    server_class = type("Server", (http.server.ThreadingHTTPServer,), {"address_family": listen_family(host, port)})
    try:
        return server_class((host, port), handler)
    except OSError as exc:  # taken between the check and now
        raise MinfmError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None


def serve(args) -> int:
    root = Path(args.exp_dir)
    if problem := missing_folder(root):
        raise MinfmError(f"{args.exp_dir}: {problem} (a run directory)")
    if not (root / "recipe.toml").is_file() and not (root / "index.html").is_file():
        # It serves every file below the folder: not a home folder by a slip of the tab key.
        raise MinfmError(f"{args.exp_dir}: neither a run directory (no recipe.toml) nor a gallery folder "
                         "(no index.html); minfm serve shows only those")
    httpd = gallery_server(root, args.host, args.port, args.allowed_hosts)  # a host it cannot listen on: its error alone
    if not is_loopback(args.host):
        print(f"minfm serve: warning: listening on {args.host}: other machines can read this run's files", file=sys.stderr)
    with httpd:
        host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL
        page = "samples/" if (root / "samples").is_dir() else ""
        print(terminal_safe(f"minfm: serving {root} at http://{host}:{httpd.server_address[1]}/{page}"), flush=True)
        httpd.serve_forever()
    return 0


ARGV_ENV = "MINFM_RELAUNCH_ARGV"


#: CPU processes per core a host may run (each runs torch's threads; tests run 2 on 1 core).
PROCS_PER_CORE = 4


def host_procs_problem(nproc: int) -> str | None:
    """``--nproc-per-node`` more than this host runs: a GPU each where there are GPUs (a
    worker without one failed only after start-up), else at most PROCS_PER_CORE per core
    (1,024 workers on 2 cores held the machine ten minutes before a step)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and nproc > gpus:
        return f"--nproc-per-node {nproc}: this host has {gpus} GPU(s), one per process"
    cores = os.cpu_count() or 1
    if not gpus and nproc > PROCS_PER_CORE * cores:
        return (f"--nproc-per-node {nproc}: this host has {cores} CPU core(s) and no GPU; at most "
                f"{PROCS_PER_CORE * cores} processes ({PROCS_PER_CORE} per core)")
    return None


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``minfm <argv>`` under torch.distributed.run with ``nproc`` local processes."""
    if problem := host_procs_problem(nproc):
        raise MinfmError(problem)
    # torchrun, whose failures end in exit codes rather than its traceback (cli/torchrun.py)
    cmd = [sys.executable, "-m", "minfm_core.cli.torchrun", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "minfm_core.cli.main"]
    # The arguments travel in the environment: torchrun's own parser would otherwise take
    # abbreviations of its flags (``--n`` for ``--nnodes``) from our command line.
    # LAUNCHER_ENV tells the workers who their launcher is: they die with it, and accept
    # that it holds the run-dir lock on their behalf.
    env = {**os.environ, ARGV_ENV: json.dumps(argv), runlock.LAUNCHER_ENV: str(os.getpid())}
    terminated = []

    def forward(signum, frame) -> None:
        # A scheduler's SIGTERM reaches this process only: torchrun passes it on to the workers,
        # which stop after their step with a checkpoint (engine/stop_signal.py) while this waits.
        terminated.append(signum)
        proc.send_signal(signum)

    with subprocess.Popen(cmd, env=env, preexec_fn=runlock.launcher_child_setup) as proc:
        previous = signal.signal(signal.SIGTERM, forward)
        try:
            try:
                rc = proc.wait()
            except KeyboardInterrupt:
                # A terminal's Ctrl-C reaches torchrun too, which stops its workers; a
                # `kill -INT` of this process alone does not: then pass it on.
                try:
                    rc = proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGINT)
                    rc = proc.wait()
                rc = rc if rc > 0 else 130  # Ctrl-C, whatever way torchrun ended
        finally:
            signal.signal(signal.SIGTERM, previous)
    if terminated:
        return STOPPED_EXIT_CODE
    if rc < 0:
        # torchrun itself died of a signal (SIGKILL from an OOM killer or a user): its workers
        # died with it and said nothing. Exit as a shell reports a signalled process, 128 + N
        # (sys.exit(-9) meant 247), with a line saying what happened.
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else f"signal {-rc}"
        print(f"minfm: error: the launcher's torchrun (pid {proc.pid}) was killed by {name}; its workers "
              "stopped with it", file=sys.stderr, flush=True)
        return 128 - rc
    return rc


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


def run(args) -> int:
    under_launcher = "LOCAL_RANK" in os.environ
    if under_launcher and runlock.LAUNCHER_ENV in os.environ:
        runlock.die_with_launcher()
    env = launch_env()  # a malformed RANK / WORLD_SIZE / LOCAL_RANK stops here, before anything starts
    world = env.world_size if under_launcher or "WORLD_SIZE" in os.environ else args.nproc_per_node
    resolved = load_recipe(args.recipe, args.overrides, world_size=world)  # fail fast, before spawning
    job = args.job or resolved.recipe.job
    # what `minfm check` refuses, refused before spawning (and before the run folder is made)
    problems = job_checks(resolved, job, world)
    if problems:
        raise RecipeError(problems, args.recipe)
    if job != "train" or under_launcher:
        return _run_here(args, resolved, job, under_launcher)
    # The process the user started holds the run dir for the run's life, so a second run
    # on it stops here, before any worker exists (see minfm_core/runlock.py). Released at the
    # end: a run folder this run made and left empty (a component failed to build) goes.
    exp_dir = Path(resolved.recipe.run.exp_dir)
    runlock.acquire(exp_dir)
    try:
        if args.nproc_per_node > 1:  # one process runs the same checks in its trainer, as early
            from ..checkpoint import CKPT_DIR

            runlock.preflight(exp_dir, exp_dir / CKPT_DIR, lambda: runlock.denoiser_param_bytes(resolved),
                              runlock.run_outputs(resolved, job))
        return _run_here(args, resolved, job, under_launcher)
    finally:
        runlock.release(exp_dir)


def _run_here(args, resolved, job: str, under_launcher: bool) -> int:
    if args.nproc_per_node > 1 and not under_launcher:
        return relaunch(args.nproc_per_node, strip_nproc(sys.argv[1:]))
    from ..engine import run_job

    return run_job(resolved, job=job)
