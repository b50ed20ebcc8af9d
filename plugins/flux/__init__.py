"""Built-in plugin 'flux': the FLUX MMDiT denoiser and ``minfm export diffusers``.

See docs/flux.md. Nothing heavy is imported here: the factory is a lazy string and
the export command imports torch only when it runs.
"""

from minfm_core import hookimpl

from .config import FluxConfig


@hookimpl
def register_denoisers(register):
    register("flux", "minfm_plugins.flux.model:build_flux", FluxConfig)


@hookimpl
def register_commands(subparsers):
    from .export_cli import add_export_command

    add_export_command(subparsers)
