"""A resumable, per-rank, infinite iterator of micro-batches over a map-style dataset.

Each epoch is one permutation of the whole dataset drawn from (seed, epoch), the same on every
rank, and the epochs follow each other in one endless global stream; rank r takes its items
r, r + W, r + 2W, ... So W ranks together read exactly what one process reads, in the same
order, whether or not W divides the dataset's length: the first k items of every rank are the
first k·W items of the global stream (no padding, no dropped samples, every sample once per
epoch). Batches are cut from a rank's stream, so every batch is full and may straddle an
epoch boundary.

The whole position is one number, the count of items this rank has yielded; it is the same on
every rank (all ranks take the same number of batches), so the trainer can save rank 0's
:meth:`BatchIterator.state_dict` and load it on all ranks. Times the world size it is the
global position: another world size continues from the same place when it divides it. Prefetching workers
(``num_workers > 0``) run ahead, but the state counts only what was handed out, so resuming
reproduces the remaining batches exactly.

Datasets have ``set_epoch(epoch)`` (declared by :class:`minfm_core.protocols.Dataset`, whose
default does nothing): it is called before each item with that item's
epoch (in the worker that loads it), so augmentations such as flips can vary per epoch while
staying a pure function of (seed, epoch, index).
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .boundary import item_problem
from .errors import MinfmError, MinfmWarning, PluginError


def seed_sequence(seed: int, *keys: int) -> np.random.SeedSequence:
    """The seed of a random stream keyed by ``(seed, *keys)``, whole: keeping only the low 32 bits
    of the seed drew the same orders for seeds 0 and 2**32. Those bits and the keys go in as
    before (a seed below 2**32 draws exactly what it drew), the higher bits as a spawn key."""
    high = (seed >> 32) & 0xFFFFFFFF  # seeds are below 2**64
    return np.random.SeedSequence([seed & 0xFFFFFFFF, *(k & 0xFFFFFFFF for k in keys)],
                                  spawn_key=(high,) if high else ())


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The dataset order of one epoch (identical in every process)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng(seed_sequence(seed, epoch)).permutation(n)


class _Keyed(torch.utils.data.Dataset):
    """Fetches ``(epoch, index)`` keys: sets the item's epoch first when the dataset cares
    (has ``set_epoch``: a registered dataset must, protocols.Dataset; any indexable will do
    for a BatchIterator used directly)."""

    def __init__(self, dataset: Any, who: str = "data") -> None:
        self.dataset = dataset
        self.who = who
        self.epochs = callable(getattr(dataset, "set_epoch", None))

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        if self.epochs:
            self.dataset.set_epoch(epoch)
        item = self.dataset[index]
        if not isinstance(item, dict):  # the rest of an item is checked where it is read (boundary)
            raise PluginError(f"{self.who}: item {index}: {item_problem(item)}")
        # The key travels with the sample: the trainer derives the sample's noise and time
        # from it, so a sample is noised the same whichever rank or micro-batch draws it.
        return {**item, "epoch": epoch, "index": index}

    def __len__(self) -> int:
        return len(self.dataset)


def _as_list(batch: list[dict]) -> list[dict]:
    return batch  # module level so spawned workers can pickle it


class _Raised:
    """A user's error met in a data worker (a MinfmError: an unreadable image; an OSError: a
    file that went away), sent to the training process as a value and raised there as
    itself. DataLoader re-raises a worker's exception as a new one whose message is the
    worker's whole traceback: a bad file read as a bug, one line of escaped traceback."""

    def __init__(self, exc: MinfmError | OSError) -> None:
        # Rebuilt as minFM's or Python's own class (OSError picks its subclass by errno): a
        # plugin's error class may not survive pickling.
        if isinstance(exc, MinfmError):
            self.error: Exception = MinfmError(str(exc))
        else:
            self.error = OSError(exc.errno, exc.strerror, exc.filename) if exc.errno is not None else OSError(str(exc))


class _InWorker(torch.utils.data.Dataset):
    """A dataset as a data worker fetches it: a user's error comes back as :class:`_Raised`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, key: Any) -> dict | _Raised:
        try:
            return self.dataset[key]
        except (MinfmError, OSError) as exc:
            return _Raised(exc)

    def __len__(self) -> int:
        return len(self.dataset)


def _worker_batches(dataset: Any, batch_sampler: Any, num_workers: int, *, seed: int):
    """DataLoader's iterator over ``dataset``'s batches (lists of items) in ``num_workers``
    data workers, which ignore SIGINT and SIGTERM and send a user's error back as a value."""
    loader = torch.utils.data.DataLoader(
        _InWorker(dataset),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=_as_list,
        # DataLoader draws its worker base seed from this generator; without one it would
        # consume the global torch RNG and shift the trainer's random stream on resume.
        generator=torch.Generator().manual_seed(seed & 0x7FFFFFFF),
        worker_init_fn=_leave_signals_to_the_trainer,
    )
    return iter(loader)


def _next_batch(it: Iterator[list]) -> list:
    """``next(it)``, with a data worker killed by a signal reported as such. torch notices a dead
    worker either in its SIGCHLD handler ("is killed by signal: Killed.") or first in its own
    liveness check ("exited unexpectedly", no signal): one SIGKILL got either line, by a race.
    The worker's exit code (that check has just collected it) says which signal it was."""
    try:
        return next(it)
    except RuntimeError as exc:
        if "exited unexpectedly" in str(exc):
            for w in getattr(it, "_workers", ()):  # DataLoader's iterator: its worker processes
                if w.exitcode is not None and w.exitcode < 0:
                    raise RuntimeError(f"DataLoader worker (pid {w.pid}) is killed by signal: "
                                       f"{signal.strsignal(-w.exitcode)}.") from None
        raise


def _each_batch(it: Iterator[list]) -> Iterator[list]:
    while True:
        try:
            batch = _next_batch(it)
        except StopIteration:
            return
        yield _raise_from_workers(batch)


def _raise_from_workers(batch: list) -> list:
    for item in batch:
        if isinstance(item, _Raised):
            raise item.error
    return batch


@contextlib.contextmanager
def loaded_ahead(dataset: Any, batches: list[list[int]], num_workers: int) -> Iterator[Iterator[list]]:
    """An iterator of ``dataset``'s items for each list of indices in ``batches``, in order:
    read in this process when ``num_workers`` is 0, else by that many worker processes ahead of
    the caller, under a training run's rules for its data workers (they ignore SIGINT and
    SIGTERM; a MinfmError or OSError raised in one is raised here as itself; they end with the
    block, whatever ends it)."""
    if num_workers <= 0:
        yield ([dataset[i] for i in batch] for batch in batches)
        return
    it = _worker_batches(dataset, batches, num_workers, seed=0)
    try:
        yield _each_batch(it)
    finally:
        it._shutdown_workers()  # now, not when an error's traceback lets go of the loader


class BatchIterator:
    """Micro-batches (``list[dict]``) of ``batch_size`` samples for one rank, forever.

    Resumable: ``state_dict()`` after k batches, loaded into a fresh iterator, yields exactly
    batches k+1, k+2, ... of the uninterrupted run.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        who: str = "data",
    ) -> None:
        """``who``: the dataset as errors name it (``dataset 'x' of plugin 'y'``)."""
        n = len(dataset)
        if batch_size < 1:
            raise MinfmError(f"batch size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise MinfmError(f"rank {rank} is outside world size {world_size}")
        if n < world_size:
            raise MinfmError(f"the dataset has {n} samples, fewer than the {world_size} ranks that share it")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_workers = num_workers
        self._n = n
        self._consumed = 0
        self._keyed = _Keyed(dataset, who)
        self._stream = _KeyStream(n, batch_size, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)
        self._source: Iterator[list[dict]] | None = None
        if num_workers > 0:
            # Before multiprocessing's own exit hook, which SIGTERMs the workers (they ignore
            # it) and then waits for them, forever: an error's traceback can keep the loader
            # alive past close(). atexit runs the later registration first.
            atexit.register(_stop_workers, weakref.ref(self))

    # -- position -------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epoch of the next item this rank will yield."""
        return self._stream.place(self._consumed)[0]

    @property
    def position(self) -> int:
        """Place of the next item this rank will yield within its epoch's order."""
        return self._stream.place(self._consumed)[1]

    @property
    def batches_per_epoch(self) -> float:
        return self._n / (self.world_size * self.batch_size)

    # -- iteration ------------------------------------------------------------------------
    def _start(self) -> Iterator[list[dict]]:
        if self.num_workers <= 0:
            return ([self._keyed[k] for k in keys] for keys in self._stream.batches(self._consumed))
        return _worker_batches(self._keyed, _Batches(self._stream, self._consumed), self.num_workers, seed=self.seed)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> list[dict]:
        if self._source is None:
            self._source = self._start()
        batch = _next_batch(self._source)
        try:
            _raise_from_workers(batch)
        except (MinfmError, OSError):
            self.close()
            raise
        self._consumed += len(batch)
        return batch

    def close(self) -> None:
        """Stop prefetching workers, now (a later ``next`` restarts them at the right place)."""
        source, self._source = self._source, None
        # DataLoader's iterator stops its workers when collected; an error's traceback may
        # hold it, so stop them here (the call PyTorch Lightning makes too).
        stop = getattr(source, "_shutdown_workers", None)
        if stop is not None:
            stop()

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {
            "consumed": self._consumed,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "dataset_len": self._n,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s position. ``state`` comes from a checkpoint file, so
        each count is checked to be a whole number in range before it is used."""
        if not isinstance(state, dict):
            raise MinfmError(f"data position: expected an object, got {type(state).__name__}")
        consumed = _count(state, "consumed", None)
        for key in ("epoch", "dataset_len", "world_size", "position", "batch_size"):
            _count(state, key, 0)
        _count(state, "seed", 0, 2**64 - 1)  # derived seeds (runtime.indexed_seed) stay below 2**64
        if state.get("world_size") == 0:
            raise MinfmError("data position: world_size must be at least 1")
        if int(state.get("dataset_len", self._n)) != self._n:
            # Another dataset: no position in the old order means anything; restart its epoch.
            warnings.warn(
                f"data: the dataset changed size ({state['dataset_len']} -> {self._n}); "
                f"resuming at the start of epoch {state.get('epoch', 0)}",
                MinfmWarning, stacklevel=2,
            )
            consumed = int(state.get("epoch", 0)) * self._n // self.world_size
        elif int(state.get("world_size", self.world_size)) != self.world_size:
            # Different rank count: the same global position (exact when this world size
            # divides it, as it does at a checkpoint when it divides the total batch size).
            consumed = consumed * int(state["world_size"]) // self.world_size
        if int(state.get("seed", self.seed)) != self.seed:
            # the trainer's seed is run.seed (data.seed, where a dataset has one, is its own)
            warnings.warn(f"data: resuming with shuffle seed {self.seed} instead of {state['seed']} (run.seed): the "
                          "data order differs from the checkpoint's", MinfmWarning, stacklevel=2)
        self.close()
        self._consumed = consumed


#: Largest count a saved data position may hold: far past any run, small enough that
#: products with a world size or an epoch length stay exact and fit numpy's seeds.
MAX_COUNT = 2**62


def _count(state: dict[str, Any], key: str, default: int | None, most: int = MAX_COUNT) -> int:
    value = state.get(key, default)
    if value is None:
        raise MinfmError(f"data position: {key} is missing")
    if type(value) is not int or not 0 <= value <= most:
        raise MinfmError(f"data position: {key} must be a whole number in [0, {most}], got {str(value)[:40]}")
    return value


def _stop_workers(ref: weakref.ref) -> None:
    it = ref()
    if it is not None:
        it.close()


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """A worker ignores SIGINT and SIGTERM: a terminal's Ctrl-C and a scheduler's SIGTERM reach
    every process of the job, and a worker dying of one made the trainer's next batch raise
    (torch reports a killed worker at once) instead of stopping after the step with its
    checkpoint. Workers end with the trainer: it shuts them down, or they see it gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _KeyStream:
    """One rank's endless stream of (epoch, index) keys, in batches. Its own object, not the
    BatchIterator's methods: the worker iterator's sampler holds it, and a sampler holding the
    BatchIterator would close a reference cycle, which only the cyclic GC frees. It frees the
    worker iterator's queues before the iterator's ``__del__`` can send its workers their stop,
    and they then wait for it forever (one test hung at exit so)."""

    def __init__(self, n: int, batch_size: int, *, rank: int, world_size: int, seed: int, shuffle: bool) -> None:
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self._order_cache: tuple[int, np.ndarray] | None = None

    def place(self, item: int) -> tuple[int, int]:
        """(epoch, place in its order) of item ``item`` of this rank: item ``rank + item * W``
        of the global stream."""
        return divmod(self.rank + item * self.world_size, self.n)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(self.n, self.seed, epoch, self.shuffle))
        return self._order_cache[1]

    def batches(self, start: int) -> Iterator[list[tuple[int, int]]]:
        """Batches of keys from item ``start`` of this rank's stream."""
        item = start
        while True:
            keys = []
            for _ in range(self.batch_size):
                epoch, pos = self.place(item)
                keys.append((epoch, int(self._order(epoch)[pos])))
                item += 1
            yield keys


class _Batches:
    """The key stream as a DataLoader batch sampler (iterated in the main process)."""

    def __init__(self, stream: _KeyStream, start: int) -> None:
        self.stream = stream
        self.start = start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.stream.batches(self.start)
