"""DeepSpeed-shaped checkpoints of a ZeroRuntime: atomic saves, loads that re-shard.

    path = save_checkpoint(rt, "ckpt", client_state={"epoch": 3}, module=model)  # every rank
    path, client_state = load_checkpoint(rt, "ckpt", module=model)  # tag None: read `latest`

``module``: the model, whose persistent buffers (BatchNorm's running statistics...) are saved
and restored with the runtime's state (checkpoint/buffers.py says whose); the engine passes
it. The runtime holds no reference to its model, so without it only the runtime's state is
saved (and a load keeps the model's buffers).

Atomic: every rank writes into ``<dir>/.<tag>.tmp``; once all have written, rank 0 swaps it
in as ``<dir>/<tag>`` and then points ``latest`` at it (temp file + os.replace). A crash at
any point leaves the previous checkpoint loadable and ``latest`` naming a complete one. A
failed write names the file and the OS's cause (a full disk, ``ulimit -f``) and removes the
partial save. A save replaces only an older checkpoint of its tag, never a user's file or
folder that carries the tag's name.

Loading at another data-parallel size, ZeRO stage or tensor-parallel size needs no offline
conversion (DeepSpeed needs one): the whole fp32 master and moments are assembled by
parameter name from all old rank files (tensor-parallel pieces joined) and this runtime's
piece and owned ranges are cut from them, in the new layout. The
compute-dtype parameters are written from the full master, so loading needs no collective.
File format and checked reading: zerofx/checkpoint/files.py.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from zerofx.checkpoint import torch_optimizer
from zerofx.checkpoint.buffers import BUFFERS_KEY, buffers_to_save, read_buffers, restore_buffers
from zerofx.checkpoint.files import (FORMAT_VERSION, LATEST_FILE, META_FILE, STATE_KEYS,
                                  CheckpointError, check_tag, is_checkpoint_dir,
                                  rank_file, read_meta, resolve_tag, tp_dir, write_atomically,
                                  write_failed)
from zerofx.checkpoint.schema import with_digest
from zerofx.checkpoint.sources import saved_state

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint"]

log = logging.getLogger(__name__)

# What torch.load(weights_only=True) reads back: client_state is checked against this at
# save time, so a checkpoint never saves what it could not load.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def save_checkpoint(rt, save_dir, tag=None, client_state=None, save_latest: bool = True,
                    module=None) -> str:
    """Write ``rt``'s training state as ``<save_dir>/<tag>``; every DP rank must call it.

    ``client_state`` (rank 0's is kept) must be plain data: dicts, lists, tuples, numbers,
    strings, tensors. ``module``: the model, whose persistent buffers are saved too (each
    rank its own). Returns the tag directory.
    """
    _check_saveable(rt)
    tag = check_tag(f"global_step{rt.micro_steps // rt.gas}" if tag is None else tag)
    _check_plain(client_state, "client_state")
    root = Path(save_dir)
    final, tmp = root / tag, root / f".{tag}.tmp"
    dp_rank = rt.plan.grid.dp_rank(rt.plan.rank)
    first = rt.plan.rank == 0
    # A tmp left by a crashed save is cleared before anyone writes into it.
    _all_ok(rt, lambda: _prepare(tmp, final) if first else None, "preparing", tmp)
    save_id = _save_id(rt)
    try:
        _all_ok(rt, lambda: _write_files(rt, tmp, dp_rank, client_state, first, save_id,
                                         module), "writing", tmp)
        _all_ok(rt, lambda: _publish(root, tmp, final, tag, save_latest) if first else None,
                "publishing", final)
    except Exception:
        if first:  # every rank is past its writes (they agreed on failing): drop the partial
            shutil.rmtree(tmp, ignore_errors=True)  # save (gone already once published)
        raise
    log.info("saved checkpoint %s", final)
    return str(final)


def load_checkpoint(rt, load_dir, tag=None, module=None):
    """Restore ``rt`` from ``<load_dir>/<tag>`` (tag None: the one ``latest`` names), and
    ``module``'s persistent buffers when given (checkpoint/buffers.py: whose).

    Returns ``(tag directory, client_state)``; ``(None, None)`` with a warning when ``tag``
    is None and the directory holds no ``latest``, as DeepSpeed does.
    """
    path = resolve_tag(load_dir, tag)
    if path is None:
        warnings.warn(f"no checkpoint in {load_dir}: {Path(load_dir) / LATEST_FILE} does not "
                      f"exist; starting from scratch", stacklevel=2)
        return None, None
    meta = read_meta(path)
    _check_params(rt, meta, path)
    # a save with TP is joined into whole parameters first: staged for an NVMe state
    source, counters = saved_state(path, meta, alloc=rt.state.staging())
    # read and checked before anything is restored: a refused load leaves the engine as it was
    buffers = read_buffers(path, meta, rt.plan, module, source.files) \
        if module is not None else None
    optim = torch_optimizer.read_state(rt, path, meta, source.files)
    _restore_state(rt, source)
    _restore_counters(rt, counters)
    if buffers is not None:
        restore_buffers(module, buffers)
    if optim is not None:
        torch_optimizer.restore(rt, optim)
    log.info("loaded checkpoint %s (saved at TP %d x DP %d, stage %d; now TP %d x DP %d, "
             "stage %d)", path, meta.get("tp_size", 1), meta["dp_size"], meta["zero_stage"],
             rt.plan.grid.tp_size, rt.plan.grid.dp_size, rt.plan.zero_stage)
    return str(path), meta["client_state"]


# ---- saving -----------------------------------------------------------------------------
def _check_saveable(rt) -> None:
    if any(s.tp_split and s.tp is None for s in rt.plan.params):
        raise CheckpointError("checkpoints of a model split by its own mpu are not supported: "
                              "zerofx does not know how its pieces join; save the model's "
                              "state_dict per model-parallel rank yourself")
    if rt.micro_steps % rt.gas:
        # Accumulated gradients are not saved (DeepSpeed does not either): a save inside an
        # accumulation window would silently drop them on resume.
        raise CheckpointError(
            f"save_checkpoint at micro-step {rt.micro_steps}, inside an accumulation window of "
            f"{rt.gas}: save after the rt.step() that ends the window")


def _check_plain(obj, where: str) -> None:
    """Reject what torch.load(weights_only=True) could not read back, naming where it is."""
    if isinstance(obj, _PLAIN):
        return
    if type(obj) in (torch.Tensor, torch.nn.Parameter):
        return
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise CheckpointError(f"{where} has a key of type {type(k).__name__}: "
                                      f"use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise CheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: checkpoints are read "
        f"with weights_only=True, so client_state may hold only dicts, lists, tuples, numbers, "
        f"strings and plain tensors; save its state_dict() or convert it")


def _save_id(rt) -> str:
    """One random id for this save, the same on every rank: every file records it, so files
    of different saves are never loaded together."""
    draw = torch.tensor(secrets.randbits(62), dtype=torch.int64, device=rt.device)
    if rt.plan.grid.world_size > 1:
        dist.broadcast(draw, src=0)
    return f"{int(draw):016x}"


def _prepare(tmp: Path, final: Path) -> None:
    _check_replaceable(final)  # before writing what may be gigabytes
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)


def _check_replaceable(final: Path) -> None:
    """A save replaces an older checkpoint of its tag, never a user's file or folder that
    happens to carry the tag's name."""
    if os.path.lexists(final) and not is_checkpoint_dir(final):
        raise CheckpointError(f"{final} exists and is not a zerofx checkpoint (it is not a "
                              f"directory of zerofx's files only), so saving tag "
                              f"{final.name!r} would delete it: choose another tag, or move "
                              f"{final} away")


def _save(obj, path: Path) -> None:
    # fsync: the swap below must never publish a directory whose files are still in flight.
    try:
        with open(path, "wb") as f:
            torch.save(with_digest(obj), f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError for I/O errors
        raise write_failed(path, e, "; nothing was published: the previous checkpoint and "
                                    "`latest` are unchanged") from None


def _meta(plan, client_state, *, whole: bool, aliases: dict, save_id: str) -> dict:
    """meta.pt: the layout of this TP rank's pieces, or (``whole``) the TP checkpoint's
    list of whole parameters and how each is split."""
    def param(p):
        if not whole:
            return {"name": p.name, "shape": list(p.shape), "offset": p.offset,
                    "numel": p.numel}
        split = {"dim": p.tp.dim, "parts": p.tp.parts} if p.tp is not None else None
        if p.tp is not None and p.tp.regions:  # unequal parts [(rows, whole on every rank)]
            split["regions"] = [[n, w] for n, w in p.tp.regions]
        return {"name": p.name, "shape": list(p.tp.full_shape if p.tp else p.shape),
                "tp": split}
    return {"format": FORMAT_VERSION, "save_id": save_id, "world_size": plan.grid.world_size,
            **({"tp_size": plan.grid.tp_size} if whole else {}),
            "dp_size": plan.grid.dp_size, "zero_stage": plan.zero_stage,
            "sharded": plan.sharded, "padded_numel": plan.padded_numel,
            "compute_dtype": plan.compute_dtype, "params": [param(p) for p in plan.params],
            # other names of the same tensor (tied weights): consolidated under every name
            "aliases": {k: list(v) for k, v in aliases.items()},
            "client_state": client_state}


def _write_files(rt, tmp: Path, dp_rank: int, client_state, first: bool,
                 save_id: str, module) -> None:
    plan = rt.plan
    if plan.grid.tp_size > 1:
        if first:
            _save(_meta(plan, client_state, whole=True, aliases=rt.aliases, save_id=save_id),
                  tmp / META_FILE)
        tmp = tmp / tp_dir(plan.grid.tp_rank(plan.rank))
        tmp.mkdir(exist_ok=True)
    if dp_rank == 0:
        _save(_meta(plan, client_state, whole=False, aliases=rt.aliases, save_id=save_id),
              tmp / META_FILE)
    with rt.state.optimizer_state("read") as fp32:  # offloaded: read from its file
        _save({"dp_rank": dp_rank, "save_id": save_id,
               "ranges": [[r.start, r.numel, r.at] for r in plan.owned()],
               **{k: fp32[k] for k in STATE_KEYS},
               "step_count": rt.state.step_count, "lr": rt.state.lr,
               "skipped": rt.state.skipped, "micro_steps": rt.micro_steps, "gas": rt.gas,
               "scaler": rt.state.scaler.state_dict(),
               **({BUFFERS_KEY: buffers_to_save(module)} if module is not None else {}),
               **torch_optimizer.to_save(rt)},
              tmp / rank_file(dp_rank))


def _publish(root: Path, tmp: Path, final: Path, tag: str, save_latest: bool) -> None:
    """Swap ``tmp`` in as ``final``, then point ``latest`` at it; each step leaves a
    loadable state (resolve_tag names the aside copy if a crash hits between the renames)."""
    aside = root / f".{tag}.old"
    if aside.exists() and not os.path.lexists(final):
        os.rename(aside, final)  # an earlier re-save crashed mid-swap: put the copy back
    _check_replaceable(final)  # again: something may have appeared there while writing
    if aside.exists():
        shutil.rmtree(aside)
    if final.exists():
        os.rename(final, aside)
    os.rename(tmp, final)
    if save_latest:
        write_atomically(root / LATEST_FILE, lambda f: f.write(tag.encode("utf-8")),
                         f"; {final} is complete, but `latest` still names the previous "
                         f"tag: pass tag={tag!r} to load it")
    if aside.exists():
        shutil.rmtree(aside)


def _all_ok(rt, action, what: str, path: Path) -> None:
    """Run ``action`` here, then agree across the DP group whether every rank succeeded.

    An agreement (all-reduce MIN) instead of a bare barrier: a rank that fails must not leave
    the others waiting forever, and no rank may go on to publish a partial checkpoint.
    """
    error = None
    try:
        action()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the others know
        error = e
    if rt.plan.grid.world_size > 1:  # every rank: TP ranks write files of their own too
        ok = torch.tensor(0 if error else 1, dtype=torch.int32, device=rt.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if error is None and int(ok) == 0:
            raise CheckpointError(f"another rank failed while {what} {path}; see its error. "
                                  f"The previous checkpoint and `latest` are unchanged")
    if error is not None:
        raise error


# ---- loading ----------------------------------------------------------------------------
def _check_params(rt, meta: dict, path: Path) -> None:
    saved = {p["name"]: tuple(p["shape"]) for p in meta["params"]}
    mine = {p.name: tuple(p.tp.full_shape if p.tp else p.shape) for p in rt.plan.params}
    problems = [f"{n} missing from the checkpoint" for n in mine if n not in saved]
    problems += [f"{n} not in the model" for n in saved if n not in mine]
    problems += [f"{n} shape {list(saved[n])} in the checkpoint, {list(s)} in the model"
                 for n, s in mine.items() if n in saved and saved[n] != s]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{path / META_FILE} does not fit this model: "
                              f"{'; '.join(problems[:3])}{more}; load it into the model that "
                              f"saved it")


@torch.no_grad()
def _restore_state(rt, source) -> None:
    """Fill this runtime's owned ranges and flat_params from ``source`` (checkpoint/sources.py:
    by parameter name and element range; only what this rank keeps is read)."""
    plan = rt.plan
    tp, tp_rank = plan.grid.tp_size, plan.grid.tp_rank(plan.rank)
    base, flat = plan.persist_offset, rt.state.flat_params  # stage 3: only the persistent
    with rt.state.optimizer_state("write") as fp32:  # offloaded: written to its file
        for key in STATE_KEYS:
            local: dict = {}  # this TP rank's piece of a split parameter, flattened

            def piece(s, start, numel, out):
                if s.tp is None:
                    source.read(key, s.name, start, numel, out)
                    return
                if s.name not in local:
                    local[s.name] = s.tp.local_piece(source.whole(key, s.name), tp,
                                                     tp_rank).reshape(-1)
                out.copy_(local[s.name][start:start + numel])
            dst = fp32[key]
            dst.zero_()  # padding stays zero
            for o in plan.owned_pieces():
                piece(o.slot, o.start, o.numel, dst[o.at:o.at + o.numel])
            if key == "master":  # ones are whole; in place: the model's parameters are
                for s in plan.params:  # views of it
                    if s.offset >= base:
                        piece(s, 0, s.numel, flat[s.offset - base:s.end - base])
        if plan.partitioned:  # stage 3's parameters are the shard itself
            rt.state.set_param_shard(fp32["master"])  # offload_param: into its file


def _restore_counters(rt, shard: dict) -> None:
    rt.restore_counters(step_count=shard["step_count"], lr=shard["lr"],
                        skipped=shard["skipped"], scaler=shard["scaler"],
                        micro_steps=shard["micro_steps"], saved_gas=shard["gas"])
