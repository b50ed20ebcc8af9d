"""``minfm eval``: Inception Score, FID, sFID, precision and recall of generated images.

    minfm eval imagenet samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    minfm eval folder experiments/run/samples/images --ref reference.npz --out metrics.json

Both sit in the shared ``eval`` command group, so another plugin can add its own ``minfm eval X``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from minfm_core.cli.argtypes import int_in, non_empty
from minfm_core.cli.groups import command_group
from minfm_core.errors import MinfmError
from minfm_core.safepath import is_inside, missing_folder, refuse_special, write_text_atomic
from minfm_core.validators import MAX_BATCH

#: The seed's table was computed on 50,000 samples (1000 classes x 50).
IMAGENET_SAMPLES = 50_000


def register(sub) -> None:
    what = command_group(sub, "eval", help="sample-quality metrics (IS, FID, sFID, precision, recall)")
    for name, helptext, arg_help in (
        ("imagenet", "evaluate an .npz of samples (ADM layout) as the seed's ImageNet table",
         "samples .npz: arr_0 uint8 (N, H, W, 3), e.g. from `minfm sample --npz`"),
        ("folder", "evaluate a folder of images", "folder of .png/.jpg images (searched recursively)"),
    ):
        q = what.add_parser(name, help=helptext)
        q.add_argument("samples", type=non_empty("SAMPLES"), help=arg_help)
        q.add_argument("--ref", required=True, type=non_empty("--ref"), help="reference images: an .npz (e.g. VIRTUAL_imagenet256_labeled.npz) or a folder")
        q.add_argument("--inception", metavar="FILE", type=non_empty("--inception"),
                       help="Inception weights (torch-fidelity's .pth or a .safetensors; a path or org/name/file Hub "
                            "reference); default $MINFM_INCEPTION_WEIGHTS, else the torch hub cache")
        q.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the network runs")
        q.add_argument("--batch-size", type=int_in("--batch-size", 1, MAX_BATCH), default=64, metavar="N", help="images per network call (default 64)")
        q.add_argument("--out", metavar="JSON", type=non_empty("--out"), help="also write the metrics to this JSON file")
        q.add_argument("--extractor", metavar="MODULE:ATTR",
                       help="use another feature extractor: a callable returning one (see minfm_plugins.eval.evaluate.Extractor)")
        q.set_defaults(func=run, eval_what=name)


def run(args) -> int:
    from .evaluate import evaluate, format_table, load_extractor

    samples = Path(args.samples)
    if args.eval_what == "imagenet":
        if samples.suffix != ".npz" or not samples.is_file():
            raise MinfmError(f"{args.samples}: expected an .npz file of samples (minfm sample --npz writes one)")
    elif problem := missing_folder(samples):
        raise MinfmError(f"{args.samples}: {problem}")
    if not Path(args.ref).exists():
        raise MinfmError(f"--ref {args.ref}: no such file or folder")
    if args.out:  # before the work: a metrics file that cannot be written would lose it
        check_out(Path(args.out), samples, Path(args.ref))
    extractor = load_extractor(args.extractor) if args.extractor else None
    metrics = evaluate(samples, args.ref, extractor=extractor, weights=args.inception, device=args.device,
                       batch_size=args.batch_size)
    if args.eval_what == "imagenet" and metrics["num_samples"] != IMAGENET_SAMPLES:
        print(f"minfm: note: {metrics['num_samples']} samples; the seed's table uses {IMAGENET_SAMPLES:,}")
    print(f"{args.samples} vs {args.ref} ({metrics['num_samples']} vs {metrics['num_reference']} images)")
    print(format_table(metrics))
    if args.out:
        write_text_atomic(Path(args.out), json.dumps(metrics, indent=2) + "\n")
    return 0


def check_out(out: Path, samples: Path, ref: Path) -> None:
    """A MinfmError unless ``out`` names a new or replaceable file that is none of the inputs.

    Writing over the reference (or into the samples folder, where the file would join the
    set next time) would corrupt the data the numbers come from.
    """
    if out.is_dir() or not out.parent.is_dir():
        why = "is a folder" if out.is_dir() else f"{out.parent} is not a folder"
        raise MinfmError(f"--out {out}: {why}; name a JSON file to write")
    try:  # a FIFO or /dev/null: refused by the write, after the whole evaluation
        refuse_special(out)
    except MinfmError as exc:
        raise MinfmError(f"--out {exc}") from None
    for what, source in (("the samples", samples), ("the --ref", ref)):
        if source.is_dir() and is_inside(out, source):
            raise MinfmError(f"--out {out}: lies inside {what} folder {source}; write the metrics elsewhere")
        if os.path.realpath(out) == os.path.realpath(source):
            raise MinfmError(f"--out {out}: is {what} file; write the metrics elsewhere")
    # os.access alone says yes to root for any folder (/proc too): try making a file there.
    try:
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise PermissionError("permission denied")
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise MinfmError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc})") from None
