"""The recipe schema (phase one).

Sections and their keys are typed here; each component table is kept raw as a
:class:`Spec` (its ``name`` plus its other keys) until plugins are loaded and the
component's own config class structures it (phase two, ``resolve.py``).

Contract paths: ``job``, ``run.exp_dir``, ``run.seed``, ``model.denoiser``,
``model.vae``, ``model.text_encoder``, ``model.patchifier``, ``flow.path``,
``flow.time_sampler``, ``flow.time_warper``, ``flow.time_weighter``, ``sample.*``,
``data``, ``train.*``, ``parallel.name``, ``balancer.name``, ``logging``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import attrs

from ..config import ExpectedType, config, converter, field, short_repr
from ..errors import RecipeError
from ..suggest import did_you_mean
from ..validators import (
    EVERY, MAX_BATCH, MAX_DATALOADER_WORKERS, MAX_GUIDANCE, MAX_SAMPLES, MAX_SIDE, MAX_SOLVER_STEPS, MAX_STEPS, SEED,
    Range, RangeError, decay, factory_spec, non_blank, path_name, probability, prompt_text,
)


@attrs.frozen
class Spec:
    """A component table: ``name`` (the registry key) and the rest of its keys (its config)."""

    name: str
    options: dict[str, Any] = attrs.field(factory=dict)

    def to_table(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}


def _structure_spec(value: Any, _: Any) -> Spec:
    if isinstance(value, str):
        return Spec(value)  # `vae = "identity"` is shorthand for `[vae] name = "identity"`
    if not isinstance(value, Mapping):
        raise ExpectedType(f"expected a component table with a 'name' key, got {short_repr(value)}")
    rest = dict(value)
    name = rest.pop("name", None)
    if name is None:
        raise ExpectedType("component table has no 'name' key (the registry name of the component)")
    if not isinstance(name, str):
        raise ExpectedType(f"expected the component's name as a string, got {short_repr(name)}")
    return Spec(name, rest)


converter.register_structure_hook(Spec, _structure_spec)
converter.register_unstructure_hook(Spec, lambda s: s.to_table())


def _spec(name: str, doc: str):
    return field(factory=lambda: Spec(name), doc=doc)


#: The parts of a training checkpoint, as ``train.init_load_plan`` names them.
CHECKPOINT_PARTS = ("model", "ema", "optimizer", "scheduler", "step")
#: Each part into itself; its ema:ema means "the EMA too, where both runs keep one" (init_plan).
DEFAULT_LOAD_PLAN = ",".join(f"{p}:{p}" for p in CHECKPOINT_PARTS)


def parse_load_plan(text: str) -> dict[str, str]:
    """``"ema:model,optimizer:optimizer"`` -> {target: source}; errors name ``train.init_load_plan``."""
    plan: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        src, sep, dst = item.partition(":")
        if not sep:
            raise RecipeError(f"train.init_load_plan: {item!r} is not source:target (e.g. ema:model)")
        for part in (src, dst):
            if part not in CHECKPOINT_PARTS:
                raise RecipeError(f"train.init_load_plan: unknown part {part!r}{did_you_mean(part, CHECKPOINT_PARTS)}; "
                                  f"parts: {', '.join(CHECKPOINT_PARTS)}")
        weights = {"model", "ema"}
        if (src in weights) != (dst in weights) or (src not in weights and src != dst):
            raise RecipeError(f"train.init_load_plan: cannot load {src!r} into {dst!r}")
        if dst in plan:
            raise RecipeError(f"train.init_load_plan: {dst!r} is loaded twice")
        plan[dst] = src
    return plan


def init_plan(train: Any, *, keeps_ema: bool) -> dict[str, str]:
    """The parts a run initialised from ``train.init_from`` loads ({target: source}).

    A run that keeps no EMA (``train.ema_decay = 0``) drops the default plan's ``ema:ema``;
    a plan of the user's own that loads into ``ema`` there is refused (nothing would hold it).
    """
    plan = parse_load_plan(train.init_load_plan)
    if "ema" in plan and not keeps_ema:
        if train.init_load_plan != DEFAULT_LOAD_PLAN:
            raise RecipeError(f"train.init_load_plan: loads {plan['ema']!r} into 'ema', but this run keeps no EMA "
                              "(train.ema_decay = 0); leave 'ema' out of the plan, or set train.ema_decay")
        del plan["ema"]
    return plan


def _load_plan(instance: Any, attribute: Any, value: Any) -> None:
    # Checked with the recipe, init_from or not: a plan that cannot parse is a typo wherever it sits.
    if isinstance(value, str):
        try:
            parse_load_plan(value)
        except RecipeError as exc:
            raise RangeError(attribute.name, str(exc).removeprefix("train.init_load_plan: ")) from None


@config
class RunSection:
    """Where a run lives and how it is seeded."""

    exp_dir: str = field("experiments/default", doc="run directory: checkpoints, samples, logs, resolved recipe",
                         validator=[non_blank, path_name])
    seed: int = field(0, doc="global seed; each rank derives its own from it", validator=SEED)
    device: Literal["auto", "cpu", "cuda"] = field("auto", doc="'auto' picks cuda when available")
    deterministic: bool = field(False, doc="torch deterministic algorithms: bitwise-repeatable runs, a little slower")


@config
class ModelSection:
    """The networks: one trainable denoiser and the frozen operators around it."""

    denoiser: Spec = field(doc="the trainable network (registry kind: denoiser)")
    vae: Spec = _spec("identity", "image <-> latent autoencoder (kind: vae)")
    text_encoder: Spec | None = field(None, doc="per-token prompt embeddings for the denoiser (kind: text_encoder)")
    clip_encoder: Spec | None = field(None, doc="pooled prompt vector for the denoiser's vec input (kind: text_encoder)")
    patchifier: Spec = _spec("patch3d", "latents <-> packed tokens (kind: patchifier)")
    attention: Spec = _spec("auto", "attention backend for packed sequences (kind: attention)")


@config
class FlowSection:
    """The flow-matching objective."""

    path: Spec = _spec("rectified", "noising rule and target (kind: path)")
    time_sampler: Spec = _spec("logit_normal", "training distribution of t (kind: time_sampler)")
    time_warper: Spec = _spec("none", "resolution-dependent shift of t (kind: time_warper)")
    time_weighter: Spec = _spec("uniform", "loss weight over t (kind: time_weighter)")


@config
class SampleSection:
    """Inference: used by `job = "sample"`, `minfm sample` and in-training galleries."""

    #: The original minFM's inferencer keys (docs/reproduce.md): an unknown key answers with its name here.
    former_names: ClassVar[dict[str, str]] = {
        "num_steps": "steps", "img_fhw": "size", "cfg_scale": "sample.guidance.scale", "eta": "sample.sampler.eta",
        "sample_method": "sampler", "per_gpu_bs": "batch_size", "save_as_npz": "save_npz", "output_dir": "out_dir",
        "ckpt_dir": "source",
    }

    sampler: Spec = _spec("euler", "ODE/SDE solver (kind: sampler)")
    guidance: Spec = _spec("cfg", "guidance rule and its scale (kind: guidance)")
    time_warper: Spec | None = field(None, doc="shift at inference; defaults to flow.time_warper")
    source: str | None = field(
        None, doc="checkpoint, run dir or hf://org/name to sample from (job = 'sample')", file="ref"
    )
    steps: int = field(50, doc="number of solver steps", validator=Range(1, MAX_SOLVER_STEPS))
    size: tuple[int, int, int] = field((1, 256, 256), doc="frames, height, width of generated images",
                                       validator=Range(1, MAX_SIDE))
    prompts: tuple[str, ...] = field((), doc="prompts to sample", validator=prompt_text)
    prompt_file: str | None = field(None, doc="text file with one prompt per line", file="file")
    neg_prompt: str = field("", doc="negative prompt for the unconditional branch", validator=prompt_text)
    distilled_guidance: float | None = field(
        None, doc="FLUX-dev guidance-embedding scalar (None: not used; FLUX.1-dev is trained on 1 to 10)",
        validator=Range(0, MAX_GUIDANCE)
    )
    samples_per_prompt: int = field(1, doc="images per prompt", validator=Range(1, MAX_SAMPLES))
    batch_size: int = field(16, doc="samples per rank per sampler call", validator=Range(1, MAX_BATCH))
    use_ema: bool = field(True, doc="sample with EMA weights when the checkpoint has them")
    out_dir: str | None = field(None, doc="output folder (default: <exp_dir>/samples)", validator=path_name)
    file_ext: Literal["png", "jpg"] = field("png", doc="image file format")
    save_npz: bool = field(False, doc="also write .npz batches (ADM evaluation layout)")
    seed: int = field(0, doc="sampling seed", validator=SEED)


@config
class TrainSection:
    """Optimisation, schedule, checkpoints and in-training evaluation (the seed's trainer)."""

    #: The original minFM's trainer keys (docs/reproduce.md): an unknown key answers with its name here.
    former_names: ClassVar[dict[str, str]] = {
        "max_lr": "lr", "gradient_clip_norm": "grad_clip_norm", "grad_norm_spike_threshold": "grad_spike_threshold",
        "grad_norm_spike_detection_start_step": "grad_spike_start_step", "txt_drop_prob": "text_dropout",
        "init_ckpt": "init_from", "init_ckpt_load_plan": "init_load_plan", "ckpt_freq": "ckpt_every",
        "log_freq": "log_every", "val_freq": "val_every", "inference_freq": "sample_every",
        "inference_at_start": "sample_at_start", "exp_dir": "run.exp_dir",
        # a [[logging.loggers]] table with name = "wandb" and its mode, project, run_name
        "wandb_mode": "logging.loggers", "wandb_project": "logging.loggers", "wandb_name": "logging.loggers",
    }

    max_steps: int = field(1000, doc="optimizer steps to train", validator=Range(1, MAX_STEPS))
    total_batch_size: int = field(
        -1, doc="global samples per optimizer step (-1: one micro-batch per rank)", validator=Range(1, MAX_BATCH, also=(-1,))
    )
    batch_size: int = field(8, doc="micro-batch per rank; accumulation fills total_batch_size",
                            validator=Range(1, MAX_BATCH))
    dataloader_num_workers: int = field(
        0, doc="processes per rank that load and decode training samples ahead of the steps (0: the training "
        "process loads them between steps); batches and resumes are the same for any value",
        validator=Range(0, MAX_DATALOADER_WORKERS),
    )
    lr: float = field(
        3e-4, doc="peak learning rate (AdamW; beyond 1 a step outruns any weight's scale); 0 keeps the weights as "
        "loaded (tests of loading)", validator=Range(0, 1)
    )
    min_lr: float = field(1e-5, doc="final learning rate of the cosine decay (at most lr)", validator=Range(0, 1))
    warmup_steps: int = field(1000, doc="linear warm-up steps (0: none)", validator=EVERY)
    weight_decay: float = field(
        0.0, doc="AdamW weight decay (each step scales the weights by 1 - lr * weight_decay)", validator=Range(0, 1)
    )
    adam_betas: tuple[float, float] = field((0.9, 0.95), doc="AdamW betas", validator=decay)
    grad_clip_norm: float = field(
        1.0, doc="clip the global gradient norm to this value (inf: no clipping)",
        validator=Range(0, math.inf, lo_open=True, allow_inf=True),
    )
    grad_spike_threshold: float = field(
        2.0, doc="skip a step whose grad norm exceeds this (grad_spike_rule says of what; inf: never)",
        validator=Range(0, math.inf, lo_open=True, allow_inf=True),
    )
    grad_spike_rule: Literal["running_mean", "absolute"] = field(
        "running_mean", doc="'running_mean': a spike is a grad norm above threshold x the running mean of "
        "accepted ones; 'absolute': above threshold itself (the seed's rule)",
    )
    grad_spike_start_step: int = field(1000, doc="spike detection starts after this step", validator=EVERY)
    ema_decay: float = field(0.999, doc="EMA decay per optimizer step (0 disables EMA)", validator=decay)
    text_dropout: float = field(
        0.1, doc="probability of dropping a prompt (trains the unconditional branch for CFG)", validator=probability
    )
    ckpt_every: int = field(
        2000, doc="save a checkpoint every N steps and at the end (0: at the end only)", validator=EVERY
    )
    keep_last: int = field(3, doc="keep the last N checkpoints (0 keeps all)", validator=EVERY)
    init_from: str | None = field(None, doc="checkpoint, run dir or hf:// source to initialise from", file="ref")
    init_load_plan: str = field(
        DEFAULT_LOAD_PLAN,
        doc="which parts of init_from to load into what, as source:target pairs", validator=_load_plan,
    )
    allow_pickle_checkpoint: bool = field(
        False, doc="also load checkpoints without a manifest (older minFM, other tools): their DCP .metadata "
        "is a pickle that can run code; only for checkpoints you trust (never honoured for downloads)",
    )
    log_every: int = field(20, doc="log metrics every N steps (0: at the end only)", validator=EVERY)
    val_every: int = field(10_000, doc="validation loss of the raw (not EMA) weights every N steps (0 disables)",
                           validator=EVERY)
    val_num_samples: int = field(10_000, doc="samples in the validation set", validator=Range(1, MAX_SAMPLES))
    sample_every: int = field(2000, doc="in-training sample gallery every N steps (0 disables)", validator=EVERY)
    fid_every: int = field(
        0, doc="FID of EMA samples against train.fid_ref every N steps (0 disables)", validator=EVERY
    )
    fid_num_samples: int = field(
        1000, doc="images drawn for the in-training FID (prompts of the data's val split)", validator=Range(2, MAX_SAMPLES)
    )
    fid_ref: str | None = field(
        None, doc="reference images for the in-training FID: an .npz (ADM layout) or a folder", file="file"
    )
    fid_extractor: str | None = field(
        None, doc="MODULE:ATTR of a feature-extractor factory (None: torch-fidelity's Inception, minfm[eval])",
        validator=factory_spec,
    )
    fid_inception: str | None = field(
        None, doc="Inception weights for the in-training FID (as minfm eval --inception)", file="ref"
    )
    fid_metric: str = field(
        "fid", doc="the registered image metric (kind metric) the in-training FID asks for, logged under its "
                   "name: minFM's 'fid', or a plugin's (a Frechet distance of other features)", validator=non_blank
    )
    sample_at_start: bool = field(False, doc="render a gallery before the first step")
    profile_steps: tuple[int, ...] = field((), doc="steps (numbered from 1, as logged) to capture a profiler trace for", validator=EVERY)
    gc_every: int = field(100, doc="run Python's garbage collector every N steps (0: never)", validator=EVERY)


@config
class LoggingSection:
    """Where metrics go."""

    loggers: tuple[Spec, ...] = field(
        factory=lambda: (Spec("console"), Spec("jsonl")), doc="logger components (kind: logger)"
    )


@config
class Recipe:
    """A whole recipe: what to run and every component it composes."""

    model: ModelSection = field(doc="the networks")
    job: Literal["train", "sample"] = field("train", doc="what `minfm run` does with this recipe")
    run: RunSection = field(factory=RunSection, doc="run directory and seed")
    flow: FlowSection = field(factory=FlowSection, doc="the flow-matching objective")
    sample: SampleSection = field(factory=SampleSection, doc="inference settings")
    data: Spec | None = field(None, doc="the dataset (kind: dataset)")
    train: TrainSection = field(factory=TrainSection, doc="optimisation and checkpoints")
    parallel: Spec = _spec("none", "parallelizer (kind: parallelizer)")
    balancer: Spec = _spec("none", "sequence balancer (kind: balancer)")
    logging: LoggingSection = field(factory=LoggingSection, doc="metric loggers")


#: Recipe path -> component kind, for every component slot (loggers are listed per index).
SLOTS: dict[str, str] = {
    "model.denoiser": "denoiser",
    "model.vae": "vae",
    "model.text_encoder": "text_encoder",
    "model.clip_encoder": "text_encoder",
    "model.patchifier": "patchifier",
    "model.attention": "attention",
    "flow.path": "path",
    "flow.time_sampler": "time_sampler",
    "flow.time_warper": "time_warper",
    "flow.time_weighter": "time_weighter",
    "sample.sampler": "sampler",
    "sample.guidance": "guidance",
    "sample.time_warper": "time_warper",
    "data": "dataset",
    "parallel": "parallelizer",
    "balancer": "balancer",
}
