"""The core's BatchIterator: per-epoch shuffles split exactly over ranks, exact resume."""

from __future__ import annotations

import pytest
import torch

from minfm_core.data_loader import BatchIterator, epoch_order
from minfm_core.errors import MinfmError


class Indexed(torch.utils.data.Dataset):
    """Returns its index and the epoch the loader set for it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = -1

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        return {"index": int(i), "epoch": self.epoch}


def keys(batches):
    return [[(s["epoch"], s["index"]) for s in b] for b in batches]


def take(it, k):
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize(("n", "world_size", "batch_size"), [(24, 3, 4), (23, 3, 4), (10, 4, 3), (7, 1, 2), (7, 2, 2)])
def test_ranks_read_exactly_the_stream_of_one_process(n, world_size, batch_size):
    """Rank r's k-th item is item r + k·W of the one-process stream, also when W does not
    divide the dataset: each rank wrapped its own share of an epoch, so 2 processes on 7
    samples trained on other batches than 1 process from the second epoch on."""
    def stream(rank, world, items):
        it = BatchIterator(Indexed(n), batch_size, rank=rank, world_size=world, seed=5)
        return [k for b in keys(take(it, -(-items // batch_size))) for k in b][:items]

    per_rank = 3 * n // world_size + 3
    one = stream(0, 1, per_rank * world_size)
    ranks = [stream(r, world_size, per_rank) for r in range(world_size)]
    assert [ranks[g % world_size][g // world_size] for g in range(per_rank * world_size)] == one
    for epoch in range(3):
        assert [i for e, i in one if e == epoch] == [int(x) for x in epoch_order(n, 5, epoch)]  # once each
    if n > 2:
        assert list(epoch_order(n, 5, 0)) != list(epoch_order(n, 5, 1))  # a new shuffle each epoch


def test_another_world_size_resumes_at_the_same_global_place():
    """A checkpoint after 2 steps of total batch 4 on 2 ranks of 7 samples, resumed on 1 rank
    (and the reverse): the batches go on as the uninterrupted run's."""
    def batches(world, skip, count):
        out = []
        for rank in range(world):
            it = BatchIterator(Indexed(7), 4 // world, rank=rank, world_size=world, seed=2)
            take(it, skip)
            out.append((it.state_dict(), keys(take(it, count))))
        return out

    (state_two, _), _ = batches(2, 2, 0)
    one = BatchIterator(Indexed(7), 4, seed=2)
    one.load_state_dict(state_two)
    (_, straight), = batches(1, 2, 3)
    assert keys(take(one, 3)) == straight
    (state_one, _), = batches(1, 2, 0)
    resumed = []
    for rank in range(2):
        it = BatchIterator(Indexed(7), 2, rank=rank, world_size=2, seed=2)
        it.load_state_dict(state_one)
        resumed.append(keys(take(it, 3)))
    assert [k for step in zip(*resumed) for k in sorted(step[0] + step[1])] == \
        [k for b in straight for k in sorted(b)]


def test_batches_are_full_lists_of_dicts_and_cross_epochs():
    it = BatchIterator(Indexed(10), 4, seed=1)
    batches = take(it, 5)
    assert all(isinstance(b, list) and len(b) == 4 and isinstance(b[0], dict) for b in batches)
    assert [s["epoch"] for s in batches[2]] == [0, 0, 1, 1]  # items 8, 9 of epoch 0, then epoch 1
    assert it.epoch == 2 and it.position == 0
    assert it.state_dict()["consumed"] == 20


def test_no_shuffle_is_the_dataset_order():
    it = BatchIterator(Indexed(6), 2, rank=1, world_size=2, shuffle=False)
    assert [s["index"] for b in take(it, 3) for s in b] == [1, 3, 5, 1, 3, 5]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop", [1, 4, 7])
def test_resume_reproduces_the_remaining_batches(num_workers, stop):
    n, bs = 13, 3
    full = keys(take(BatchIterator(Indexed(n), bs, rank=1, world_size=2, seed=3), 12))
    first = BatchIterator(Indexed(n), bs, rank=1, world_size=2, seed=3, num_workers=num_workers)
    assert keys(take(first, stop)) == full[:stop]
    state = first.state_dict()  # workers have prefetched further; the state counts only what was handed out
    first.close()
    again = BatchIterator(Indexed(n), bs, rank=1, world_size=2, seed=3, num_workers=num_workers)
    again.load_state_dict(state)
    assert (again.epoch, again.position) == (state["epoch"], state["position"])
    assert keys(take(again, 12 - stop)) == full[stop:]
    again.close()


def test_state_is_the_same_on_every_rank_and_loading_it_elsewhere_works():
    its = [BatchIterator(Indexed(11), 2, rank=r, world_size=3, seed=0) for r in range(3)]
    for it in its:
        take(it, 4)
    assert len({it.state_dict()["consumed"] for it in its}) == 1
    shared = its[0].state_dict()
    for rank in range(3):
        fresh = BatchIterator(Indexed(11), 2, rank=rank, world_size=3, seed=0)
        fresh.load_state_dict(shared)
        assert keys([next(fresh)]) == keys([next(its[rank])])


def test_world_size_change_keeps_the_samples_seen():
    it = BatchIterator(Indexed(40), 5, rank=0, world_size=2)
    take(it, 2)  # 10 per rank, 20 in all
    wider = BatchIterator(Indexed(40), 5, rank=0, world_size=4)
    wider.load_state_dict(it.state_dict())
    assert wider.state_dict()["consumed"] == 5 and wider.epoch == 0


def test_workers_leave_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    it = BatchIterator(Indexed(8), 2, num_workers=1)
    take(it, 3)
    it.close()
    assert torch.equal(before, torch.get_rng_state())


def test_a_dropped_iterator_stops_its_workers_at_once():
    """The worker iterator's sampler held the BatchIterator, a cycle only the cyclic GC freed:
    it finalized the workers' queues before the stop could go through them, so the workers
    waited forever and the test process hung at exit (in multiprocessing's exit hook)."""
    import gc
    import multiprocessing

    before = set(multiprocessing.active_children())
    gc.disable()  # freed by its reference count alone, as it was not
    try:
        it = BatchIterator(Indexed(8), 2, num_workers=1)
        take(it, 1)
        workers = set(multiprocessing.active_children()) - before
        del it
        for w in workers:
            w.join(timeout=20)
    finally:
        gc.enable()
    assert workers and all(w.exitcode == 0 for w in workers)


class Failing(Indexed):
    """Item 3 raises what ``error`` makes."""

    def __init__(self, n: int, error) -> None:
        super().__init__(n)
        self.error = error

    def __getitem__(self, i: int) -> dict:
        if i == 3:
            raise self.error()
        return super().__getitem__(i)


@pytest.mark.parametrize("error", [
    lambda: MinfmError("data/3.jpg: not a readable image (truncated)"),
    lambda: FileNotFoundError(2, "No such file or directory", "data/3.jpg"),
], ids=["MinfmError", "OSError"])
def test_a_users_error_in_a_data_worker_is_raised_as_itself_and_the_workers_stop(error):
    """DataLoader re-raised a worker's error as a new one whose message was the worker's whole
    traceback (`minfm: error: Caught MinfmError in DataLoader worker process 0. Original
    Traceback ...`, on one line) for an unreadable image."""
    import multiprocessing

    expected = error()
    it = BatchIterator(Failing(8, error), 2, shuffle=False, num_workers=1)
    next(it)
    with pytest.raises(type(expected)) as raised:
        next(it)
    assert str(raised.value) == str(expected)
    if isinstance(expected, OSError):
        assert raised.value.filename == expected.filename  # what `minfm: error: FILE: reason` names
    assert "Traceback" not in str(raised.value)
    assert multiprocessing.active_children() == []  # stopped, though the traceback holds the loader


def test_a_process_whose_data_worker_failed_exits():
    """The workers ignore SIGTERM, which multiprocessing's exit hook sends them before it waits
    for them: a process that ended with a worker's error in flight (its traceback holding the
    loader) waited forever."""
    import subprocess
    import sys

    from conftest import ROOT

    script = ("import sys; sys.path.insert(0, 'tests')\n"
              "from test_data_loader import Failing\n"
              "from minfm_core.data_loader import BatchIterator\n"
              "it = BatchIterator(Failing(8, lambda: ValueError('a bug')), 2, shuffle=False, num_workers=1)\n"
              "next(it); next(it)\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.rstrip().endswith("ValueError: a bug"), res.stderr[-2000:]


def test_bad_arguments():
    with pytest.raises(MinfmError, match="fewer than the 4 ranks"):
        BatchIterator(Indexed(3), 1, world_size=4)
    with pytest.raises(MinfmError, match="rank 2 is outside"):
        BatchIterator(Indexed(3), 1, rank=2, world_size=2)
    with pytest.raises(MinfmError, match="batch size"):
        BatchIterator(Indexed(3), 0)


def test_over_the_shapes_dataset():
    from minfm_core.registry import get_registry

    comp = get_registry().get("dataset", "shapes")
    ds = comp.build(comp.config(num_samples=20))
    a = BatchIterator(ds, 4, seed=9)
    b = BatchIterator(ds, 4, seed=9)
    for _ in range(6):
        x, y = next(a), next(b)
        assert [s["prompt"] for s in x] == [s["prompt"] for s in y]
        assert all(torch.equal(p["image"], q["image"]) for p, q in zip(x, y))


def test_every_bit_of_the_seed_shapes_the_order_and_low_seeds_keep_theirs():
    """Only the low 32 bits counted: seeds 0 and 2**32 shuffled alike, though seeds to 2**63 - 1 are accepted."""
    assert list(epoch_order(50, 0, 0)) != list(epoch_order(50, 2**32, 0))
    assert list(epoch_order(50, 2**32, 0)) != list(epoch_order(50, 2**33, 0))
    assert list(epoch_order(10, 5, 3)) == [9, 1, 0, 3, 4, 2, 7, 8, 6, 5]  # the order seed 5 always drew
    assert list(epoch_order(10, 2**63 - 1, 1)) == list(epoch_order(10, 2**63 - 1, 1))


def test_an_item_that_is_not_a_dict_is_one_line_naming_its_index():
    """A dataset yielding tuples crashed in the loader's {**item} with a TypeError."""
    from minfm_core.data_loader import _Keyed
    from minfm_core.errors import MinfmError

    class Tuples:
        def set_epoch(self, epoch):
            pass

        def __getitem__(self, i):
            return ("a prompt", i)

        def __len__(self):
            return 5

    with pytest.raises(MinfmError, match=r"^data: item 3: expected a dict with 'image' \(or 'latent'\) and 'prompt', got tuple$"):
        _Keyed(Tuples())[(0, 3)]


@pytest.mark.parametrize(("sig", "why", "sigchld"), [
    ("SIGKILL", "Killed; most often the out-of-memory killer", True),
    ("SIGBUS", "Bus error; out of shared memory (/dev/shm", True),
    # torch's liveness check sees the worker gone before its SIGCHLD handler runs (forced here
    # by taking that handler away): "exited unexpectedly", which a CI run got for a SIGKILL
    ("SIGKILL", "Killed; most often the out-of-memory killer", False),
], ids=["SIGKILL", "SIGBUS", "SIGKILL-seen-by-the-liveness-check"])
def test_a_killed_data_worker_is_one_line_naming_the_likely_cause(sig, why, sigchld, capsys, monkeypatch):
    """A worker the kernel's out-of-memory killer ended (SIGKILL), or one that ran out of
    /dev/shm (SIGBUS, a container's 64 MB default), raised torch's RuntimeError from its
    SIGCHLD handler, anywhere in the training process: a traceback and "a bug in minFM"."""
    import multiprocessing
    import os
    import signal
    import time


    pids = []

    def command(args):
        before = {p.pid for p in multiprocessing.active_children()}
        it = BatchIterator(Indexed(64), 2, num_workers=1)
        next(it)
        pids.extend(p.pid for p in multiprocessing.active_children() if p.pid not in before)
        torchs = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if not sigchld else None
        try:
            os.kill(pids[0], getattr(signal, sig))
            for _ in range(100):  # torch raises from its SIGCHLD handler, or at the next batch
                time.sleep(0.05)
                next(it)
        finally:
            if torchs is not None:
                signal.signal(signal.SIGCHLD, torchs)  # installed once per process by torch

    from cli_capture import main_with_command

    assert main_with_command(monkeypatch, command) == 2
    err = capsys.readouterr().err
    assert f"minfm: error: data worker (pid {pids[0]}) killed by signal: {why}" in err
    assert "Traceback" not in err and "bug" not in err


def test_a_data_worker_found_gone_is_one_line():
    from minfm_core.errors import data_worker_lost_line

    line = data_worker_lost_line(RuntimeError("DataLoader worker (pid(s) 12, 13) exited unexpectedly"))
    assert line.startswith("data workers (pid 12, 13) exited unexpectedly; with no data workers "
                           "(dataloader_num_workers 0) the items load in this process")
    assert data_worker_lost_line(RuntimeError("shape mismatch")) is None
    assert data_worker_lost_line(ValueError("DataLoader worker (pid 1) exited unexpectedly")) is None


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_plain_list_of_dicts_needs_no_set_epoch(num_workers):
    """docs/data.md: a dataset *may* define set_epoch; the loader called it always (AttributeError)."""
    it = BatchIterator([{"i": i} for i in range(10)], 4, seed=0, num_workers=num_workers)
    try:
        batches = [next(it) for _ in range(3)]
    finally:
        it.close()
    seen = [item["i"] for b in batches for item in b]
    assert sorted(seen[:10]) == list(range(10)) and [item["epoch"] for b in batches for item in b][10:] == [1, 1]
