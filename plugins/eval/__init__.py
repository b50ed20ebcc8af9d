"""Sample-quality evaluation: Inception Score, FID, sFID, precision and recall (the ADM suite's table).

    minfm eval imagenet samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    minfm eval folder experiments/run/samples/images --ref reference_images/

The Inception network is torch-fidelity's (``pip install 'minfm[eval]'``); any callable with
the same output (:data:`Extractor`) can stand in for it, e.g. a small random network in tests.
"""

from .evaluate import Extractor, compute_metrics, evaluate, extract_features, format_table, load_extractor
from .inception import InceptionFeatures, resolve_inception_weights
from .metrics import feature_stats, frechet_distance, inception_score, precision_recall

__all__ = [
    "Extractor", "InceptionFeatures", "compute_metrics", "evaluate", "extract_features", "feature_stats",
    "format_table", "frechet_distance", "inception_score", "load_extractor", "precision_recall", "resolve_inception_weights",
]
