"""The hub plugin: registers the hf:// source resolver and the ``minfm hub`` commands.

Hook implementations only; huggingface_hub is imported when a command runs.
"""

from __future__ import annotations

from minfm_core import hookimpl


@hookimpl
def register_sources(register):
    register("hf", "minfm_hub.source:resolve_hf_uri", doc="hf://org/name[@rev]: a Hugging Face Hub repo (safetensors only); with subpath, a file or folder of any repo")


@hookimpl
def register_commands(subparsers):
    from .cli import register

    register(subparsers)
