"""`minfm check` builds what a run builds first and cheaply (protocols.CHECK_BUILDS), so that a
factory's own refusal fails the check as it fails the run.

It said ok (exit 0) for recipes `minfm run` refused: a model factory's MinfmError became a
"not built on meta" footnote in the summary, and no other kind's factory ran at all.
"""

from __future__ import annotations

import argparse

import pytest

from minfm_core import MinfmError, config, field, hookimpl, protocols
from minfm_core.cli import check_cmd
from minfm_core.errors import RecipeError
from minfm_core.plugins import plugin
from minfm_core.registry import get_registry


@config
class ModeConfig:
    """How the probe factory misbehaves."""

    mode: str = field("ok", doc="the misbehaviour")


def _refuse(cfg):
    if cfg.mode == "own_path":
        raise MinfmError("flow.time_sampler.mode: the probe refuses this mode")
    if cfg.mode == "minfm":
        raise MinfmError("a and b must differ")
    if cfg.mode == "bug":
        raise ValueError("boom in factory")
    if cfg.mode == "type_in_body":
        return len(5)
    return get_registry().get("time_sampler", "uniform").build()


def _denoiser(cfg, *, load_weights=True, attention=None, balancer=None):
    if cfg.mode == "meta_bug":  # works on a real device only
        import torch

        return torch.nn.Linear(2, 2).weight.sum().item()
    raise MinfmError("model.denoiser.pretrained: /nope.safetensors does not exist")


@config
class AbsoluteOutputs:
    """A logger that names a file outside the run folder."""

    filename: str = field("/tmp/outside.csv", doc="where it writes")

    @property
    def run_outputs(self):
        return (self.filename,)


class _Logger(protocols.Logger):
    def __init__(self, cfg, *, run_dir, rank=0, recipe=None):
        pass

    def log(self, step, metrics):
        pass

    def log_images(self, step, name, images, captions):
        pass

    def close(self):
        pass


class Probe:
    @hookimpl
    def register_time_samplers(self, register):
        register("probe_ts", _refuse, ModeConfig)

    @hookimpl
    def register_denoisers(self, register):
        register("probe_den", _denoiser, ModeConfig)

    @hookimpl
    def register_loggers(self, register):
        register("probe_log", _Logger, AbsoluteOutputs)


def _check(*overrides: str) -> list[str]:
    from engine_helpers import TINY

    args = argparse.Namespace(recipe=TINY, overrides=list(overrides), world_size=None, print_recipe=False)
    with plugin(Probe(), "probe"):
        try:
            assert check_cmd.run(args) == 0
        except RecipeError as exc:
            return exc.problems
    return []


@pytest.mark.parametrize("mode, problem", [
    ("own_path", "flow.time_sampler.mode: the probe refuses this mode"),
    ("minfm", "flow.time_sampler: a and b must differ"),
    ("bug", "flow.time_sampler: the factory of time_sampler 'probe_ts' of plugin 'probe' raised ValueError: boom in "
            "factory when built (a bug in plugin 'probe'; minfm run stops on it too, with its traceback)"),
    ("type_in_body", "flow.time_sampler: the factory of time_sampler 'probe_ts' of plugin 'probe' raised TypeError: "
                     "object of type 'int' has no len() when built (a bug in plugin 'probe'; minfm run stops on it "
                     "too, with its traceback)"),
], ids=["minfm-error-naming-its-field", "minfm-error", "bug", "type-error-in-body"])
def test_check_builds_a_time_sampler_and_reports_what_its_factory_refuses(mode, problem, capsys):
    assert _check(f'flow.time_sampler={{name = "probe_ts", mode = "{mode}"}}') == [problem]
    assert _check('flow.time_sampler={name = "probe_ts"}') == []
    assert ": ok (job = 'train')" in capsys.readouterr().out


def test_check_reports_a_model_factorys_refusal_on_meta():
    """It was "not built on meta: ..." in the summary, and exit 0."""
    assert _check('model.denoiser={name = "probe_den"}') == [
        "model.denoiser.pretrained: /nope.safetensors does not exist"]


def test_a_model_factory_that_fails_only_on_meta_is_named_as_breaking_the_contract():
    """The problem said "minfm run stops on it too", which builds on the real device, where it works."""
    assert _check('model.denoiser={name = "probe_den", mode = "meta_bug"}') == [
        "model.denoiser: the factory of denoiser 'probe_den' of plugin 'probe' raised RuntimeError: Tensor.item() "
        "cannot be called on meta tensors when built on the meta device (a bug in plugin 'probe'; its kind must "
        "build on the meta device with load_weights=False, docs/plugins.md)"]


def test_the_run_names_the_slot_whose_factory_refused_as_check_does(tmp_path, capsys):
    """`minfm run` said only "minfm: error: a and b must differ"."""
    import json

    from engine_helpers import TINY
    from minfm_core.cli.main import main

    with plugin(Probe(), "probe"):
        assert main(["run", str(TINY), "--set", f"run.exp_dir={json.dumps(str(tmp_path / 'run'))}",
                     "--set", 'flow.time_sampler={name = "probe_ts", mode = "minfm"}']) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("minfm: error: flow.time_sampler: a and b must differ "
                                                               "(raised in plugin 'probe')")


def test_a_type_error_inside_a_factory_body_names_the_factory():
    """A TypeError raised inside the body (the signature is fine) lost the note naming the
    component and its plugin that every other exception gets."""
    with plugin(Probe(), "probe"):
        comp = get_registry().get("time_sampler", "probe_ts")
        with pytest.raises(TypeError) as info:
            comp.build(ModeConfig(mode="type_in_body"))
    assert info.value.__notes__ == ["(raised by the factory of time_sampler 'probe_ts' of plugin 'probe')"]


def test_a_logger_naming_a_file_outside_the_run_folder_is_refused():
    """runlock probed (wrote) run_outputs joined to the run folder as given: an absolute name
    wrote outside it. check and run (job_checks) refuse it before anything is written."""
    problems = _check('logging.loggers=[{name = "probe_log"}]')
    assert problems == ["logging.loggers[0] (probe_log): run_outputs: refusing path "
                        "'/tmp/outside.csv': it leaves experiments/tiny (from --set logging.loggers)"]
    assert _check('logging.loggers=[{name = "probe_log", filename = "../up.csv"}]')[0].endswith(
        "refusing path '../up.csv': it leaves experiments/tiny (from --set logging.loggers)")
    assert _check('logging.loggers=[{name = "probe_log", filename = "mine/metrics.csv"}]') == []
