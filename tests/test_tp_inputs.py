"""Tensor-parallel ranks fed different batches are refused (2 real gloo ranks, slow).

Sharding data by global rank instead of data-parallel rank gives each rank of a TP group
its own batch: each activation would mix two batches and train on with a wrong loss. The
engine compares its first calls' inputs across the group; equal inputs pass unchanged.
"""
import pytest

from models import block_batch, make
from multiproc import run_ranks
from test_tensor_parallel import _cfg


def _body(rank, world):
    import zerofx

    engine, *_ = zerofx.initialize(model=make("block")[0], config=_cfg())
    try:
        engine(*block_batch(seed=rank))  # sharded by global rank: each TP rank its own batch
        refused = None
    except zerofx.ConfigError as e:
        refused = str(e)
    return refused, float(engine(*block_batch(seed=engine.dp_rank)))  # the same batch


@pytest.mark.slow
def test_tp_ranks_given_different_batches_are_refused_by_name():
    results = run_ranks(_body, 2)
    for refused, _ in results:
        assert refused is not None and "given different inputs" in refused
        assert "engine.dp_rank, here 0 of 1" in refused
    assert results[0][1] == results[1][1]  # then the same batch: one loss, no refusal
