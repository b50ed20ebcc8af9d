"""``minfm cache``: pre-fetch pretrained weights, and encode a dataset's latents once.

``minfm cache models RECIPE`` downloads every pretrained reference the recipe's
components name (T5, CLIP, VAE, denoiser, ...) that is not cached yet, through the
source that resolves it (the hub plugin's ``hf``), so that later runs work with
``HF_HUB_OFFLINE=1``; run with ``HF_HUB_OFFLINE=1`` itself, it only checks that
every reference is already cached. A component lists its references in a ``pretrained_refs``
config property, or names one in a ``pretrained`` field (see
``minfm_core.pretrained.pretrained_refs``); local paths are left alone.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MinfmError, NotCachedError, terminal_safe
from ..pretrained import is_local, parse_hub_ref, recipe_refs, resolve_pretrained
from ..recipe import ONE_PROCESS, load_recipe
from . import latents_cmd


def register(sub) -> None:
    from .argtypes import Parser as _Parser, add_recipe_args

    p = sub.add_parser("cache", help="pre-fetch pretrained weights; encode a dataset's latents once")
    what = p.add_subparsers(dest="cache_what", metavar="WHAT", parser_class=_Parser)

    m = what.add_parser("models", help="download every pretrained weight the recipe names (T5, CLIP, VAE, denoiser)")
    add_recipe_args(m)
    m.set_defaults(func=run_models)

    latents_cmd.register(what)


def run_models(args) -> int:
    resolved = load_recipe(args.recipe, [*ONE_PROCESS, *args.overrides])
    refs = recipe_refs(resolved)
    if not refs:
        print(f"{args.recipe}: names no pretrained weights; nothing to fetch")
        return 0
    fetched, failed, uncached, seen = 0, [], [], set()
    for path, ref in refs:
        if ref in seen:  # two slots naming one file (a class table both encoders read): fetched, or named, once
            continue
        seen.add(ref)
        if is_local(ref):
            print(terminal_safe(f"{path}: {ref} (local, skipped)"))  # a recipe's values (perhaps downloaded)
            continue
        try:  # one missing reference (e.g. a file another command writes) does not stop the others
            local = resolve_pretrained(ref)
        except NotCachedError as exc:
            if parse_hub_ref(ref) is None:  # another source's: its own words
                failed.append(str(exc))
                continue
            # Not in the Hugging Face cache, and offline. Each one's error advises this very
            # command: say once what is missing, and why. (Any other error is kept as it is.)
            uncached.append(ref + (" (nor a local file)" if Path(ref).suffix else ""))
            continue
        except MinfmError as exc:
            failed.append(f"{exc}" + (" (nor is it an existing local file)" if Path(ref).suffix else ""))
            continue
        fetched += 1
        print(terminal_safe(f"{path}: {ref} -> {local}"))
    if fetched and not failed:  # offline runs would miss whatever failed
        print(f"{fetched} Hub reference(s) in the Hugging Face cache; later runs can set HF_HUB_OFFLINE=1")
    elif fetched:
        print(f"{fetched} Hub reference(s) in the Hugging Face cache")
    if uncached:
        failed.append(f"not in the Hugging Face cache, and the Hub is offline (HF_HUB_OFFLINE=1): "
                      f"{', '.join(uncached)}; unset HF_HUB_OFFLINE for minfm cache models to fetch "
                      f"{'it' if len(uncached) == 1 else 'them'}")
    if len(failed) == 1:
        raise MinfmError(failed[0])
    if failed:
        raise MinfmError(f"{len(failed)} references not fetched: " + "; ".join(failed))
    return 0
