"""``minfm cache latents RECIPE``: encode the recipe's dataset once with its VAE.

Output, per split (the layout the datasets' ``use_cached_latents`` reads, docs/data.md)::

    OUT/<split>/part-00000.safetensors   latents (C, F, h, w) keyed by item index "00000042"
    OUT/<split>/part-00000.json          that shard's entries (written last: marks it done)
    OUT/<split>/index.json               {"entries": [{shard, key, prompt, label?, split, size}]}
    OUT/<split>/cache.json               what was encoded (items, shard size, dtype, seed, data and
                                         VAE settings): a rerun reuses finished shards only if it matches

Shard ``i`` holds items ``[i * shard_size, (i + 1) * shard_size)``. Every file is written
to a temporary name and renamed, so an interrupted run leaves no half shard; a rerun skips
finished shards. Under torchrun (``RANK``/``WORLD_SIZE``) rank ``r`` encodes the shards
``i % WORLD_SIZE == r``; whichever rank finds every shard done writes the index.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import Any

import attrs

from ..config import Dtype
from ..errors import MinfmError
from ..jsonio import read_json_file
from ..latents_record import RECORD, cache_request, read_record, without_flips
from ..launch_env import launch_env
from ..protocols import CachedLatentsConfig
from ..recipe import ONE_PROCESS, load_recipe
from ..safepath import require_folder_room, write_text_atomic
from ..validators import MAX_BATCH, MAX_DATALOADER_WORKERS, MAX_SAMPLES



def register(what) -> None:
    from .argtypes import add_recipe_args, int_in, non_empty

    p = what.add_parser("latents", help="encode the recipe's dataset with its VAE into safetensors shards")
    add_recipe_args(p)
    p.add_argument("--out", type=non_empty("--out"), help="output folder (default: data.latents_dir if the dataset has one, else <exp_dir>/latents)")
    p.add_argument("--split", action="append", dest="splits", metavar="SPLIT", type=non_empty("--split"),
                   help="dataset split to encode (repeatable; default: train)")
    p.add_argument("--shard-size", type=int_in("--shard-size", 1, MAX_BATCH), default=1024, metavar="N", help="items per shard (default 1024)")
    p.add_argument("--batch-size", type=int_in("--batch-size", 1, MAX_BATCH), default=32, metavar="N", help="images per VAE call (default 32)")
    p.add_argument("--dtype", choices=typing.get_args(Dtype), default="fp32", help="dtype the latents are stored in (default fp32)")
    p.add_argument("--dataloader-num-workers", type=int_in("--dataloader-num-workers", 0, MAX_DATALOADER_WORKERS), default=0,
                   metavar="N", help="processes that read and decode the images ahead of the VAE (default 0: this one "
                   "does; as train.dataloader_num_workers)")
    p.add_argument("--limit", type=int_in("--limit", 1, MAX_SAMPLES), default=None, metavar="N", help="encode only the first N items of each split")
    p.set_defaults(func=run)


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1))


def _shard_name(i: int) -> str:
    return f"part-{i:05d}"


def encode_split(vae, dataset, out: Path, split: str, *, vae_slot, shard_size: int, batch_size: int, dtype: str,
                 limit: int | None = None, rank: int = 0, world: int = 1, seed: int = 0, log=print,
                 request: dict | None = None, num_workers: int = 0) -> dict[str, int]:
    """Encode this rank's unfinished shards of one split; write the index when all are done.
    ``vae_slot``: the recipe's ``model.vae`` (its config says what shape every latent has).
    ``num_workers`` processes read (decode) the items ahead of the VAE (0: this one does).

    ``request`` (the dataset and VAE settings) is kept in ``cache.json`` with the item count,
    shard size, dtype and seed: finished shards are reused only by the same request (another
    dataset size or shard size would mix stale or duplicated items into the index)."""
    from ..data_loader import loaded_ahead
    from ..weights import DTYPES

    torch_dtype = DTYPES[dtype]
    n = len(dataset) if limit is None else min(limit, len(dataset))
    n_shards = (n + shard_size - 1) // shard_size
    out.mkdir(parents=True, exist_ok=True)
    # as it reads back (tuples as lists), so that equal requests compare equal
    record = json.loads(json.dumps({"items": n, "shard_size": shard_size, "dtype": dtype, "seed": seed,
                                    "request": request or {}}))
    kept = out / RECORD
    if kept.exists():
        old = read_record(out, "cache latents")
        diff = sorted(k for k in record if not isinstance(old, dict) or old.get(k) != record[k])
        if diff:
            raise MinfmError(f"cache latents: {out} holds a cache of another request (different {', '.join(diff)}); "
                             "remove it or choose another --out")
    elif any(out.glob("part-*")) or (out / "index.json").exists():  # any name this writes: not ours to replace
        raise MinfmError(f"cache latents: {out} holds shards or an index.json without a cache.json record, so "
                         "they cannot be matched to this request; remove them or choose another --out")
    else:
        _write_json(kept, record)
    # finished: its record and its shard (a shard deleted since is encoded again, not
    # indexed as there and found missing by training)
    mine = range(rank, n_shards, world)
    todo = [s for s in mine if not ((out / f"{_shard_name(s)}.json").exists()
                                    and (out / f"{_shard_name(s)}.safetensors").is_file())]
    stats = {"encoded": 0, "skipped": len(mine) - len(todo)}
    spans = {s: range(s * shard_size, min((s + 1) * shard_size, n)) for s in todo}
    shard_batches = {s: [list(span[i:i + batch_size]) for i in range(0, len(span), batch_size)] for s, span in spans.items()}
    with loaded_ahead(dataset, [b for bs in shard_batches.values() for b in bs], num_workers) as loaded:
        for s, batches in shard_batches.items():
            _encode_shard(vae, vae_slot, loaded, batches, out, s, split, torch_dtype, seed)
            stats["encoded"] += 1
            log(f"{split}: shard {s + 1}/{n_shards} ({len(spans[s])} items)")
    parts = [out / f"{_shard_name(s)}.json" for s in range(n_shards)]
    if all(p.exists() for p in parts):
        entries = [e for p in parts for e in _shard_entries(p)]
        _write_json(out / "index.json", {"entries": entries, "num_items": len(entries), "dtype": dtype})
        stats["indexed"] = len(entries)
    return stats


def _encode_shard(vae, vae_slot, loaded, batches: list[list[int]], out: Path, s: int, split: str, torch_dtype,
                  seed: int) -> None:
    """Encode shard ``s``, whose ``batches`` of item indices come next from ``loaded``, and write it."""
    import torch

    from ..engine.pipeline import encode_latents
    from ..engine.runtime import indexed_seed
    from ..weights import save_safetensors_file

    tensors: dict[str, Any] = {}
    entries = []
    for indices in batches:
        try:
            items = next(loaded)
        except MinfmError as exc:  # an unreadable item, found when its shard is encoded
            raise MinfmError(f"{exc}; the shards finished before it are kept: fix or replace that item and run "
                             "the command again to go on (removing it changes the item count: the cache is then "
                             "another request's, to be made in another --out or after removing this one)") from None
        if any("image" not in it for it in items):
            raise MinfmError("cache latents: the dataset already yields latents (is use_cached_latents set?)")
        images = [it["image"] for it in items]
        # per-item generators: any shard size, batch size or number of ranks, and a resumed
        # run, draw the same posterior samples
        latents = encode_latents(vae, vae_slot, images, [torch.Generator().manual_seed(indexed_seed(seed, i)) for i in indices])
        for i, item, z in zip(indices, items, latents):
            key = f"{i:08d}"
            tensors[key] = z.detach().to("cpu", torch_dtype).contiguous()
            entry = {"shard": f"{_shard_name(s)}.safetensors", "key": key, "prompt": item.get("prompt", ""),
                     "split": split, "size": list(item["image"].shape[1:])}
            if item.get("label") is not None:
                entry["label"] = int(item["label"])
            entries.append(entry)
    save_safetensors_file(tensors, out / f"{_shard_name(s)}.safetensors")
    _write_json(out / f"{_shard_name(s)}.json", entries)  # last: its presence marks the shard finished


def _shard_entries(part: Path) -> list[dict]:
    """A finished shard's entries (its ``part-*.json``), read as the data on disk it is."""
    entries = read_json_file(part, f"cache latents: {part}", 1 << 30)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise MinfmError(f"cache latents: {part}: not a shard's list of entries; remove it to encode that shard again")
    return entries


def run(args) -> int:
    import torch

    twice = sorted({s for s in args.splits or () if args.splits.count(s) > 1})
    if twice:  # (it encoded the split twice over)
        raise MinfmError(f"--split {twice[0]}: given more than once")
    # Ranks here only split the shards: the recipe's training parallelism is not checked.
    resolved = load_recipe(args.recipe, [*ONE_PROCESS, *args.overrides], world_size=1)
    data = resolved.get("data")
    if data is None:
        raise MinfmError(f"{args.recipe}: has no [data] section to encode")
    cached = data.config if isinstance(data.config, CachedLatentsConfig) else None
    if cached is not None and cached.use_cached_latents:
        raise MinfmError("data.use_cached_latents: set it to false to encode the images (--set data.use_cached_latents=false)")
    if cached is None:  # the cache would be written, and no setting of this dataset reads it
        print(f"minfm: warning: {data.component.describe()} has no use_cached_latents / latents_dir "
              "(protocols.CachedLatentsConfig): training will not read these latents unless the dataset "
              "reads them itself (layout: docs/data.md, 'Cached latents')", file=sys.stderr)
    out = Path(args.out or (cached.latents_dir if cached else "") or Path(resolved.recipe.run.exp_dir) / "latents")
    require_folder_room(out, "--out" if args.out else "data.latents_dir" if cached and cached.latents_dir else "run.exp_dir")
    env = launch_env()
    rank, world = env.rank, env.world_size
    device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    # Every split's dataset before any is encoded: an unknown or empty last split was found
    # after the first was encoded and written. Flips are drawn per epoch when the cache is
    # read: the images are stored unflipped (every p_flip 0, a mix's sources' too).
    unflipped = attrs.evolve(data, config=without_flips(data.config))
    datasets = {}
    for split in args.splits or ["train"]:
        try:
            datasets[split] = unflipped.build(split=split)
        except MinfmError as exc:
            if not args.splits:  # the default split: the dataset's own error
                raise
            raise MinfmError(f"--split {split}: {exc}") from None
    vae = resolved.build("model.vae").to(device)
    request = cache_request(resolved)
    for split, dataset in datasets.items():
        stats = encode_split(vae, dataset, out / split, split, vae_slot=resolved["model.vae"],
                             shard_size=args.shard_size, batch_size=args.batch_size,
                             dtype=args.dtype, limit=args.limit, rank=rank, world=world,
                             seed=resolved.recipe.run.seed, log=lambda m: print(m, file=sys.stderr),
                             request=request, num_workers=args.dataloader_num_workers)
        done = f"; index of {stats['indexed']} items written" if "indexed" in stats else "; waiting for other ranks' shards"
        print(f"{out / split}: encoded {stats['encoded']} shard(s), skipped {stats['skipped']} finished{done}")
    return 0
