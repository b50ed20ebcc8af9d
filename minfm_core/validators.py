"""Range validators for config fields, each carrying a machine-readable description.

Every numeric field of a recipe section or a component config declares its valid range
with one of these (docs/components.md, "Value ranges"). A validator here

- is an ordinary attrs validator (``field(..., validator=positive)``);
- accepts ``None`` (optional fields are "unset", not out of range);
- checks every element of a tuple value (``adam_betas``, ``patch_size``);
- refuses NaN and infinities unless it says otherwise (no range contains them);
- has ``range_text`` (e.g. ``"> 0"``), shown by ``minfm plugins`` and in errors, and
  ``violations()``: values outside the range, from which the tests generate bad inputs.

It raises :class:`RangeError`, which the recipe error formatter turns into
``train.lr: must be finite and > 0, got nan`` (the field's own path, not its table's).
"""

from __future__ import annotations

import math
import re
import sys
import numbers
from typing import Any


#: Pixels per side a recipe's sizes or ``minfm sample --size`` may ask for: past any model's
#: training size, and the most a WebP holds (14-bit sides), which clips are also written as;
#: a larger side would fail in the encoder only after the whole clip was drawn.
MAX_SIDE = 16383
#: Frames per clip a recipe, a command line or a demo request may ask for.
MAX_FRAMES = 1024
#: Seeds: what TOML's 64-bit integers and ``torch.Generator.manual_seed`` (< 2**64, with the
#: per-image offsets added) both hold.
MAX_SEED = 2**63 - 1
#: Optimizer steps, and every "each N steps" period: a billion steps is years at any speed.
MAX_STEPS = 10**9
#: Data-loading processes per training process: each holds a copy of the dataset's state,
#: and past one per core they only compete for it (a GPU node has ~8-32 cores per GPU).
MAX_DATALOADER_WORKERS = 64
#: Samples in one batch (per rank or in total).
MAX_BATCH = 2**20
#: Samples in a split, a draw or a synthetic dataset: a shuffled epoch keeps 8 bytes per
#: sample (800 MB at this limit).
MAX_SAMPLES = 10**8
#: Images (or clips) of one sampling request, prompts x samples per prompt: its
#: ``metadata.json`` holds a record for each (~200 bytes) and is read back on resume
#: (at most 256 MiB), and its plan is made before the first image.
MAX_DRAW = 10**6
#: Images one in-training gallery draws (prompts x sample.samples_per_prompt; raw and EMA
#: weights each draw them). A gallery runs inside the training loop, which stops for nothing
#: while it draws: 3,000 prompts took 3 min 40 s a gallery on a tiny model, 1.1 M hours.
MAX_GALLERY = 1024
#: A width: hidden size, embedding size, channels (FLUX.1-dev's widest is 4096).
MAX_WIDTH = 2**16
#: Blocks or layers of one kind (FLUX.1-dev: 19 + 38).
MAX_DEPTH = 1024
#: Tokens of one sequence (a 16k x 16k image in 16-pixel patches is 2**20).
MAX_TOKENS = 2**24
#: Tokens of one prompt (FLUX.1-dev's T5 reads 512).
MAX_PROMPT_TOKENS = 65536
#: Characters of one prompt: every prompt is copied into the request's metadata.json and
#: index.html (a 10 MB line of a prompt file was, whole); 64 Ki characters is far past any
#: encoder's window (T5 reads 512 tokens).
MAX_PROMPT_CHARS = 65536
#: Solver steps of one sampling run.
MAX_SOLVER_STEPS = 10_000
#: A guidance scale (CFG's usual values are 1 to 15; FLUX.1-dev's distilled guidance 1 to 10).
MAX_GUIDANCE = 100


class RangeError(ValueError):
    """A value outside its field's declared range (carries the field name for the error path).

    ``own``: the value is wrong whatever the others hold (a :class:`Range`, a blank name);
    False where the rule reads other values too (a head count that must divide a width),
    which a recipe's loader then reports from its first try only (config.structure_all)."""

    def __init__(self, field: str, message: str, *, own: bool = False):
        self.field, self.own = field, own
        super().__init__(message)


def _num(x: float) -> str:
    if isinstance(x, int):  # exact: 2**63 - 1 is not 9.223372036854776e+18
        return str(x)
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


class Range:
    """``lo <= value <= hi`` (either bound optional, either end open), finite unless ``allow_inf``."""

    def __init__(
        self,
        lo: float | None = None,
        hi: float | None = None,
        *,
        lo_open: bool = False,
        hi_open: bool = False,
        allow_inf: bool = False,
        also: tuple[Any, ...] = (),
        note: str = "",
    ):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.allow_inf = allow_inf
        #: Sentinels accepted besides the range, e.g. ``-1`` meaning "all ranks" (documented in the field doc).
        self.also = tuple(also)
        self.note = note
        self.range_text = self._text()

    def _text(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            text = "finite" if not self.allow_inf else "any number"
        if self.also:
            text += " or " + " or ".join(repr(a) for a in self.also)
        return text

    def __repr__(self) -> str:
        return f"<range {self.range_text}>"

    def ok(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return True  # types are the converter's business; a range speaks about numbers only
        # numpy's scalars too (np.int64(-5) passed every range): as the Python number they are
        v = int(v) if isinstance(v, numbers.Integral) else float(v)
        if v in self.also and not (isinstance(v, float) and math.isnan(v)):
            return True
        if isinstance(v, float) and (math.isnan(v) or (math.isinf(v) and not self.allow_inf)):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def __call__(self, inst: Any, attribute: Any, value: Any) -> None:
        if value is None:
            return
        items = list(_flatten(value))
        for v in items:
            if not self.ok(v):
                # "finite and" only where a float could have been NaN/inf and the range says more.
                finite = ("finite and " if isinstance(v, float) and not math.isfinite(v)
                          and self.range_text != "finite" and not self.allow_inf else "")
                what = "each element must be" if isinstance(value, (tuple, list)) else "must be"
                raise RangeError(attribute.name, f"{what} {finite}{self.range_text}, got {v!r}"[:200], own=True)

    def violations(self, integer: bool) -> list[Any]:
        """Values outside this range (for generated tests); ints only when ``integer``."""
        out: list[Any] = []
        if self.lo is not None:
            out.append(self.lo if self.lo_open else self.lo - 1)
        if self.hi is not None:
            out.append(self.hi if self.hi_open else self.hi + 1)
        if not integer:
            out.append(math.nan)
            if not self.allow_inf:
                out.append(math.inf)
        out = [int(v) if integer and not (isinstance(v, float) and math.isnan(v)) else v for v in out]
        return [v for v in out if v not in self.also and not self.ok(v)]


def _flatten(value: Any):
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _flatten(v)
    else:
        yield value


def in_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
             also: tuple[Any, ...] = ()) -> Range:
    return Range(lo, hi, lo_open=lo_open, hi_open=hi_open, also=also)


#: > 0: counts and sizes where 0 would mean nothing.
positive = Range(0, lo_open=True)
#: >= 0: counts where 0 has a documented meaning ("off", "at the end only", "keep all").
non_negative = Range(0)
#: A seed: [0, MAX_SEED].
SEED = Range(0, MAX_SEED)
#: A step number or an "every N steps" period (0 where the field documents it).
EVERY = Range(0, MAX_STEPS)
#: Any finite number (no range beyond "not NaN, not infinite").
finite = Range()
#: A probability or fraction: [0, 1].
probability = Range(0, 1)
#: A decay or momentum: [0, 1).
decay = Range(0, 1, hi_open=True)


def at_least(lo: float) -> Range:
    return Range(lo)


def greater_than(lo: float) -> Range:
    return Range(lo, lo_open=True)


def range_text(validator: Any) -> str | None:
    """What a field's validator accepts, for ``minfm plugins``: a :class:`Range`'s text, or
    the bounds of attrs' own ``gt``/``ge``/``lt``/``le`` (third-party plugins use those)."""
    rng = range_of(validator)
    if rng is not None:
        return rng.range_text
    parts: list[str] = []
    for v in _walk(validator):
        op, bound = getattr(v, "compare_op", None), getattr(v, "bound", None)
        if op in ("<", "<=", ">", ">=") and isinstance(bound, (int, float)):
            parts.append(f"{op} {_num(bound)}")
    return " and ".join(parts) or None


def _walk(validator: Any):
    if validator is None:
        return
    if isinstance(validator, (list, tuple)):
        for v in validator:
            yield from _walk(v)
        return
    yield validator
    for inner in (*getattr(validator, "_validators", ()), getattr(validator, "validator", None)):
        if inner is not None and inner is not validator:
            yield from _walk(inner)


def range_of(validator: Any) -> Range | None:
    """The :class:`Range` inside a field's validator (a list, ``and_`` or ``optional`` of them), if any."""
    if validator is None:
        return None
    if isinstance(validator, Range):
        return validator
    for inner in (*getattr(validator, "_validators", ()), getattr(validator, "validator", None)):
        found = range_of(inner) if inner is not validator else None
        if found is not None:
            return found
    return None


def non_blank(instance: Any, attribute: Any, value: Any) -> None:
    """A string setting that names something (a folder) cannot be empty: ``""`` would mean the current folder."""
    if isinstance(value, str) and not value.strip():
        raise RangeError(attribute.name, f"must not be empty, got {value!r}", own=True)


#: Longest file name (one path component) and path the file systems minFM runs on take, in bytes.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


def path_name(instance: Any, attribute: Any, value: Any) -> None:
    """A setting naming a file or folder fits the file system: no NUL, each part at most 255
    bytes, the whole at most 4096. Python's ``exists()`` raised "File name too long" for
    a longer one, quoting it whole (100 KB) and naming no setting."""
    if not isinstance(value, str):
        return
    if "\0" in value:
        raise RangeError(attribute.name, "a NUL character in a path", own=True)
    size = len(value.encode("utf-8", "surrogatepass"))
    longest = max((len(p.encode("utf-8", "surrogatepass")) for p in value.split("/")), default=0)
    if size > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
        raise RangeError(attribute.name, f"a path of {size:,} bytes with a part of {longest:,}: file systems take "
                         f"at most {MAX_PATH_BYTES:,} and {MAX_NAME_BYTES} (got {value[:60]!r}...)", own=True)


_FACTORY_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def factory_spec_problem(spec: str) -> str | None:
    """What is wrong with a ``MODULE:ATTR`` naming a factory of the user's (a feature
    extractor): not of that form, or a standard-library module (``os:system`` is a way to run
    a function, not to plug in a network). None when it may be imported."""
    if not isinstance(spec, str) or not _FACTORY_SPEC.fullmatch(spec):
        return "expected MODULE:ATTR"
    top = spec.partition(":")[0].split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return f"{top} is a standard-library module, not a feature-extractor factory"
    return None


def factory_spec(instance: Any, attribute: Any, value: Any) -> None:
    """A recipe's ``MODULE:ATTR`` setting (:func:`factory_spec_problem`), checked when it loads."""
    if value is not None and (problem := factory_spec_problem(value)):
        raise RangeError(attribute.name, f"{value[:80]!r}: {problem}", own=True)


def prompt_problem(text: str) -> str | None:
    """What is wrong with one prompt as text (a NUL, past :data:`MAX_PROMPT_CHARS`), or None."""
    if "\0" in text:
        return "a NUL character"
    if len(text) > MAX_PROMPT_CHARS:
        return f"{len(text):,} characters, more than {MAX_PROMPT_CHARS:,}"
    return None


def prompt_text(instance: Any, attribute: Any, value: Any) -> None:
    """A recipe's prompt(s): each :func:`prompt_problem`-free."""
    for i, text in enumerate(value if isinstance(value, tuple) else (value,)):
        problem = prompt_problem(text) if isinstance(text, str) else None
        if problem:
            raise RangeError(attribute.name, f"prompt {i}: {problem}" if isinstance(value, tuple) else problem, own=True)


def draw_problem(n_prompts: int, per_prompt: int, what: str) -> str | None:
    """A sampling request of more than :data:`MAX_DRAW` images, as one line naming ``what``
    (``sample.samples_per_prompt``, ``--n``); None when it fits."""
    total = n_prompts * per_prompt
    if total <= MAX_DRAW:
        return None
    return (f"{what}: {n_prompts:,} prompt(s) x {per_prompt:,} samples = {total:,}, more than one sampling request "
            f"draws (at most {MAX_DRAW:,}); split the prompts or the samples over several requests")
