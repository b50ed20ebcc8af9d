"""`minfm check` refuses an attention backend the run could not use on the CPU (and a run
with it stops before any work), instead of accepting it and crashing in the first step."""

from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import TINY
from minfm_core.cli.main import main
from minfm_core.errors import MinfmError
from minfm_core.packing import cu_seqlens
from minfm_core.registry import get_registry
from minfm_plugins.attention.backends import Flex
from minfm_plugins.attention.config import FlexConfig

JOBS = ("train", "sample")


def _cases():
    """(backend, job, refused on the CPU): every registered backend, from its config's needs_cuda."""
    for comp in get_registry().components("attention"):
        cfg = comp.config() if comp.config is not None else None
        needs = getattr(cfg, "needs_cuda", ())
        for job in JOBS:
            yield pytest.param(comp.name, job, job in needs, id=f"{comp.name}-{job}")


def test_the_backends_that_need_cuda_say_so():
    reg = get_registry()
    assert set(reg.get("attention", "flex").config().needs_cuda) == {"train"}  # no CPU backward
    for name in ("flash_attn", "flash_attn3", "torch_varlen"):
        assert set(reg.get("attention", name).config().needs_cuda) == set(JOBS)


@pytest.mark.parametrize(("backend", "job", "refused"), list(_cases()))
def test_check_refuses_a_backend_the_cpu_cannot_run(backend, job, refused, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    args = ["check", str(TINY), "--set", f"run.exp_dir={json.dumps(str(tmp_path / 'exp'))}",
            "--set", f"model.attention.name={json.dumps(backend)}", "--set", 'run.device="cpu"',
            "--set", f"job={json.dumps(job)}", "--set", f"sample.source={json.dumps(str(tmp_path / 'ckpt'))}"]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    if refused:
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert f"model.attention.name: {backend!r} cannot {job} on the CPU (run.device = 'cpu')" in err
        assert "use 'sdpa' or 'auto'" in err
        # with run.device = "cuda" the backend is not the problem: a machine without CUDA is (one line)
        rc = main([*args, "--set", 'run.device="cuda"'])
        err = capsys.readouterr().err.strip()
        import torch

        assert rc == 0 if torch.cuda.is_available() else (rc == 2 and "model.attention" not in err
                                                          and "run.device: 'cuda', but torch sees no CUDA" in err), err
    else:
        assert rc == 0, err


def test_a_flex_training_run_on_the_cpu_stops_before_any_work(tmp_path, capsys):
    """Was: NotImplementedError 'FlexAttention does not support backward on CPU' in the first step."""
    exp = tmp_path / "exp"
    rc = main(["run", str(TINY), "--set", f"run.exp_dir={json.dumps(str(exp))}", "--set", 'model.attention.name="flex"',
               "--set", 'run.device="cpu"', "--set", "train.max_steps=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model.attention.name: 'flex' cannot train on the CPU" in err and "Traceback" not in err
    assert not exp.exists()


def _qkv(lens, requires_grad):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(sum(lens), 2, 8, generator=g, requires_grad=requires_grad) for _ in range(3)]


def test_flex_called_with_gradients_on_the_cpu_is_a_clear_error():
    """The backend itself (a Python caller, no recipe check) says what to use, not torch's NotImplementedError."""
    lens = torch.tensor([3, 5])
    q, k, v = _qkv([3, 5], requires_grad=True)
    with pytest.raises(MinfmError, match="attention backend 'flex' cannot train on cpu tensors .*use 'sdpa' or 'auto'"):
        Flex(FlexConfig(compile=False))(q, k, v, cu_seqlens(lens), 5)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_flex_without_gradients_still_runs_on_the_cpu():
    """Sampling (no_grad) keeps working, even with inputs that require grad."""
    lens = torch.tensor([3, 5])
    q, k, v = _qkv([3, 5], requires_grad=True)
    try:
        with torch.no_grad():
            out = Flex(FlexConfig(compile=False))(q, k, v, cu_seqlens(lens), 5)
            ref = Flex(FlexConfig(compile=False))(q.detach(), k.detach(), v.detach(), cu_seqlens(lens), 5)
    except (RuntimeError, NotImplementedError) as exc:  # some torch builds have no eager CPU flex
        pytest.skip(f"flex on CPU unavailable: {exc}")
    assert torch.equal(out, ref)
