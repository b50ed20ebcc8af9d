"""Evaluate an image set against a reference set: IS, FID, sFID, precision, recall."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from minfm_core.errors import MinfmError
from minfm_core.validators import factory_spec_problem
from .inputs import image_batches
from .metrics import feature_stats, frechet_distance, inception_score, precision_recall

#: An extractor maps uint8 (N, 3, H, W) images to {"pool", "spatial", "logits"} float tensors.
Extractor = Callable[[torch.Tensor], dict[str, torch.Tensor]]
FEATURES = ("pool", "spatial", "logits")
#: Metric keys in the seed's table order, with their printed names.
NAMES = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision", "recall": "Recall"}




def load_extractor(spec: str, where: str = "--extractor") -> Extractor:
    """Call the factory ``MODULE:ATTR`` for a feature extractor (``where`` names the setting in errors).

    The factory must be a Python function or class of a module outside the standard
    library, callable without arguments, and must return a callable. Anything else (say
    ``os:system``) is refused by name before it is called: the spec is a way to plug in a
    network, not to run arbitrary functions.
    """
    if problem := factory_spec_problem(spec):
        raise MinfmError(f"{where} {spec!r}: {problem}")
    mod, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise MinfmError(f"{where} {spec!r}: {exc}") from None
    factory = obj
    if not (inspect.isfunction(factory) or inspect.isclass(factory)):
        raise MinfmError(f"{where} {spec!r}: expected a Python function or class, got {type(factory).__name__}")
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise MinfmError(f"{where} {spec!r}: the factory must be callable without arguments") from None
    except ValueError:
        pass  # no signature to inspect (some C-level classes): the call below decides
    try:
        extractor = factory()
    except Exception as exc:  # the user's own code: its failure is named, not a minFM bug
        raise MinfmError(f"{where} {spec!r}: the factory failed: {type(exc).__name__}: {exc}") from None
    if not callable(extractor):
        raise MinfmError(f"{where} {spec!r}: the factory returned {type(extractor).__name__}, not a callable extractor")
    return extractor


def extract_features(source: str | Path, extractor: Extractor, *, batch_size: int = 64, log=None,
                     shard: tuple[int, int] = (0, 1), opened=None) -> dict[str, np.ndarray]:
    """Features of every image of an .npz or a folder, as float32 arrays (N, D).

    ``shard=(i, k)``: only batches ``i, i + k, ...`` (one process's share of k).
    ``opened``: what ``image_batches(source, batch_size)`` returned already (its checks done).
    """
    n, batches = opened or image_batches(source, batch_size)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in FEATURES}
    done = 0
    for b, batch in enumerate(batches):  # every batch is read, so an .npz's CRC is checked at its end
        if b % shard[1] != shard[0]:
            continue
        feats = extractor(torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2))  # a copy: batches may be read-only
        missing = [k for k in FEATURES if k not in feats]
        if missing:
            raise MinfmError(f"feature extractor returned no {', '.join(missing)} features")
        for k in FEATURES:
            f = feats[k].detach().float().cpu().numpy().reshape(batch.shape[0], -1)
            check_finite(f, source)
            if parts[k] and f.shape[1] != parts[k][0].shape[1]:
                raise MinfmError(f"the feature extractor returned {k} features of width {parts[k][0].shape[1]} "
                                 f"and of width {f.shape[1]} for batches of {source}")
            parts[k].append(f)
        done += batch.shape[0]
        if log is not None:
            log(f"{source}: {done}/{n} images")
    return {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in parts.items()}


def check_finite(features: np.ndarray, source) -> None:
    """A MinfmError for NaN or infinite features: they would end in a linear-algebra traceback."""
    if not np.isfinite(features).all():
        raise MinfmError(f"the feature extractor returned non-finite features for {source}")


def check_widths(what: str, samples: np.ndarray, ref: np.ndarray) -> None:
    """A MinfmError unless sample and reference features have one width (say, two extractors' caches)."""
    if samples.shape[1:] != ref.shape[1:]:
        raise MinfmError(f"the feature extractor returned {what} of width {samples.shape[1]} for samples "
                         f"but {ref.shape[1]} for the reference")


#: Precision and recall measure each image's distance to its PR_K-th nearest neighbour in its
#: own set (the ADM suite's k); with PR_K images or fewer there is no such neighbour, and a
#: smaller k gave numbers of another metric (3 samples: precision and recall 1.0).
PR_K = 3
#: The fewest images of each set the table is computed from.
MIN_IMAGES = PR_K + 1
_TOO_FEW = f"at least {MIN_IMAGES} images are needed (precision and recall use each image's {PR_K}rd nearest neighbour)"


def compute_metrics(samples: dict[str, np.ndarray], ref: dict[str, np.ndarray], *, device="cpu") -> dict[str, float]:
    """The seed's table from sample and reference features."""
    for name, feats in (("samples", samples), ("reference", ref)):
        if feats["pool"].shape[0] < MIN_IMAGES:
            raise MinfmError(f"{name}: {_TOO_FEW}, found {feats['pool'].shape[0]}")
        for k in FEATURES:
            check_finite(feats[k], name)
    for k in FEATURES:
        check_widths(f"{k} features", samples[k], ref[k])
    fid = frechet_distance(*feature_stats(samples["pool"]), *feature_stats(ref["pool"]))
    sfid = frechet_distance(*feature_stats(samples["spatial"]), *feature_stats(ref["spatial"]))
    precision, recall = precision_recall(ref["pool"], samples["pool"], k=PR_K, device=device)
    return {"inception_score": inception_score(samples["logits"]), "fid": fid, "sfid": sfid,
            "precision": precision, "recall": recall}


def pick_device(choice: str = "auto") -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise MinfmError("--device cuda: no CUDA device is available")
    return torch.device(choice)


def evaluate(samples: str | Path, ref: str | Path, *, extractor: Extractor | None = None, weights: str | None = None,
             device: str = "auto", batch_size: int = 64, log=None) -> dict[str, float]:
    """Metrics of ``samples`` (an .npz or a folder) against ``ref`` (same kinds)."""
    from .inception import InceptionFeatures

    dev = pick_device(device)
    # Bad input fails before any network runs; counting reads only an .npz's header or a folder's names.
    opened = {}
    for name, source in (("samples", samples), ("reference", ref)):
        n, _ = opened[name] = image_batches(source, batch_size)
        if n < MIN_IMAGES:
            raise MinfmError(f"{name} {source}: {_TOO_FEW}, found {n}")
    if log is None:
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    extractor = extractor or InceptionFeatures(weights, device=dev)
    ref_feats = extract_features(ref, extractor, batch_size=batch_size, log=log, opened=opened["reference"])
    sample_feats = extract_features(samples, extractor, batch_size=batch_size, log=log, opened=opened["samples"])
    out = compute_metrics(sample_feats, ref_feats, device=dev)
    return {**out, "num_samples": int(sample_feats["pool"].shape[0]), "num_reference": int(ref_feats["pool"].shape[0])}


def format_table(metrics: dict[str, float]) -> str:
    rows = [f"{NAMES[k]:<16} {metrics[k]:.4f}" if k in ("precision", "recall") else f"{NAMES[k]:<16} {metrics[k]:.2f}"
            for k in NAMES]
    return "\n".join(rows)
