"""Checkpoints: bitwise resume (1 and 2 ranks), re-sharding loads, atomic saves, bad input.

The reference for a resume is the same run without the interruption; the reference for the
saved state is the runtime's own shards, assembled here from plan.owned() (not by the
checkpoint code under test).
"""

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
            flat[r.start:r.start + r.numel] = getattr(rt.state, key)[r.at:r.at + r.numel]
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


# ---- atomic saves, client_state, bad input (no compile: state filled in directly) --------
@pytest.fixture
def rt(no_torchrun_env):
    return _filled(_runtime(stage=2)[1], seed=0)


def _filled(rt, seed):
    """Distinct, recognisable state, as if trained."""
    g = torch.Generator().manual_seed(seed)
    for key in ("master", "exp_avg", "exp_avg_sq"):
        getattr(rt.state, key).copy_(torch.randn(getattr(rt.state, key).shape, generator=g))
    rt.state.step_count.fill_(seed + 3)
    rt.micro_steps = seed + 3
    return rt


def _load_fresh(path, tag=None):
    from zerofx.checkpoint import load_checkpoint

    fresh = _runtime(stage=2, seed=5)[1]
    return fresh, load_checkpoint(fresh, path, tag)


def test_client_state_round_trip(rt, tmp_path):
    from zerofx.checkpoint import save_checkpoint

    client = {"epoch": 3, "sched": {"last": [1, 2.5, None], "t": torch.ones(2, 2)},
              "name": "run", "pair": (1, "a"), 7: True}
    save_checkpoint(rt, tmp_path, tag="t", client_state=client)
    fresh, (path, got) = _load_fresh(tmp_path)
    assert path == str(tmp_path / "t")
    assert torch.equal(got["sched"].pop("t"), client["sched"].pop("t"))
    assert got == client
    _equal(_gather(fresh)["master"], _gather(rt)["master"], "master")
    assert torch.equal(fresh.state.step_count, rt.state.step_count)
    assert fresh.micro_steps == rt.micro_steps


@pytest.mark.parametrize("bad, culprit", [
    ({"sched": {"fn": lambda s: s}}, "client_state['sched']['fn']"),
    ({"opt": [1, object()]}, "client_state['opt'][1]"),
    ({("a", 1): 2}, "key of type tuple"),
])
def test_client_state_must_be_plain_data(rt, tmp_path, bad, culprit):
    from zerofx.checkpoint import CheckpointError, save_checkpoint

    with pytest.raises(CheckpointError, match="client_state") as e:
        save_checkpoint(rt, tmp_path, client_state=bad)
    assert culprit in str(e.value)
    assert not tmp_path.joinpath("latest").exists()


def _crash_on_second_save(monkeypatch):
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("second_tag", ["b", "a"])  # a new tag, and overwriting the old one
def test_crash_mid_save_keeps_previous_checkpoint(rt, tmp_path, monkeypatch, second_tag):
    from zerofx.checkpoint import save_checkpoint

    save_checkpoint(rt, tmp_path, tag="a")
    before = _gather(rt)["master"]
    _filled(rt, seed=1)
    with monkeypatch.context() as m:
        _crash_on_second_save(m)
        with pytest.raises(OSError, match="simulated"):
            save_checkpoint(rt, tmp_path, tag=second_tag)
    assert (tmp_path / "latest").read_text() == "a"
    assert not (tmp_path / "b").exists()
    fresh, (path, _) = _load_fresh(tmp_path)
    assert path == str(tmp_path / "a")
    _equal(_gather(fresh)["master"], before, "master after the crash")
    # the next save clears the crashed temp directory and succeeds
    save_checkpoint(rt, tmp_path, tag=second_tag)
    assert (tmp_path / "latest").read_text() == second_tag
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"a", second_tag, "latest"})
    _equal(_gather(_load_fresh(tmp_path)[0])["master"], _gather(rt)["master"], "new save")


def test_save_latest_false_leaves_latest(rt, tmp_path):
    from zerofx.checkpoint import save_checkpoint

    save_checkpoint(rt, tmp_path, tag="a")
    save_checkpoint(rt, tmp_path, tag="b", save_latest=False)
    assert (tmp_path / "latest").read_text() == "a"
    assert _load_fresh(tmp_path, tag="b")[1][0] == str(tmp_path / "b")


def test_no_checkpoint_returns_none_with_warning(rt, tmp_path):
    from zerofx.checkpoint import load_checkpoint

    with pytest.warns(UserWarning, match="no checkpoint"):
        assert load_checkpoint(rt, tmp_path) == (None, None)


def test_save_rejects_bad_tag_and_open_accumulation_window(tmp_path, no_torchrun_env):
    from zerofx.checkpoint import CheckpointError, save_checkpoint

    _, rt = _runtime(stage=2, gas=2)
    with pytest.raises(CheckpointError, match="tag '../x'"):
        save_checkpoint(rt, tmp_path, tag="../x")
    rt.micro_steps = 3
    with pytest.raises(CheckpointError, match="inside an accumulation window of 2"):
        save_checkpoint(rt, tmp_path)


def _corrupt(kind, root):
    tag = root / "a"
    if kind == "missing tag":
        return "tag 'nope'", "nope"
    if kind == "latest target":
        (root / "latest").write_text("gone")
        (root / ".gone.old").mkdir()
        return "names tag 'gone'.*interrupted", None
    if kind == "missing rank file":
        (tag / "zero_dp_rank_0.pt").unlink()
        return "zero_dp_rank_0.pt is missing", None
    if kind == "truncated":
        data = (tag / "zero_dp_rank_0.pt").read_bytes()
        (tag / "zero_dp_rank_0.pt").write_bytes(data[:len(data) // 2])
        return "zero_dp_rank_0.pt cannot be read.*truncated or corrupt", None
    if kind == "corrupt meta":
        (tag / "meta.pt").write_bytes(b"not a checkpoint")
        return "meta.pt cannot be read", None
    meta = torch.load(tag / "meta.pt", weights_only=True)
    if kind == "format":
        meta["format"] = 99
        msg = "format 99, this zerofx reads format 2"
    else:  # names and shapes
        meta["params"][0]["name"] = "renamed"
        meta["params"][1].update(shape=[1, 2, 3], numel=6)  # another model's, consistent
        msg = (r"does not fit this model: \S+ missing from the checkpoint; renamed not in the "
               r"model; \S+ shape \[1, 2, 3\] in the checkpoint")
    from zerofx.checkpoint.schema import DIGEST_KEY, with_digest

    meta.pop(DIGEST_KEY, None)
    torch.save(with_digest(meta), tag / "meta.pt")
    return msg, None


@pytest.mark.parametrize("kind", ["missing dir", "missing tag", "latest target",
                                  "missing rank file", "truncated", "corrupt meta", "format",
                                  "params"])
def test_bad_checkpoints_name_the_file_and_the_fix(rt, tmp_path, kind):
    from zerofx.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    if kind == "missing dir":
        with pytest.raises(CheckpointError, match="no such checkpoint directory"):
            load_checkpoint(rt, tmp_path / "absent")
        return
    save_checkpoint(rt, tmp_path, tag="a")
    msg, tag = _corrupt(kind, tmp_path)
    fresh = _filled(_runtime(stage=2)[1], seed=7)
    before = _gather(fresh)
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(fresh, tmp_path, tag)
    # every check runs before the first write: a failed load leaves the runtime as it was
    for key in before:
        _equal(_gather(fresh)[key], before[key], key)
