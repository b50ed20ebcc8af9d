"""Built-in plugin 'eval': sample-quality metrics (the ADM suite's table) and ``minfm eval``.

    minfm eval imagenet samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    minfm eval folder experiments/run/samples/images --ref reference_images/

Inception Score, FID, sFID, precision and recall live in :mod:`.evaluate` and :mod:`.metrics`;
the Inception network is torch-fidelity's (``pip install 'minfm[eval]'``), and any callable
with the same output (:data:`.evaluate.Extractor`) can stand in for it. The plugin also
registers the ``fid`` image metric, which the trainer's in-training FID (``train.fid_every``)
asks for by name. This module holds hooks only: numpy, torch and the network load when a
command or metric runs, so registering stays fast.
"""

from minfm_core import hookimpl


@hookimpl
def register_commands(subparsers):
    from .cli import register

    register(subparsers)


@hookimpl
def register_metrics(register):
    register("fid", "minfm_plugins.eval.fid:FidMetric", doc="Frechet distance of pool features (Inception by default)")
