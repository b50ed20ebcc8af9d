"""Image metrics that plugins register (``register_metrics``, kind ``metric``) and the
trainer asks for by name.

The core computes no metric itself: the in-training FID (``train.fid_every``) asks the
registry for the metric ``train.fid_metric`` names (``fid``: the ``eval`` plugin's) and drives it through the members of
:class:`minfm_core.protocols.Metric`. The registered factory is called as::

    factory(ref, *, extractor=None, weights=None, device="cpu") -> Metric

``ref`` is the reference images (an .npz of uint8 (N, H, W, 3) or a folder), ``extractor`` an
optional ``MODULE:ATTR`` feature-extractor factory, ``weights`` the default network's weights.
"""

from __future__ import annotations

from typing import Any

from . import protocols
from .errors import MinfmError, PluginError
from .protocols import Metric


def build_metric(name: str, ref: str, **kwargs: Any) -> Metric:
    """The metric ``name`` for the reference images ``ref`` (kwargs: extractor, weights, device)."""
    from .registry import get_registry

    registry = get_registry()
    if name not in registry.names("metric"):
        installed = ", ".join(registry.names("metric")) or "none"
        raise MinfmError(f"no plugin registers the image metric {name!r} (installed: {installed}; "
                         f"minFM's own is the 'eval' plugin)")
    component = registry.get("metric", name)
    built = component.load_factory()(ref, **kwargs)
    # as Component.build checks what it builds: a metric lacking `distance` trained through
    # every step up to the first FID, then died of an AttributeError blamed on minFM
    problem = protocols.built_problem("metric", built)
    if problem:
        raise PluginError(f"{component.describe()}: {problem}")
    return built
