"""Every rank starts from rank 0's weights and buffers (runtime/start_state.py), on every path,
with each rank seeded differently as torch's default seeding (and DeepSpeed's tutorials) do."""
import re

import pytest
import torch

from models import make, mlp_batch
from multiproc import run_ranks


def _seeded_model(rank, name="mlp"):
    model, _ = make(name, seed=100 + 17 * rank)  # a different model on every rank
    model.register_buffer("shift", torch.randn(3))  # buffers differ too
    model.register_buffer("mask", torch.rand(4) > 0.5)  # and boolean ones
    return model


def _state(module):
    return {n: t.detach().float().clone()
            for n, t in [*module.named_parameters(), *module.named_buffers()]}


def _runtime_body(rank, world, stage):
    import zerofx
    from zerofx.runtime import start_state

    start_state.CHUNK_BYTES = 1024  # several coalesced broadcasts per dtype
    model = _seeded_model(rank)
    rt = zerofx.ZeroRuntime(model, {"zero_optimization": {"stage": stage}, "optimizer": {
        "type": "Adam", "params": {"lr": 1e-3}}})
    with rt.gathered_parameters():
        return _state(model)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_zero_runtime_starts_every_rank_from_rank_0(stage):
    want = _state(_seeded_model(0))
    for rank, got in enumerate(run_ranks(_runtime_body, world_size=2, args=(stage,))):
        assert got.keys() == want.keys()
        for n, t in got.items():
            torch.testing.assert_close(t, want[n], rtol=0, atol=0,
                                       msg=lambda m, n=n: f"rank {rank} {n}: {m}")


def _plain_body(rank, world):
    from zerofx.runtime import plain_dp

    torch._dynamo.reset()
    plain_dp.reset()
    model = _seeded_model(rank)
    compiled = torch.compile(model, backend="zero", options={"config": {}})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        compiled(*mlp_batch(seed=10 * step + rank)).backward()
        opt.step()
        opt.zero_grad()
    return _state(model)


@pytest.mark.slow
def test_plain_compile_trains_rank_0s_model_like_one_process():
    """DDP's start for plain torch.compile(backend="zero"): the reference is rank 0's model
    trained by one process on both ranks' batches (mean of the per-rank losses)."""
    ref = _seeded_model(0)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(3):
        sum(ref(*mlp_batch(seed=10 * step + r)) for r in range(2)).div(2).backward()
        opt.step()
        opt.zero_grad()
    want = _state(ref)
    for rank, got in enumerate(run_ranks(_plain_body, world_size=2)):
        for n, t in got.items():
            torch.testing.assert_close(t, want[n], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=n: f"rank {rank} {n}: {m}")


def _tp_body(rank, world):
    import zerofx

    model = _seeded_model(rank, "block")
    engine, *_ = zerofx.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 2, "tensor_parallel": {"size": 2},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}})
    rt = engine.runtime
    tp_rank = rt.plan.grid.tp_rank(rt.plan.rank)
    return tp_rank, {n: p.detach().float().clone() for n, p in model.named_parameters()}, \
        {n: rt.plan.slot(n).tp for n, _ in model.named_parameters()}


@pytest.mark.slow
def test_tensor_parallel_pieces_are_cut_from_rank_0s_weights():
    whole = _state(_seeded_model(0, "block"))
    split = 0
    for got_rank, (tp_rank, pieces, specs) in enumerate(run_ranks(_tp_body, world_size=2)):
        for n, piece in pieces.items():
            spec = specs[n]
            want = spec.local_piece(whole[n], 2, tp_rank) if spec is not None else whole[n]
            split += spec is not None
            torch.testing.assert_close(piece, want, rtol=0, atol=0,
                                       msg=lambda m, n=n: f"rank {got_rank} {n}: {m}")
    assert split > 0  # the block's attention and MLP weights were split


_PROGRAMS: list = []  # the capturing pass's output, per process


def _capture(gm, ctx):
    # zerofx's ops name their runtime by a per-process handle: a new runtime, a new number
    code = re.sub(rf"\.default\({ctx.state_id}([,)])", r".default(<runtime>\1", gm.code)
    _PROGRAMS.append((ctx.graph_kind, code))
    return gm


def _program_body(rank, world):
    """Compile one bf16 ZeRO-2 training step twice (a fresh runtime and Dynamo each time);
    return the final code of every graph each compile produced."""
    import zerofx
    from zerofx.passes import PassSpec

    spec = PassSpec("capture", _capture, frozenset({"forward", "backward", "optimizer"}))
    runs = []
    for _ in range(2):
        torch._dynamo.reset()
        _PROGRAMS.clear()
        model = _seeded_model(rank, "block")
        rt = zerofx.ZeroRuntime(model, {"bf16": {"enabled": True},
                                        "zero_optimization": {"stage": 2},
                                        "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}})
        compiled = torch.compile(model, backend="zero",
                                 options={"runtime": rt, "extra_passes": (spec,)})
        x, y = make("block")[1]
        rt.backward(compiled(x, y))
        rt.step()
        runs.append(list(_PROGRAMS))
    return runs


@pytest.mark.slow
def test_compiling_twice_on_two_ranks_gives_one_program():
    """Convention 10: a rerun, and every rank, compiles the same program (nothing chosen by
    timing changes a graph; the matmul forms are rank 0's)."""
    (a1, a2), (b1, b2) = run_ranks(_program_body, world_size=2)
    assert [k for k, _ in a1] == ["forward", "backward", "optimizer"]
    assert a1 == a2 and b1 == b2, "two compiles on one rank differ"
    assert a1[:2] == b1[:2], "rank 1 compiled another forward/backward than rank 0"
    # the step graph updates this rank's own shard: only where it sits may differ
    differ = [(x, y) for x, y in zip(a1[2][1].splitlines(), b1[2][1].splitlines()) if x != y]
    assert differ and all("slice.Tensor(flat_params" in x for x, _ in differ), differ
