"""Tensor-parallel ranks fed different batches are refused (2 real gloo ranks, slow).

Sharding data by global rank instead of data-parallel rank gives each rank of a TP group
its own batch: each activation would mix two batches and train on with a wrong loss. The
engine compares its first calls' inputs across the group; equal inputs pass unchanged.
"""
import pytest

from models import block_batch, make
from multiproc import run_ranks
from test_tensor_parallel import _cfg


def _body(rank, world, by_global_rank):
    import zerofx

    engine, *_ = zerofx.initialize(model=make("block")[0], config=_cfg())
    seed = rank if by_global_rank else engine.dp_rank
    try:
        loss = engine(*block_batch(seed=seed))
    except zerofx.ConfigError as e:
        return str(e)
    return float(loss)


@pytest.mark.slow
def test_tp_ranks_given_different_batches_are_refused_by_name():
    for message in run_ranks(_body, 2, args=(True,)):
        assert isinstance(message, str) and "given different inputs" in message
        assert "engine.dp_rank, here 0 of 1" in message
    losses = run_ranks(_body, 2, args=(False,))
    assert losses[0] == losses[1]  # the same batch: one loss, no refusal
