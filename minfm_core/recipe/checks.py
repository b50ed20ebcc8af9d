"""Cross-component checks, run before any model is built.

Components describe themselves through a few documented config attributes
(docs/plugins.md, "Config attributes the core reads"); a component that does not
expose one is simply not checked on it. Plugins add their own checks through the
``check_recipe`` hook.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..errors import MinfmError, RecipeError
from ..engine.prompts import gallery_prompts, read_prompt_file
from ..launch_env import world_size_from_env
from ..protocols import CachedLatentsConfig
from ..runlock import run_outputs
from ..safepath import file_in_the_way, relative_inside
from ..validators import MAX_GALLERY, MAX_TOKENS
from .load import is_trusted
from .schema import init_plan, parse_load_plan


def _attr(resolved, path: str, name: str) -> Any:
    cfg = resolved.config(path)
    return getattr(cfg, name, None) if cfg is not None else None


def accumulation_steps(total_batch_size: int, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step; the one rule ``minfm check`` and the trainer share."""
    per_step = batch_size * world_size
    if total_batch_size == -1:
        return 1
    if total_batch_size <= 0 or total_batch_size % per_step:
        raise RecipeError(
            f"train.total_batch_size: {total_batch_size} is not a positive multiple of "
            f"train.batch_size x world size = {batch_size} x {world_size} = {per_step}"
        )
    return total_batch_size // per_step


def _outside_run_folder(resolved) -> list[str]:
    """A recipe from a downloaded repo may not choose where a job writes: its ``run.exp_dir``
    (and ``sample.out_dir``) must stay below the folder minfm runs in, unless the user's own
    --set gave it."""
    if resolved.outside is None:
        return []
    out = []
    for key, value in (("run.exp_dir", resolved.recipe.run.exp_dir), ("sample.out_dir", resolved.recipe.sample.out_dir)):
        if not value or is_trusted(key, resolved.trusted):
            continue
        try:
            relative_inside(Path("."), value, what=key)
        except MinfmError:
            out.append(f"{key}: {value!r} leaves the current folder, and this recipe came from a download "
                       f"({resolved.outside}); choose the folder yourself with --set {key}=DIR")
    return out


#: What the trainer logs under its own names (metrics.jsonl, loggers): a plugin's metric
#: logged under one of them (train.fid_metric) would overwrite it.
TRAINER_LOG_KEYS = ("step", "loss", "grad_norm", "lr", "skipped", "tokens_per_sec", "mfu", "val_loss")


def job_checks(resolved, job: str, world_size: int | None = None) -> list[str]:
    """Rules of one job (``train`` or ``sample``) that the engine applies at start-up.

    Separate from :func:`cross_checks` because a recipe is also loaded for other jobs than
    its own (sampling from a training run's recipe at another world size must not trip on
    its accumulation rule). ``minfm check`` applies the recipe's own job's rules.
    """
    # Each selected component's factory, imported and bound to the keywords the engine
    # passes: a typo in a lazy "module:attr" factory, or a denoiser without ``balancer=``,
    # fails here, not mid-run.
    problems = [f"{path}.name: {problem}" for path, slot in resolved.slots.items()
                if (problem := slot.component.factory_problem())]
    problems += _attention_fits_the_device(resolved, job)
    if resolved.recipe.run.device == "cuda":  # checked as the run checks it, not at its first step
        from ..engine.runtime import pick_device

        try:
            pick_device("cuda", 0)
        except MinfmError as exc:
            problems.append(str(exc))
    world = world_size if world_size is not None else world_size_from_env()
    recipe = resolved.recipe
    train, s = recipe.train, recipe.sample
    exp = recipe.run.exp_dir
    problems += _outside_run_folder(resolved)
    if problem := file_in_the_way(exp, "run.exp_dir"):  # (or a file above it: /dev/null/run)
        problems.append(problem)
    if job == "train":
        try:
            accumulation_steps(train.total_batch_size, train.batch_size, world)
        except RecipeError as exc:
            problems.extend(exc.problems)
        if train.grad_spike_rule == "running_mean" and train.grad_spike_threshold <= 1:
            # a multiple of the mean at or below 1 calls every second step a spike
            problems.append(f"train.grad_spike_threshold: {train.grad_spike_threshold} is not above 1, and with "
                            "train.grad_spike_rule = 'running_mean' it is a multiple of the mean grad norm")
        if train.min_lr > train.lr:
            problems.append(f"train.min_lr: {train.min_lr} is above the peak train.lr = {train.lr}")
        if train.fid_every > 0:
            from ..registry import get_registry

            metrics = get_registry().names("metric")
            key = "train.fid_every" if train.fid_metric == "fid" else "train.fid_metric"  # what the user chose
            if train.fid_metric in TRAINER_LOG_KEYS:  # it is logged under its name
                problems.append(f"train.fid_metric: {train.fid_metric!r} is a name the trainer logs itself "
                                f"({', '.join(TRAINER_LOG_KEYS)}); register the metric under another")
            elif train.fid_metric not in metrics:
                problems.append(f"{key}: no plugin registers the image metric {train.fid_metric!r} that the "
                                f"in-training FID uses (installed: {', '.join(metrics) or 'none'}; minFM's own "
                                "'fid' is the 'eval' plugin's)")
        if recipe.data is None:
            problems.append('data: a train job needs a [data] table (e.g. name = "shapes")')
        data_cfg = resolved.config("data") if recipe.data is not None else None
        if data_cfg is not None:
            problems.extend(_data_problems(resolved, data_cfg, "data"))
            # a mix's sources, each by its own path; read only where the mix reads no cache of its own
            mix_cached = isinstance(data_cfg, CachedLatentsConfig) and data_cfg.use_cached_latents
            for where, source_cfg in _mix_sources(data_cfg):
                problems.extend(_data_problems(resolved, source_cfg, where, fits_only=mix_cached))
        problems.extend(_run_outputs_problems(resolved))
        if train.init_from and not parse_load_plan(train.init_load_plan):  # (its syntax: the schema's check)
            problems.append("train.init_load_plan: empty, so nothing would be loaded from train.init_from")
        elif train.init_from:
            try:  # what the trainer loads: a plan into an EMA the run does not keep is refused
                init_plan(train, keeps_ema=train.ema_decay > 0)
            except RecipeError as exc:
                problems.extend(exc.problems)
        resuming = os.path.isdir(os.path.join(exp, "checkpoints"))  # a resume does not read init_from
        if train.init_from and "://" not in train.init_from and not resuming \
                and not os.path.exists(os.path.expanduser(train.init_from)):
            problems.append(f"train.init_from: {train.init_from}: no such file or folder"
                            + (" (a Hub repo is hf://org/name)" if train.init_from.count("/") == 1 else ""))
    elif job == "sample":
        if not s.prompts and not s.prompt_file:
            problems.append("sample.prompts / sample.prompt_file: a sample job needs prompts")
        if s.source and "://" not in s.source and not os.path.exists(os.path.expanduser(s.source)):
            problems.append(f"sample.source: {s.source}: no such file or folder"
                            + (" (a Hub repo is hf://org/name)" if s.source.count("/") == 1 else ""))
        # The sampler refuses this only at start-up (engine/sample.py): the same rule.
        out = s.out_dir or os.path.join(exp, "samples")
        flag = "sample.out_dir" if s.out_dir else "sample.out_dir (default run.exp_dir/samples)"
        if problem := file_in_the_way(out, flag):
            problems.append(problem)
    problems += _reference_problems(resolved, job)
    # Read now what the job would read later: a training run meets its gallery prompts at the
    # first gallery, hours in (a sample job adds the file to sample.prompts; a gallery uses it
    # only where sample.prompts is empty).
    drawing = job == "train" and (train.sample_every > 0 or train.sample_at_start)
    galleries = drawing and not s.prompts
    file_read = True
    if s.prompt_file and (job == "sample" or galleries):
        try:
            read_prompt_file(s.prompt_file)
        except MinfmError as exc:
            problems.append(f"sample.prompt_file: {exc}")
            file_read = False
    if drawing and file_read:
        n = len(gallery_prompts(resolved.recipe))
        if n * s.samples_per_prompt > MAX_GALLERY:
            key = "sample.prompts" if s.prompts else "sample.samples_per_prompt"
            problems.append(f"{key}: {n:,} prompt(s) x {s.samples_per_prompt:,} samples = {n * s.samples_per_prompt:,} "
                            f"images a training gallery, more than {MAX_GALLERY:,}; draw more after training with "
                            "minfm sample")
    return [resolved.blame(p) for p in problems or start_problems(resolved, job)]


def _reference_problems(resolved, job: str) -> list[str]:
    """What a job's start refuses of its sources and pretrained references without reading
    them: a blank one, a URI of a scheme no plugin resolves, an ``hf://`` that is no Hub id,
    and a pretrained reference that is neither a local path nor ``org/name``. (Whether a
    remote one exists is the run's to find: `minfm check` makes no request.)"""
    import attrs

    from ..pretrained import recipe_refs, reference_problem

    def field_of(path: str, ref: str) -> str:  # the setting that holds it, for the --set blame
        cfg = resolved.slots[path].config
        names = [a.name for a in attrs.fields(type(cfg)) if getattr(cfg, a.name) == ref] if attrs.has(type(cfg)) else []
        return f"{path}.{names[0]}" if names else path

    r = resolved.recipe
    refs = [(field_of(path, ref), ref, True) for path, ref in recipe_refs(resolved)]
    if job == "train" and r.train.init_from is not None:
        refs.append(("train.init_from", r.train.init_from, False))
    if job == "sample" and r.sample.source is not None:
        refs.append(("sample.source", r.sample.source, False))
    return [f"{where}: {problem}" for where, ref, pretrained in refs
            if (problem := reference_problem(ref, pretrained=pretrained))]


def _run_outputs_problems(resolved) -> list[str]:
    """Each logger's ``run_outputs`` (``protocols.RunOutputsConfig``) must name places inside the
    run folder: the run probes (writes) every one of them before it starts."""
    try:
        run_outputs(resolved)
    except MinfmError as exc:
        return [str(exc)]
    return []


def _attention_fits_the_device(resolved, job: str) -> list[str]:
    """An attention backend whose config lists ``job`` in ``needs_cuda``
    (``protocols.NeedsCudaConfig``), on the device the run would pick (``run.device``, as ``engine.runtime.pick_device`` picks it): refused here,
    not at the first attention call of the first step."""
    needs = _attr(resolved, "model.attention", "needs_cuda")
    if not isinstance(needs, tuple) or job not in needs:
        return []
    device = resolved.recipe.run.device
    if device == "cuda":
        return []  # without CUDA the run stops on run.device itself
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return []
        where = "run.device = 'auto' and torch sees no CUDA device"
    else:
        where = f"run.device = {device!r}"
    name = resolved["model.attention"].component.name
    return [f"model.attention.name: {name!r} cannot {job} on the CPU ({where}); use 'sdpa' or 'auto'"]


def _mix_sources(data_cfg) -> list[tuple[str, Any]]:
    """``(path, config)`` of each source of a dataset that mixes others (a ``sources`` tuple of
    entries with a ``dataset`` table, as ``mix`` has): the sources' fields are checked as a
    top-level dataset's are."""
    from ..registry import get_registry

    sources = getattr(data_cfg, "sources", None)
    out = []
    for k, src in enumerate(sources if isinstance(sources, tuple) else ()):
        table = getattr(src, "dataset", None)
        where = f"data.sources[{k}].dataset"
        try:
            config = get_registry().resolve_table("dataset", table, where).config
        except MinfmError:  # resolving the recipe reported a bad table by its path
            continue
        if config is not None:
            out.append((where, config))
    return out


def _data_problems(resolved, data_cfg, where: str, fits_only: bool = False) -> list[str]:
    """A dataset config's problems for a train job, its fields named under ``where``."""
    problems = _data_fits_the_model(resolved, data_cfg, where)
    if fits_only:
        return problems
    if isinstance(data_cfg, CachedLatentsConfig) and data_cfg.use_cached_latents and not data_cfg.latents_dir:
        problems.append(f"{where}.latents_dir: use_cached_latents = true needs the folder minfm cache latents wrote")
    unset = getattr(data_cfg, "unset", ())
    problems.extend(f"{where}.{name}: a train job needs it set" for name in (unset if isinstance(unset, tuple) else ()))
    return problems


def _data_fits_the_model(resolved, data_cfg, where: str = "data") -> list[str]:
    """A dataset's ``frames`` and ``size_multiple`` (docs/plugins.md, "Config attributes the
    core reads") against the VAE and patch: the first batch would refuse them, after the run
    folder was made."""
    comp = _attr(resolved, "model.vae", "compression")
    patch = _attr(resolved, "model.patchifier", "patch_size")
    if comp is None:
        return []
    pf, ph, pw = patch if patch is not None and len(patch) == 3 else (1, 1, 1)
    problems = []
    frames = getattr(data_cfg, "frames", None)
    if isinstance(frames, int) and not isinstance(frames, bool):
        from ..engine.video_io import check_frames

        try:
            check_frames(frames, int(comp[0]), int(pf), what=f"{where}.frames")
        except MinfmError as exc:
            problems.append(str(exc))
    elif frames is None and not isinstance(getattr(data_cfg, "sources", None), tuple) and int(pf) > 1:
        # A dataset without `frames` yields pictures, one frame each: one latent frame, which
        # patches more than one frame deep cannot cut (the first batch failed, blaming the
        # image size). A mix has no frames of its own: its sources are checked each by its path.
        problems.append(f"{where}: pictures, 1 frame each, but model.patchifier.patch_size cuts latents {int(pf)} "
                        "frames deep: this model cannot train on them (a patch 1 frame deep can)")
    multiple = getattr(data_cfg, "size_multiple", None)
    mh, mw = comp[1] * ph, comp[2] * pw
    if isinstance(multiple, int) and not isinstance(multiple, bool) and (multiple % mh or multiple % mw):
        problems.append(f"{where}.size_multiple: {multiple} is not a multiple of the VAE's compression x patch "
                        f"= {mh}x{mw}")
    return problems


#: Text-encoder slots, whether each must be pooled, and what the denoiser takes from it.
_TEXT_SLOTS = (("model.text_encoder", False, "d_txt", "per-token text embeddings"),
               ("model.clip_encoder", True, "d_vec", "one pooled vector per prompt"))


def _is_field(cfg, name: str) -> bool:
    import attrs

    return attrs.has(type(cfg)) and name in attrs.fields_dict(type(cfg))


def _text_encoders_fit(resolved) -> list[str]:
    """Every run encodes its prompts (engine/pipeline.py ``encode_text``): a denoiser that takes
    text (declares ``d_txt``) needs the per-token slot; that slot must not be pooled, the vec
    slot must be (configs that declare ``pooled``)."""
    problems = []
    d_txt = _attr(resolved, "model.denoiser", "d_txt")
    if d_txt is not None and resolved.get("model.text_encoder") is None:
        problems.append(f"model.text_encoder: missing: the denoiser takes per-token text embeddings "
                        f'(model.denoiser.d_txt = {d_txt}); add a [model.text_encoder] table (e.g. name = "vocab")')
    for path, want, den_attr, what in _TEXT_SLOTS:
        slot = resolved.get(path)
        pooled = getattr(slot.config, "pooled", None) if slot is not None else None
        if not isinstance(pooled, bool) or pooled == want:
            continue
        feeds = f"this slot gives the denoiser {what} (model.denoiser.{den_attr})"
        if _is_field(slot.config, "pooled"):
            problems.append(f"{path}.pooled: must be {str(want).lower()}: {feeds}")
        else:
            gives = "one pooled vector per prompt" if pooled else "per-token embeddings"
            problems.append(f"{path}.name: {slot.component.name!r} returns {gives}, but {feeds}")
    return problems


#: Channels of the images every dataset yields and every sample is saved as (RGB).
IMAGE_CHANNELS = 3


def _vae_fits_the_images(resolved) -> list[str]:
    """The VAE's image channels (its ``image_channels`` field, or the identity VAE's
    ``channels``) against RGB images: the first batch, or the first saved sample, would fail."""
    cfg = resolved.config("model.vae")
    for name in ("image_channels", "channels"):
        value = getattr(cfg, name, None) if cfg is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            if value != IMAGE_CHANNELS:
                return [f"model.vae.{name}: {value}, but images have {IMAGE_CHANNELS} channels (RGB: what every "
                        "dataset yields and every sample is saved as)"]
            return []
    return []


def cross_checks(resolved, world_size: int | None = None) -> list[str]:
    problems: list[str] = []
    if world_size is not None and world_size < 1:
        raise MinfmError(f"--world-size: expected a positive integer, got {world_size}")
    world = world_size if world_size is not None else world_size_from_env()

    d_img = _attr(resolved, "model.denoiser", "d_img")
    channels = _attr(resolved, "model.vae", "latent_channels")
    patch = _attr(resolved, "model.patchifier", "patch_size")
    if d_img is not None and channels is not None and patch is not None:
        want = channels * math.prod(patch)
        if d_img != want:
            problems.append(
                f"model.denoiser.d_img: {d_img} does not match the VAE's {channels} latent channels x "
                f"patch {tuple(patch)} = {want}"
            )

    if resolved.recipe.sample.distilled_guidance is not None:
        from ..protocols import GuidanceEmbedConfig

        den = resolved.config("model.denoiser")
        if isinstance(den, GuidanceEmbedConfig) and not den.guidance_embed:
            problems.append("sample.distilled_guidance: the denoiser embeds no guidance scale (model.denoiser."
                            "guidance_embed = false), so the value would be ignored; leave it unset")

    d_head = _attr(resolved, "model.denoiser", "d_head")
    axes = _attr(resolved, "model.denoiser", "rope_axes")
    if d_head is not None and axes is not None and sum(axes) != d_head:
        problems.append(f"model.denoiser.rope_axes: sum {sum(axes)} must equal d_head = {d_head}")
    if axes is not None and patch is not None and len(axes) != len(patch):
        problems.append(f"model.denoiser.rope_axes: {len(axes)} axes but the patch has {len(patch)} dims (t, y, x)")

    for enc_path, den_attr in (("model.text_encoder", "d_txt"), ("model.clip_encoder", "d_vec")):
        dim = _attr(resolved, enc_path, "dim")
        want = _attr(resolved, "model.denoiser", den_attr)
        if dim is not None and want is not None and dim != want:
            problems.append(f"{enc_path}.dim: its output dim {dim} does not match model.denoiser.{den_attr} = {want}")

    problems += _text_encoders_fit(resolved)
    problems += _vae_fits_the_images(resolved)

    comp = _attr(resolved, "model.vae", "compression")
    pcomp = _attr(resolved, "model.patchifier", "vae_compression")
    if comp is not None and pcomp is not None and tuple(comp) != tuple(pcomp):
        problems.append(
            f"model.patchifier.vae_compression: {tuple(pcomp)} does not match the VAE's compression {tuple(comp)}"
        )

    # Rules the trainer and sampler would otherwise meet only after start-up: checked here so
    # that `minfm check` refuses exactly what `minfm run` refuses.
    recipe = resolved.recipe
    train = recipe.train
    if train.fid_every > 0 and not train.fid_ref:
        problems.append("train.fid_ref: train.fid_every > 0 needs reference images (an .npz or a folder)")
    if comp is not None:
        # The sampler meets this only after loading every weight: say it now.
        _, h, w = recipe.sample.size
        pf, ph, pw = patch if patch is not None and len(patch) == 3 else (1, 1, 1)
        mh, mw = comp[1] * ph, comp[2] * pw
        if h % mh or w % mw:
            problems.append(
                f"sample.size: height and width {h}x{w} must be multiples of the VAE's compression x patch "
                f"= {mh}x{mw}"
            )
        # a sample is one packed sequence: 16384x16384 pixels unpatched is 268 M tokens, which
        # the system's out-of-memory killer answers with SIGKILL, not a message
        frames = max(1, math.ceil(recipe.sample.size[0] / (comp[0] * pf)))
        tokens = frames * (h // mh) * (w // mw)
        if tokens > MAX_TOKENS:
            problems.append(f"sample.size: {'x'.join(map(str, recipe.sample.size))} is {tokens:,} tokens a sample, "
                            f"more than the {MAX_TOKENS:,} one sequence may hold")
        # Training galleries sample this size too: a frame count the model cannot draw
        # would otherwise fail at the first gallery, hours in.
        from ..engine.video_io import check_frames

        try:
            check_frames(recipe.sample.size[0], int(comp[0]), int(patch[0]) if patch is not None else 1,
                         what=f"sample.size {'x'.join(map(str, recipe.sample.size))}")
        except MinfmError as exc:
            problems.append(str(exc))

    shard = _attr(resolved, "parallel", "shard_size")
    if shard is not None and shard > 0 and world % shard:
        problems.append(f"parallel.shard_size: world size {world} is not divisible by shard_size {shard}")

    from ..plugins import load_plugins

    state = load_plugins()
    for extra in state.pm.hook.check_recipe(recipe=resolved, world_size=world):
        problems.extend(extra or [])
    # a plugin skipped while checking (its check_recipe broke) cannot vouch for its components
    for path, slot in resolved.slots.items():
        why = state.failures.get(slot.component.plugin)
        if why is not None:
            problems.append(f"{path}: {slot.component.describe()} was skipped: {why}")
    return problems


def start_problems(resolved, job: str) -> list[str]:
    """Start-up rules of ``job`` that read what :func:`job_checks` vouched for (the prompt
    file, the source): checked once those pass, by ``job_checks`` itself and by ``minfm
    sample``, which takes a run's recipe for another job."""
    from ..validators import draw_problem

    recipe = resolved.recipe
    problems = []
    if job == "train":
        train = recipe.train
        outside = sorted({s for s in train.profile_steps if not 1 <= s <= train.max_steps})
        if outside:
            problems.append(f"train.profile_steps: {', '.join(map(str, outside))} not in 1..train.max_steps = "
                            f"{train.max_steps} (steps count from 1, as the logs and checkpoints do)")
    elif job == "sample":
        s = recipe.sample
        if not s.source and not pretrained_denoiser(resolved):
            cfg = resolved.config("model.denoiser")
            field = "model.denoiser.pretrained" if hasattr(cfg, "pretrained") else "the denoiser's pretrained weights"
            problems.append(f"sample.source: a sample job needs weights: set sample.source (a run dir, checkpoint or "
                            f"hf://org/name) or {field}; without either it would sample from random weights")
        n_prompts = len(s.prompts)
        if s.prompt_file:
            try:
                n_prompts += len(read_prompt_file(s.prompt_file))
            except MinfmError:
                pass  # job_checks names the file's fault
        problem = draw_problem(n_prompts, s.samples_per_prompt, "sample.samples_per_prompt")
        if problem:
            problems.append(problem)
    return problems


def pretrained_denoiser(resolved) -> bool:
    """Whether the recipe's denoiser names pretrained weights (what ``minfm cache models`` reads)."""
    from ..pretrained import pretrained_refs

    return bool(pretrained_refs(resolved.config("model.denoiser")))
