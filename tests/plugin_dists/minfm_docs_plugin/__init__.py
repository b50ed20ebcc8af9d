"""A third-party plugin written from docs/plugins.md alone (the tests train with it).

A time sampler, a denoiser that takes a sequence balancer, a logger and a CLI command.
Its hooks stay light: the torch parts are lazy ``"module:attribute"`` factories.
"""

import attrs

from minfm_core import config, field, hookimpl


@config
class ArcsineConfig:
    """Arcsine time sampling: t = sin^2(pi u / 2), more mass near 0 and 1."""

    eps: float = field(1e-4, doc="t is kept in [eps, 1 - eps]", validator=attrs.validators.gt(0))


@config
class MlpDenoiserConfig:
    """A per-token MLP denoiser with per-sample attention, for plugin tests."""

    d_img: int = field(12, doc="image token features")
    d_txt: int = field(16, doc="text token features")
    d_vec: int = field(16, doc="pooled text features")
    d_model: int = field(32, doc="hidden width")
    d_head: int = field(16, doc="attention head size")


@config
class CsvLoggerConfig:
    """Losses as CSV lines in the run folder."""

    filename: str = field("metrics.csv", doc="file in the run folder")


@hookimpl
def register_time_samplers(register):
    register("arcsine", "minfm_docs_plugin.parts:ArcsineSampler", ArcsineConfig)


@hookimpl
def register_denoisers(register):
    register("docs_mlp", "minfm_docs_plugin.parts:build_denoiser", MlpDenoiserConfig)


@hookimpl
def register_loggers(register):
    register("csv", "minfm_docs_plugin.parts:CsvLogger", CsvLoggerConfig)


@hookimpl
def register_commands(subparsers):
    parser = subparsers.add_parser("arcsine-table", help="print quantiles of the arcsine time sampler")
    parser.add_argument("--n", type=int, default=5)
    parser.set_defaults(func=_table)


def _table(args):
    from minfm_core.errors import MinfmError

    if args.n < 2:
        raise MinfmError("--n: at least 2 quantiles")
    import math

    for i in range(args.n):
        u = i / (args.n - 1)
        print(f"{u:.3f} {math.sin(math.pi * u / 2) ** 2:.3f}")
    return 0
