"""``minfm hub push`` / ``minfm hub pull`` (argument parsing only; the work is in push.py / pull.py)."""

from __future__ import annotations

import argparse
import sys

from minfm_core.cli.argtypes import add_allow_pickle_flag, int_in, non_empty

from .pull import MAX_FILES_LIMIT


def register(sub) -> None:
    hub = sub.add_parser(
        "hub", help="push models to / pull models from the Hugging Face Hub",
        description="Share trained models as Hugging Face Hub repos (see docs/hub.md). Examples:\n"
        "  minfm hub push experiments/quickstart me/minfm-shapes\n"
        "  minfm hub pull me/minfm-shapes@v1 --local-dir shapes\n"
        "  minfm sample hf://me/minfm-shapes@v1 --prompt 'a red circle'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = hub.add_subparsers(dest="hub_command", metavar="SUBCOMMAND", parser_class=type(hub))

    p = cmds.add_parser("push", help="upload a trained model as one commit (no-op when nothing changed)")
    p.add_argument("src", metavar="SRC", type=non_empty("SRC"), help="run dir, checkpoint dir, or a folder holding model.safetensors")
    p.add_argument("repo_id", metavar="REPO_ID", help="namespace/name on the Hub (created if missing)")
    p.add_argument("--revision", metavar="R", type=non_empty("--revision"), help="branch to push to (created from main if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--include-training-state", action="store_true",
                   help="also push the full DCP training state (checkpoint/) so the run can be resumed")
    p.add_argument("--diffusers", action="store_true",
                   help="also push a diffusers-format transformer/ folder (FluxTransformer2DModel, EMA weights)")
    add_allow_pickle_flag(p)
    p.add_argument("--message", "-m", metavar="M", help="commit message")
    p.add_argument("--license", default="other", help="license id for the model card (default: other)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="shard safetensors files above this size, with an index (1KB..50GB, default 5GB)")
    p.set_defaults(func=_push)

    p = cmds.add_parser("pull", help="download a model repo (safetensors and text files only)")
    p.add_argument("ref", metavar="REPO_ID[@REV]", help="namespace/name, optionally @branch, @tag or @commit")
    p.add_argument("--local-dir", metavar="DIR", help="download into DIR instead of the Hugging Face cache")
    p.add_argument("--include-training-state", action="store_true",
                   help="also download the DCP training state (checkpoint/), needed to resume training")
    p.add_argument("--max-files", type=int_in("--max-files", 1, MAX_FILES_LIMIT), metavar="N",
                   help="refuse a pull of more than N files (default 10000, or MINFM_HUB_MAX_FILES)")
    p.add_argument("--max-bytes", metavar="SIZE",
                   help="refuse a pull of more than SIZE bytes, e.g. 200GB (default 1TiB, or MINFM_HUB_MAX_BYTES)")
    p.set_defaults(func=_pull)


def _push(args) -> int:
    from .push import push

    result = push(
        args.src, args.repo_id, revision=args.revision, private=args.private,
        include_training_state=args.include_training_state, allow_pickle_checkpoint=args.allow_pickle_checkpoint,
        diffusers=args.diffusers, message=args.message,
        license=args.license, max_shard_size=args.max_shard_size,
    )
    print(f"hf://{result.repo_id}@{result.commit}")
    return 0


def _pull(args) -> int:
    from .pull import pull

    pulled = pull(args.ref, args.local_dir, training_state=args.include_training_state,
                  max_files=args.max_files, max_bytes=args.max_bytes)
    print(f"pulled {args.ref} (commit {pulled.commit[:12]})", file=sys.stderr)
    print(pulled.path)
    return 0
