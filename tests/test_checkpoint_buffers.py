"""Checkpoints carry the model's persistent buffers (checkpoint/buffers.py).

BatchNorm's running_mean / running_var / num_batches_tracked and a buffer of the model's own
that every forward changes: a resume must continue them as the uninterrupted run does, so
the whole state_dict (parameters and buffers) is compared bit for bit with that run. The
fresh model of every resume starts with other weights and other buffers: the load must win.

Whose buffers a rank gets back: at the TP x DP grid of the save its own (ranks' BatchNorm
statistics differ, each normalises its own batches); at another grid global rank 0's.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from multiproc import run_ranks

K, M = 3, 2  # steps before the save, steps after it
PERSISTENT = {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "ema"}


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)
        # the model's own persistent buffer, changed by every forward and read by the next
        self.register_buffer("ema", torch.zeros(16))
        self.register_buffer("scratch", torch.zeros(16), persistent=False)  # not in state_dict

    def forward(self, x, y):
        h = torch.relu(self.bn(self.fc1(x))) + 0.1 * self.ema
        self.ema.mul_(0.9).add_(h.detach().mean(0), alpha=0.1)
        self.scratch.copy_(h.detach()[0])
        return F.cross_entropy(self.fc2(h), y)


def _model(seed):
    torch.manual_seed(seed)
    model = BNNet()
    if seed:  # a fresh model whose buffers differ from anything the run saved
        with torch.no_grad():
            for buf in model.buffers():
                buf.fill_(7)
    return model


def _cfg(stage):
    return {"train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 200}}


def _engine(seed, stage):
    import zerofx

    torch._dynamo.reset()
    engine, *_ = zerofx.initialize(model=_model(seed), config=_cfg(stage))
    return engine


def _batch(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own data and scale:
    return torch.randn(4, 8, generator=g) * (1 + rank), torch.randint(0, 3, (4,), generator=g)


def _train(engine, steps, rank=0):
    losses = []
    for step in steps:
        loss = engine(*_batch(step, rank))
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().clone())
    return losses


def _state(engine):
    with engine.runtime.gathered_parameters():
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _buffers(engine):
    return {k: v for k, v in _state(engine).items() if k in PERSISTENT}


def _equal(a, b, where):
    assert a.keys() == b.keys(), where
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), f"{where}: {n}"


def _resume(ckpt, stage, rank=0):
    """K steps, save, M more (the uninterrupted run); a fresh engine loads and trains the
    same M steps."""
    engine = _engine(0, stage)
    _train(engine, range(K), rank)
    engine.save_checkpoint(ckpt)
    saved = _buffers(engine)
    expected = _train(engine, range(K, K + M), rank)
    uninterrupted = _state(engine)

    fresh = _engine(1, stage)
    fresh.load_checkpoint(ckpt)
    loaded = _buffers(fresh)
    resumed = _train(fresh, range(K, K + M), rank)
    return dict(saved=saved, loaded=loaded, expected=expected, resumed=resumed,
                uninterrupted=uninterrupted, final=_state(fresh))


def _check_resume(res, where):
    _equal(res["loaded"], res["saved"], f"{where}: buffers right after the load")
    assert all(torch.equal(a, b) for a, b in zip(res["resumed"], res["expected"])), where
    _equal(res["final"], res["uninterrupted"], f"{where}: state_dict after {M} more steps")


def test_resume_one_process_continues_every_buffer(tmp_path, no_torchrun_env):
    res = _resume(tmp_path, stage=2)
    assert int(res["saved"]["bn.num_batches_tracked"]) == K
    assert int(res["final"]["bn.num_batches_tracked"]) == K + M
    _check_resume(res, "1 process")
    # the rank file holds the persistent buffers, by state_dict name, and nothing else
    shard = torch.load(tmp_path / f"global_step{K}" / "zero_dp_rank_0.pt", weights_only=True)
    assert set(shard["buffers"]) == PERSISTENT


def _two_rank_body(rank, world, ckpt):
    return _resume(ckpt, stage=1, rank=rank)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt_buffers")
    return ckpt, run_ranks(_two_rank_body, 2, args=(str(ckpt),), timeout_s=240)


@pytest.mark.slow
def test_resume_two_ranks_each_rank_gets_its_own_buffers_back(two_ranks):
    _, (r0, r1) = two_ranks
    # the ranks' statistics differ (each normalised its own batches), so whose is restored
    # matters: at the saving grid, each rank's own
    assert not torch.equal(r0["saved"]["bn.running_mean"], r1["saved"]["bn.running_mean"])
    for rank, res in enumerate((r0, r1)):
        _check_resume(res, f"rank {rank}")


@pytest.mark.slow
def test_two_rank_checkpoint_into_one_process_gets_rank_0s_buffers(two_ranks,
                                                                   no_torchrun_env):
    """Another grid (DP 2 -> 1) and another stage (1 -> 3): every rank takes global rank
    0's buffers, as a fresh start takes rank 0's."""
    ckpt, (r0, _) = two_ranks
    engine = _engine(1, stage=3)
    engine.load_checkpoint(ckpt)
    _equal(_buffers(engine), r0["saved"], "rank 0's buffers")


# ---- without training: buffers set by hand ------------------------------------------------
def _marked(seed, stage=2):
    engine = _engine(seed, stage)
    with torch.no_grad():
        for i, buf in enumerate(engine.module.buffers()):
            buf.copy_(torch.full_like(buf, seed * 10 + i))
    return engine


def _strip_buffers(rank_file):
    """The rank file as a zerofx that did not save buffers wrote it."""
    from zerofx.checkpoint.schema import check_digest, with_digest

    body = check_digest(torch.load(rank_file, weights_only=True), rank_file)
    del body["buffers"]
    torch.save(with_digest(body), rank_file)


def test_checkpoint_without_buffers_loads_with_one_warning(tmp_path, no_torchrun_env):
    saver = _marked(1)
    saver.save_checkpoint(tmp_path, tag="old")
    saved = _state(saver)
    rank_file = tmp_path / "old" / "zero_dp_rank_0.pt"
    _strip_buffers(rank_file)
    engine = _marked(2)
    before = _buffers(engine)
    with pytest.warns(UserWarning, match=f"{rank_file} holds no buffers.*the model keeps its "
                      f"own 4 persistent buffer"):
        engine.load_checkpoint(tmp_path)
    _equal(_buffers(engine), before, "the model's own buffers, kept")
    _equal({n: p for n, p in _state(engine).items() if n not in PERSISTENT},
           {n: p for n, p in saved.items() if n not in PERSISTENT}, "parameters, loaded")


@pytest.mark.parametrize("change, problem", [
    (lambda m: m.register_buffer("extra", torch.zeros(2)), "extra missing from the checkpoint"),
    (lambda m: delattr(m, "ema"), "ema not in the model"),
    (lambda m: setattr(m, "ema", torch.zeros(3)),
     r"ema shape \[16\] in the checkpoint, \[3\] in the model"),
])
def test_buffers_that_do_not_fit_are_refused_before_anything_loads(tmp_path, no_torchrun_env,
                                                                   change, problem):
    import zerofx
    from zerofx.checkpoint import CheckpointError

    _marked(1).save_checkpoint(tmp_path, tag="t")
    model = _model(2)
    change(model)
    engine, *_ = zerofx.initialize(model=model, config=_cfg(2))
    before = _state(engine)
    with pytest.raises(CheckpointError, match=f"zero_dp_rank_0.pt: its buffers do not fit this "
                       f"model: {problem}; load it into the model that saved it"):
        engine.load_checkpoint(tmp_path, tag="t")
    _equal(_state(engine), before, "the engine, untouched")
    assert engine.global_steps == 0


# ---- tensor parallelism: each TP rank's buffers in its own tp_rank_<t>/ files -------------
TP_CFG = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
          "tensor_parallel": {"size": 2}, "train_micro_batch_size_per_gpu": 2,
          "zero_optimization": {"stage": 1}}


def _tp_block(value):
    from models import make

    model, _ = make("block")
    model.register_buffer("marker", torch.full((4,), float(value)))
    return model


def _tp_body(rank, world, ckpt):
    import zerofx

    engine, *_ = zerofx.initialize(model=_tp_block(0), config=TP_CFG)
    engine.module.marker.fill_(rank + 1)  # after the start's broadcast of rank 0's buffers
    engine.save_checkpoint(ckpt, tag="tp")
    fresh, *_ = zerofx.initialize(model=_tp_block(-1), config=TP_CFG)
    fresh.load_checkpoint(ckpt, tag="tp")
    return fresh.module.marker.clone()


@pytest.mark.slow
def test_tensor_parallel_ranks_get_their_own_buffers_and_tp1_gets_rank_0s(tmp_path,
                                                                        no_torchrun_env):
    import zerofx

    markers = run_ranks(_tp_body, 2, args=(str(tmp_path),), timeout_s=240)
    for rank, marker in enumerate(markers):
        assert torch.equal(marker, torch.full((4,), float(rank + 1))), rank
    cfg = {k: v for k, v in TP_CFG.items() if k != "tensor_parallel"}
    engine, *_ = zerofx.initialize(model=_tp_block(-1), config=cfg)
    engine.load_checkpoint(tmp_path, tag="tp")
    assert torch.equal(engine.module.marker, torch.full((4,), 1.0))  # tp_rank_0's
