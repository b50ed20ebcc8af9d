"""Built-in plugin 'parallel': how the denoiser is spread over ranks (`none`, `fsdp2`)."""

from minfm_core import hookimpl

from .config import Fsdp2Config, NoParallelConfig


@hookimpl
def register_parallelizers(register):
    register("none", "minfm_plugins.parallel.single:NoParallel", NoParallelConfig)
    register("fsdp2", "minfm_plugins.parallel.fsdp2:Fsdp2", Fsdp2Config)


@hookimpl
def check_recipe(recipe, world_size):
    slot = recipe.get("parallel")
    # Sampling may replicate the whole model on every rank; training would not sync gradients.
    if slot is not None and slot.component.name == "none" and world_size > 1 and recipe.recipe.job == "train":
        return [f"parallel.name: 'none' runs one process, but the world size is {world_size}; use name = \"fsdp2\""]
    return []

