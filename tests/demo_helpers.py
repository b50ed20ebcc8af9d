"""A demo app on a free loopback port, for the tests that talk to a real server."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def serving(model, *, window_s: float = 1.0, max_batch: int = 8, queue_limit: int = 16):
    """Yield (app, batcher, url) for ``model``; the wide default window keeps CI load from splitting a batch."""
    from minfm_apps.batcher import Batcher
    from minfm_apps.demo import batcher_queue_limit, build_app, launch

    batcher = Batcher(lambda s, jobs, cb: model.run(s, jobs, cb), window_s=window_s, max_batch=max_batch,
                      max_queue=batcher_queue_limit(queue_limit, max_batch))
    app = build_app(model, batcher, queue_limit=queue_limit)
    _, url, _ = launch(app, host="127.0.0.1", port=None, block=False)
    try:
        yield app, batcher, url
    finally:
        app.close()
        batcher.close()
