"""Reading and writing model weights as safetensors (never pickle).

Weights usually come from outside (a pulled Hub repo, a cloned folder, a shard index
someone else wrote), so every read goes through :func:`load_safetensors_file` /
:func:`open_safetensors`: the file must stay inside its folder (no symlink out), its
header length is bounded before anything is parsed, and whatever the safetensors
library rejects (random bytes, a pickle renamed ``model.safetensors``, a truncated
file) becomes one :class:`MinfmError` naming the file. Shard names in an index are
checked with :func:`minfm_core.safepath.contained`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import MinfmError, first_line
from .safepath import contained, write_atomic
from .textfiles import read_bounded

#: Recipe dtype names (``minfm_core.config.Dtype``) -> torch dtypes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Largest safetensors JSON header accepted. Real headers are a few MB even for
#: 12B-parameter models; the length is read first so a hostile 8-byte prefix cannot make
#: the parser allocate gigabytes.
MAX_HEADER_BYTES = 100 * 2**20
#: Largest ``*.safetensors.index.json`` accepted (real ones: well under 10 MB).
MAX_INDEX_BYTES = 100 * 2**20
#: What the safetensors library raises for a file it cannot parse.
_PARSE_ERRORS = (SafetensorError, ValueError, OSError, RuntimeError, OverflowError, UnicodeDecodeError)


def check_header(path: Path) -> None:
    """Refuse ``path`` unless it starts like a safetensors file with a bounded JSON header.

    Reads 8 bytes (the little-endian header length) and the header's first byte only. Only a
    regular file is read (a link to one counts): opened without blocking and checked on its
    descriptor, since a FIFO named ``x.safetensors`` would block its reader forever.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MinfmError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise MinfmError(f"{path}: not a safetensors file (only {len(prefix)} bytes)")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES:
                raise MinfmError(f"{path}: not a safetensors file (header of {n} bytes, "
                                 f"more than the {MAX_HEADER_BYTES} minFM accepts)")
            if n < 2 or n > size - 8:
                raise MinfmError(f"{path}: not a safetensors file (header length {n} does not fit "
                                 f"a file of {size} bytes)")
            if f.read(1) != b"{":
                raise MinfmError(f"{path}: not a safetensors file (the header is not a JSON object)")
    except OSError as exc:
        raise MinfmError(f"{path}: cannot read weights ({exc.strerror or type(exc).__name__})") from None


def save_safetensors_file(tensors: dict[str, torch.Tensor], path: str | Path,
                          metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, atomically: an existing file is replaced whole or kept."""
    from safetensors.torch import save_file

    def save(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:
            # A full disk or a lost permission is an I/O error the Rust writer reports as its
            # own exception ("... (os error 28) ..."): as an OSError, every caller's handling of
            # file errors applies (one line, exit 2), where this one was a traceback.
            errno = _os_errno(exc)
            if errno is None:
                raise
            raise OSError(errno, os.strerror(errno), str(path)) from None

    write_atomic(Path(path), save)


def _os_errno(exc: Exception) -> int | None:
    """The OS error number a safetensors error carries (``... (os error 28) ...``), if any."""
    m = re.search(r"\(os error (\d+)\)", str(exc))
    return int(m.group(1)) if m else None


def load_safetensors_file(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, or one MinfmError naming it (see the module doc)."""
    path = Path(path)
    check_header(path)
    try:
        return load_file(str(path), device=device)
    except _PARSE_ERRORS as exc:
        raise MinfmError(f"{path}: not a valid safetensors file ({first_line(exc)})") from None


@contextlib.contextmanager
def open_safetensors(path: str | Path, framework: str = "pt", device: str = "cpu") -> Iterator:
    """``safe_open(path)`` with the header bounded and parse errors as one MinfmError naming ``path``."""
    path = Path(path)
    check_header(path)
    try:
        handle = safe_open(str(path), framework=framework, device=device)
    except _PARSE_ERRORS as exc:
        raise MinfmError(f"{path}: not a valid safetensors file ({first_line(exc)})") from None
    with handle as f:
        try:
            yield f
        except _PARSE_ERRORS as exc:  # e.g. a tensor whose bytes were cut off
            raise MinfmError(f"{path}: not a valid safetensors file ({first_line(exc)})") from None


def has_weights(folder: Path, name: str = "model") -> bool:
    """Whether ``folder`` holds ``<name>`` weights: one safetensors file or an index of shards."""
    return (folder / f"{name}.safetensors").is_file() or (folder / f"{name}.safetensors.index.json").is_file()


def index_shards(index: Path) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` names, each checked to stay in its folder.

    The index is untrusted text: bad JSON, a missing ``weight_map``, a non-string value,
    an absolute or ``..`` path, a symlink out of the folder or a name that is not a
    ``.safetensors`` file are refused with one MinfmError naming the index.
    """
    return list(read_index(index)[1].values())


def read_index(index: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """(weight_map: tensor -> shard name, shard name -> its checked path) of an index (see
    :func:`index_shards`)."""
    index = Path(index)
    raw = read_bounded(index, f"{index}: shard index", MAX_INDEX_BYTES)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MinfmError(f"{index}: not a valid shard index (bad JSON: {first_line(exc)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise MinfmError(f"{index}: not a valid shard index (no 'weight_map' object)")
    bad = sorted(repr(k) for k, v in weight_map.items() if not isinstance(v, str))
    if bad:
        raise MinfmError(f"{index}: weight_map values must be file names; not for {first_names(bad, 3)}")
    shards = {}
    for name in sorted(set(weight_map.values())):
        path = contained(index.parent, name, what=str(index))
        if not name.endswith(".safetensors"):
            raise MinfmError(f"{index}: refusing shard {name!r}: not a .safetensors file")
        shards[name] = path
    return weight_map, shards


def check_index_agrees(index: Path, weight_map: dict[str, str], shards: dict[str, Path]) -> None:
    """Each shard holds exactly the tensors the index maps to it (headers only). A tensor
    in two shards was taken from whichever was read last, whatever the index said."""
    found: set[str] = set()
    for name, shard in shards.items():
        if not shard.is_file():
            raise MinfmError(f"{index}: names a shard that is missing: {name}")
        with open_safetensors(shard) as f:
            keys = set(f.keys())
        stray = [k for k in keys if weight_map.get(k) != name]
        if stray:
            raise MinfmError(f"{index}: {name} holds tensors the index maps to another shard or not at all: "
                             f"{first_names(stray)}")
        found |= keys
    missing = set(weight_map) - found
    if missing:
        raise MinfmError(f"{index}: maps tensors that no shard holds: {first_names(missing)}")


def weights_file(folder: Path, name: str) -> Path:
    """``folder/<name>.safetensors``, refused when it is a symlink leading out of ``folder``."""
    return contained(Path(folder), f"{name}.safetensors", what=f"{folder}/{name}.safetensors")


def check_weights_folder(folder: Path) -> None:
    """Vet a folder before a library (transformers, diffusers) reads its safetensors itself.

    Each ``*.safetensors`` file must stay inside the folder and have a bounded header, and
    each ``*.safetensors.index.json`` may only name shards inside it; refusals are one
    MinfmError naming the file, instead of whatever the library would do with them.
    """
    folder = Path(folder)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        index = contained(folder, index.name, what=str(index))
        weight_map, shards = read_index(index)
        for shard in shards.values():
            if shard.exists():
                check_header(shard)
        if all(s.exists() for s in shards.values()):  # (a missing one is the library's to name)
            check_index_agrees(index, weight_map, shards)
    for weights in sorted(folder.glob("*.safetensors")):
        check_header(contained(folder, weights.name, what=str(weights)))


def read_safetensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """``<name>.safetensors`` or the shards listed in ``<name>.safetensors.index.json``."""
    out: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(folder), name):
        out.update(load_safetensors_file(path))
    return out


def _weight_files(folder: Path, name: str) -> list[Path]:
    """``<name>.safetensors``, or the shards of its index (each holding what the index maps to it)."""
    single = folder / f"{name}.safetensors"
    if single.is_file() or single.is_symlink():
        return [weights_file(folder, name)]
    index = folder / f"{name}.safetensors.index.json"
    if not index.is_file():
        raise MinfmError(f"{folder}: no {name}.safetensors")
    index = contained(folder, index.name, what=str(index))
    weight_map, shards = read_index(index)
    check_index_agrees(index, weight_map, shards)
    return list(shards.values())


#: safetensors' dtype names -> torch's (what a header says, read without the data).
_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                  "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def header_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """``<name>`` weights of ``folder`` as meta tensors of their shapes and dtypes, read from
    the safetensors headers alone (no data): what :func:`check_keys` compares with a model
    built on the meta device before a real one is built."""
    out = {}
    for path in _weight_files(Path(folder), name):
        with open_safetensors(path) as f:
            for key in f.keys():
                part = f.get_slice(key)
                out[key] = torch.empty(part.get_shape(), dtype=_HEADER_DTYPES.get(part.get_dtype(), torch.uint8),
                                       device="meta")
    return out


#: Largest ``config.json`` of a pretrained folder read (real ones: a few KB).
MAX_CONFIG_BYTES = 1 << 20
#: What transformers and diffusers raise for a config or weights they cannot take.
LIBRARY_LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, OverflowError)


def pretrained_meta_model(build, folder: Path, where: str) -> torch.nn.Module:
    """``build()`` (a model from ``folder``'s ``config.json``) on the meta device, refused when
    it has more parameters than the folder's safetensors files have bytes: every parameter
    takes at least one, so such a config is not what the weights hold. A downloaded
    config.json of 29.5 B parameters was built in full (110 GiB) before any check."""
    config = Path(folder) / "config.json"
    if config.is_file() and config.stat().st_size > MAX_CONFIG_BYTES:
        raise MinfmError(f"{where}: {config} is {config.stat().st_size:,} bytes, more than the {MAX_CONFIG_BYTES:,} accepted")
    try:
        with torch.device("meta"):
            model = build()
    except LIBRARY_LOAD_ERRORS as exc:
        raise MinfmError(f"{where}: {config} does not describe a model this library builds ({first_line(exc, 200)})") from None
    params = sum(p.numel() for p in model.parameters())
    held = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors") if p.is_file())
    if params > held:
        raise MinfmError(f"{where}: {config} describes a model of {params:,} parameters, but the folder's "
                         f"weights hold {held:,} bytes: they cannot be that model")
    return model


def check_keys(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str, *, params_only: bool = False) -> None:
    """Refuse to load on missing/unexpected keys or shape mismatches, naming them.

    ``params_only``: ``sd`` holds the parameters only (an EMA file), so buffers may be
    missing and keep their values; every parameter must still be there."""
    own = model.state_dict()
    missing = (set(dict(model.named_parameters())) if params_only else set(own)) - set(sd)
    unexpected = set(sd) - set(own)
    shapes = [f"{k} {tuple(sd[k].shape)} (model wants {tuple(own[k].shape)})"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    # integer or boolean values for a floating-point weight were cast without a word
    kinds = [f"{k} {str(sd[k].dtype).removeprefix('torch.')} (model wants floating point)"
             for k in sorted(set(sd) & set(own)) if own[k].is_floating_point() and not sd[k].is_floating_point()]
    problems = [f"{what}: {first_names(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes),
                 ("dtype mismatches", kinds)) if keys]
    if problems:
        raise MinfmError(f"{where}: weights do not fit the model: " + "; ".join(problems))


def first_names(items, limit: int = 10) -> str:
    """``a, b, c and 7 more``: a bounded list of names for an error message."""
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


#: Floating dtypes torch.isfinite reads directly; others (float8, as in FLUX's fp8 releases)
#: are widened for the check, one tensor at a time.
_ISFINITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def all_finite(v: torch.Tensor) -> bool:
    """Whether every value of floating-point ``v`` is finite (float8 widened to be read)."""
    return bool(torch.isfinite(v if v.dtype in _ISFINITE_DTYPES else v.float()).all())


def check_finite(sd: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or infinity (a run that diverged): sampling from them draws
    noise, and training from them skips every step. Sharded tensors (DTensors) are left to
    their full-tensor loaders: one rank refusing alone would leave the others waiting."""
    bad = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and not hasattr(v, "full_tensor")
           and v.is_floating_point() and not all_finite(v)]
    if bad:
        raise MinfmError(f"{where}: NaN or infinite values in {first_names(bad, 5)} (a run that diverged?)")


def load_safetensors_into(model: torch.nn.Module, folder: Path, name: str = "model") -> None:
    sd = read_safetensors(Path(folder), name)
    check_finite(sd, f"{folder}/{name}.safetensors")
    # EMA files hold the trainable parameters only; buffers keep their values.
    check_keys(model, sd, f"{folder}/{name}.safetensors", params_only=(name == "ema"))
    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        # A sharded (FSDP2) model: each rank keeps only its shards of the full tensors.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=name != "ema"))
    else:
        model.load_state_dict(sd, strict=name != "ema")
