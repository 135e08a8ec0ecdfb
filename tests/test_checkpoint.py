"""Checkpoints: bitwise resume (1 and 2 ranks), re-sharding loads, atomic saves, bad input.

The reference for a resume is the same run without the interruption; the reference for the
saved state is the runtime's own shards, assembled here from plan.owned() (not by the
checkpoint code under test).
"""
import warnings

import pytest
import torch

from models import make, mlp_batch
from multiproc import run_ranks

K, N = 2, 3  # steps before the save, steps after it
LR = 1e-2


def _cfg(stage, gas=1):
    return {"optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 300},
            "gradient_accumulation_steps": gas}


def _batch(step, rank, micro, gas):
    # One process with gas=G sees, as micro-batch m, what rank m sees with G ranks and gas 1.
    return mlp_batch(seed=1000 * step + 10 * (rank * gas + micro))


def _runtime(stage, gas=1, seed=0):
    import zerofx

    model, _ = make("mlp", seed=seed)
    return model, zerofx.ZeroRuntime(model, _cfg(stage, gas))


def _train(model, rt, steps, *, start=0, rank=0):
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    losses = []
    for step in range(start, start + steps):
        for micro in range(rt.gas):
            loss = compiled(*_batch(step, rank, micro, rt.gas))
            loss.backward()
            rt.step()
            losses.append(loss.detach().clone())
    return losses


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _gather(rt):
    """{name: full fp32 tensor} for master and both moments, from this rank's shard."""
    out = {}
    for key in ("master", "exp_avg", "exp_avg_sq"):
        flat = torch.zeros(rt.plan.padded_numel)
        for r in rt.plan.owned():
            flat[r.start:r.start + r.numel] = getattr(rt, key)[r.at:r.at + r.numel]
        out[key] = {s.name: flat[s.offset:s.end].view(s.shape).clone() for s in rt.plan.params}
    return out


def _merge(gathered):
    """Every rank's gather holds its own owned part, zeros elsewhere: sum them."""
    return {k: {n: sum(g[k][n] for g in gathered) for n in gathered[0][k]}
            for k in gathered[0]}


def _equal(a, b, where):
    assert a.keys() == b.keys(), where
    for n in a:
        assert torch.equal(a[n], b[n]), f"{where}: {n}"


# ---- bitwise resume ---------------------------------------------------------------------
def test_resume_one_process_is_bitwise(tmp_path, no_torchrun_env):
    from zerofx.checkpoint import load_checkpoint, save_checkpoint

    model, rt = _runtime(stage=2)
    _train(model, rt, K)
    path = save_checkpoint(rt, tmp_path, client_state={"epoch": 1})
    assert path == str(tmp_path / f"global_step{K}")
    expected = _train(model, rt, N, start=K)
    final = _params(model)

    torch._dynamo.reset()
    model2, rt2 = _runtime(stage=2, seed=1)  # other initial weights: the load must win
    got_path, client = load_checkpoint(rt2, tmp_path)
    assert (got_path, client, rt2.micro_steps) == (path, {"epoch": 1}, K)
    got = _train(model2, rt2, N, start=K)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)), (got, expected)
    _equal(_params(model2), final, "final parameters")


def _two_rank_body(rank, world, ckpt_dir):
    from zerofx.checkpoint import load_checkpoint, save_checkpoint

    torch._dynamo.reset()
    model, rt = _runtime(stage=2)
    _train(model, rt, K, rank=rank)
    save_checkpoint(rt, ckpt_dir, client_state={"rank0": rank, "t": torch.arange(3)})
    saved = _gather(rt)
    expected = _train(model, rt, N, start=K, rank=rank)
    final = _params(model)

    torch._dynamo.reset()
    model2, rt2 = _runtime(stage=2, seed=1)
    _, client = load_checkpoint(rt2, ckpt_dir)
    resumed = _train(model2, rt2, N, start=K, rank=rank)
    return dict(saved=saved, expected=expected, final=final, resumed=resumed,
                resumed_final=_params(model2), client=client)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt2")
    return ckpt, run_ranks(_two_rank_body, 2, args=(str(ckpt),), timeout_s=240)


@pytest.mark.slow
def test_resume_two_ranks_stage2_is_bitwise(two_ranks):
    ckpt, results = two_ranks
    assert sorted(p.name for p in (ckpt / f"global_step{K}").iterdir()) == [
        "meta.pt", "zero_dp_rank_0.pt", "zero_dp_rank_1.pt"]
    assert (ckpt / "latest").read_text() == f"global_step{K}"
    for rank, res in enumerate(results):
        assert all(torch.equal(a, b) for a, b in zip(res["resumed"], res["expected"])), rank
        _equal(res["resumed_final"], res["final"], f"rank {rank} final parameters")
        assert res["client"]["rank0"] == 0  # rank 0's client_state is the one kept
        assert torch.equal(res["client"]["t"], torch.arange(3))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_load_two_rank_checkpoint_into_one_process(two_ranks, stage, no_torchrun_env):
    from zerofx.checkpoint import load_checkpoint

    ckpt, results = two_ranks
    saved = _merge([r["saved"] for r in results])
    # 2 ranks x gas 1 = 1 process x gas 2: the same global batch per optimizer step
    model, rt = _runtime(stage=stage, gas=2, seed=1)
    load_checkpoint(rt, ckpt)
    assert rt.micro_steps == K * 2
    _equal(_gather(rt)["master"], saved["master"], "assembled master")
    _equal(_gather(rt)["exp_avg"], saved["exp_avg"], "assembled exp_avg")
    _equal(_gather(rt)["exp_avg_sq"], saved["exp_avg_sq"], "assembled exp_avg_sq")
    _equal(_params(model), saved["master"], "parameters written from the master")

    losses = torch.stack(_train(model, rt, N, start=K))
    # micro m of one process = rank m of the 2-rank run; only the reduction order differs
    expected = torch.stack([torch.stack(r["expected"]) for r in results], dim=1).reshape(-1)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    for n, p in _params(model).items():
        torch.testing.assert_close(p, results[0]["final"][n], rtol=1e-5, atol=1e-6)
