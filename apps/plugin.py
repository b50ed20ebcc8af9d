"""The apps plugin: adds ``minfm demo`` to the CLI.

Hook implementations only; gradio and torch are imported when the command runs, so
``minfm --help`` stays fast and works without the ``demo`` extra installed.
"""

from __future__ import annotations

import importlib.util

from minfm_core import hookimpl
from minfm_core.cli.argtypes import add_allowed_host_flag, host_arg, non_empty
from minfm_core.errors import MinfmError

from .numbers import NUMBERS


@hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser(
        "demo", help="serve a Gradio text-to-image (or text-to-video) demo (page + /generate API) of a model",
        description="Serve a text-to-image page and a /generate API for SRC (a run directory, a checkpoint, "
                    "a model folder or hf://org/name[@rev]). Requests arriving together are sampled in one "
                    "packed batch, even at different sizes.",
    )
    p.add_argument("source", metavar="SRC", type=non_empty("SRC"), help="run directory, checkpoint directory, model folder or hf://org/name[@rev]")
    p.add_argument("--host", default="127.0.0.1", type=host_arg, help="address to bind (default: loopback only)")
    p.add_argument("--port", type=NUMBERS["--port"], default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    add_allowed_host_flag(p)
    p.add_argument("--queue-limit", type=NUMBERS["--queue-limit"], default=32, metavar="N", help="requests allowed to wait in the queue")
    p.add_argument("--max-batch", type=NUMBERS["--max-batch"], default=8, metavar="N",
                   help="images per batched sampler call (and handlers running at once)")
    p.add_argument("--batch-window-ms", type=NUMBERS["--batch-window-ms"], default=100.0, metavar="MS",
                   help="how long the first request waits for others to join its batch")
    p.add_argument("--max-steps", type=NUMBERS["--max-steps"], default=100, metavar="N", help="upper bound on sampler steps per request")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA weights")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise MinfmError("minfm demo needs gradio: pip install 'minfm[demo]'")
    from .demo import serve

    return serve(args.source, host=args.host, port=args.port, share=args.share, queue_limit=args.queue_limit,
                 max_batch=args.max_batch, window_ms=args.batch_window_ms, use_ema=not args.no_ema,
                 max_steps=args.max_steps, allowed_hosts=tuple(args.allowed_hosts))
