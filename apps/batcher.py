"""Request batching: requests that arrive close together share one sampler call.

Each request (one prompt, n images) is queued. One worker thread takes the first
waiting request, keeps collecting for ``window_s`` seconds or until ``max_batch``
images are gathered, and then runs every compatible request of that window in ONE
call, whatever their image sizes: the packed-sequence model needs no padding, so a
16x16 and a 24x32 request cost one pass over their summed tokens. Requests are
compatible when they share a ``key`` (what one call cannot vary per image: steps,
sampler, guidance). Only this thread touches the model, so one copy serves everyone.

A request whose ``future`` is cancelled (its caller left) is dropped: it is skipped when a
batch is formed, its result is discarded, and a call whose requests are all cancelled stops
at its next step. At most ``max_queue`` requests may wait (not cancelled, not yet in a call);
``submit`` refuses more with :class:`QueueFull`.

A call that fails is retried one request at a time: one request's fault (a prompt the
encoder refuses, a size that runs out of memory) reaches that request only, and its
batch-mates get their images (and never its error, which may quote its prompt).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("minfm_apps.batcher")

#: run(key, jobs, callback) -> one result per job; callback(step, steps) reports progress.
RunFn = Callable[[Hashable, list[Any], Callable[[int, int], None]], Sequence[Any]]


class QueueFull(RuntimeError):
    """``submit`` was refused: ``max_queue`` requests are already waiting."""


class _Abandoned(Exception):
    """Raised from the progress callback: every request of the running call was cancelled."""


@dataclass(eq=False)
class Request:
    """A submitted request: its jobs (one per image), its batch key and where its result lands."""

    jobs: list[Any]
    key: Hashable
    future: Future = field(default_factory=Future)
    step: int = 0  # sampler progress of the call serving this request (0 while waiting)
    steps: int = 0


@dataclass(frozen=True)
class BatchRecord:
    """What one sampler call served (for logs and tests)."""

    requests: int
    images: int
    key: Hashable
    jobs: tuple[Any, ...]
    seconds: float


class Batcher:
    """Collects requests for ``window_s`` seconds (up to ``max_batch`` images) and runs them together."""

    def __init__(self, run: RunFn, *, window_s: float = 0.1, max_batch: int = 8, history: int = 64,
                 max_queue: int | None = None) -> None:
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self.run = run
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.calls = 0  # sampler calls made so far
        self.history: collections.deque[BatchRecord] = collections.deque(maxlen=history)
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._carry: collections.deque[Request] = collections.deque()  # did not fit the last batch
        self._lock = threading.Lock()
        self._waiting: dict[int, Request] = {}  # submitted, not yet in a call (by id)
        self._thread = threading.Thread(target=self._loop, name="minfm-batcher", daemon=True)
        self._thread.start()

    def submit(self, jobs: Sequence[Any], key: Hashable) -> Request:
        if not jobs:
            raise ValueError("a request needs at least one job")
        if len(jobs) > self.max_batch:
            raise ValueError(f"a request of {len(jobs)} images exceeds max_batch={self.max_batch}")
        if not self._thread.is_alive():
            raise RuntimeError("the batcher is closed")
        req = Request(list(jobs), key)
        with self._lock:
            for rid in [rid for rid, r in self._waiting.items() if r.future.cancelled()]:
                del self._waiting[rid]
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the limit is {self.max_queue})")
            self._waiting[id(req)] = req
        self._queue.put(req)
        return req

    @property
    def waiting(self) -> int:
        """Requests submitted and not cancelled that no call has taken yet."""
        with self._lock:
            return sum(not r.future.cancelled() for r in self._waiting.values())

    def close(self, timeout: float | None = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    # ---- worker -------------------------------------------------------------------
    def _next(self, timeout: float | None) -> Request | None:
        """The next live request (cancelled ones are dropped here), None to stop; queue.Empty on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._carry:
                req = self._carry.popleft()
            else:
                left = None if deadline is None else deadline - time.monotonic()
                req = self._queue.get(timeout=left) if left is None or left > 0 else self._queue.get_nowait()
            if req is not None and req.future.cancelled():
                self._forget(req)
                continue
            return req

    def _forget(self, req: Request) -> None:
        with self._lock:
            self._waiting.pop(id(req), None)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._next(None)
            if first is None:
                break
            batch, images = [first], len(first.jobs)
            deadline = time.monotonic() + self.window_s
            while images < self.max_batch:
                try:
                    req = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if req is None:
                    stopping = True
                    break
                if images + len(req.jobs) > self.max_batch:
                    self._carry.append(req)  # first in line for the next batch
                    break
                batch.append(req)
                images += len(req.jobs)
            for req in batch:
                self._forget(req)
            groups: dict[Hashable, list[Request]] = {}
            for req in batch:
                groups.setdefault(req.key, []).append(req)
            for key, group in groups.items():
                self._serve(key, group)
        for req in list(self._carry):  # closing: nobody will serve these
            _deliver(req, exc=RuntimeError("the demo is shutting down"))

    def _serve(self, key: Hashable, group: list[Request]) -> None:
        group = [req for req in group if not req.future.cancelled()]
        if not group:
            return
        try:
            results = self._call(key, group)
        except _Abandoned:
            log.info("sampler call %d stopped: every request was cancelled", self.calls)
            return
        except Exception as exc:
            if len(group) > 1:
                # One request may be what failed (a prompt the encoder refuses, one size too big
                # for memory): its batch-mates must not get its error, which would also show them
                # its prompt. Each is served alone, so each hears of its own fault only.
                log.info("sampler call %d failed (%s): serving its %d requests one by one",
                         self.calls, type(exc).__name__, len(group))
                for req in group:
                    self._serve(key, [req])
                return
            _deliver(group[0], exc=exc)
            return
        except BaseException as exc:  # not a request's fault: every waiting request must hear about it
            for req in group:
                _deliver(req, exc=exc)
            return
        at = 0
        for req in group:
            _deliver(req, result=results[at : at + len(req.jobs)])
            at += len(req.jobs)

    def _call(self, key: Hashable, group: list[Request]) -> list[Any]:
        """One sampler call for ``group``'s jobs; raises :class:`_Abandoned` when all were cancelled."""
        jobs = [job for req in group for job in req.jobs]

        def callback(step: int, steps: int) -> None:
            if all(req.future.cancelled() for req in group):
                raise _Abandoned  # nobody waits for this call any more: stop sampling
            for req in group:
                req.step, req.steps = step, steps

        start = time.perf_counter()
        self.calls += 1
        results = list(self.run(key, jobs, callback))
        if len(results) != len(jobs):
            raise RuntimeError(f"the sampler returned {len(results)} results for {len(jobs)} jobs")
        seconds = time.perf_counter() - start
        self.history.append(BatchRecord(len(group), len(jobs), key, tuple(jobs), seconds))
        log.info("sampler call %d: %d requests, %d images in %.2f s", self.calls, len(group), len(jobs), seconds)
        return results


def _deliver(req: Request, *, result: Any = None, exc: BaseException | None = None) -> None:
    """Set a request's outcome unless it was cancelled meanwhile (then nobody wants it)."""
    try:
        if exc is not None:
            req.future.set_exception(exc)
        else:
            req.future.set_result(result)
    except InvalidStateError:
        pass
