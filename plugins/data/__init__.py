"""Built-in plugin 'data': the ``shapes``, ``moving_shapes``, ``image_folder``, ``video_folder`` and
``imagenet`` datasets, the weighted ``mix`` of several, and
``minfm data imagenet prepare`` (under the shared ``data`` command group).

A dataset factory is ``factory(cfg, *, split="train")`` and returns a map-style dataset whose
items are ``{"image": (3, F, H, W) in [-1, 1]}`` (or ``{"latent": (C, F, h, w)}``) plus
``"prompt"`` and optionally ``"label"``; see docs/data.md.
"""

from minfm_core import hookimpl

from .configs import ImageFolderConfig, ImagenetConfig, MixConfig, MovingShapesConfig, ShapesConfig, VideoFolderConfig


@hookimpl
def register_datasets(register):
    register("shapes", "minfm_plugins.data.shapes:build", ShapesConfig)
    register("image_folder", "minfm_plugins.data.image_folder:build", ImageFolderConfig)
    register("imagenet", "minfm_plugins.data.imagenet:build", ImagenetConfig)
    register("moving_shapes", "minfm_plugins.data.moving_shapes:build", MovingShapesConfig)
    register("video_folder", "minfm_plugins.data.video_folder:build", VideoFolderConfig)
    register("mix", "minfm_plugins.data.mix:build", MixConfig)


@hookimpl
def register_commands(subparsers):
    # argparse only: the command's torch-heavy work is imported when it runs
    from .imagenet_prepare import register

    register(subparsers)
