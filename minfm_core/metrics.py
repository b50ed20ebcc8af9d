"""Image metrics that plugins register (``register_metrics``) and the trainer asks for by name.

The core computes no metric itself: the in-training FID (``train.fid_every``) asks for the
metric named ``fid`` and drives it through the members :class:`ImageMetric` declares.
A metric is registered as ``register(name, factory, doc=None)``, the factory a callable or
a lazy ``"module:attribute"`` string, called as::

    factory(ref, *, extractor=None, weights=None, device="cpu") -> ImageMetric

``ref`` is the reference images (an .npz of uint8 (N, H, W, 3) or a folder), ``extractor`` an
optional ``MODULE:ATTR`` feature-extractor factory, ``weights`` the default network's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .errors import MinfmError, PluginError


class ImageMetric(Protocol):
    """A distance between a set of generated images and a fixed reference set, from per-image features."""

    def features(self, images: Any) -> Any:
        """uint8 (N, 3, H, W) images -> (N, D) numpy features."""

    def reference_features(self, *, batch_size: int, shard: tuple[int, int] = (0, 1)) -> Any:
        """(n, D) features of the reference batches ``i, i + k, ...`` for ``shard=(i, k)``."""

    def stats(self, features: Any) -> Any:
        """A summary of (N, D) features (the reference's is computed once and kept)."""

    def distance(self, samples: Any, reference: Any) -> float:
        """The metric between two summaries."""


def registered_metrics() -> dict[str, tuple[str, Callable[..., Any] | str, str]]:
    """name -> (plugin, factory, doc) of every metric the loaded plugins register."""
    from .plugins import load_plugins

    state = load_plugins()
    found: dict[str, tuple[str, Callable[..., Any] | str, str]] = {}
    for impl in state.pm.hook.register_metrics.get_hookimpls():
        def register(name: str, factory, doc: str | None = None, _plugin: str = impl.plugin_name) -> None:
            if name in found:
                raise PluginError(f"metric {name!r} is registered by both plugin {found[name][0]!r} and plugin "
                                  f"{_plugin!r}; disable one with MINFM_DISABLE_PLUGINS")
            found[name] = (_plugin, factory, doc or "")

        impl.function(register)  # positionally, as pluggy calls a hook (its one argument is `register`)
    return found


def build_metric(name: str, ref: str, **kwargs: Any) -> ImageMetric:
    """The metric ``name`` for the reference images ``ref`` (kwargs: extractor, weights, device)."""
    from .registry import import_object

    metrics = registered_metrics()
    if name not in metrics:
        raise MinfmError(f"no plugin registers the image metric {name!r} (installed: {', '.join(sorted(metrics)) or 'none'}; "
                         f"minFM's own is the 'eval' plugin)")
    factory = metrics[name][1]
    if isinstance(factory, str):
        factory = import_object(factory)
    return factory(ref, **kwargs)
