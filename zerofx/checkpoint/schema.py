"""What a readable checkpoint file must contain, checked before anything is allocated or
restored: a file can be readable and still wrong (edited by hand, from another zerofx, from
another save), and a bad count or range must end in a CheckpointError naming the file, not
in a ZeroDivisionError, a KeyError, or a terabyte allocation.

Every file of one save carries the same ``save_id`` (drawn by rank 0, shared with every
rank before writing): a rank file or meta.pt copied in from another save is refused by name.
Every file also carries a CRC-32 of its whole content: torch.load does not verify the zip's
checksums, so a flipped bit in a tensor's bytes would otherwise load as a silently different
weight. (CRC-32, not a cryptographic hash: it guards against corruption at several GB/s;
weights_only loading is what guards against hostile files.)
"""
from __future__ import annotations

import math
import zlib

import torch

from zerofx.config.schema import is_int


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read as asked; the message names file and fix."""


def _bad(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; the file is corrupt or from another zerofx "
                           f"version: load another tag")


def check_meta(meta: dict, path, *, whole: bool) -> None:
    """meta.pt of one layout (``whole``: a tensor-parallel checkpoint's list of whole
    parameters, which has no flat layout of its own)."""
    for key in ("dp_size", "padded_numel", "zero_stage"):
        if not is_int(meta[key]) or meta[key] < (1 if key == "dp_size" else 0):
            raise _bad(path, f"{key} is {meta[key]!r}, not a {'positive' if key == 'dp_size' else 'non-negative'} integer")
    if not isinstance(meta["sharded"], bool):
        raise _bad(path, f"sharded is {meta['sharded']!r}, not a bool")
    if whole and (not is_int(meta.get("tp_size")) or meta["tp_size"] < 1):
        raise _bad(path, f"tp_size is {meta.get('tp_size')!r}, not a positive integer")
    params = meta["params"]
    if not isinstance(params, list):
        raise _bad(path, "params is not a list")
    for i, p in enumerate(params):
        _check_param(p, i, path, meta["padded_numel"], whole=whole)


def _regions_fit(regions, shape, dim: int) -> bool:
    """Absent, or [[rows, whole], ...] adding up to the split dimension (whole: a bool, or
    the number of rank groups the rows are cut into, at least 2, dividing them)."""
    return regions is None or (isinstance(regions, list) and all(
        isinstance(r, list) and len(r) == 2 and is_int(r[0]) and r[0] > 0 and
        (isinstance(r[1], bool) or is_int(r[1]) and r[1] >= 2 and r[0] % r[1] == 0)
        for r in regions) and sum(r[0] for r in regions) == shape[dim])


def _check_param(p, i: int, path, padded: int, *, whole: bool) -> None:
    keys = ("name", "shape", "tp") if whole else ("name", "shape", "offset", "numel")
    if not isinstance(p, dict) or any(k not in p for k in keys):
        raise _bad(path, f"params[{i}] lacks one of {list(keys)}")
    shape = p["shape"]
    if not isinstance(p["name"], str) or not isinstance(shape, list) or \
            not all(is_int(d) and d >= 0 for d in shape):
        raise _bad(path, f"params[{i}] has name {p['name']!r} and shape {shape!r}")
    if whole:
        split = p["tp"]
        if split is not None and not (isinstance(split, dict) and is_int(split.get("dim"))
                                      and is_int(split.get("parts")) and split["parts"] >= 1
                                      and 0 <= split["dim"] < max(len(shape), 1)
                                      and _regions_fit(split.get("regions"), shape,
                                                       split["dim"])):
            raise _bad(path, f"params[{i}] ({p['name']}) has tensor-parallel split {split!r}")
        return
    offset, numel = p["offset"], p["numel"]
    if not (is_int(offset) and is_int(numel)) or numel != math.prod(shape) or \
            offset < 0 or offset + numel > padded:
        raise _bad(path, f"params[{i}] ({p['name']}) spans [{offset!r}, +{numel!r}) with "
                         f"shape {shape}, outside the flat buffer of {padded} elements")


def check_rank(shard: dict, path, padded: int, state_keys) -> int:
    """A rank file's ranges, state tensors and counters; returns its owned element count."""
    ranges = shard["ranges"]
    if not isinstance(ranges, list) or not all(
            isinstance(r, (list, tuple)) and len(r) == 3 and all(is_int(v) for v in r)
            for r in ranges):
        raise _bad(path, "ranges is not a list of [start, numel, at] integer triples")
    owned = 0
    for start, numel, at in ranges:
        if start < 0 or numel < 0 or at < 0 or start + numel > padded:
            raise CheckpointError(f"{path}: owned range [{start}, +{numel}) exceeds the flat "
                                  f"buffer of {padded} elements named in meta.pt; the files "
                                  f"are from different saves")
        owned = max(owned, at + numel)
    for key in state_keys:
        t = shard[key]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() < owned:
            raise _bad(path, f"{key!r} is not an fp32 tensor covering its {owned} owned "
                             f"elements")
    for key in ("step_count", "lr", "skipped"):
        if not isinstance(shard[key], torch.Tensor) or shard[key].numel() != 1:
            raise _bad(path, f"{key!r} is not a one-element tensor")
    if not is_int(shard["micro_steps"]) or shard["micro_steps"] < 0:
        raise _bad(path, f"micro_steps is {shard['micro_steps']!r}")
    if not is_int(shard["gas"]) or shard["gas"] < 1:
        raise _bad(path, f"gradient accumulation steps (gas) is {shard['gas']!r}, not >= 1")
    scaler = shard["scaler"]
    from zerofx.runtime.loss_scaler import STATE_KEYS as SCALER_KEYS

    if not isinstance(scaler, dict) or any(
            not isinstance(scaler.get(k), torch.Tensor) or scaler[k].numel() != 1
            for k in SCALER_KEYS):
        raise _bad(path, f"the loss scaler state lacks one of {list(SCALER_KEYS)}")
    buffers = shard.get("buffers")  # the model's (checkpoint/buffers.py); older saves: none
    if buffers is not None and not (isinstance(buffers, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in buffers.items())):
        raise _bad(path, "'buffers' is not a map of buffer names to tensors")
    return sum(numel for _, numel, _ in ranges)


def check_same_save(obj: dict, path, save_id, reference_path) -> None:
    """``obj`` (read from ``path``) belongs to the save ``reference_path`` belongs to."""
    mine = obj.get("save_id")
    if mine != save_id:
        raise CheckpointError(
            f"{path} belongs to another save than {reference_path} (save ids {mine!r} and "
            f"{save_id!r}): the files of two checkpoints are mixed. Copy every file of one "
            f"tag directory together, or load another tag")


DIGEST_KEY = "crc32"


def _feed(crc: int, obj) -> int:
    """CRC-32 over a canonical serialisation of ``obj`` (types, shapes and bytes)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(f"T{t.dtype}{tuple(obj.shape)}".encode(), crc)
        return zlib.crc32(memoryview(t.view(torch.uint8).numpy()), crc)
    if isinstance(obj, dict):
        crc = zlib.crc32(f"D{len(obj)}".encode(), crc)
        for k in sorted(obj, key=repr):
            crc = _feed(_feed(crc, k), obj[k])
        return crc
    if isinstance(obj, (list, tuple)):
        crc = zlib.crc32(f"{type(obj).__name__}{len(obj)}".encode(), crc)
        for v in obj:
            crc = _feed(crc, v)
        return crc
    return zlib.crc32(f"{type(obj).__name__}:{obj!r}".encode(), crc)


def with_digest(obj: dict) -> dict:
    """``obj`` plus the checksum of everything in it (what save_checkpoint writes)."""
    return {**obj, DIGEST_KEY: _feed(0, obj)}


def check_digest(obj: dict, path) -> dict:
    """``obj`` without its checksum, after checking it; CheckpointError if it differs."""
    if DIGEST_KEY not in obj:
        raise CheckpointError(f"{path} has no {DIGEST_KEY} checksum: not written by this zerofx "
                              f"(checkpoint format 2); load it with the zerofx that wrote it "
                              f"and consolidate it (zerofx-consolidate)")
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    if _feed(0, body) != obj[DIGEST_KEY]:
        raise CheckpointError(f"{path} fails its checksum: its contents changed after the "
                              f"save (disk or copy corruption); load another tag")
    return body
