"""The demo's request batcher: one call per window and key, split back per request, errors delivered."""

from __future__ import annotations

import threading
import time

import pytest

from minfm_apps.batcher import Batcher


class FakeModel:
    """Records each call; 'draws' a job by echoing it."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None):
        self.calls: list[tuple[object, list]] = []
        self.delay = delay
        self.fail = fail

    def __call__(self, key, jobs, callback):
        self.calls.append((key, list(jobs)))
        for k in range(3):
            time.sleep(self.delay)
            callback(k + 1, 3)
        if self.fail is not None:
            raise self.fail
        return [("img", j) for j in jobs]


@pytest.fixture
def make():
    made = []

    def _make(model, **kw):
        b = Batcher(model, **kw)
        made.append(b)
        return b

    yield _make
    for b in made:
        b.close()


def test_requests_in_one_window_share_one_call(make):
    model = FakeModel()
    b = make(model, window_s=0.5, max_batch=8)
    reqs = [b.submit([f"a{i}"], key="k") for i in range(2)] + [b.submit(["b0", "b1"], key="k")]
    results = [r.future.result(timeout=10) for r in reqs]
    assert results == [[("img", "a0")], [("img", "a1")], [("img", "b0"), ("img", "b1")]]
    assert b.calls == 1 and len(model.calls) == 1
    assert model.calls[0][1] == ["a0", "a1", "b0", "b1"]
    rec = b.history[-1]
    assert (rec.requests, rec.images, rec.key) == (3, 4, "k")
    assert all((r.step, r.steps) == (3, 3) for r in reqs)  # every request saw the shared progress


def test_different_keys_are_separate_calls(make):
    model = FakeModel()
    b = make(model, window_s=0.3, max_batch=8)
    r1, r2, r3 = b.submit(["x"], key=("steps", 4)), b.submit(["y"], key=("steps", 8)), b.submit(["z"], key=("steps", 4))
    assert [r.future.result(timeout=10) for r in (r1, r2, r3)] == [[("img", "x")], [("img", "y")], [("img", "z")]]
    assert sorted((k, j) for k, j in model.calls) == [(("steps", 4), ["x", "z"]), (("steps", 8), ["y"])]
    assert b.calls == 2


def test_max_batch_caps_images_per_call_and_carries_the_rest(make):
    model = FakeModel()
    b = make(model, window_s=0.5, max_batch=3)
    reqs = [b.submit(["a", "b"], key=0), b.submit(["c", "d"], key=0), b.submit(["e"], key=0)]
    assert [len(r.future.result(timeout=10)) for r in reqs] == [2, 2, 1]
    sizes = [len(j) for _, j in model.calls]
    assert max(sizes) <= 3 and sum(sizes) == 5
    assert [j for _, js in model.calls for j in js] == ["a", "b", "c", "d", "e"]  # order kept


def test_a_request_larger_than_a_batch_is_refused(make):
    b = make(FakeModel(), window_s=0.0, max_batch=2)
    with pytest.raises(ValueError, match="exceeds max_batch=2"):
        b.submit(["a", "b", "c"], key=0)
    with pytest.raises(ValueError, match="at least one job"):
        b.submit([], key=0)


def test_a_failed_call_reaches_every_request_and_the_batcher_lives_on(make):
    model = FakeModel(fail=RuntimeError("out of memory"))
    b = make(model, window_s=0.3, max_batch=8)
    reqs = [b.submit(["a"], key=0), b.submit(["b"], key=0)]
    for r in reqs:
        with pytest.raises(RuntimeError, match="out of memory"):
            r.future.result(timeout=10)
    # the shared call failed, then each request alone: its own failure, not its batch-mate's
    assert [j for _, j in model.calls] == [["a", "b"], ["a"], ["b"]]
    model.fail = None
    assert b.submit(["c"], key=0).future.result(timeout=10) == [("img", "c")]
    assert b.calls == 4


class PoisonModel(FakeModel):
    """Refuses any call holding a job that starts with "bad", naming it (as an encoder names a prompt)."""

    def __call__(self, key, jobs, callback):
        bad = [j for j in jobs if j.startswith("bad")]
        self.fail = ValueError(f"unknown prompt {bad[0]!r}") if bad else None
        return super().__call__(key, jobs, callback)


def test_one_bad_request_fails_alone_and_its_error_names_only_its_own_input(make):
    model = PoisonModel()
    b = make(model, window_s=0.5, max_batch=8)
    good = b.submit(["good0", "good1"], key=0)
    bad = b.submit(["bad<img src=x>"], key=0)
    other = b.submit(["good2"], key=0)
    assert good.future.result(timeout=10) == [("img", "good0"), ("img", "good1")]
    assert other.future.result(timeout=10) == [("img", "good2")]
    with pytest.raises(ValueError, match="unknown prompt 'bad<img src=x>'"):
        bad.future.result(timeout=10)
    assert [j for _, j in model.calls] == [["good0", "good1", "bad<img src=x>", "good2"], ["good0", "good1"],
                                           ["bad<img src=x>"], ["good2"]]
    # the call that served each request is the one in history (the failed one is not)
    assert [r.jobs for r in b.history] == [("good0", "good1"), ("good2",)]


def test_wrong_result_count_is_an_error():
    b = Batcher(lambda key, jobs, cb: [], window_s=0.0)
    try:
        with pytest.raises(RuntimeError, match="returned 0 results for 1 jobs"):
            b.submit(["a"], key=0).future.result(timeout=10)
    finally:
        b.close()


def test_submissions_from_many_threads(make):
    model = FakeModel(delay=0.01)
    b = make(model, window_s=0.05, max_batch=4)
    out: dict[int, list] = {}

    def client(i: int) -> None:
        out[i] = b.submit([i], key=0).future.result(timeout=20)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == {i: [("img", i)] for i in range(12)}
    assert all(len(j) <= 4 for _, j in model.calls) and b.calls == len(model.calls) < 12


def test_close_stops_the_worker():
    b = Batcher(FakeModel(), window_s=0.0)
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(["a"], key=0)


def test_cancelled_requests_are_skipped_and_a_call_nobody_waits_for_stops(make):
    """A caller that left (its future cancelled) must not keep the sampler busy: a cancelled
    request is not drawn, and a running call whose requests are all cancelled stops."""
    model = FakeModel(delay=0.5)  # 3 steps of 0.5 s
    b = make(model, window_s=0.0, max_batch=1)
    running = b.submit(["slow"], key=0)
    deadline = time.monotonic() + 10
    while not model.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = [b.submit([f"q{i}"], key=0) for i in range(3)]
    for r in [running, *queued]:
        assert r.future.cancel()
    t0 = time.monotonic()
    assert b.submit(["next"], key=0).future.result(timeout=10) == [("img", "next")]
    assert time.monotonic() - t0 < 2.5  # not 0.5 + 3 x 1.5 s of abandoned work
    assert [j for _, j in model.calls] == [["slow"], ["next"]]


def test_a_cancelled_request_in_a_shared_call_gets_no_result_and_breaks_nothing(make):
    model = FakeModel(delay=0.2)
    b = make(model, window_s=0.3, max_batch=8)
    keep, drop = b.submit(["a"], key=0), b.submit(["b"], key=0)
    time.sleep(0.45)  # the call is running
    assert drop.future.cancel()
    assert keep.future.result(timeout=10) == [("img", "a")]
    assert drop.future.cancelled()


def test_the_queue_is_bounded_and_cancelled_requests_free_their_place(make):
    from minfm_apps.batcher import QueueFull

    model = FakeModel(delay=0.3)
    b = make(model, window_s=0.0, max_batch=1, max_queue=2)
    first = b.submit(["a"], key=0)
    deadline = time.monotonic() + 10
    while not model.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    waiting = [b.submit(["b"], key=0), b.submit(["c"], key=0)]
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        b.submit(["d"], key=0)
    assert waiting[0].future.cancel()
    last = b.submit(["e"], key=0)  # the cancelled one's place
    assert [r.future.result(timeout=10) for r in (first, waiting[1], last)] == [[("img", "a")], [("img", "c")],
                                                                                 [("img", "e")]]
    with pytest.raises(ValueError, match="max_queue"):
        Batcher(FakeModel(), max_queue=0)
