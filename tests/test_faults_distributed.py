"""A fault on one rank of a 2-process run: every rank stops with one line, the launcher exits 2.

The fault is injected into rank 1 only, through a ``sitecustomize`` on the workers' path."""

from __future__ import annotations

import os

import pytest

from conftest import run_minfm
from engine_helpers import TINY
from minfm_core import checkpoint as ck

INJECT = '''
import os
if os.environ.get("RANK") == "0" and "LOCAL_RANK" in os.environ and os.environ["MINFM_TEST_FAULT"] == "finish":
    # rank 0 alone names the finished checkpoint: step 2's rename fails (after every rank's write)
    import errno
    real_rename = os.rename
    def rename(src, dst, **kw):
        if str(src).endswith(".tmp-step_00000002"):
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real_rename(src, dst, **kw)
    os.rename = rename
elif os.environ.get("RANK") == "1" and "LOCAL_RANK" in os.environ:
    if os.environ["MINFM_TEST_FAULT"] == "save":  # a full disk writing rank 1's file of step 2
        import errno
        import safetensors.torch as st
        real_save = st.save_file
        def save_file(tensors, filename, metadata=None):
            # (written under a temporary name beside it, then renamed)
            if "step_00000002/" in str(filename) and "rank_1.safetensors" in str(filename):
                raise OSError(errno.ENOSPC, "No space left on device", str(filename))
            return real_save(tensors, filename, metadata=metadata)
        st.save_file = save_file
    elif os.environ["MINFM_TEST_FAULT"] == "step":  # bad input met by rank 1 alone, in step 2 (rank 0: in a collective)
        from minfm_core.engine import train as T
        from minfm_core.errors import MinfmError
        real_step = T.Trainer.make_batch
        def make_batch(self, samples):
            if self.step == 1:
                raise MinfmError("test: bad data on rank 1 only")
            return real_step(self, samples)
        T.Trainer.make_batch = make_batch
'''


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["save", "finish", "step"])
def test_a_fault_on_one_rank_is_one_line_on_every_rank_and_exit_2(tmp_path, fault):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    exp = tmp_path / "run"
    res = run_minfm("run", str(TINY), "--nproc-per-node", "2", "--set", f"run.exp_dir={exp}",
                    "--set", "parallel.name=fsdp2", "--set", "parallel.param_dtype=fp32",
                    "--set", "train.max_steps=3", "--set", "train.ckpt_every=1",
                    env={"PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")]),
                         "MINFM_TEST_FAULT": fault})
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "bug in minFM" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("minfm: error:")]
    if fault == "save":  # found at the save's own barrier: the same line on both ranks
        want = {f"minfm: error: rank 1: {exp}/checkpoints/.tmp-step_00000002: cannot write checkpoint: "
                "rank_1.safetensors: No space left on device (the previous checkpoints are intact)"}
    elif fault == "finish":  # rank 0's failure, kept until every rank next meets: the same line on both
        want = {f"minfm: error: rank 0: {exp}/checkpoints/.tmp-step_00000002: cannot write checkpoint: "
                "Input/output error (the previous checkpoints are intact)"}
    else:  # rank 0 meets the closed connection in its collective and names it
        want = {"minfm: error: test: bad data on rank 1 only",
                "minfm: error: lost the connection to another process of this run"}
        errors = [ln.split(" (")[0] for ln in errors]
    assert set(errors) == want, res.stderr[-3000:]  # each rank said something, and nothing else
    assert [c.name for c in ck.list_checkpoints(exp)] == ["step_00000001"]  # and it still verifies
    ck.open_checkpoint(exp / "checkpoints" / "step_00000001")
