"""Process-level set-up: device, process group, seeding.

Every run has a process group, even a single process (gloo, world size 1): the
checkpoint and parallel code then has one path, and a checkpoint written by one
process loads on many and back (DCP resharding).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..errors import MinfmError
from ..launch_env import launch_env


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(choice: str, local_rank: int) -> torch.device:
    """``run.device`` for the process of ``local_rank``: one GPU per local process."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "" if torch.version.cuda else f" (torch {torch.__version__} is a build without CUDA)"
        raise MinfmError(f"run.device: 'cuda', but torch sees no CUDA device{build}; "
                         "set run.device = 'auto' or 'cpu'")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise MinfmError(f"local rank {local_rank} needs GPU {local_rank}, but this machine shows {count} "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                         f"run at most {count} processes per node")
    return torch.device("cuda", local_rank)


def init_runtime(device: str = "auto") -> Runtime:
    """Initialise torch.distributed from torchrun's environment (or as a world of one)."""
    env = launch_env()
    rank, world, local_rank = env.rank, env.world_size, env.local_rank
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if world == 1 and "MASTER_ADDR" not in os.environ:
            # An in-memory store: no port to collide with another run on this host, and no
            # file left behind (the /tmp file store of a SIGKILLed run stayed there for good).
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world)
    return Runtime(rank, world, local_rank, dev)


def shutdown_runtime() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def indexed_seed(seed: int, index: int) -> int:
    """Item ``index``'s seed of a numbered stream (validation noise, a latents shard).

    Kept below 2**64, the most ``torch.Generator.manual_seed`` takes, so any recipe seed
    (up to 2**63 - 1) works; for seeds below ~9e12 it equals ``seed * 1_000_003 + index``.
    """
    return (seed * 1_000_003 + index) % 2**64


#: Streams of :func:`derived_seed`: randomness that must not repeat another's numbers.
POSTERIOR_STREAM, SAMPLER_STREAM = 1, 2


def derived_seed(seed: int, stream: int) -> int:
    """The seed of another stream of ``seed``'s randomness (a VAE's posterior noise next to a
    sample's path noise, a sampler's fresh noise next to its starting noise): hashed, so it
    repeats neither ``seed`` nor any nearby seed (``seed + 1`` is the next image's)."""
    return int(np.random.SeedSequence([seed, 0x5EED, stream]).generate_state(1)[0])


def rank_seed(seed: int, rank: int, stream: int = 0) -> int:
    """Distinct, reproducible seeds per (rank, stream) derived from one run seed."""
    return int(np.random.SeedSequence([seed, rank, stream]).generate_state(1)[0])

