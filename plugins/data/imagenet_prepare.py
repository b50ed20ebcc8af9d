"""``minfm data imagenet prepare``: what the ``imagenet`` dataset and ``class_embedding`` encoder need.

    minfm data imagenet prepare /data/ILSVRC2012 --recipe recipes/flux_tiny_imagenet.toml \\
        --out $MINFM_DATA_DIR/imagenet --encoder '{name = "clip", pretrained = "black-forest-labs/FLUX.1-dev/text_encoder"}' \\
        --latents

Writes to ``--out`` (safetensors and JSON only, never pickle)::

    classes.json                    [{"label", "wnid", "name", "prompt"}] x 1000, in label order
    label_map.json                  {wnid: label}
    class_embeddings.safetensors    (1001, dim) table, row = label, row 1000 = the empty prompt;
                                    metadata "labels" = {prompt: row} (the class_embedding format)
    class_embeddings.json           the same {prompt: row} map
    prepare.json                    what was done: root, split sizes, encoder, template
    latents/<split>/...             with --latents: the recipe's VAE latents (minfm cache latents layout)

This plugin (the one with the ``imagenet`` dataset) adds the command under the shared ``data``
group, so the core knows nothing of it. The table is written in the ``class_embedding`` text
encoder's documented file format (docs/encoders.md), not through that plugin's code. The
encoder is ``--encoder`` (a TOML inline table naming a text encoder) or the recipe's own
``model.clip_encoder`` / ``model.text_encoder`` when that is not itself a ``class_embedding`` table; per-token encoders are mean-pooled over each prompt's tokens.
"""

from __future__ import annotations

import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from minfm_core.cli.argtypes import int_in, non_empty
from minfm_core.cli.groups import command_group
from minfm_core.config import Dtype
from minfm_core.errors import MinfmError
from minfm_core.launch_env import launch_env
from minfm_core.safepath import require_folder_room, write_text_atomic
from minfm_core.validators import MAX_BATCH

UNCONDITIONAL = ""
#: The class_embedding file format: the table under this tensor name, {prompt: row} JSON under this metadata key.
TABLE_TENSOR, LABELS_KEY = "embeddings", "labels"


def register(sub) -> None:
    which = command_group(sub, "data", help="prepare datasets")
    inet = which.add_parser("imagenet", help="ILSVRC-2012")
    action = inet.add_subparsers(dest="data_action", metavar="ACTION", parser_class=type(inet))
    q = action.add_parser("prepare", help="class names, label map, class-name embeddings (and latents) from an ILSVRC folder")
    q.add_argument("root", type=non_empty("ROOT"), help="ILSVRC-2012 folder with train/<wnid>/*.JPEG (and val/)")
    q.add_argument("--recipe", required=True, type=non_empty("--recipe"), help="the training recipe (its data, text encoder and VAE)")
    q.add_argument("--out", required=True, type=non_empty("--out"), help="output folder, e.g. $MINFM_DATA_DIR/imagenet")
    q.add_argument("--encoder", metavar="TABLE",
                   help="text encoder for the class names as a TOML inline table, e.g. "
                        "'{name = \"clip\", pretrained = \"black-forest-labs/FLUX.1-dev/text_encoder\"}' "
                        "(default: the recipe's clip_encoder or text_encoder, unless that is a class_embedding table)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value (TOML literal); repeatable")
    q.add_argument("--latents", action="store_true", help="also encode the images with the recipe's VAE")
    q.add_argument("--split", action="append", dest="splits", choices=("train", "val"),
                   help="splits to encode with --latents (default: those present under ROOT)")
    q.add_argument("--shard-size", type=int_in("--shard-size", 1, MAX_BATCH), default=1024, metavar="N", help="latents per shard (default 1024)")
    q.add_argument("--batch-size", type=int_in("--batch-size", 1, MAX_BATCH), default=32, metavar="N", help="images per VAE / prompts per encoder call")
    q.add_argument("--dtype", choices=typing.get_args(Dtype), default="fp32", help="stored latent dtype")
    q.set_defaults(func=run)


def check_out(root: Path, out: Path) -> None:
    """``--out`` must not lie in ROOT's train/ or val/: its folder would be taken for a class
    folder by every later prepare and training run (symlinks followed)."""
    require_folder_room(out, "--out")
    real_out = Path(os.path.realpath(out))
    for split in ("train", "val"):
        folder = Path(os.path.realpath(root / split))
        if real_out == folder or folder in real_out.parents:
            raise MinfmError(f"--out {str(out)!r}: lies inside {str(root / split)!r}, where every folder is taken "
                             f"for an ILSVRC-2012 class; write beside the splits instead (e.g. --out {str(root)!r})")


def split_counts(root: Path, val_labels: Path | None = None) -> dict[str, int]:
    """Pictures per split as the ``imagenet`` dataset reads them: those in <wnid>/ class folders
    (every one a known WordNet id), or for val those ``val_labels`` lists.

    A flat val/ without ``val_labels`` counts 0: the dataset reads none of it, which only
    --latents needs (refused there). A train/ or val/ holding no pictures at all is refused:
    preparing nothing would write tables a run then trains on nothing with.
    """
    from .imagenet import count_images, is_image

    if not root.is_dir():
        raise MinfmError(f"{root}: no such ILSVRC-2012 folder")
    counts = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            continue
        counts[split] = count_images(folder, val_labels if split == "val" else None)
        if counts[split]:
            continue
        loose = sum(1 for f in folder.iterdir() if is_image(f.name) and f.is_file())
        if split == "train" or not loose:
            raise MinfmError(f"{root}: {split}/ holds no images in class folders (expected {split}/<wnid>/*.JPEG"
                             + (f"; the {loose} lying directly in {split}/ are not read)" if loose else ")"))
    if not counts:
        raise MinfmError(f"{root}: has neither train/ nor val/ (expected <root>/train/<wnid>/*.JPEG)")
    return counts


def parse_encoder(table: str):
    """``--encoder`` TOML inline table -> (component, config)."""
    from minfm_core.config import structure
    from minfm_core.recipe.schema import Spec
    from minfm_core.recipe.toml import tomllib
    from minfm_core.registry import get_registry

    try:
        raw = tomllib.loads(f"encoder = {table}")["encoder"]
    except tomllib.TOMLDecodeError as exc:
        raise MinfmError(f"--encoder: not a TOML inline table ({exc}), e.g. '{{name = \"clip\"}}'") from None
    except RecursionError:
        raise MinfmError("--encoder: arrays or tables nested too deeply") from None
    spec = structure(raw, Spec, path="--encoder")
    comp = get_registry().get("text_encoder", spec.name, path="--encoder.name")
    return comp, structure(spec.options, comp.config, path="--encoder")


def pick_encoder(resolved, table: str | None):
    if table:
        return parse_encoder(table)
    for path in ("model.clip_encoder", "model.text_encoder"):
        slot = resolved.get(path)
        if slot is not None and slot.component.name != "class_embedding":
            return slot.component, slot.config
    raise MinfmError(
        "the recipe's text encoders are class_embedding tables (what this command writes); name the encoder "
        "of the class names with --encoder, e.g. '{name = \"clip\", pretrained = \"black-forest-labs/FLUX.1-dev/text_encoder\"}'"
    )


def encode_prompts(encoder, prompts: list[str], batch_size: int):
    """One vector per prompt: pooled encoders as they are, per-token ones mean-pooled."""
    import torch

    from minfm_core.packing import segment_mean

    rows = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            out = encoder(prompts[i : i + batch_size])
            if isinstance(out, tuple):
                tokens, lens = out
                out = segment_mean(tokens.float(), lens.to(tokens.device))
            rows.append(out.float().cpu())
    return torch.cat(rows)


def check_table_fits(resolved, dim: int, rows: int) -> None:
    """The recipe's class_embedding slots must be able to load the table we write."""
    for path in ("model.text_encoder", "model.clip_encoder"):
        slot = resolved.get(path)
        if slot is not None and slot.component.name == "class_embedding":
            if slot.config.dim != dim or slot.config.num_rows != rows:
                raise MinfmError(
                    f"{path}: expects a ({slot.config.num_rows}, {slot.config.dim}) table; the encoder gives "
                    f"({rows}, {dim}) (set {path}.dim or pick another --encoder)"
                )


def save_class_table(table, rows: dict[str, int], path: Path) -> None:
    """The (rows, dim) table with its {prompt: row} map, as the class_embedding encoder reads it."""
    from minfm_core.weights import save_safetensors_file

    meta = {LABELS_KEY: json.dumps(rows, ensure_ascii=False, sort_keys=True)}
    save_safetensors_file({TABLE_TENSOR: table.detach().cpu().contiguous()}, path, metadata=meta)


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def run(args) -> int:
    import torch

    from minfm_core.recipe import ONE_PROCESS, load_recipe

    from .imagenet import _prompts, imagenet_classes

    # Everything that can be refused is refused before the first file is written.
    root, out = Path(os.path.expanduser(args.root)), Path(os.path.expanduser(args.out))
    check_out(root, out)
    resolved = load_recipe(args.recipe, [*ONE_PROCESS, *args.overrides], world_size=1)
    data = resolved.get("data")
    inet = data.config if data is not None and data.component.name == "imagenet" else None
    if args.latents and inet is None:
        raise MinfmError(f"{args.recipe}: --latents encodes the images as the recipe's [data] reads them, and that "
                         f"is {repr(data.component.name) if data is not None else 'not set'}, not imagenet")
    template = inet.prompt_template if inet is not None else "{name}"
    val_labels = Path(os.path.expanduser(inet.val_labels)) if inet is not None and inet.val_labels else None
    classes = list(imagenet_classes())
    labels = {wnid: i for i, (wnid, _) in enumerate(classes)}
    counts = split_counts(root, val_labels)
    env = launch_env()
    rank, world = env.rank, env.world_size
    device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    latents = latents_plan(args, root, counts, device) if args.latents else None

    if rank == 0:
        prompts = _prompts(template)
        comp, cfg = pick_encoder(resolved, args.encoder)
        encoder = comp.build(cfg, load_weights=True)
        if isinstance(encoder, torch.nn.Module):
            encoder = encoder.to(device).eval().requires_grad_(False)
        table = encode_prompts(encoder, prompts + [UNCONDITIONAL], args.batch_size)
        check_table_fits(resolved, table.shape[1], table.shape[0])
        rows: dict[str, int] = {}
        for label, prompt in enumerate(prompts):
            rows.setdefault(prompt.strip(), label)  # the two "crane"s: one text, one row (as the seed)
        rows[UNCONDITIONAL] = len(prompts)
        out.mkdir(parents=True, exist_ok=True)
        save_class_table(table, rows, out / "class_embeddings.safetensors")  # atomically
        _write_json(out / "class_embeddings.json", rows)
        _write_json(out / "classes.json", [{"label": i, "wnid": w, "name": n, "prompt": p}
                                          for i, ((w, n), p) in enumerate(zip(classes, prompts))])
        _write_json(out / "label_map.json", labels)
        _write_json(out / "prepare.json", {"root": str(root), "splits": counts, "prompt_template": template,
                                           "encoder": {"name": comp.name}, "table": list(table.shape)})
        print(f"{out}: classes.json, label_map.json, class_embeddings.safetensors ({table.shape[0]} x {table.shape[1]}, "
              f"{comp.name}); splits {', '.join(f'{k} {v}' for k, v in counts.items())}")
    if latents is not None:
        encode_latents(args, out, *latents, rank, world)
    return 0


def latents_plan(args, root: Path, counts: dict[str, int], device):
    """(recipe, VAE, {split: dataset}) for --latents: the recipe's imagenet data reading ROOT
    unflipped, every split asked for present and readable, the VAE built."""
    from minfm_core.recipe import ONE_PROCESS, load_recipe

    resolved = load_recipe(args.recipe, [*ONE_PROCESS, *args.overrides, f"data.root={json.dumps(str(root))}",
                                         "data.use_cached_latents=false", "data.p_flip=0.0"], world_size=1)
    datasets = {}
    for split in dict.fromkeys(args.splits or counts):
        if split not in counts:
            raise MinfmError(f"--split {split}: {root} has no {split}/ folder")
        if not counts[split]:  # only a flat val/ counts 0 (split_counts refuses other empty splits)
            labels = getattr(resolved.config("data"), "val_labels", None)
            if labels:  # set, yet it names none of the pictures: its own problem, not a missing setting
                raise MinfmError(f"--latents: data.val_labels = {labels} lists none of the pictures lying in "
                                 f"{root / split} (an empty file, or the labels of another copy of ImageNet?)")
            raise MinfmError(f"--latents: {root / split} holds its pictures directly, which the imagenet dataset "
                             "reads only with data.val_labels (set it, or encode --split train only)")
        datasets[split] = resolved["data"].build(split=split)
    return resolved, resolved.build("model.vae").to(device), datasets


def encode_latents(args, out: Path, resolved, vae, datasets: dict, rank: int, world: int) -> None:
    from minfm_core.cli.latents_cmd import encode_split
    from minfm_core.latents_record import cache_request

    # The request is recorded as `minfm cache latents` records it: without it, a rerun with
    # other data or VAE settings took the old shards as finished, and every training run
    # from the cache warned that all its settings had changed.
    request = cache_request(resolved)
    for split, dataset in datasets.items():
        stats = encode_split(vae, dataset, out / "latents" / split, split, vae_slot=resolved["model.vae"],
                             shard_size=args.shard_size,
                             batch_size=args.batch_size, dtype=args.dtype, rank=rank, world=world,
                             seed=resolved.recipe.run.seed, log=lambda m: print(m, file=sys.stderr), request=request)
        print(f"{out / 'latents' / split}: encoded {stats['encoded']} shard(s), skipped {stats['skipped']}"
              + (f"; index of {stats['indexed']} items" if "indexed" in stats else ""))
    print(f"train with: --set data.use_cached_latents=true --set data.latents_dir=\"{out / 'latents'}\"")
