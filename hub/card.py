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
from minfm_core.errors import MinfmError
from minfm_core.jsonio import last_jsonl_record
from minfm_core.recipe.load import MAX_RECIPE_BYTES
from minfm_core.recipe.toml import tomllib
from minfm_core.textfiles import read_bounded
from minfm_core.weights import open_safetensors

from .uri import SCHEME

#: Datasets the built-in data plugins read, by recipe ``data.name``.
KNOWN_DATASETS = {"imagenet": "ILSVRC/imagenet-1k"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_WEIGHTS = {"model": "denoiser weights", "ema": "EMA of the denoiser weights (used for sampling by default)"}


def read_recipe(folder: Path) -> dict[str, Any]:
    path = folder / "recipe.toml"
    if not path.exists():
        return {}
    try:
        return tomllib.loads(read_bounded(path, str(path), MAX_RECIPE_BYTES).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MinfmError(f"{path}: not a valid recipe ({first[:200]})") from None


def last_metrics(folder: Path, max_items: int = 8) -> dict[str, Any]:
    """Scalars of the last ``metrics.jsonl`` record that has a step (empty if none)."""
    last = last_jsonl_record(folder / "metrics.jsonl", "step")
    scalars = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
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


def metadata(recipe: dict[str, Any], license: str) -> dict[str, Any]:
    """The card's YAML metadata (Hub keys)."""
    model = recipe.get("model", {})
    denoiser = model.get("denoiser", {}) if isinstance(model.get("denoiser"), dict) else {}
    # train.init_from names a local path unless it says hf://; a bare org/name in `pretrained` is a Hub id
    init_from = _hub_id(recipe.get("train", {}).get("init_from"), bare=False)
    base = [b for b in (init_from, _hub_id(denoiser.get("pretrained"))) if b]
    data = recipe.get("data") or {}
    data_name = data if isinstance(data, str) else data.get("name")
    datasets = [KNOWN_DATASETS[data_name]] if data_name in KNOWN_DATASETS else []
    datasets += [d for d in (_hub_id(data.get(k)) for k in ("repo_id", "hf_dataset")) if d] if isinstance(data, dict) else []
    task = "text-to-video" if recipe_makes_clips(recipe) else "text-to-image"
    tags = ["minfm", "flow-matching", task]
    if denoiser.get("name"):
        tags.append(str(denoiser["name"]))
    meta: dict[str, Any] = {"library_name": "minfm", "pipeline_tag": task, "license": license, "tags": tags}
    if base:
        meta["base_model"] = sorted(set(base)) if len(set(base)) > 1 else base[0]
    if datasets:
        meta["datasets"] = sorted(set(datasets))
    return meta


def _component(model: dict[str, Any], key: str) -> str | None:
    spec = model.get(key)
    if isinstance(spec, str):
        return f"`{spec}`"
    if isinstance(spec, dict) and "name" in spec:
        extra = f" ({spec['flavor']})" if "flavor" in spec else ""
        return f"`{spec['name']}`{extra}"
    return None


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def _is_animated(path: Path | None) -> bool:
    """Whether a pushed picture holds more than one frame (an APNG gallery of clips)."""
    if path is None:
        return False
    from PIL import Image

    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) > 1
    except (OSError, ValueError):  # not a picture Pillow reads: the card just shows it as it is
        return False


def _clip_size(recipe: dict[str, Any]) -> str | None:
    """``FxHxW`` of the recipe's sample clips, for the card's sampling command (None for images)."""
    sample = recipe.get("sample")
    size = sample.get("size") if isinstance(sample, dict) else None
    if (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
            and size[0] > 1 and min(size) > 0):
        return "x".join(map(str, size))
    return None


def render(repo_id: str, files: dict[str, Path], folder: Path, license: str = "other") -> str:
    """The full README.md text for ``files`` (repo path -> local file) pushed from ``folder``."""
    from huggingface_hub import ModelCardData

    recipe = read_recipe(folder)
    meta = metadata(recipe, license)
    yaml = ModelCardData(**meta).to_yaml()
    model = recipe.get("model", {})
    stats = weight_stats(files)

    video = meta["pipeline_tag"] == "text-to-video"
    animated = _is_animated(files.get("samples.png"))
    parts = [f"---\n{yaml}\n---\n", f"# {repo_id.split('/')[-1]}\n"]
    what = [f"A {meta['pipeline_tag']} flow-matching model trained with [minFM](https://github.com/Kai-46/minFM)."]
    comps = [(label, _component(model, key)) for label, key in (
        ("denoiser", "denoiser"), ("VAE", "vae"), ("text encoder", "text_encoder"), ("pooled text encoder", "clip_encoder"))]
    comps = [f"{label} {c}" for label, c in comps if c]
    if comps:
        what.append("Components: " + ", ".join(comps) + ".")
    if "model" in stats:
        n, dtypes = stats["model"]
        what.append(f"The denoiser has {_human(n)} parameters ({dtypes}).")
    parts.append(" ".join(what) + "\n")

    prompts = recipe.get("sample", {}).get("prompts") or ["a photo of a cat"]
    prompt = shlex.quote(str(prompts[0]))
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

    train = recipe.get("train", {})
    summary = []
    data = recipe.get("data")
    data_name = data if isinstance(data, str) else (data or {}).get("name")
    if data_name:
        summary.append(("dataset", f"`{data_name}`"))
    for key, label in (("max_steps", "steps"), ("total_batch_size", "global batch size"), ("lr", "peak learning rate"),
                       ("ema_decay", "EMA decay"), ("init_from", "initialised from")):
        if key in train:
            summary.append((label, f"`{train[key]}`"))
    for key, value in last_metrics(folder).items():
        summary.append((f"last `{key}`", f"{value:.4g}" if isinstance(value, float) else str(value)))
    if summary:
        parts.append("## Training\n\n| | |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in summary))

    if "samples.png" in files:
        alt = "animated sample grid" if animated else "sample grid"
        parts.append(f"## Samples\n\n![{alt}](samples.png)\n")
    return "\n".join(parts)
