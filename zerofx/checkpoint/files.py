"""The checkpoint files on disk: names, format, checked reading, safe writing, full tensors.

    <dir>/latest                      the newest complete tag (text, one line)
    <dir>/<tag>/meta.pt               rank 0: format, sizes, the plan's parameter list, client_state
    <dir>/<tag>/zero_dp_rank_{r}.pt   DP rank r: its owned flat ranges and their fp32 state
                                      (master, exp_avg, exp_avg_sq), plus the step counters
    with tensor parallelism (tp > 1): <tag>/meta.pt lists whole parameters and how each is
    split; <tag>/tp_rank_{t}/ holds TP rank t's pieces in the layout above (its own meta.pt
    and one file per DP rank). Reading joins the pieces, so any TP size can load it.

This module knows nothing of a live runtime, so tools (zerofx-consolidate) read checkpoints
without torch.distributed or a model. Everything is read with ``weights_only=True``: a
checkpoint can come from anywhere, and a pickle could run code.
"""
from __future__ import annotations

import errno
import math
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from zerofx.checkpoint.schema import (CheckpointError, check_digest, check_meta, check_rank,
                                      check_same_save)

FORMAT_VERSION = 2  # 2: every file carries save_id and a crc32 of its content
META_FILE = "meta.pt"
LATEST_FILE = "latest"
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")
_RANK_FILE = re.compile(r"zero_dp_rank_\d+\.pt")
_TP_DIR = re.compile(r"tp_rank_\d+")


def tp_dir(tp_rank: int) -> str:
    return f"tp_rank_{tp_rank}"


def rank_file(dp_rank: int) -> str:
    return f"zero_dp_rank_{dp_rank}.pt"


def check_tag(tag) -> str:
    """A tag is one plain directory name that ``latest``'s one line holds exactly; a leading
    dot is reserved for temp directories."""
    tag = str(tag)
    if (not tag or tag in (".", "..", LATEST_FILE) or tag.startswith(".")
            or "/" in tag or os.sep in tag):
        raise CheckpointError(f"checkpoint tag {tag!r} is not a plain directory name; use "
                              f"something like 'global_step100' (no '/', no leading '.')")
    if tag != tag.strip() or not tag.isprintable():
        # `latest` is one line, read back without its newline: "run1 " or "a\nb" would
        # come back as another tag (an older "run1" silently loaded instead).
        raise CheckpointError(f"checkpoint tag {tag!r} has surrounding whitespace or a "
                              f"control character, which `latest` cannot hold exactly; use "
                              f"a plain name like 'global_step100'")
    return tag


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` holds only what save_checkpoint writes there (meta.pt, rank files,
    TP rank directories of the same): the only kind of directory a save may replace."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    entries = list(path.iterdir())
    if not any(p.name == META_FILE for p in entries):
        return False
    for p in entries:
        if p.name == META_FILE or _RANK_FILE.fullmatch(p.name):
            if p.is_symlink() or not p.is_file():
                return False
        elif not (_TP_DIR.fullmatch(p.name) and is_checkpoint_dir(p)):
            return False
    return True


def resolve_tag(load_dir, tag=None) -> Path | None:
    """The tag directory to read; None when ``tag`` is None and no ``latest`` exists."""
    root = Path(load_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint directory; pass the directory "
                              f"save_checkpoint wrote to")
    if tag is None:
        latest = root / LATEST_FILE
        tag = _read_latest(latest)
        if tag is None:
            return None
        if not tag:
            raise CheckpointError(f"{latest} is empty; pass tag= explicitly")
        try:  # `latest` names a directory inside load_dir, never a path elsewhere
            check_tag(tag)
        except CheckpointError:
            raise CheckpointError(f"{latest} names {tag!r}, not a tag directory inside "
                                  f"{root}; write a tag name there or pass tag=") from None
        where = f"{latest} names tag {tag!r}, but"
    else:
        tag = check_tag(tag)
        where = f"tag {tag!r}:"
    path = root / tag
    aside = root / f".{tag}.old"
    if not path.is_dir() and aside.is_dir() and (aside / META_FILE).is_file():
        # A re-save of this tag crashed between its two renames: the aside copy is the
        # previous, complete checkpoint (the next save of the tag puts it back in place).
        warnings.warn(f"{path} is missing; loading {aside}, the copy a crashed re-save of "
                      f"tag {tag!r} set aside", stacklevel=3)
        return aside
    if not path.is_dir():
        hint = (f" ({aside} exists but is incomplete: a save was interrupted while "
                f"swapping)") if aside.is_dir() else ""
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise CheckpointError(f"{where} {path} does not exist{hint}; tags present: "
                              f"{', '.join(have) or 'none'}")
    return path


def _read_latest(latest: Path) -> str | None:
    """The tag ``latest`` holds (one trailing newline dropped: `echo tag > latest`), None if
    there is no ``latest``."""
    if latest.is_symlink():
        # zerofx writes `latest` as a plain file; following a link would read (and echo in
        # the errors below) whatever file it points to.
        raise CheckpointError(f"{latest} is a symbolic link, not the file save_checkpoint "
                              f"writes; replace it with a file holding the tag, or pass tag=")
    if not latest.is_file():
        return None
    try:
        return latest.read_text(encoding="utf-8").removesuffix("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{latest} cannot be read ({e}); pass tag= explicitly") \
            from None


def write_atomically(path: Path, write: Callable[[BinaryIO], None], note: str = "") -> None:
    """Write ``path`` whole or not at all: ``write`` fills a fresh temp file beside it, which
    is then renamed over it. A failure removes the temp file and raises write_failed's error
    (``note`` appended to its message)."""
    path = Path(path)
    try:
        tmp, fd = _fresh_temp(path)
    except OSError as e:
        raise write_failed(path, e, note) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError for I/O errors
        tmp.unlink(missing_ok=True)
        raise write_failed(path, e, note) from None


def _fresh_temp(path: Path) -> tuple[Path, int]:
    """A new file beside ``path`` at a random name, opened O_CREAT|O_EXCL|O_NOFOLLOW (as
    mkstemp does, but with the umask's permissions, not 0600): a file or symlink planted at
    a predictable name is never written through."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):  # tempfile's bound on name collisions
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue  # taken by chance (or planted): draw another name
    raise FileExistsError(errno.EEXIST, "no free temporary file name beside it")


class CheckpointWriteError(CheckpointError, OSError):
    """A file that could not be written. Also an OSError: callers that handle a full disk
    as one keep working."""


# What to do about the causes a write meets in practice; anything else: the generic advice.
_WRITE_FIXES = {errno.ENOSPC: "free space on that file system or write elsewhere",
                errno.EDQUOT: "free space within your disk quota or write elsewhere",
                errno.EFBIG: "raise the file size limit (ulimit -f) or write elsewhere"}


def write_failed(path, error: BaseException, note: str = "") -> CheckpointWriteError:
    """The error for a failed write of ``path``, naming the OS's cause: on a full disk
    torch.save raises "unexpected pos", with the OSError only as its context."""
    cause, seen = error, set()
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        reason, code = cause.strerror or str(cause), cause.errno
    else:
        reason, code = f"{type(error).__name__}: {error}", None
    fix = _WRITE_FIXES.get(code, "check that the path is writable")
    err = CheckpointWriteError(f"cannot write {path}: {reason}; {fix}{note}")
    err.errno = code
    return err


def load_file(path: Path, *, mmap: bool = False) -> dict:
    """torch.load with weights_only, every failure turned into a CheckpointError.
    ``mmap``: tensors map the file (private, copy-on-write) instead of being read into
    memory: a load copies out only the ranges its rank keeps (checkpoint/sources.py), so a
    rank file larger than memory loads."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete (a rank did "
                              f"not write it?); load another tag or save again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, forbidden global...
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); the file is "
                              f"truncated or corrupt: load another tag") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a zerofx checkpoint "
                              f"dict; is this a zerofx checkpoint?")
    if path.name == META_FILE and obj.get("format") != FORMAT_VERSION:
        return obj  # read_meta names the format mismatch, the clearer message
    return check_digest(obj, path)


def read_meta(tag_dir: Path) -> dict:
    path = Path(tag_dir) / META_FILE
    if not path.is_file():
        _refuse_deepspeed_layout(Path(tag_dir))
    meta = load_file(path)
    version = meta.get("format")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version!r}, this zerofx reads format "
                              f"{FORMAT_VERSION}; load it with the zerofx version that wrote it "
                              f"and consolidate it (zerofx-consolidate)")
    _require(meta, ("dp_size", "zero_stage", "params", "padded_numel", "sharded",
                    "client_state"), path)
    check_meta(meta, path, whole="tp_size" in meta)
    return meta


# DeepSpeed's file names in a tag directory (engine.save_checkpoint, ZeRO stages 0-3)
_DEEPSPEED_FILES = ("mp_rank_*_model_states.pt", "*zero_pp_rank_*_optim_states.pt",
                    "zero_pp_rank_*_model_states.pt")


def _refuse_deepspeed_layout(tag_dir: Path) -> None:
    """A DeepSpeed checkpoint given to zerofx: say so, and how to convert it (explicitly:
    a conversion writes a new checkpoint, so loading never does it behind the user's back)."""
    found = sorted({p.name for pattern in _DEEPSPEED_FILES for p in tag_dir.glob(pattern)})
    if not found:
        return
    root = tag_dir.parent
    raise CheckpointError(
        f"{tag_dir} is a DeepSpeed checkpoint ({', '.join(found[:3])}), not zerofx's format. "
        f"Convert it once, weights, Adam moments, step counts and scheduler state included: "
        f"`zerofx-from-deepspeed {root} {root}_zerofx --tag {tag_dir.name}`, then load "
        f"{root}_zerofx (DeepSpeed's zero_to_fp32.py would carry only the weights)")


def _require(obj: dict, keys, path) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: not a complete zerofx checkpoint file; "
                              f"load another tag")


def read_rank(tag_dir: Path, meta: dict, dp_rank: int) -> dict:
    """One rank file, checked against meta: its ranges fit the flat buffer and its tensors."""
    path = Path(tag_dir) / rank_file(dp_rank)
    shard = load_file(path, mmap=True)
    _require(shard, ("dp_rank", "ranges", *STATE_KEYS, "step_count", "lr", "skipped",
                     "micro_steps", "gas", "scaler"), path)
    if shard["dp_rank"] != dp_rank:
        raise CheckpointError(f"{path} was written by DP rank {shard['dp_rank']}, not "
                              f"{dp_rank}: files from different saves are mixed; save again")
    check_same_save(shard, path, meta.get("save_id"), Path(tag_dir) / META_FILE)
    shard["owned_numel"] = check_rank(shard, path, meta["padded_numel"], STATE_KEYS)
    return shard


def needed_ranks(meta: dict) -> list[int]:
    """Unsharded (stage 0 or one rank): every rank holds everything, so rank 0 suffices."""
    return list(range(meta["dp_size"])) if meta["sharded"] else [0]


def read_shards(tag_dir: Path, meta: dict,
                on_file: Callable[[Path], None] | None = None) -> list[dict]:
    """The rank files needed to rebuild the full state, after checking all of them exist."""
    tag_dir = Path(tag_dir)
    for r in range(meta["dp_size"]):
        if not (tag_dir / rank_file(r)).is_file():
            raise CheckpointError(f"{tag_dir / rank_file(r)} is missing: the checkpoint was "
                                  f"saved by {meta['dp_size']} DP ranks; copy every rank's "
                                  f"file or load another tag")
    shards = []
    for r in needed_ranks(meta):
        shards.append(read_rank(tag_dir, meta, r))
        if on_file is not None:
            on_file(tag_dir / rank_file(r))
    # The needed ranks' ranges tile the flat buffer exactly: a padded size that disagrees
    # (a hand-edited 1e12, a meta.pt from another layout) is refused before allocating it.
    owned = sum(s["owned_numel"] for s in shards)
    if owned != meta["padded_numel"]:
        raise CheckpointError(f"{tag_dir / META_FILE} names a flat buffer of "
                              f"{meta['padded_numel']} elements, but the rank files own "
                              f"{owned}: the files are from different saves or corrupt; load "
                              f"another tag")
    return shards


def assemble(meta: dict, shards: list[dict], key: str, alloc=None) -> torch.Tensor:
    """The full flat fp32 ``key`` state in the saved layout (padding zero), in a tensor of
    ``alloc(numel)`` (zero-filled; None: in memory)."""
    flat = alloc(meta["padded_numel"]) if alloc is not None else \
        torch.zeros(meta["padded_numel"], dtype=torch.float32)
    for shard in shards:
        for start, numel, at in shard["ranges"]:
            flat[start:start + numel].copy_(shard[key][at:at + numel])
    return flat


def by_name(meta: dict, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cut a flat buffer in the saved layout into {parameter name: tensor of its shape}."""
    return {p["name"]: flat[p["offset"]:p["offset"] + p["numel"]].view(p["shape"])
            for p in meta["params"]}


def full_state(tag_dir, key: str = "master",
               on_file: Callable[[Path], None] | None = None) -> dict[str, torch.Tensor]:
    """{parameter name: full fp32 tensor} of one state kind, from the shard files alone."""
    return full_states(tag_dir, (key,), on_file)[0][key]


def full_states(tag_dir, keys=STATE_KEYS, on_file: Callable[[Path], None] | None = None,
                _parent: tuple | None = None, *, alloc=None):
    """({key: {parameter name: whole fp32 tensor}}, a rank file for the step counters).

    Each file is read once; tensor-parallel pieces are joined into whole parameters.
    ``_parent``: (save id, path) of the TP checkpoint's meta.pt a TP rank's must match.
    ``alloc(numel)``: where the whole tensors go (zero-filled fp32; the load of an
    NVMe-offloaded state passes file-backed ones, offload/scratch.py, so neither the files,
    mapped, nor the state need fit in memory); the tensors are then views of its buffers.
    """
    tag_dir = Path(tag_dir)
    meta = read_meta(tag_dir)
    if _parent is not None:
        check_same_save(meta, tag_dir / META_FILE, *_parent)
    tp = meta.get("tp_size", 1)
    if tp == 1:
        shards = read_shards(tag_dir, meta, on_file)
        # in memory, a tensor each: what callers keep does not pin the whole flat buffer
        own = (lambda t: t) if alloc is not None else torch.Tensor.clone
        states = {k: {n: own(t) for n, t in
                      by_name(meta, assemble(meta, shards, k, alloc)).items()} for k in keys}
        return states, shards[0]
    parent = (meta.get("save_id"), tag_dir / META_FILE)
    per_rank = [full_states(tag_dir / tp_dir(t), keys, on_file, parent, alloc=alloc)
                for t in range(tp)]
    joined: dict = {k: {} for k in keys}
    for p in meta["params"]:
        for k in keys:
            pieces = [states[k].get(p["name"]) for states, _ in per_rank]
            missing = [tp_dir(t) for t, piece in enumerate(pieces) if piece is None]
            if missing:
                raise CheckpointError(f"{tag_dir}: {p['name']} is missing from {missing}; "
                                      f"the files are from different saves")
            split = p.get("tp")
            out = alloc(math.prod(p["shape"])).view(p["shape"]) \
                if split and alloc is not None else None
            joined[k][p["name"]] = join_tp_pieces(pieces, split["dim"], split["parts"],
                                                  split.get("regions"), out=out) \
                if split else pieces[0]
    return joined, per_rank[0][1]


def with_aliases(tag_dir, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus every other name model.state_dict() uses for a tied tensor (the same
    tensor object, so torch.save stores it once), for ``load_state_dict(strict=True)``."""
    aliases = read_meta(Path(tag_dir)).get("aliases", {})
    if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(n, str) for n in v)
            for k, v in aliases.items()):
        raise CheckpointError(f"{Path(tag_dir) / META_FILE}: 'aliases' is not a map of names; "
                              f"the file is corrupt")
    out = dict(state)
    for canon, others in aliases.items():
        if canon in state:
            out.update(dict.fromkeys(others, state[canon]))
    return out


def join_tp_pieces(pieces: list[torch.Tensor], dim: int, parts: int,
                   regions=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole parameter from its TP ranks' pieces (inverse of TPShard.local_piece): each
    piece holds its block of every part, so blocks are regrouped part by part. ``regions``
    [(rows, whole)]: unequal parts, a whole one held entirely by every rank, one whose
    ``whole`` is a group count g in g groups, group k on ranks [k·tp/g, (k+1)·tp/g).
    ``out``: the tensor to write the whole parameter into (else a new one)."""
    if regions:
        blocks, at, tp = [], 0, len(pieces)
        for n, whole in regions:
            g = tp if whole is False else 1 if whole is True else int(whole)
            blocks += [pieces[k * tp // g].narrow(dim, at, n // g) for k in range(g)]
            at += n // g
        return torch.cat(blocks, dim, out=out)
    chunks = [p.chunk(parts, dim) for p in pieces]
    blocks = [c[k] for k in range(parts) for c in chunks]
    return torch.cat(blocks, dim, out=out)
