"""checkpoint/torch_optimizer.py: a torch optimizer stepped on the shard (groups with their own
hyperparameters, a client optimizer) keeps its moments across save and load. Before, its
state was not in the rank files and a resume restarted it from zero, silently. The reference
is the same engine trained without interruption."""
import pytest
import torch
import torch.nn.functional as F

import zerofx
from test_param_groups import _batch, _cfg, _groups, _model
from zerofx.checkpoint import CheckpointError


def _run(engine, steps):
    for s in steps:
        x, y = _batch(s)
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()


def _engine(seed, how, stage=1):
    model = _model(seed)
    if how == "groups":
        return model, zerofx.initialize(model=model, model_parameters=_groups(model, "decay"),
                                        config=_cfg(stage))[0]
    if how == "client":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        cfg = dict(_cfg(stage), zero_allow_untested_optimizer=True)
        del cfg["optimizer"]
        return model, zerofx.initialize(model=model, optimizer=opt, config=cfg)[0]
    return model, zerofx.initialize(model=model, config=_cfg(stage))[0]  # fused


@pytest.mark.parametrize("how, stage", [("groups", 1), ("groups", 3), ("client", 2)])
def test_a_resume_continues_bit_for_bit(how, stage, tmp_path, no_torchrun_env):
    model, engine = _engine(0, how, stage)
    _run(engine, range(3))
    engine.save_checkpoint(tmp_path)
    _run(engine, range(3, 6))
    resumed_model, resumed = _engine(5, how, stage)
    resumed.load_checkpoint(tmp_path)
    _run(resumed, range(3, 6))
    with engine.runtime.gathered_parameters(), resumed.runtime.gathered_parameters():
        for (n, p), q in zip(model.named_parameters(), resumed_model.parameters()):
            assert torch.equal(p, q), n


def test_its_state_does_not_load_into_the_fused_optimizer(tmp_path, no_torchrun_env):
    _, engine = _engine(0, "groups")
    _run(engine, range(2))
    engine.save_checkpoint(tmp_path)
    model, fused = _engine(5, "fused")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match=r"torch optimizer \(AdamW.*fused optimizer"):
        fused.load_checkpoint(tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_a_checkpoint_without_it_loads_with_a_warning(tmp_path, no_torchrun_env):
    _, engine = _engine(0, "groups")
    _run(engine, range(2))
    path = engine.save_checkpoint(tmp_path)
    from pathlib import Path

    from zerofx.checkpoint.schema import check_digest, with_digest
    for f in Path(path).glob("zero_dp_rank_*.pt"):  # as a zerofx before this change saved
        shard = check_digest(torch.load(f, weights_only=True), f)
        del shard["torch_optimizer"]
        torch.save(with_digest(shard), f)
    _, resumed = _engine(5, "groups")
    with pytest.warns(UserWarning, match="moments restart from zero"):
        resumed.load_checkpoint(tmp_path)
