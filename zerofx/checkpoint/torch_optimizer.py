"""The state of a torch optimizer the runtime steps on its shard (runtime/shard_optimizer.py:
parameter groups with their own hyperparameters, or ``optimizer=<torch optimizer>``).

Its moments live in that optimizer's own state, not in the flat exp_avg/exp_avg_sq the rank
files hold for the fused kernels: without this a resume restarted them from zero, silently.
Each rank saves its instance's ``state_dict()`` in its rank file; the state is laid out by
the pieces of the shard the rank owns, so it loads back only at the grid (TP x DP) and ZeRO
stage of the save, and only into an engine that steps such an optimizer: anything else is
refused before the load restores anything. A checkpoint saved before this was kept loads
with one warning (its moments restart, as they did).
"""
from __future__ import annotations

import warnings

from zerofx.checkpoint.buffers import saved_rank_file
from zerofx.checkpoint.schema import CheckpointError

KEY = "torch_optimizer"


def to_save(rt) -> dict:
    so = rt.shard_optimizer
    if so is None:
        return {}
    return {KEY: {"class": type(so.inner).__qualname__, "state": so.inner.state_dict()}}


def read_state(rt, tag_dir, meta: dict, read: dict):
    """This rank's saved state, checked against ``rt``; None when there is none to load."""
    plan = rt.plan
    saved_grid = (meta.get("tp_size", 1), meta["dp_size"], meta["zero_stage"])
    grid = (plan.grid.tp_size, plan.grid.dp_size, plan.zero_stage)
    at = (plan.grid.tp_rank(plan.rank), plan.grid.dp_rank(plan.rank)) \
        if saved_grid == grid else (0, 0)
    shard, path = saved_rank_file(tag_dir, meta, read, at)
    saved, so = shard.get(KEY), rt.shard_optimizer
    if saved is None:
        if so is not None and plan.rank == 0:
            warnings.warn(f"{path} holds no state of the torch optimizer "
                          f"({type(so.inner).__name__}) this engine steps (saved by a zerofx "
                          f"that did not keep it): its moments restart from zero",
                          stacklevel=3)
        return None
    if so is None:
        raise CheckpointError(
            f"{path} holds the state of a torch optimizer ({saved['class']}: parameter groups "
            f"with their own hyperparameters, or optimizer=<torch optimizer>); this engine "
            f"runs the config's fused optimizer, whose state is laid out otherwise. Build "
            f"the engine as it was when saved")
    if saved_grid != grid:
        raise CheckpointError(
            f"{path} holds a torch optimizer's state ({saved['class']}), laid out by the "
            f"shard pieces each rank owned at TP {saved_grid[0]} x DP {saved_grid[1]}, ZeRO "
            f"stage {saved_grid[2]}; it cannot be re-sharded to TP {grid[0]} x DP {grid[1]}, "
            f"stage {grid[2]}. Load at the saving world size and stage")
    if saved["class"] != type(so.inner).__qualname__:
        raise CheckpointError(f"{path} holds {saved['class']}'s state; this engine steps "
                              f"{type(so.inner).__qualname__}")
    return saved["state"]


def restore(rt, state) -> None:
    rt.shard_optimizer.inner.load_state_dict(state)
