"""The plugin contract: one hook per component kind, plus CLI and recipe-check hooks.

Each ``register_*`` hook receives ``register(name, factory, config=None, doc=None)``, the
same for every kind: ``factory`` is a callable or a lazy ``"module:attribute"`` string,
``config`` an attrs class made with :func:`minfm_core.config` (none for sources and metrics:
pass their ``doc`` by keyword). What each kind's factory receives and what the
built object provides is declared in :mod:`minfm_core.protocols` (``PROTOCOLS[kind]``,
``FACTORY_KWARGS[kind]``); :mod:`minfm_core.testing` checks a component against it. See
docs/plugins.md.
"""

import pluggy

hookspec = pluggy.HookspecMarker("minfm")
hookimpl = pluggy.HookimplMarker("minfm")


@hookspec
def register_denoisers(register):
    """Register denoisers (trainable networks on packed sequences).

    Built objects: :class:`minfm_core.protocols.Denoiser`.
    """


@hookspec
def register_vaes(register):
    """Register VAEs (frozen image <-> latent autoencoders).

    Built objects: :class:`minfm_core.protocols.Vae`.
    """


@hookspec
def register_text_encoders(register):
    """Register text encoders (prompts -> packed token embeddings or pooled vectors).

    Built objects: :class:`minfm_core.protocols.TextEncoder`.
    """


@hookspec
def register_patchifiers(register):
    """Register patchifiers (latents -> packed tokens with positions, and back).

    Built objects: :class:`minfm_core.protocols.Patchifier`.
    """


@hookspec
def register_paths(register):
    """Register probability paths (noising rule and regression target).

    Built objects: :class:`minfm_core.protocols.ProbabilityPath`.
    """


@hookspec
def register_time_samplers(register):
    """Register training-time samplers of t in [0, 1].

    Built objects: :class:`minfm_core.protocols.TimeSampler`.
    """


@hookspec
def register_time_warpers(register):
    """Register time warpers (e.g. resolution-dependent shift).

    Built objects: :class:`minfm_core.protocols.TimeWarper`.
    """


@hookspec
def register_time_weighters(register):
    """Register loss weightings over t.

    Built objects: :class:`minfm_core.protocols.TimeWeighter`.
    """


@hookspec
def register_samplers(register):
    """Register ODE/SDE samplers used at inference.

    Built objects: :class:`minfm_core.protocols.Sampler`.
    """


@hookspec
def register_guidances(register):
    """Register guidance rules (combine conditional and unconditional velocities).

    Built objects: :class:`minfm_core.protocols.Guidance`.
    """


@hookspec
def register_attention_backends(register):
    """Register attention backends for packed variable-length sequences.

    Built objects: :class:`minfm_core.protocols.Attention`.
    """


@hookspec
def register_balancers(register):
    """Register sequence balancers (re-route packed tokens across ranks).

    Built objects: :class:`minfm_core.protocols.Balancer`.
    """


@hookspec
def register_parallelizers(register):
    """Register parallelizers (shard models over ranks).

    Built objects: :class:`minfm_core.protocols.Parallelizer`.
    """


@hookspec
def register_datasets(register):
    """Register datasets (images or latents with prompts).

    Built objects: :class:`minfm_core.protocols.Dataset`.
    """


@hookspec
def register_loggers(register):
    """Register metric loggers.

    Built objects: :class:`minfm_core.protocols.Logger`.
    """


@hookspec
def register_sources(register):
    """Register checkpoint-source resolvers by URI scheme (``register("s3", resolve)``).

    Built objects: :class:`minfm_core.protocols.Source`.
    """


@hookspec
def register_metrics(register):
    """Register image metrics: ``register(name, factory, doc=...)`` (no config: the doc by keyword;
    the callback is ``register(name, factory, config=None, doc=None)`` as for every kind).

    Built objects: :class:`minfm_core.protocols.Metric` (see minfm_core.metrics; ``fid`` is the
    in-training FID's).
    """


@hookspec
def register_commands(subparsers):
    """Add subcommands to the ``minfm`` CLI (an argparse subparsers object); each command's
    ``func(args)`` returns its exit code (an int, or None for 0)."""


@hookspec
def check_recipe(recipe, world_size):
    """Return a list of ``path: problem`` strings for a resolved recipe at a world size.

    ``recipe.get(path)`` is a slot (None when absent): ``.component.name`` and
    ``.component.plugin`` say which component fills it, ``.config`` is its config. Return None
    or an empty list for no problems; anything but a list (or tuple) of strings, or raising,
    skips the plugin (docs/plugins.md).
    """
