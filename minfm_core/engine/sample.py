"""Sampling runs: ``minfm sample SRC`` and ``job = "sample"`` recipes.

    minfm sample experiments/quickstart --prompt "a red circle" --n 4
    minfm sample hf://org/model --prompt-file prompts.txt --npz --nproc-per-node 2

Prompts x samples-per-prompt are cut into fixed batches, handed to ranks round robin:
an image is the same whatever the number of processes. Ranks short of a batch run a
dummy one (never written), so every rank makes the same number of denoiser calls, as a
sharded (``fsdp2``) denoiser needs. Writes images (PNG) or clips (MP4 plus a lossless
animated WebP, see video_io.py), an HTML gallery, ``metadata.json`` and optionally
``samples.npz`` (the ADM evaluation layout; clips add a frame axis), prompt-major.

Resuming: ``metadata.json`` is written first and describes the request (prompts, seeds,
steps, guidance, sampler, size, the source checkpoint, the sampling recipe). An ``--out``
holding another request's samples is refused, naming what differs, unless ``--overwrite``
(which removes the stale images first); for the same request, batches whose files all
exist are skipped, so an interrupted run resumes. Every file is written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import checkpoint as ckpt_mod
from .. import runlock
from ..checkpoint_format import MANIFEST, read_manifest
from ..errors import MinfmError, os_error_line, terminal_safe
from ..images import read_rgb
from ..jsonio import parse_json
from ..pretrained import resolve_recipe_refs
from ..safepath import recipe_root, require_folder_room, trust_boundary, write_atomic, write_bytes_atomic, write_text_atomic
from ..textfiles import read_bounded
from ..validators import draw_problem
from ..weights import check_weights_folder, has_weights, load_safetensors_into
from .gallery import write_sample_index
from .prompts import read_prompt_file, sample_job_prompts
from .generate import generate, image_seed, to_pil, to_uint8
from .video_io import DEFAULT_FPS, encode_webp, read_webp, require_av, write_mp4
from .pipeline import build_pipeline, sharded_denoiser
from .runtime import init_runtime, shutdown_runtime


def locate(src_path: Path, stack: contextlib.ExitStack, *, allow_pickle: bool = False) -> tuple[Path, str, Path]:
    """(recipe.toml, kind, weights location) for a run dir, a checkpoint, or an exported folder.

    kind is "safetensors" (a Hub-style folder with model.safetensors) or "dcp". A checkpoint
    is opened and verified here, before anything is written (see checkpoint.open_checkpoint),
    and kept from a live run's ``keep_last`` pruning until ``stack`` closes (checkpoint.held).
    """
    if has_weights(src_path):
        recipe = src_path / "recipe.toml"
        if not recipe.is_file():
            raise MinfmError(f"{src_path}: has model weights but no recipe.toml")
        check_weights_folder(src_path)  # headers, index and links, before anything is written
        return recipe, "safetensors", src_path
    also = ", nor a model folder (model.safetensors with a recipe.toml, as minfm hub push and pull make)"
    if any((src_path / f).is_file() for f in ("diffusion_pytorch_model.safetensors", "model_index.json",
                                               "diffusion_pytorch_model.safetensors.index.json")):
        also += ("; this is a diffusers folder (minfm export diffusers writes it for diffusers): "
                 "use the run or checkpoint it was exported from")
    ckpt = stack.enter_context(ckpt_mod.held(src_path, also))
    ckpt_mod.open_checkpoint(ckpt, allow_pickle=allow_pickle)
    return ckpt_mod.recipe_for(ckpt), "dcp", ckpt


def check_weights_fit(resolved, kind: str, where: Path, use_ema: bool, allow_pickle: bool = False) -> None:
    """The weights' names and shapes (headers, or a checkpoint's manifest) against the
    recipe's denoiser built on the meta device, before a real one is built: a downloaded
    recipe.toml of d_model 8192 and 64 blocks (each value in its range) filled 250 GiB before
    its 276 KB of weights were compared with it."""
    from ..weights import check_keys, header_tensors

    if kind == "dcp":
        ckpt = ckpt_mod.open_checkpoint(where, allow_pickle=allow_pickle)
        if ckpt.manifest is None:  # a legacy checkpoint (trusted by the user) lists no shapes
            return
        source = "ema" if use_ema and ckpt.has_part("ema") else "model"
        held = {k[len(source) + 1:]: torch.empty(t["shape"], device="meta")
                for k, t in ckpt.manifest.tensors.items() if k.startswith(source + ".")}
        label = f"{where} ({source} weights)"
    else:
        source = "ema" if use_ema and has_weights(where, "ema") else "model"
        held = header_tensors(where, source)
        label = f"{where}/{source}.safetensors"
    with torch.device("meta"):
        model = resolved["model.denoiser"].build(load_weights=False)
    try:
        check_keys(model, held, label, params_only=source == "ema")
    except MinfmError as exc:
        raise MinfmError(f"{exc} (the model as {resolved.source} describes it)") from None


def load_denoiser_weights(model: torch.nn.Module, kind: str, where: Path, use_ema: bool,
                          allow_pickle: bool = False) -> str:
    """Load raw or EMA weights; returns which were loaded."""
    if kind == "dcp":
        ckpt = ckpt_mod.open_checkpoint(where, allow_pickle=allow_pickle)
        source = "ema" if use_ema and ckpt.has_part("ema") else "model"
        ckpt_mod.load_weights(ckpt, model, source=source)
        return source
    name = "ema" if use_ema and has_weights(where, "ema") else "model"
    load_safetensors_into(model, where, name)
    return name


def sample_cli(args) -> int:
    from ..sources import resolve_source

    with contextlib.ExitStack() as stack:
        return _sample_cli(args, resolve_source(args.source), stack)


def _sample_cli(args, src: Path, stack: contextlib.ExitStack) -> int:
    from ..launch_env import launch_env
    from ..recipe import ONE_PROCESS, load_recipe

    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if prompts and args.n is not None:  # refused before the source is opened and verified
        _check_draw(len(prompts), args.n, "--n")
    recipe_path, kind, where = locate(src, stack, allow_pickle=args.allow_pickle_checkpoint)
    # The flags as recipe settings, each with its flag: a problem it causes names the flag.
    flagged: dict[str, str] = {}  # override -> flag
    if args.steps is not None:
        flagged[f"sample.steps={args.steps}"] = "--steps"
    if args.cfg is not None:
        flagged[f"sample.guidance.scale={args.cfg}"] = "--cfg"
    if args.size is not None:  # (frames, height, width), parsed and range-checked by argparse
        flagged["sample.size=[{}, {}, {}]".format(*args.size)] = "--size"
    if args.n is not None:
        flagged[f"sample.samples_per_prompt={args.n}"] = "--n"
    if args.seed is not None:
        flagged[f"sample.seed={args.seed}"] = "--seed"
    if args.npz:
        flagged["sample.save_npz=true"] = "--npz"
    if args.no_ema:
        flagged["sample.use_ema=false"] = "--no-ema"
    # In one process nothing is sharded or balanced: a run trained on 2 GPUs with
    # balancer.bags = "g1n2" samples here as it would there (the user's --set still wins).
    one = list(ONE_PROCESS) if launch_env().world_size == 1 else []
    # A setting that is a flag's, or that this command takes from its arguments, given by --set
    # too: the flag's value won and the --set one was never read (`--steps 1 --set
    # sample.steps=-1` went unchecked; `--set sample.out_dir=...` wrote to the default).
    by_flag = {override.partition("=")[0]: flag for override, flag in flagged.items()}
    taken = {**by_flag, "sample.out_dir": "--out", "sample.source": "SRC"}
    for override in args.overrides:
        key = override.partition("=")[0].strip()
        if key in taken:
            raise MinfmError(f"--set {key}: minfm sample takes it from {taken[key]}; give it there")
    overrides = ["job=sample", *one, *args.overrides, *flagged]
    flags = {"job": "", **{o.partition("=")[0]: "" for o in one}, **by_flag}
    # A recipe downloaded with the model is data (docs/security.md); --set stays the user's.
    resolved = load_recipe(recipe_path, overrides, untrusted_root=recipe_root(recipe_path), flags=flags, recorded=True)
    if not prompts:  # the sample job's, as job = "sample" draws them: a --set prompt_file was ignored
        prompts = sample_job_prompts(resolved.recipe)
    if not prompts:
        raise MinfmError("no prompts: pass --prompt or --prompt-file (or set sample.prompts in the recipe)")
    _check_draw(len(prompts), resolved.recipe.sample.samples_per_prompt,
                "--n" if args.n is not None else "sample.samples_per_prompt")
    out = Path(args.out) if args.out else default_out(args.source, src)
    return run_sampling(resolved, prompts, out, weights=(kind, where), source=args.source,
                        overwrite=args.overwrite, out_flag="--out", allow_pickle=args.allow_pickle_checkpoint,
                        fps=args.fps or DEFAULT_FPS)


def default_out(source: str, src: Path) -> Path:
    """``<source>/samples_cli`` for a local source (``<run>/samples_cli`` for a checkpoint
    ``<run>/checkpoints/step_N``); ``./samples/<org>--<name>[@rev]`` for a remote one.

    A remote source resolves into a download cache (the Hub cache's snapshot folder), which
    must never be written to: other runs read it as the model. A checkpoint folder is no
    place for samples either: the run's ``keep_last`` deletes it whole, samples included.
    """
    base = src if src.is_dir() else src.parent
    base = ckpt_mod.run_folder(base) or base  # beside the run's other outputs, as for the run folder itself
    cache = trust_boundary(base)  # models--org--name for a path inside a Hub cache snapshot
    if "://" in source:
        name = source.split("://", 1)[1].strip("/").replace("/", "--")
    elif cache != Path(os.path.realpath(base)):
        name = cache.name.split("--", 1)[-1]
    else:
        return base / "samples_cli"
    return Path("samples") / (re.sub(r"[^A-Za-z0-9._@-]+", "-", name).strip(".") or "remote")


def sample_recipe(resolved) -> int:
    """``job = "sample"``: from ``sample.source`` if set, else the recipe's pretrained weights
    (the denoiser's ``pretrained``); a recipe with neither is refused, as by ``minfm check``:
    it would sample from random weights."""
    from ..errors import RecipeError
    from ..recipe.checks import start_problems
    from ..sources import resolve_source

    problems = [resolved.blame(p) for p in start_problems(resolved, "sample")]
    if problems:
        raise RecipeError(problems, resolved.source)
    s = resolved.recipe.sample
    prompts = sample_job_prompts(resolved.recipe)
    if not prompts:
        raise MinfmError("sample.prompts / sample.prompt_file: a sample job needs prompts")
    allow_pickle = resolved.recipe.train.allow_pickle_checkpoint
    out = Path(s.out_dir) if s.out_dir else Path(resolved.recipe.run.exp_dir) / "samples"
    with contextlib.ExitStack() as stack:
        weights = locate(resolve_source(s.source), stack, allow_pickle=allow_pickle)[1:] if s.source else None
        return run_sampling(resolved, prompts, out, weights=weights, source=s.source, out_flag="sample.out_dir",
                            allow_pickle=allow_pickle)


class Batches(Sequence):
    """The (prompt, sample) items, prompt-major, cut into batches of ``batch_size``: batch ``b``
    is computed when asked for, so a plan costs nothing however many items it holds."""

    def __init__(self, n_prompts: int, samples_per_prompt: int, batch_size: int) -> None:
        self.per, self.size = samples_per_prompt, batch_size
        self.items = n_prompts * samples_per_prompt

    def __len__(self) -> int:
        return -(-self.items // self.size)

    def __getitem__(self, b):
        if isinstance(b, slice):
            return [self[i] for i in range(*b.indices(len(self)))]
        if b < 0:
            b += len(self)
        if not 0 <= b < len(self):
            raise IndexError(b)
        return [divmod(j, self.per) for j in range(b * self.size, min((b + 1) * self.size, self.items))]


def plan_batches(n_prompts: int, samples_per_prompt: int, batch_size: int) -> Batches:
    """All (prompt, sample) items cut into batches of ``batch_size``, independent of the world size.

    A batch is generated together, so fixing batches here (and handing whole batches to
    ranks) makes an image identical whether one process or many drew it.
    """
    if batch_size < 1:
        raise MinfmError(f"sample.batch_size: expected a positive integer, got {batch_size}")
    return Batches(n_prompts, samples_per_prompt, batch_size)


def _check_draw(n_prompts: int, per_prompt: int, what: str) -> None:
    problem = draw_problem(n_prompts, per_prompt, what)
    if problem:
        raise MinfmError(problem)


def image_name(i: int, k: int, ext: str) -> str:
    return f"{i:05d}_{k:02d}.{ext}"


#: What one clip is written as: the MP4 to play, the WebP pages show (and npz is read from).
CLIP_EXTS = ("mp4", "webp")


def item_files(i: int, k: int, s) -> list[str]:
    """The files of item (prompt i, sample k): one image, or a clip's MP4 and WebP."""
    exts = CLIP_EXTS if s.size[0] > 1 else (s.file_ext,)
    return [image_name(i, k, e) for e in exts]


def rank_share(pending: list[int], rank: int, world: int) -> tuple[list[int], int]:
    """This rank's batches (round robin) and the number of rounds every rank runs.

    Ranks with fewer batches run dummy batches for the remaining rounds: with a sharded
    denoiser every rank must make the same number of forward calls (each one gathers
    parameters collectively).
    """
    return pending[rank::world], -(-len(pending) // world)


# image_name's widths are minimums: --n 100 writes 00000_100.png, 100,000 prompts 100000_00.png
_IMAGE = re.compile(r"^\d{5,}_\d{2,}\.(png|jpg|jpeg|mp4|webp)\Z")
_IMAGE_TMP = re.compile(r"^\.\d{5,}_\d{2,}\.(png|jpg|jpeg|mp4|webp)(\..+)?\.tmp\Z")  # a write cut short
# the out folder's own files, cut short (an npz of 50k images is gigabytes)
_OUT_TMP = re.compile(r"^\.(samples\.npz|metadata\.json|index\.html)\.[0-9a-f]+\.tmp\Z")
#: metadata.json of an out folder is read back on resume: 50k records are ~10 MB. A request
#: whose own record can be larger (up to 10**6 images, each record repeating its prompt) may
#: read back as much as it writes (_metadata_limit).
MAX_METADATA_BYTES = 256 << 20
#: A record's bytes besides its prompt: keys, numbers, indentation, a clip's preview, frames and fps.
_RECORD_BYTES = 512
# Recipe values that do not change a single pixel: leave them out of the request.
_NOT_PIXELS = ("prompts", "prompt_file", "out_dir", "save_npz", "source")
# Shown at the top of the settings already: the recipe copy would only repeat them.
_SHOWN = ("steps", "size", "seed", "samples_per_prompt", "batch_size", "neg_prompt", "distilled_guidance")
_ALIASES = {"recipe.sample.sampler.name", "recipe.sample.guidance.name", "recipe.sample.guidance.scale"}


def request_settings(resolved, prompts: list[str], *, source: str | None, weights, fps: int = DEFAULT_FPS) -> dict:
    """What decides the pictures in an out folder: compared with ``metadata.json`` before drawing."""
    s = resolved.recipe.sample
    d = resolved.to_dict()
    sample_recipe_part = {k: v for k, v in d.get("sample", {}).items() if k not in _NOT_PIXELS + _SHOWN}
    settings = {"source": source, "checkpoint": None if weights is None else str(Path(weights[1]).resolve()),
                "weights_content": None if weights is None else weights_content(*weights),
                "prompts": list(prompts), "steps": s.steps, "size": list(s.size),
                "sampler": resolved["sample.sampler"].component.name,
                "guidance": resolved["sample.guidance"].component.name,
                "guidance_scale": d.get("sample", {}).get("guidance", {}).get("scale"),  # the recipe's value, if any
                "distilled_guidance": s.distilled_guidance, "neg_prompt": s.neg_prompt,
                "seed": s.seed, "samples_per_prompt": s.samples_per_prompt, "batch_size": s.batch_size,
                "recipe": {"model": d.get("model"), "flow": d.get("flow"), "sample": sample_recipe_part}}
    if s.size[0] > 1:  # the clips' timing is in their files: another fps is another request
        settings["fps"] = fps
    return json.loads(json.dumps(settings))  # as metadata.json will hold it (tuples -> lists)


def weights_content(kind: str, where: Path) -> str:
    """What tells these weights from others found at the same path later (a run deleted and
    trained again to the same step, a folder exported again): a checkpoint's manifest CRC,
    which covers every file's CRC-32, else the weight files' names, sizes and mtimes."""
    if kind == "dcp" and (Path(where) / MANIFEST).is_file():
        return f"manifest crc32 {read_manifest(Path(where)).crc32}"
    stats = sorted((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in Path(where).iterdir()
                   if p.is_file() and p.name.endswith((".safetensors", ".index.json", ".distcp", ".metadata")))
    return "files sha256 " + hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def _metadata_limit(settings: dict) -> int:
    """The most ``metadata.json`` to read back for ``settings``: what this request itself
    writes at most, where that is over :data:`MAX_METADATA_BYTES` (its own finished record
    must resume; a larger file is no record of it)."""
    per_sample = sum(len(json.dumps(p)) + _RECORD_BYTES for p in settings.get("prompts", ()))
    own = 2 * len(json.dumps(settings, indent=2)) + settings.get("samples_per_prompt", 1) * per_sample
    return max(MAX_METADATA_BYTES, own)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def prepare_out(out: Path, settings: dict, *, overwrite: bool, flag: str) -> None:
    """Refuse an out folder holding another request's samples (unless ``overwrite``: clear them)."""
    hint = "pass --overwrite to replace them, or choose another --out" if flag == "--out" else \
        f"choose another {flag} or remove that folder"
    require_folder_room(out, flag)
    images = out / "images"
    # lstat, not is_dir: an images/ linking elsewhere would have --overwrite delete, and the
    # run write, files in a folder outside the out folder.
    if images.is_symlink():
        raise MinfmError(f"{flag} {out}: {images} is a symlink; refusing to write or delete through it "
                         f"(remove the link or choose another {flag})")
    require_folder_room(images, f"{flag} {out}")
    meta = out / "metadata.json"
    ours = [p for p in images.iterdir() if _IMAGE.match(p.name)] if images.is_dir() else []
    stale: str | None = None
    if meta.is_file():
        try:
            old = parse_json(read_bounded(meta, str(meta), _metadata_limit(settings)), str(meta)).get("settings", {})
            if not isinstance(old, dict):
                raise ValueError
        except (ValueError, MinfmError, AttributeError):
            old = None
        if old is None:
            stale = f"{meta} is not a minFM sampling record"
        else:
            # The weights kind is known only once loaded; the source string may name the same
            # checkpoint another way ("run" vs "./run"): the resolved checkpoint decides.
            # fps belongs to a clip request only: between a clip and a picture request it is absent
            # from one side, which the size (that differs too) already tells; the user set no fps.
            skip = ("weights", "source") + (() if "fps" in old and "fps" in settings else ("fps",))
            diff = _differences(*({k: v for k, v in d.items() if k not in skip} for d in (old, settings)))
            diff = [k for k in diff if k not in _ALIASES]
            # a request that failed before its first image (weights that did not load) left
            # only its record: nothing to protect, so it does not hold the folder
            if diff and (ours or (out / "samples.npz").exists()):
                shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
                stale = f"holds samples of another request (different {shown})"
    elif ours or (out / "samples.npz").exists() or (out / "index.html").exists():
        stale = "holds images, samples.npz or index.html but no metadata.json, so they cannot be matched to this request"
    if stale and not overwrite:
        raise MinfmError(f"{flag} {out}: {stale}; {hint}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        images.mkdir(exist_ok=True)
        # Only what minFM writes ever goes: writes an interrupted run cut short, and, when
        # replacing another request, its images (by our naming) and npz.
        for p in [q for q in images.iterdir() if _IMAGE_TMP.match(q.name)] + (ours if stale else []) \
                + [q for q in out.iterdir() if _OUT_TMP.match(q.name)]:
            p.unlink(missing_ok=True)
        if stale:  # its gallery page too: it would link to the images just removed
            (out / "samples.npz").unlink(missing_ok=True)
            (out / "index.html").unlink(missing_ok=True)
        write_text_atomic(meta, json.dumps({"settings": settings, "complete": False, "images": []}, indent=2))
    except OSError as exc:
        raise MinfmError(f"{flag} {out}: cannot write: {exc.strerror}") from None


def run_sampling(resolved, prompts: list[str], out: Path, *, weights, source: str | None,
                 overwrite: bool = False, out_flag: str = "--out", allow_pickle: bool = False,
                 fps: int = DEFAULT_FPS) -> int:
    s = resolved.recipe.sample
    _check_draw(len(prompts), s.samples_per_prompt, "sample.samples_per_prompt")
    # (A frame count the VAE or patchifier cannot cut was refused when the recipe loaded.)
    if s.size[0] > 1:
        require_av()  # clips are written as MP4: say the extra is missing now, not after the first batch
    rt = init_runtime(resolved.recipe.run.device)
    # From claiming the out folder to the first batch: a request refused in between (a prompt
    # the text encoder cannot encode, weights that do not load) takes its record back.
    claimed_unused = False
    try:
        # Before any model is built: the out folder must hold this request's samples or none.
        settings = request_settings(resolved, prompts, source=source, weights=weights, fps=fps)
        error = None
        if rt.is_main:
            try:
                # Missing weights are found before the out folder is touched (the models are
                # built after it is claimed): a failed request leaves nothing behind.
                resolve_recipe_refs(resolved)
                # One sampler per out folder: a second one took the folder over while the first
                # was still loading, and the two mixed their requests' images, both exiting 0.
                require_folder_room(out, out_flag)
                ckpt_mod.refuse_inside_checkpoint(out, out_flag, "samples")
                runlock.acquire(out, what=out_flag)
                prepare_out(out, settings, overwrite=overwrite, flag=out_flag)
                claimed_unused = True
            except MinfmError as exc:
                error = str(exc)
        error = _broadcast(error)
        if error is not None:
            raise MinfmError(error)
        if weights is not None:
            check_weights_fit(resolved, *weights, use_ema=s.use_ema, allow_pickle=allow_pickle)
        denoiser = None
        if rt.world_size > 1 and resolved["parallel"].component.name != "none":
            # Sharded before any weights arrive: only rank 0 ever holds a full copy.
            denoiser = sharded_denoiser(resolved, world_size=rt.world_size, device=rt.device, rank=rt.rank,
                                        trainable=False)
        pipe = build_pipeline(resolved, rt.device, load_weights=True, world_size=rt.world_size, denoiser=denoiser)
        pipe.check_prompts(prompts, "the prompts")  # one the text encoder refuses: before any batch
        pipe.check_prompts([s.neg_prompt], "sample.neg_prompt")
        loaded = "pretrained"
        if weights is not None:
            loaded = load_denoiser_weights(pipe.denoiser, *weights, use_ema=s.use_ema, allow_pickle=allow_pickle)
        batches = plan_batches(len(prompts), s.samples_per_prompt, s.batch_size)
        claimed_unused = False
        images_dir = out / "images"
        clips = s.size[0] > 1
        seed_of = lambda i, k: image_seed(s.seed, i, k, s.samples_per_prompt)  # noqa: E731
        pending = None
        if rt.is_main:
            # A batch with any file missing is drawn again whole (same composition: same pixels).
            pending = [b for b, chunk in enumerate(batches)
                       if not all(_written(images_dir / f) for i, k in chunk for f in item_files(i, k, s))]
        pending = _broadcast(pending)
        mine, rounds = rank_share(pending, rt.rank, rt.world_size)
        if rt.is_main:
            done = len(batches) - len(pending)
            print(f"minfm: {len(batches)} batch{'es' * (len(batches) != 1)}, {done} already done, {len(pending)} to draw on "
                  f"{rt.world_size} rank(s)", flush=True)
        for r in range(rounds):
            if r < len(mine):
                chunk = batches[mine[r]]
                batch_prompts, seeds = [prompts[i] for i, _ in chunk], [seed_of(i, k) for i, k in chunk]
            else:  # dummy work: keeps the collective calls in step, never written
                chunk, batch_prompts, seeds = [], [prompts[0]], [s.seed]
            imgs = generate(pipe, batch_prompts, sizes=[tuple(s.size)] * len(seeds), seeds=seeds, steps=s.steps,
                            neg_prompt=s.neg_prompt, distilled_guidance=s.distilled_guidance)
            failed = None
            try:
                for (i, k), img in zip(chunk, imgs):
                    if clips:
                        frames = to_uint8(img)
                        mp4, webp = (images_dir / f for f in item_files(i, k, s))
                        write_mp4(mp4, frames, fps)
                        write_bytes_atomic(webp, encode_webp(frames, fps))
                    else:
                        _save_atomic(to_pil(img), images_dir / item_files(i, k, s)[0])
            except (MinfmError, OSError) as exc:
                failed = os_error_line(exc) if isinstance(exc, OSError) else str(exc)
            # Every rank learns of a failed write before the next collective: the others
            # otherwise met a closed connection (a gloo traceback) instead of the reason.
            ckpt_mod.barrier(failed)
            if rt.is_main:
                print(f"minfm: round {r + 1}/{rounds}", flush=True)
        ckpt_mod.barrier()
        if rt.is_main:
            items = [ik for chunk in batches for ik in chunk]
            settings = {**settings, "weights": loaded}
            records = []
            for i, k in items:  # prompt-major, as plan_batches lists them: the npz keeps this order
                files = item_files(i, k, s)
                rec = {"path": f"images/{files[0]}", "prompt": prompts[i], "prompt_index": i, "sample": k,
                       "seed": seed_of(i, k)}
                if clips:
                    rec.update(preview=f"images/{files[1]}", frames=s.size[0], fps=fps)
                records.append(rec)
            write_text_atomic(out / "metadata.json",
                              json.dumps({"settings": settings, "complete": True, "images": records}, indent=2))
            write_sample_index(out, records)
            if s.save_npz:
                write_npz(out / "samples.npz", [out / r.get("preview", r["path"]) for r in records],
                          fps=fps if clips else None)
            kind = f"{'clip' if clips else 'image'}{'s' * (len(items) != 1)}"
            drawn = sum(len(batches[b]) for b in pending)
            if drawn == len(items):
                print(terminal_safe(f"minfm: wrote {len(items)} {kind} to {out}"))
            else:  # a resumed request: say what this call added
                print(terminal_safe(f"minfm: {out} holds all {len(items)} {kind}: {drawn} drawn now, {len(items) - drawn} already there"))
    finally:
        if rt.is_main:
            if claimed_unused:
                _forget_request(out)
            runlock.release(out)  # which also removes the folders it made, if nothing else is left there
        shutdown_runtime()
    return 0


def _forget_request(out: Path) -> None:
    """Undo :func:`prepare_out` for a request refused before its first batch: its record and an
    empty ``images/``. A folder holding any image keeps its record, which is what matches those
    images on resume."""
    images = out / "images"
    try:
        if (out / "samples.npz").exists() or (images.is_dir() and not images.is_symlink() and any(images.iterdir())):
            return
        meta = out / "metadata.json"
        if meta.is_file() and not meta.is_symlink():
            meta.unlink()
        if images.is_dir() and not images.is_symlink():
            images.rmdir()
    except OSError:
        pass  # left as it is: a record without images holds nothing (prepare_out)


def _written(path: Path) -> bool:
    """A finished item: a non-empty regular file (a folder, FIFO or link planted at its name is not)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size > 0


def _broadcast(obj):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _save_atomic(image, path: Path) -> None:
    """Write then rename: an interrupted run never leaves a truncated image that looks done."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    write_bytes_atomic(path, buf.getvalue())


def write_npz(path: Path, files: list[Path], fps: int | None = None) -> None:
    """``arr_0``: uint8 (N, H, W, 3), the layout the ADM evaluation suite reads; for clips
    (``fps`` given: ``files`` are their lossless WebPs) uint8 (N, F, H, W, 3).

    Streamed into the zip one sample at a time (50k samples at 256x256 are ~10 GB), then
    renamed into place.
    """
    import zipfile

    load = (lambda p: read_webp(p, fps)) if fps else (lambda p: np.asarray(read_rgb(p), dtype=np.uint8))  # noqa: E731
    first = load(files[0])
    shape = (len(files), *first.shape)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for p in files:
                    arr = first if p == files[0] else load(p)
                    if arr.shape != first.shape:
                        dims = lambda a: "x".join(map(str, a.shape[:-1]))  # noqa: E731
                        raise MinfmError(f"{p}: is {dims(arr)}, the others {dims(first)}; .npz needs one size")
                    f.write(np.ascontiguousarray(arr).tobytes())

    write_atomic(path, write)


