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
import sys
import typing
from pathlib import Path
from typing import Any

from minfm_core.cli.argtypes import int_in
from minfm_core.cli.groups import command_group
from minfm_core.config import Dtype
from minfm_core.errors import MinfmError
from minfm_core.launch_env import launch_env
from minfm_core.safepath import write_text_atomic
from minfm_core.validators import MAX_BATCH

UNCONDITIONAL = ""
#: The class_embedding file format: the table under this tensor name, {prompt: row} JSON under this metadata key.
TABLE_TENSOR, LABELS_KEY = "embeddings", "labels"


def register(sub) -> None:
    which = command_group(sub, "data", help="prepare datasets")
    inet = which.add_parser("imagenet", help="ILSVRC-2012")
    action = inet.add_subparsers(dest="data_action", metavar="ACTION", parser_class=type(inet))
    action.required = True
    q = action.add_parser("prepare", help="class names, label map, class-name embeddings (and latents) from an ILSVRC folder")
    q.add_argument("root", help="ILSVRC-2012 folder with train/<wnid>/*.JPEG (and val/)")
    q.add_argument("--recipe", required=True, help="the training recipe (its data, text encoder and VAE)")
    q.add_argument("--out", required=True, help="output folder, e.g. $MINFM_DATA_DIR/imagenet")
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


def split_counts(root: Path, labels: dict[str, int]) -> dict[str, int]:
    """Images per split of an ILSVRC tree; every class folder must be a known WordNet id."""
    if not root.is_dir():
        raise MinfmError(f"{root}: no such ILSVRC-2012 folder")
    counts = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            continue
        n = 0
        for sub in sorted(folder.iterdir()):
            if sub.is_dir():
                if sub.name not in labels:
                    raise MinfmError(f"{sub}: not an ILSVRC-2012 class folder (unknown WordNet id)")
                n += sum(1 for f in sub.iterdir() if f.suffix.lower() in (".jpeg", ".jpg", ".png"))
            elif sub.suffix.lower() in (".jpeg", ".jpg", ".png"):
                n += 1  # a flat val/ (labels from data.val_labels)
        counts[split] = n
    if not counts:
        raise MinfmError(f"{root}: has neither train/ nor val/ (expected <root>/train/<wnid>/*.JPEG)")
    empty = [split for split, n in counts.items() if not n]
    if empty:  # preparing nothing would write tables a run then trains on nothing with
        raise MinfmError(f"{root}: {' and '.join(f'{s}/' for s in empty)} holds no images "
                         "(expected <wnid>/*.JPEG folders, or a flat val/)")
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

    from minfm_core.recipe import load_recipe

    from .imagenet import imagenet_classes

    root, out = Path(args.root).expanduser(), Path(args.out).expanduser()
    resolved = load_recipe(args.recipe, args.overrides, world_size=1)
    data = resolved.get("data")
    template = getattr(data.config, "prompt_template", "{name}") if data is not None else "{name}"
    classes = list(imagenet_classes())
    labels = {wnid: i for i, (wnid, _) in enumerate(classes)}
    counts = split_counts(root, labels)
    env = launch_env()
    rank, world = env.rank, env.world_size
    device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)

    if rank == 0:
        prompts = [template.format(name=name) for _, name in classes]
        comp, cfg = pick_encoder(resolved, args.encoder)
        encoder = comp.build(cfg, load_weights=True)
        if isinstance(encoder, torch.nn.Module):
            encoder = encoder.to(device).eval().requires_grad_(False)
        table = encode_prompts(encoder, prompts + [UNCONDITIONAL], args.batch_size)
        check_table_fits(resolved, table.shape[1], table.shape[0])
        rows: dict[str, int] = {}
        for label, prompt in enumerate(prompts):
            rows.setdefault(prompt.strip(), label)  # "crane", "maillot": two classes, one text, one row
        rows[UNCONDITIONAL] = len(prompts)
        save_class_table(table, rows, out / "class_embeddings.safetensors")  # atomically
        _write_json(out / "class_embeddings.json", rows)
        _write_json(out / "classes.json", [{"label": i, "wnid": w, "name": n, "prompt": p}
                                          for i, ((w, n), p) in enumerate(zip(classes, prompts))])
        _write_json(out / "label_map.json", labels)
        _write_json(out / "prepare.json", {"root": str(root), "splits": counts, "prompt_template": template,
                                           "encoder": {"name": comp.name}, "table": list(table.shape)})
        print(f"{out}: classes.json, label_map.json, class_embeddings.safetensors ({table.shape[0]} x {table.shape[1]}, "
              f"{comp.name}); splits {', '.join(f'{k} {v}' for k, v in counts.items())}")
    if args.latents:
        encode_latents(args, root, out, counts, rank, world, device)
    return 0


def encode_latents(args, root: Path, out: Path, counts: dict[str, int], rank: int, world: int, device) -> None:
    from minfm_core.cli.latents_cmd import encode_split
    from minfm_core.recipe import load_recipe

    resolved = load_recipe(args.recipe, [*args.overrides, f"data.root={json.dumps(str(root))}",
                                         "data.use_cached_latents=false", "data.p_flip=0.0"], world_size=1)
    data = resolved.get("data")
    if data is None or data.component.name != "imagenet":
        raise MinfmError(f"{args.recipe}: --latents needs a recipe whose [data] is the imagenet dataset")
    vae = resolved.build("model.vae").to(device)
    for split in args.splits or list(counts):
        if split not in counts:
            raise MinfmError(f"--split {split}: {root} has no {split}/ folder")
        stats = encode_split(vae, data.build(split=split), out / "latents" / split, split, shard_size=args.shard_size,
                             batch_size=args.batch_size, dtype=args.dtype, rank=rank, world=world,
                             seed=resolved.recipe.run.seed, log=lambda m: print(m, file=sys.stderr))
        print(f"{out / 'latents' / split}: encoded {stats['encoded']} shard(s), skipped {stats['skipped']}"
              + (f"; index of {stats['indexed']} items" if "indexed" in stats else ""))
    print(f"train with: --set data.use_cached_latents=true --set data.latents_dir=\"{out / 'latents'}\"")
