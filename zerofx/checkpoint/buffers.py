"""The model's persistent buffers in a checkpoint: BatchNorm's running statistics and
num_batches_tracked, counters, anything registered with ``register_buffer``.

The rank files hold the optimizer's fp32 state, which covers the trained parameters only;
buffers change in the forward and would restart from the fresh model's values on resume.
DeepSpeed saves ``module.state_dict()`` (parameters and persistent buffers) under "module" in
``mp_rank_00_model_states.pt`` and restores it with ``module.load_state_dict``
(deepspeed/runtime/engine.py: ``_save_checkpoint``, ``module_state_dict``,
``load_module_state_dict``); zerofx saves the buffers part of it, by state_dict name:

    save   every rank puts its own buffers in its rank file (key "buffers"): ranks' buffers
           differ (each BatchNorm normalises its own batches; nothing syncs them)
    load   at the TP x DP grid of the save, each rank takes back the buffers it saved, so a
           resume continues bit for bit on every rank (DeepSpeed does this at stage 3, where
           each DP rank writes and reads its own zero_pp_rank_<r> model-states file);
           at another grid, every rank takes global rank 0's (tp_rank_0, DP rank 0): what a
           fresh start does (runtime/start_state.py) and what DeepSpeed's stage 0-2 load does
           (one mp_rank_00 file, written by DP rank 0, read by every rank)

Non-persistent buffers are not in ``state_dict()``: neither saved nor restored, as in
DeepSpeed. Names and shapes must match the model exactly (DeepSpeed's strict load); a
checkpoint saved before buffers were saved loads with one warning naming it.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from zerofx.checkpoint.files import META_FILE, rank_file, read_meta, read_rank, tp_dir
from zerofx.checkpoint.schema import CheckpointError, check_same_save

BUFFERS_KEY = "buffers"


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """{state_dict name: the live buffer} of every persistent buffer, under every name
    ``state_dict()`` gives it (a module shared by two parents is saved under both)."""
    out = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def buffers_to_save(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies on the CPU: the files are read back with map_location="cpu", and the copy
    cannot change while the other ranks are still writing."""
    return {n: b.detach().to("cpu", copy=True) for n, b in persistent_buffers(module).items()}


def read_buffers(tag_dir: Path, meta: dict, plan, module: nn.Module, read: dict):
    """The saved buffers this rank restores, checked against ``module``; None (after a
    warning) when the checkpoint holds none. ``read``: {(tp rank, DP rank): rank file}
    already read by the load, so no file is read twice."""
    saved_grid = (meta.get("tp_size", 1), meta["dp_size"])
    grid = plan.grid
    same = saved_grid == (grid.tp_size, grid.dp_size)
    at = (grid.tp_rank(plan.rank), grid.dp_rank(plan.rank)) if same else (0, 0)
    shard, path = saved_rank_file(tag_dir, meta, read, at)
    saved = shard.get(BUFFERS_KEY)
    live = persistent_buffers(module)
    if saved is None:
        if live and plan.rank == 0:  # one warning for the job: every rank's file lacks them
            warnings.warn(
                f"{path} holds no buffers (saved by a zerofx that did not save them, or "
                f"without the model): the model keeps its own {len(live)} persistent "
                f"buffer(s) ({', '.join(list(live)[:3])}{', ...' if len(live) > 3 else ''}), "
                f"so running statistics and counters restart from their current values; "
                f"save again with engine.save_checkpoint to carry them", stacklevel=3)
        return None
    _check_fit(saved, live, path)
    return saved


@torch.no_grad()
def restore_buffers(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """In place: compiled graphs hold these very tensors. copy_ casts to the buffer's dtype
    and device, as load_state_dict does."""
    for name, buf in persistent_buffers(module).items():
        buf.copy_(saved[name])


def saved_rank_file(tag_dir, meta: dict, read: dict, at: tuple[int, int]) -> tuple[dict, Path]:
    """(contents, path) of the rank file of (TP rank, DP rank) ``at``, taken from ``read``
    (the files the load already read) or read now."""
    shard = read.get(at)
    if shard is None:
        shard = _read_rank_file(Path(tag_dir), meta, *at)
    return shard, _rank_path(tag_dir, meta, *at)


def _rank_path(tag_dir, meta: dict, tp_rank: int, dp_rank: int) -> Path:
    base = Path(tag_dir) / tp_dir(tp_rank) if meta.get("tp_size", 1) > 1 else Path(tag_dir)
    return base / rank_file(dp_rank)


def _read_rank_file(tag_dir: Path, meta: dict, tp_rank: int, dp_rank: int) -> dict:
    if meta.get("tp_size", 1) == 1:
        return read_rank(tag_dir, meta, dp_rank)
    sub = tag_dir / tp_dir(tp_rank)  # its own meta.pt: the layout its rank file is checked by
    sub_meta = read_meta(sub)
    check_same_save(sub_meta, sub / META_FILE, meta.get("save_id"), tag_dir / META_FILE)
    return read_rank(sub, sub_meta, dp_rank)


def _check_fit(saved: dict, live: dict, path: Path) -> None:
    """DeepSpeed's strict load_state_dict: the same names, and shapes that fit."""
    problems = [f"{n} missing from the checkpoint" for n in live if n not in saved]
    problems += [f"{n} not in the model" for n in saved if n not in live]
    problems += [f"{n} shape {list(saved[n].shape)} in the checkpoint, {list(b.shape)} in the "
                 f"model" for n, b in live.items() if n in saved and saved[n].shape != b.shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{path}: its buffers do not fit this model: "
                              f"{'; '.join(problems[:3])}{more}; load it into the model that "
                              f"saved it")
