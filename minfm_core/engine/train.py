"""The trainer: frozen ops -> path -> denoiser -> weighted per-sample loss -> AdamW.

    minfm run recipes/quickstart.toml                       # one process
    minfm run recipes/quickstart.toml --nproc-per-node 2    # two, gloo on CPU / NCCL on GPU

Gradient accumulation fills ``train.total_batch_size`` (global, over all ranks);
non-finite or spiking gradient norms skip the step (weights and EMA untouched);
checkpoints are DCP, asynchronous and atomic; a run resumes from its latest complete
checkpoint automatically. SIGTERM (a scheduler's preemption or time limit) stops a run after
its current step with a checkpoint (stop_signal.py).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import tomli_w
import torch
import torch.distributed as dist

from .. import checkpoint as ckpt_mod
from .. import runlock
from ..data_loader import BatchIterator
from ..errors import MinfmError, MinfmWarning, RecipeError, terminal_safe
from ..jsonio import parse_json
from ..recipe.schema import CHECKPOINT_PARTS, DEFAULT_LOAD_PLAN, init_plan
from ..recipe.checks import accumulation_steps, job_checks
from ..safepath import write_text_atomic
from ..schedule import lr_at
from ..sources import resolve_source
from ..weights import all_finite, first_names, has_weights
from .ema import EMA
from .pipeline import build_pipeline, denoiser_kwargs, per_sample_loss, prepare_batch, shard, sharded_denoiser
from .prompts import job_prompts
from .runtime import Runtime, init_runtime, rank_seed, seed_everything, shutdown_runtime
from .stop_signal import STOPPED_EXIT_CODE, StopRequest


def _plain(value):
    """A param-group value as JSON gives it back (betas: a tuple in the optimizer, a list in a checkpoint)."""
    return list(value) if isinstance(value, tuple) else value


#: Optimizer steps skipped in a row (non-finite loss or gradient, or a spike) after which a run
#: stops: it learns nothing more (its weights stay as they were), and it ran to max_steps and
#: exited 0.
MAX_SKIPPED_IN_A_ROW = 100

#: Optimizer state entries that are never negative (AdamW's second moments and step count).
NONNEGATIVE_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "step"})


def _state_problems(tree: Any, at_least_zero: frozenset[str] = frozenset(), name: str = "") -> list[str]:
    """``"NAME: NaN or infinite values"`` (or ``negative values``, for a leaf named in
    ``at_least_zero``) for each floating-point tensor of a nested state dict that holds them;
    a sharded tensor (DTensor) is read on this rank's shards."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _state_problems(v, at_least_zero, f"{name}.{k}" if name else str(k))]
    if not isinstance(tree, torch.Tensor) or not tree.is_floating_point():
        return []
    local = tree.to_local() if hasattr(tree, "to_local") else tree
    if local.numel() == 0:
        return []
    if not all_finite(local):
        return [f"{name}: NaN or infinite values"]
    if name.rsplit(".", 1)[-1] in at_least_zero and bool((local < 0).any()):
        return [f"{name}: negative values"]
    return []


def _check_param_groups(loaded, fresh: list[dict], where) -> None:
    """The optimizer's param groups come from a checkpoint's JSON: the same groups, keys and
    parameters as this run's, and values of the same types (finite numbers stay numbers)."""
    def same(a, b) -> bool:
        if isinstance(b, bool) or b is None or isinstance(b, str):
            return type(a) is type(b)
        if isinstance(b, (int, float)):
            return isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)
        if isinstance(b, (list, tuple)):
            return isinstance(a, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return True

    ok = isinstance(loaded, list) and len(loaded) == len(fresh) and all(
        isinstance(g, dict) and g.keys() == f.keys() and g["params"] == f["params"]
        and all(same(g[k], f[k]) for k in f if k != "params") for g, f in zip(loaded, fresh))
    if not ok:
        raise MinfmError(f"{where}: the optimizer's param groups do not fit this run's optimizer")


def make_adamw(params, cfg) -> torch.optim.AdamW:
    """AdamW, fused when torch has a fused kernel for these parameters (CUDA, and CPU since 2.4).

    The fused kernel computes the same update (tests/test_engine_train.py checks it) and
    is several times faster: one kernel instead of a dozen elementwise passes.
    """
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(params, **kwargs)


def _all_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.AVG if x.device.type == "cuda" else dist.ReduceOp.SUM)
        if x.device.type != "cuda":
            x /= dist.get_world_size()
    return x


def _full(x: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


class Trainer:
    def __init__(self, resolved, rt: Runtime):
        self.resolved = resolved
        self.recipe = resolved.recipe
        self.cfg = resolved.recipe.train
        self.rt = rt
        self.exp_dir = Path(self.recipe.run.exp_dir)
        #: Set by train(): a SIGTERM stops fit() after its step, with a checkpoint (stopped = True).
        self.stop_request: StopRequest | None = None
        self.stopped = False
        # what `minfm check` applies, no more
        problems = job_checks(resolved, "train", rt.world_size)
        if problems:
            raise RecipeError(problems, resolved.source)
        self.accum = accumulation_steps(self.cfg.total_batch_size, self.cfg.batch_size, rt.world_size)
        # One writer per run dir, every place it writes writable, and room for a checkpoint,
        # before any work (docs/reliability.md).
        ckpt_dir = self.exp_dir / ckpt_mod.CKPT_DIR
        # partial saves go before the room check and the first write: one that ran out of disk
        # would otherwise make a full disk of the one the resume needs
        self.run_lock = runlock.hold_run_dir(self.exp_dir, ckpt_dir, lambda: runlock.denoiser_param_bytes(resolved),
                                             runlock.run_outputs(resolved, "train"),
                                             tidy=lambda: ckpt_mod.remove_partial_saves(ckpt_dir))
        self.recipe_text = tomli_w.dumps(resolved.to_dict())
        if rt.is_main:
            self.exp_dir.mkdir(parents=True, exist_ok=True)

        # Some CPU/GPU kernels (index_put with accumulate, ...) sum in a racy order; ask for
        # the deterministic ones when the recipe wants bitwise-repeatable runs.
        torch.use_deterministic_algorithms(self.recipe.run.deterministic, warn_only=True)
        seed_everything(self.recipe.run.seed)  # identical initial weights on every rank
        if rt.world_size > 1 and resolved["parallel"].component.name != "none":
            denoiser = sharded_denoiser(resolved, world_size=rt.world_size, device=rt.device, rank=rt.rank)
        else:
            denoiser = resolved["model.denoiser"].build(load_weights=True, **denoiser_kwargs(resolved)).to(rt.device)
            denoiser = shard(resolved, denoiser, world_size=1, device=rt.device, trainable=True)
        self.pipe = build_pipeline(resolved, rt.device, world_size=rt.world_size, denoiser=denoiser)
        # a gallery prompt the text encoder refuses stops the run now, not at its step
        for what, prompts in job_prompts(self.recipe, "train"):
            self.pipe.check_prompts(prompts, what)
        self.model = self.pipe.denoiser
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_adamw(self.params, self.cfg)
        self.ema = EMA(self.model, self.cfg.ema_decay) if self.cfg.ema_decay > 0 else None
        self.dataset = resolved.build("data", split="train")
        self._warn_stale_cache()
        self.batches = BatchIterator(
            self.dataset, self.cfg.batch_size, rank=rt.rank, world_size=rt.world_size, seed=self.recipe.run.seed,
            num_workers=self.cfg.dataloader_num_workers, who=self.pipe.who("data"),
        )
        self.generator = torch.Generator().manual_seed(rank_seed(self.recipe.run.seed, rt.rank))
        self.step = 0
        # The lr schedule's position is step + lr_offset: 0 unless a plan loaded the
        # scheduler without the step (it goes on with the source run's lr; the seed's
        # ckpt_scheduler:mem_scheduler), and kept by this run's own checkpoints.
        self.lr_offset = 0
        self.norm_mean: float | None = None  # running mean of accepted grad norms (spike detection)
        self._skipped_in_a_row = 0
        self.checkpointer = ckpt_mod.Checkpointer(
            self.exp_dir, keep_last=self.cfg.keep_last, recipe_text=self.recipe_text
        )
        # (component, logger): a bug a plugin's logger raises is noted with whose it is
        self.loggers = [
            (slot.component, slot.build(run_dir=str(self.exp_dir), rank=rt.rank, recipe=resolved.to_dict()))
            for path, slot in resolved.slots.items() if path.startswith("logging.loggers")
        ]
        self._to_loggers("set_total", self.cfg.max_steps)  # declared (protocols.Logger's default: no-op)
        self.n_params = sum(p.numel() for p in self.params)
        self._val_set = None
        if self.cfg.val_every:  # built now: a val split that cannot be read fails before step 1, not at step val_every
            try:
                self.val_dataset()
            except MinfmError as exc:
                raise MinfmError(f"train.val_every = {self.cfg.val_every} validates on the data's 'val' split: {exc} "
                                 "(train.val_every = 0 trains without validation)") from None
            self._warn_small_val_set()
        self.fid = None
        if self.cfg.fid_every:
            from .fid import TrainingFid

            self.fid = TrainingFid(self.cfg, self.recipe.sample, self.val_dataset(), self.rt)
        self._resume_or_init()
        if rt.is_main:  # the run's record, once the start is accepted: a refused one leaves it as it was
            write_text_atomic(self.exp_dir / "recipe.toml", self.recipe_text)

    # ---- state ------------------------------------------------------------------
    def app_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": {"step": torch.tensor(self.step + self.lr_offset), "lr": torch.tensor(self.cfg.lr)},
            "step": torch.tensor(self.step),
            # float64: the running mean is a Python float; float32 made a resumed run's differ (1e-7)
            "trainer": {"norm_mean": torch.tensor(float("nan") if self.norm_mean is None else self.norm_mean,
                                                  dtype=torch.float64)},
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save(self) -> None:
        extras = {"generator": self.generator.get_state()}
        meta = {"data": json.dumps(self.batches.state_dict()), "step": str(self.step), "world_size": str(self.rt.world_size)}
        self.checkpointer.save(self.step, self.app_state(), extras, meta)

    def _load(self, ckpt: ckpt_mod.Checkpoint, plan: dict[str, str], *, exact: bool) -> None:
        """Load parts of ``ckpt`` per ``plan`` ({target: source}); one DCP read per part."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        parts = ckpt.parts()
        for target, source in plan.items():
            if source not in parts:
                raise MinfmError(f"{ckpt.path}: has no {source!r} to load (train.init_load_plan)")
            state = self.app_state()
            if target in ("model", "ema"):
                base = state[target]
                # EMA holds trainable parameters only: loading from it leaves buffers as they are.
                box = {source: {k: v for k, v in base.items() if source == "model" or k in trainable}}
                ckpt_mod.refuse_unexpected(ckpt, source, set(box[source]))  # (a resume's and init_from's)
                ckpt.load(box)
                self._refuse_bad_state(_state_problems(box[source]), f"{ckpt.path} ({source} weights)")
                if target == "model":
                    set_model_state_dict(self.model, {**base, **box[source]})
                else:
                    self.ema.load_state_dict(box[source])
            elif target == "optimizer":
                fresh = [dict(g) for g in state["optimizer"]["param_groups"]]
                box = {"optimizer": state["optimizer"]}
                ckpt.load(box)
                _check_param_groups(box["optimizer"].get("param_groups"), fresh, ckpt.path)
                self._refuse_bad_state(_state_problems(box["optimizer"].get("state", {}), at_least_zero=NONNEGATIVE_MOMENTS),
                                       f"{ckpt.path} (optimizer state)")
                set_optimizer_state_dict(self.model, self.optimizer, box["optimizer"])
                # The moments come from the checkpoint, the settings from this recipe (a
                # weight_decay or adam_betas changed for the resume was silently ignored,
                # while the run's recipe.toml recorded the new value). lr follows the schedule.
                changed = set()
                for group, want in zip(self.optimizer.param_groups, fresh):
                    for key, value in want.items():
                        if key not in ("params", "lr") and _plain(group.get(key)) != _plain(value):
                            changed.add(f"{key} {group.get(key)} -> {value}")
                            group[key] = value
                if changed:
                    self._log_line(f"optimizer settings from the recipe, not the checkpoint: {', '.join(sorted(changed))}")
            elif target == "scheduler":
                box = {"scheduler": state["scheduler"]}
                ckpt.load(box)
                lr_step = float(box["scheduler"]["step"])
                if not (math.isfinite(lr_step) and lr_step >= 0 and lr_step.is_integer()):
                    raise MinfmError(f"{ckpt.path}: scheduler step {lr_step} is not a step count (an integer >= 0)")
                lr_step = int(lr_step)
            elif target == "step":
                box = {"step": state["step"], "trainer": state["trainer"]}
                ckpt.load(box)
                self.step = int(box["step"])
                if self.step < 0:
                    raise MinfmError(f"{ckpt.path}: step {self.step} is negative")
                named = ckpt.manifest.step if ckpt.manifest is not None else None
                if named is not None and named != self.step:
                    # resumed "at step 3" from step 6's folder: the data position was step 6's
                    raise MinfmError(f"{ckpt.path}: its step tensor says {self.step}, its manifest {named}")
                nm = float(box["trainer"]["norm_mean"])
                if not (math.isnan(nm) or (math.isfinite(nm) and nm >= 0)):
                    # a negative mean grad norm skipped every step as a spike, and the run exited 0
                    raise MinfmError(f"{ckpt.path}: trainer.norm_mean {nm} is not a mean gradient norm (finite, >= 0)")
                self.norm_mean = None if math.isnan(nm) else nm
        if "scheduler" in plan:  # after the loop: the plan may name the step after it
            self.lr_offset = lr_step - self.step
        if exact:
            # Each rank reads its own file: one that refuses it refuses on every rank (rank 0
            # alone went on, said "resumed" and rewrote recipe.toml before its peer's loss stopped it).
            problem, extras = None, None
            try:
                extras = ckpt.rank_extras(self.rt.rank)
                if extras is not None and ckpt.world_size == self.rt.world_size:
                    tensors, meta = extras
                    self.generator.set_state(tensors["generator"])
                    self.batches.load_state_dict(parse_json(meta["data"], "data position"))
            except (KeyError, ValueError, TypeError, RuntimeError, MinfmError) as exc:
                problem = f"{ckpt.path}/rank_{self.rt.rank}.safetensors: bad per-rank state ({exc})"
            self._agree(problem, f"{ckpt.path}: another rank's per-rank state is bad (see its error)")
            if extras is None or ckpt.world_size != self.rt.world_size:
                # Another world size: the data goes on from the same global place (every rank
                # consumed as many as rank 0; load_state_dict rescales to this world size), and
                # a sample's noise comes from (seed, epoch, index): the run continues as it
                # would have at the old size. Only the per-rank generator (batches whose
                # samples carry no index) cannot continue: it is reseeded by step.
                self.generator.manual_seed(rank_seed(self.recipe.run.seed, self.rt.rank, self.step))
                first = ckpt.rank_extras(0)
                if first is not None:
                    try:
                        self.batches.load_state_dict(parse_json(first[1]["data"], "data position"))
                    except (KeyError, ValueError, TypeError, MinfmError) as exc:
                        raise MinfmError(f"{ckpt.path}/rank_0.safetensors: bad per-rank state ({exc})") from None
                self._log_line(f"resumed at world size {self.rt.world_size} from a checkpoint of world size "
                               f"{ckpt.world_size}: the data goes on from the same place, each sample with its "
                               "own noise, as at the old size")

    def _refuse_bad_state(self, problems: list[str], where: str) -> None:
        """Refuse, on every rank together, state whose values no run makes: NaN weights trained
        on with every step skipped as a spike, negative second moments sent the weights to NaN
        a step later, and either run exited 0. A sharded tensor is read on each rank's shards."""
        why = " (a run that diverged, or a damaged checkpoint?)"
        self._agree(f"{where}: {first_names(problems, 3)}{why}" if problems else None,
                    f"{where}: values found by another rank{why}")

    def _agree(self, problem: str | None, elsewhere: str) -> None:
        """Raise ``problem`` (this rank's finding, None: none) on every rank together: one
        all-reduce says whether any rank found one; a rank that found none says ``elsewhere``."""
        found = problem is not None
        if self.rt.world_size > 1:
            t = torch.tensor([float(found)], device=self.rt.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            found = bool(t.item())
        if found:
            raise MinfmError(problem or elsewhere)

    def _resume_or_init(self) -> None:
        allow_pickle = self.cfg.allow_pickle_checkpoint
        latest, skipped = ckpt_mod.resume_point(self.exp_dir, allow_pickle=allow_pickle)
        for path, why in skipped:  # kept on disk as evidence; never pruned
            self._log_line(f"warning: skipping checkpoint {path.name}: {why}")
            self.checkpointer.keep.add(path)
        if latest is not None:
            # An EMA turned on for the resume (train.ema_decay was 0) starts from the loaded model.
            new_ema = self.ema is not None and not latest.has_part("ema")
            self._load(latest, {p: p for p in CHECKPOINT_PARTS if p != "ema" or (self.ema is not None and not new_ema)}, exact=True)
            if self.step > self.cfg.max_steps:
                # Refused before recipe.toml is rewritten: it exited 0 having trained nothing,
                # its record now claiming the lower max_steps.
                raise MinfmError(f"train.max_steps = {self.cfg.max_steps} is below step {self.step} of the checkpoint "
                                 f"this run resumes from ({latest.path}): nothing to train; raise train.max_steps "
                                 "to continue the run, or choose another run.exp_dir to start afresh")
            self._log_line(f"resumed from {latest.path} at step {self.step}"
                           + (" = train.max_steps: the run is finished, nothing to train" if self.step == self.cfg.max_steps else ""))
            if new_ema:
                self.ema.reset(self.model)
                self._log_line("the checkpoint holds no EMA (train.ema_decay was 0): the EMA starts from this step's weights")
            if changed := recipe_changes(latest.path / "recipe.toml", self.recipe_text):
                self._log_line(f"warning: resumed with settings other than the checkpoint's: {changed}")
        elif skipped:
            raise MinfmError(f"{self.exp_dir}: no checkpoint verifies (newest: {skipped[0][1]}); "
                             "move the checkpoints away to start afresh")
        elif self.cfg.init_from:
            try:
                self._init_from()
                if self.step >= self.cfg.max_steps:  # (it exited 0, trained nothing and saved nothing)
                    raise MinfmError(f"its step {self.step} (train.init_load_plan loads the step) is not below "
                                     f"train.max_steps = {self.cfg.max_steps}: nothing to train; raise "
                                     "train.max_steps, or leave the step out of the plan")
            except MinfmError as exc:  # a resume's errors name the checkpoint; these name the setting too
                raise MinfmError(f"train.init_from = {self.cfg.init_from}: {exc}") from None
            self._log_line(f"initialised from {self.cfg.init_from} with plan {self.cfg.init_load_plan!r}")

    def _init_from(self) -> None:
        """Loads what ``train.init_load_plan`` names from ``train.init_from``."""
        plan = init_plan(self.cfg, keeps_ema=self.ema is not None)
        weights_only = set(plan) <= {"model", "ema"}
        root = resolve_source(self.cfg.init_from, training_state=not weights_only)
        # The default plan's ema:ema is "the EMA too, where there is one": a source that
        # kept none starts this run's EMA from the loaded model, as a resume does.
        default = self.cfg.init_load_plan == DEFAULT_LOAD_PLAN
        if weights_only and has_weights(root):
            if default and not has_weights(root, "ema"):
                plan.pop("ema", None)
            self._load_exported(root, plan)  # a Hub folder: the weights are enough
        else:
            # A Hub folder pushed without --include-training-state holds weights only: the
            # default plan also wants the optimizer and the step, so say how to take the weights.
            also = ("; it holds weights only (pushed without --include-training-state): "
                    'train.init_load_plan = "model:model,ema:ema" starts from them with a fresh optimizer at step 0'
                    if has_weights(root) else "")
            with ckpt_mod.held(root, also) as path:  # another live run's keep_last must not prune it meanwhile
                ckpt = ckpt_mod.open_checkpoint(path, allow_pickle=self.cfg.allow_pickle_checkpoint)
                if default and not ckpt.has_part("ema"):
                    plan.pop("ema", None)
                self._load(ckpt, plan, exact=False)
        if self.ema is not None and "ema" not in plan and "model" in plan:
            # The EMA was cloned from the random initialisation: left there, it would hold
            # 0.999^N of it after N steps, and galleries, FID and exports use the EMA.
            self.ema.reset(self.model)

    def _load_exported(self, folder: Path, plan: dict[str, str]) -> None:
        """Model / EMA from an exported folder's model / ema safetensors (single file or shards)."""
        from ..weights import check_finite, check_keys, load_safetensors_into, read_safetensors

        for target, source in plan.items():
            if target == "model":  # checked key by key; an FSDP2 model keeps only its shards
                load_safetensors_into(self.model, folder, source)
            else:  # "ema": init_plan kept it only for a run that keeps one
                sd = read_safetensors(folder, source)
                # the EMA holds the trainable parameters: each must be there, in its shape
                # (copy_ would broadcast a [1] into a [12, 32] without a word)
                check_keys(self.model, sd, f"{folder}/{source}.safetensors", params_only=True)
                check_finite(sd, f"{folder}/{source}.safetensors")
                self.ema.load_state_dict({n: sd[n] for n in self.ema.names})

    # ---- one optimizer step ---------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step + self.lr_offset, lr=self.cfg.lr, min_lr=self.cfg.min_lr,
                                warmup_steps=self.cfg.warmup_steps, max_steps=self.cfg.max_steps)
        self.model.train()
        loss_sum = torch.zeros((), device=self.rt.device)
        tokens = 0
        for _ in range(self.accum):
            samples = next(self.batches)
            batch = self.make_batch(samples)
            losses = self.loss_fn(batch)
            weighted = (losses * batch.weight).sum() / (self.cfg.batch_size * self.accum)
            weighted.backward()
            loss_sum += weighted.detach()
            tokens += batch.n_tokens
        norm = _full(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip_norm)).float()
        norm_val = float(norm)
        loss = float(_all_mean(loss_sum))
        skip = self._should_skip(norm_val, loss)
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.model)
            self.norm_mean = norm_val if self.norm_mean is None else 0.99 * self.norm_mean + 0.01 * norm_val
        self.step += 1
        return {"loss": loss, "grad_norm": norm_val, "lr": self.optimizer.param_groups[0]["lr"],
                "skipped": float(skip is not None), "tokens": float(tokens * self.rt.world_size)}

    def make_batch(self, samples: list[dict]):
        return prepare_batch(self.pipe, samples, self.generator, self.cfg.text_dropout, seed=self.recipe.run.seed)

    def loss_fn(self, batch) -> torch.Tensor:
        return per_sample_loss(self.pipe, batch)

    def _should_skip(self, norm: float, loss: float) -> str | None:
        if not (math.isfinite(norm) and math.isfinite(loss)):
            return "non-finite"
        if self.step < self.cfg.grad_spike_start_step:
            return None
        if self.cfg.grad_spike_rule == "absolute":
            return "spike" if norm > self.cfg.grad_spike_threshold else None
        # a mean of 0 (all-zero gradients so far) makes any gradient a "spike": no mean to compare with
        if self.norm_mean and norm > self.cfg.grad_spike_threshold * self.norm_mean:
            return "spike"
        return None

    # ---- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss on a fixed validation set at fixed, stratified timesteps (comparable across runs)."""
        from .validate import validation_loss

        return validation_loss(self.pipe, self.val_dataset(), num_samples=self.cfg.val_num_samples,
                               batch_size=self.cfg.batch_size, seed=self.recipe.run.seed, rank=self.rt.rank,
                               world_size=self.rt.world_size, device=self.rt.device)

    def _warn_small_val_set(self) -> None:
        """validation_loss uses min(val_num_samples, the split's size) items: say so when that is fewer."""
        try:
            size = len(self._val_set)
        except TypeError:  # a split without a length: nothing known to compare
            return
        if self.cfg.val_num_samples > size and self.rt.is_main:
            warnings.warn(f"train.val_num_samples = {self.cfg.val_num_samples} is more than the data's 'val' split "
                          f"holds ({size}): validation uses its {size} samples", MinfmWarning, stacklevel=2)

    def _warn_stale_cache(self) -> None:
        """Names the data and VAE settings changed since the cache this run reads was made: it
        trains on the cached latents, so their recipe values would pass unused, unsaid."""
        from ..latents_record import changed_settings
        from ..protocols import CachedLatentsConfig

        data = self.resolved.config("data")
        if not (isinstance(data, CachedLatentsConfig) and data.use_cached_latents and data.latents_dir):
            return
        folder = Path(os.path.expanduser(data.latents_dir)) / "train"
        # every rank reads the small record: a malformed one stops them all alike, not rank 0 alone
        changed = changed_settings(self.resolved, folder)
        if changed and self.rt.is_main:
            warnings.warn(f"data.latents_dir: {folder} was cached with other {', '.join(changed)}: this run trains "
                          "on the cached latents, so the recipe's values take no effect until `minfm cache latents` "
                          "makes the cache again", MinfmWarning, stacklevel=2)

    def val_dataset(self):
        if self._val_set is None:
            self._val_set = self.resolved.build("data", split="val")
        return self._val_set

    def gallery(self) -> None:
        from .gallery import training_gallery

        made = training_gallery(self.pipe, self.model, self.ema, self.recipe, self.step, is_main=self.rt.is_main)
        for name, (images, prompts) in made.items():
            self._to_loggers("log_images", self.step, f"samples/{name}", images, prompts)

    # ---- the loop -----------------------------------------------------------------------
    def fit(self, until: int | None = None) -> None:
        """Train to ``train.max_steps`` (or stop early after step ``until``, e.g. in a notebook)."""
        cfg = self.cfg
        stop = cfg.max_steps if until is None else min(until, cfg.max_steps)
        if cfg.sample_at_start and self.step == 0:  # even with sample_every = 0: the one gallery asked for
            self.gallery()
        window_t, window_tokens = time.perf_counter(), 0.0
        while self.step < stop:
            # profile_steps count as the logs and checkpoints do: step N is the N-th step (from 1)
            prof = self._profiler() if self.step + 1 in cfg.profile_steps else nullcontext()
            with prof:
                metrics = self.train_step()
            window_tokens += metrics.pop("tokens")
            if metrics["skipped"]:
                self._log_line(f"step {self.step}: skipped optimizer step (grad norm {metrics['grad_norm']:.3g}, loss {metrics['loss']:.3g})")
            self._skipped_in_a_row = self._skipped_in_a_row + 1 if metrics["skipped"] else 0
            stuck = self._skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW
            if (cfg.log_every and self.step % cfg.log_every == 0) or self.step == stop or stuck:
                dt = time.perf_counter() - window_t
                metrics["tokens_per_sec"] = window_tokens / max(dt, 1e-9)
                mfu = self._mfu(metrics["tokens_per_sec"])
                if mfu is not None:
                    metrics["mfu"] = mfu
                self._log(metrics)
                window_t, window_tokens = time.perf_counter(), 0.0
            if stuck:  # every rank sees the same (reduced) loss and norm: all stop at this step
                raise MinfmError(
                    f"step {self.step}: {self._skipped_in_a_row} optimizer steps in a row skipped (grad norm "
                    f"{metrics['grad_norm']:.3g}, loss {metrics['loss']:.3g}): the run has diverged, or every "
                    "gradient is a spike against train.grad_spike_threshold x its running mean; nothing more "
                    "would be learnt. Start again from an earlier checkpoint (train.init_from) with a lower train.lr")
            # The checkpoint first: what follows only reads the weights (each with its own
            # generators), and a failure in it (a damaged FID reference, a full disk for the
            # gallery) then loses no step.
            saved = (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == cfg.max_steps
            if saved:
                self.save()
            if cfg.val_every and self.step % cfg.val_every == 0:
                self._log({"val_loss": self.validation_loss()})
            if self.fid is not None and self.step % cfg.fid_every == 0:
                fid = self.fid(self.pipe, self.ema)
                if fid is not None:
                    self._log({cfg.fid_metric: fid})
            if cfg.sample_every and (self.step % cfg.sample_every == 0 or self.step == cfg.max_steps):
                self.gallery()
            # Asked on every step by every rank (a collective); at train.max_steps the run is
            # finished, its final checkpoint saved: a SIGTERM then changes nothing (exit 0).
            if self._stop_agreed() and self.step < cfg.max_steps:
                if not saved:
                    self.save()
                self.checkpointer.finish()  # written and renamed into place before the line says so
                self.stopped = True
                self._log_line(f"stopped by SIGTERM after step {self.step}, its checkpoint saved; "
                               "the same command resumes the run")
                break
            self.checkpointer.poll()
            if cfg.gc_every and self.step % cfg.gc_every == 0:
                gc.collect()
        self.checkpointer.finish()

    def _stop_agreed(self) -> bool:
        """Whether a stop was requested (on any rank: all of them stop after the same step).

        The same collective says whether a checkpoint failed to finish on some rank (rank 0
        renames and prunes alone): then every rank stops with that rank's line."""
        if self.stop_request is None:
            return False
        flag = self.stop_request.requested
        if self.rt.world_size > 1:
            t = torch.tensor([float(flag), float(self.checkpointer.failure is not None)], device=self.rt.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            stop, failed = t.tolist()
            if failed:
                self.checkpointer.finish()  # raises the failure on every rank
            flag = bool(stop)
        return flag

    def close(self) -> None:
        """Stop the data workers, wait for the last checkpoint and close every logger, each even
        when one before it failed (a full disk); the first failure is raised after."""
        if isinstance(self.batches, BatchIterator):  # (a test may hand the trainer its own batches)
            self.batches.close()  # joins its workers (they ignore SIGTERM: the trainer ends them)
        failures = []
        try:
            self.checkpointer.wait()
        except Exception as exc:
            failures.append(exc)
        for comp, lg in self.loggers:
            try:
                with comp.calling("close"):
                    lg.close()
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    def _profiler(self):
        out = self.exp_dir / "profile"
        step = self.step + 1  # the step about to run, as it will be logged

        def on_ready(prof):
            out.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(out / f"step_{step:08d}_rank{self.rt.rank}.json"))

        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.rt.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        return torch.profiler.profile(activities=acts, on_trace_ready=on_ready)

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.rt.device.type != "cuda":
            return None
        from .flops import peak_flops

        peak = peak_flops(self.rt.device)
        return None if peak is None else 6.0 * self.n_params * tokens_per_s / (peak * self.rt.world_size)

    def _log(self, metrics: dict[str, float]) -> None:
        self._to_loggers("log", self.step, metrics)

    def _to_loggers(self, member: str, *args) -> None:
        for comp, lg in self.loggers:
            with comp.calling(member):
                getattr(lg, member)(*args)

    def finished_line(self, seconds: float) -> None:
        """Where a finished run's results are: the progress lines end at the last step and
        said nothing of them."""
        exp = self.exp_dir
        gallery = exp / "samples" / "index.html"
        where = f"checkpoint {exp / ckpt_mod.CKPT_DIR / ckpt_mod.step_dir(self.step)}"
        if self.rt.is_main and gallery.is_file():
            where += f", galleries {gallery}"
        elapsed = str(datetime.timedelta(seconds=round(seconds)))
        self._log_line(f"trained to step {self.step} in {elapsed}: {where}; "
                       f"sample it with: minfm sample {exp} --prompt \"...\"")

    def _log_line(self, text: str) -> None:
        if self.rt.is_main:
            print(terminal_safe(f"minfm: {text}"), flush=True)  # it quotes run.exp_dir


def train(resolved) -> int:
    """Train a resolved recipe; 0 when it reached ``train.max_steps``, STOPPED_EXIT_CODE when
    SIGTERM stopped it (with a checkpoint to resume from)."""
    rt = init_runtime(resolved.recipe.run.device)
    try:
        trainer = Trainer(resolved, rt)
        stop = StopRequest()
        with stop.installed():  # also while close() waits for the stop's checkpoint
            trainer.stop_request = stop
            first, started = trainer.step, time.perf_counter()
            try:
                trainer.fit()
            except BaseException:
                with contextlib.suppress(Exception):  # the error that stopped the run is the one to report
                    trainer.close()
                raise
            trainer.close()
        if not trainer.stopped and trainer.step > first:
            trainer.finished_line(time.perf_counter() - started)
    finally:
        runlock.release(resolved.recipe.run.exp_dir)
        shutdown_runtime()
    return STOPPED_EXIT_CODE if trainer.stopped else 0


#: Settings whose change on a resume alters what the weights mean or what they learn from
#: (another VAE, text encoder, RoPE, data or seed), or drops what the checkpoint holds (an
#: EMA turned off): each went on silently (exit 0). Said, not refused: a change may be meant
#: (the attention backend, compile, more data), and the tensors' shapes are checked anyway.
RESUME_WATCHED = ("model.", "data.", "flow.", "run.seed", "train.ema_decay")


def recipe_changes(recorded: Path, current: str, limit: int = 6) -> str | None:
    """``key: old -> new`` for the watched settings (:data:`RESUME_WATCHED`) that differ
    between the recipe a checkpoint recorded (``recorded``, its ``recipe.toml``) and this
    run's (``current``, the same TOML dump); None when none does, or the record is missing
    or unreadable (an older checkpoint: nothing to compare)."""
    from ..recipe.load import MAX_RECIPE_BYTES
    from ..recipe.toml import tomllib
    from ..textfiles import read_text

    try:
        old = tomllib.loads(read_text(recorded, str(recorded), MAX_RECIPE_BYTES))
    except (MinfmError, tomllib.TOMLDecodeError, RecursionError):
        return None
    before, after = _flat(old), _flat(tomllib.loads(current))
    keys = sorted(k for k in before.keys() | after.keys()
                  if k.startswith(RESUME_WATCHED) and before.get(k) != after.get(k))
    if not keys:
        return None
    shown = [f"{k}: {_short(before.get(k))} -> {_short(after.get(k))}" for k in keys[:limit]]
    return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def _flat(table: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value: object) -> str:
    text = "(unset)" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

