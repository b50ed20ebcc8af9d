"""The model card (README.md) of a pushed minFM repo: Hub metadata plus a human summary.

Everything comes from the pushed folder (``recipe.toml``, ``metrics.jsonl``, the weights'
safetensors headers), and nothing time-dependent goes in, so pushing the same folder twice
writes the same card (and the second push is a no-op).

A video model is one whose recipe samples or trains on clips
(:func:`minfm_core.engine.video_io.recipe_makes_clips`): its card says
``pipeline_tag: text-to-video``, and its ``samples.png`` (the last training gallery, an
animated PNG for clips) plays on the card as an animated preview.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from minfm_core.engine.video_io import recipe_makes_clips
from minfm_core.errors import MinfmError, first_line
from minfm_core.jsonio import last_jsonl_record
from minfm_core.recipe.load import MAX_RECIPE_BYTES
from minfm_core.recipe.toml import tomllib
from minfm_core.textfiles import read_bounded
from minfm_core.weights import open_safetensors

from .uri import SCHEME

#: Datasets the built-in data plugins read, by recipe ``data.name``.
KNOWN_DATASETS = {"imagenet": "ILSVRC/imagenet-1k"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*\Z")
#: A license id as the Hub's model-card metadata takes one: "apache-2.0", "cc-by-nc-4.0", "other".
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]{0,63}\Z")
_WEIGHTS = {"model": "denoiser weights", "ema": "EMA of the denoiser weights (used for sampling by default)"}

# The recipe keys the card reads, each with the shape the recipe schema gives it. Every read
# goes through `_get`, which knows only these keys, so this table is the whole list a
# pushed recipe.toml is checked against. A run writes its recipe.toml itself: a wrong shape
# is a hand edit that no longer loads as a recipe, so the push is refused naming the key
# rather than publishing a card and a recipe nobody can use.
_SHAPES: dict[str, tuple[str, Any]] = {
    "table": ("a table", lambda v: isinstance(v, dict)),
    "component": ("a name or a table", lambda v: isinstance(v, (str, dict))),  # `vae = "identity"` is shorthand
    "string": ("a string", lambda v: isinstance(v, str)),
    "integer": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "strings": ("an array of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "integers": ("an array of integers",
                 lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)),
}
_COMPONENTS = ("denoiser", "vae", "text_encoder", "clip_encoder")
RECIPE_KEYS: dict[str, str] = {
    "model": "table",
    **{f"model.{c}": "component" for c in _COMPONENTS},
    **{f"model.{c}.{k}": "string" for c in _COMPONENTS for k in ("name", "flavor")},
    "model.denoiser.pretrained": "string",
    "train": "table", "train.init_from": "string", "train.max_steps": "integer", "train.total_batch_size": "integer",
    "train.lr": "number", "train.ema_decay": "number",
    "data": "component", "data.name": "string", "data.repo_id": "string", "data.hf_dataset": "string",
    "sample": "table", "sample.prompts": "strings", "sample.size": "integers",
}
_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}


def _get(recipe: dict[str, Any], key: str, where: str = "recipe.toml") -> Any:
    """``recipe[key]`` for a dotted key of :data:`RECIPE_KEYS` (None when absent, or when its
    parent is a component given by name); a value of the wrong shape is one MinfmError."""
    desc, ok = _SHAPES[RECIPE_KEYS[key]]  # a KeyError here is a read this table does not declare: a bug
    parent_key, _, name = key.rpartition(".")
    parent = _get(recipe, parent_key, where) if parent_key else recipe  # parents are checked first
    value = parent.get(name) if isinstance(parent, dict) else None
    if value is not None and not ok(value):
        got = _TOML_TYPES.get(type(value), type(value).__name__)
        raise MinfmError(f"{where}: {key} must be {desc}, not {got}; fix it (or remove the file) and push again")
    return value


def read_recipe(folder: Path) -> dict[str, Any]:
    path = folder / "recipe.toml"
    if not path.exists():
        return {}
    try:
        recipe = tomllib.loads(read_bounded(path, str(path), MAX_RECIPE_BYTES).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MinfmError(f"{path}: not a valid recipe ({first[:200]})") from None
    for key in RECIPE_KEYS:  # every shape the card relies on, refused here with the file's full path
        _get(recipe, key, str(path))
    return recipe


def last_metrics(folder: Path, max_items: int = 8) -> dict[str, Any]:
    """Scalars of the last ``metrics.jsonl`` record that has a step (empty if none), but its wall
    clock ``time`` (a Unix timestamp said nothing in a card: `1.796e+09`)."""
    last = last_jsonl_record(folder / "metrics.jsonl", "step")
    scalars = {k: v for k, v in last.items()
               if k != "time" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return dict(list(scalars.items())[:max_items])


def weight_stats(files: dict[str, Path]) -> dict[str, tuple[int, str]]:
    """``{"model": (n_params, dtypes)}`` for each weights stem, from safetensors headers only."""
    out: dict[str, tuple[int, str]] = {}
    for repo_path, local in files.items():
        if "/" in repo_path or not repo_path.endswith(".safetensors"):
            continue
        stem = re.sub(r"-\d{5}-of-\d{5}$", "", repo_path[: -len(".safetensors")])
        n, dtypes = out.get(stem, (0, ""))
        seen = set(filter(None, dtypes.split(", ")))
        with open_safetensors(local) as f:  # bounded header, one-line errors; no tensor is read
            for name in f.keys():
                t = f.get_slice(name)
                count = 1
                for d in t.get_shape():
                    count *= d
                n += count
                seen.add(t.get_dtype())
        out[stem] = (n, ", ".join(sorted(seen)))
    return out


def _hub_id(value: Any, bare: bool = True) -> str | None:
    """A Hub repo id named by a recipe value (``hf://org/name@rev``, or ``org/name`` if ``bare``), else None."""
    if not isinstance(value, str) or not (bare or value.startswith(SCHEME)):
        return None
    value = value[len(SCHEME):] if value.startswith(SCHEME) else value
    value = value.split("@", 1)[0]
    return value if _REPO_ID.match(value) and not Path(value).exists() else None


def validate_license(license: str) -> str:
    """``license`` if it is a license id, else a MinfmError: the card's metadata publishes it
    as typed (an empty one, a newline with HTML after it, 100,000 characters)."""
    if not isinstance(license, str) or not _LICENSE.match(license):
        raise MinfmError(f"--license {license[:80]!r}: expected a license id such as apache-2.0, mit, "
                         "cc-by-nc-4.0 or other (lower-case letters, digits, '.', '+' and '-')"
                         if isinstance(license, str) else f"license must be a string, got {type(license).__name__}")
    return license


def metadata(recipe: dict[str, Any], license: str) -> dict[str, Any]:
    """The card's YAML metadata (Hub keys)."""
    # train.init_from names a local path unless it says hf://; a bare org/name in `pretrained` is a Hub id
    init_from = _hub_id(_get(recipe, "train.init_from"), bare=False)
    base = [b for b in (init_from, _hub_id(_get(recipe, "model.denoiser.pretrained"))) if b]
    data_name = _data_name(recipe)
    datasets = [KNOWN_DATASETS[data_name]] if data_name in KNOWN_DATASETS else []
    datasets += [d for d in (_hub_id(_get(recipe, f"data.{k}")) for k in ("repo_id", "hf_dataset")) if d]
    task = "text-to-video" if recipe_makes_clips(recipe) else "text-to-image"
    tags = ["minfm", "flow-matching", task]
    denoiser = _component_name(recipe, "denoiser")
    if denoiser:
        tags.append(denoiser)
    meta: dict[str, Any] = {"library_name": "minfm", "pipeline_tag": task, "license": license, "tags": tags}
    if base:
        meta["base_model"] = sorted(set(base)) if len(set(base)) > 1 else base[0]
    if datasets:
        meta["datasets"] = sorted(set(datasets))
    return meta


def _data_name(recipe: dict[str, Any]) -> str | None:
    data = _get(recipe, "data")
    return data if isinstance(data, str) else _get(recipe, "data.name")


def _component_name(recipe: dict[str, Any], key: str) -> str | None:
    spec = _get(recipe, f"model.{key}")
    return spec if isinstance(spec, str) else _get(recipe, f"model.{key}.name")


#: The most of one recipe value a card shows.
MAX_SHOWN = 120


def _code(value: Any, cell: bool = False) -> str:
    """``value`` as one inline code span, whatever it holds: a pushed recipe is text someone
    wrote (a pulled repo re-published), and a raw value in a card is markdown and HTML that
    the Hub renders (a heading, a script tag, a `javascript:` link). Control characters are
    escaped, backticks outfenced, and in a table cell ``|`` is escaped (GFM splits cells there
    even inside code)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))
    text = text[:MAX_SHOWN] + ("..." if len(text) > MAX_SHOWN else "")
    if cell:
        text = text.replace("|", "\\|")
    fence = "`" * (max(map(len, re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _component(recipe: dict[str, Any], key: str) -> str | None:
    name = _component_name(recipe, key)
    if not name:
        return None
    flavor = _get(recipe, f"model.{key}.flavor")
    return _code(name) + (f" ({_code(flavor)})" if flavor is not None else "")


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def _is_animated(path: Path | None) -> bool:
    """Whether a pushed picture holds more than one frame (an APNG gallery of clips).

    No pixel is decoded, only headers. A file Pillow cannot read, or one declaring more pixels than its
    decompression-bomb limit, is refused naming it, as every image from outside is
    (:func:`minfm_core.images.read_rgb`): the card would show it to everyone who opens it.
    """
    if path is None:
        return False
    from PIL import Image

    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) > 1
    except Image.DecompressionBombError as exc:
        raise MinfmError(f"{path}: image too large to decode safely ({first_line(exc, 120)})") from None
    # Only Pillow runs in this block, and a malformed file makes it raise many types (OSError,
    # SyntaxError, EOFError, struct.error, IndexError for a cut GIF...): all mean a bad image.
    except Exception as exc:
        raise MinfmError(f"{path}: not a readable image ({first_line(exc, 200)})") from None


def _clip_size(recipe: dict[str, Any]) -> str | None:
    """``FxHxW`` of the recipe's sample clips, for the card's sampling command (None for images)."""
    size = _get(recipe, "sample.size")
    if size and len(size) == 3 and size[0] > 1 and min(size) > 0:
        return "x".join(map(str, size))
    return None


def render(repo_id: str, files: dict[str, Path], folder: Path, license: str = "other") -> str:
    """The full README.md text for ``files`` (repo path -> local file) pushed from ``folder``."""
    from huggingface_hub import ModelCardData

    recipe = read_recipe(folder)
    meta = metadata(recipe, license)
    yaml = ModelCardData(**meta).to_yaml()
    stats = weight_stats(files)

    video = meta["pipeline_tag"] == "text-to-video"
    animated = _is_animated(files.get("samples.png"))
    parts = [f"---\n{yaml}\n---\n", f"# {repo_id.split('/')[-1]}\n"]
    what = [f"A {meta['pipeline_tag']} flow-matching model trained with [minFM](https://github.com/Kai-46/minFM)."]
    comps = [(label, _component(recipe, key)) for label, key in (
        ("denoiser", "denoiser"), ("VAE", "vae"), ("text encoder", "text_encoder"), ("pooled text encoder", "clip_encoder"))]
    comps = [f"{label} {c}" for label, c in comps if c]
    if comps:
        what.append("Components: " + ", ".join(comps) + ".")
    if "model" in stats:
        n, dtypes = stats["model"]
        what.append(f"The denoiser has {_human(n)} parameters ({dtypes}).")
    parts.append(" ".join(what) + "\n")

    prompts = [p for p in _get(recipe, "sample.prompts") or () if p.isprintable() and len(p) <= MAX_SHOWN]
    prompt = shlex.quote(prompts[0] if prompts else "a photo of a cat")  # one line: a line break ends the code block
    clip = _clip_size(recipe)
    size_flag = f" --size {clip}" if video and clip else ""
    install = "pip install 'minfm[video]'" if video else "pip install minfm"
    parts.append(
        f"## Sample\n\n```bash\n{install}\n"
        f"minfm sample hf://{repo_id} --prompt {prompt}{size_flag} --out samples/\n"
        f"minfm hub pull {repo_id} --local-dir {repo_id.split('/')[-1]}   # or download the files only\n```\n\n"
        "In Python, `minfm_core.sources.resolve_source(\"hf://"
        f"{repo_id}\")` returns the local folder (safetensors only are downloaded).\n"
        + ("\nEach clip is written as an MP4 (H.264) and an animated WebP; `--size FRAMESxHEIGHTxWIDTH` "
           "sets the frame count.\n" if video else "")
    )

    rows = []
    for stem, doc in _WEIGHTS.items():
        if f"{stem}.safetensors" in files:
            rows.append((f"`{stem}.safetensors`", doc))
        elif f"{stem}.safetensors.index.json" in files:
            rows.append((f"`{stem}-*.safetensors` + `{stem}.safetensors.index.json`", doc + ", sharded"))
    for name, doc in (("recipe.toml", "the resolved recipe the model was trained with (`minfm run recipe.toml`)"),
                      ("metrics.jsonl", "training metrics, one JSON record per log step"),
                      ("samples.png", "an animated sample grid (APNG: every clip plays)" if animated else "a sample grid")):
        if name in files:
            rows.append((f"`{name}`", doc))
    if any(p.startswith("checkpoint/") for p in files):
        rows.append(("`checkpoint/`", "the full training state (torch.distributed.checkpoint) to resume training"))
    parts.append("## Files\n\n| file | content |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows))

    summary = []
    data_name = _data_name(recipe)
    if data_name:
        summary.append(("dataset", _code(data_name, cell=True)))
    for key, label in (("max_steps", "planned steps"), ("total_batch_size", "global batch size"), ("lr", "peak learning rate"),
                       ("ema_decay", "EMA decay"), ("init_from", "initialised from")):
        value = _get(recipe, f"train.{key}")
        if value is not None:
            summary.append((label, _code(value, cell=True)))
    for key, value in last_metrics(folder).items():
        summary.append((f"last {_code(key, cell=True)}", f"{value:.4g}" if isinstance(value, float) else str(value)))
    if summary:
        parts.append("## Training\n\n| | |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in summary))

    if "samples.png" in files:
        alt = "animated sample grid" if animated else "sample grid"
        parts.append(f"## Samples\n\n![{alt}](samples.png)\n")
    return "\n".join(parts)
