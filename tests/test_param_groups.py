"""zerofx.initialize(model_parameters=...) read as DeepSpeed reads it (zerofx/param_groups.py):
parameter groups with the config's optimizer train as torch.optim.AdamW over the same groups
would, the parameters left out do not train, and what cannot be honoured is refused before
the model is touched.

The reference is independent of zerofx: one eager fp32 model stepped by torch.optim.AdamW
over the same groups (at two ranks, on the two ranks' batches concatenated)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zerofx
from multiproc import run_ranks

LR, STEPS, BATCH = 1e-2, 5, 4


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 3))


def _split(model):
    """Weights of linears decay; biases and the norm do not (the usual recipe)."""
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if p.dim() != 2]
    return decay, rest


def _groups(model, case):
    decay, rest = _split(model)
    if case == "decay":  # own weight_decay per group
        return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    if case == "lr":  # one group with its own lr too
        return [{"params": decay}, {"params": rest, "lr": 3e-3, "weight_decay": 0.0}]
    assert case == "agree"  # groups with the config's values: the fused kernel runs them
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest}]


def _cfg(stage, **extra):
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1}},
            **extra}


def _batch(step, rank=0):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)


def _train_zerofx(model, groups, cfg, steps=STEPS, rank=0):
    engine, *_ = zerofx.initialize(model=model, model_parameters=groups, config=cfg)
    for s in range(steps):
        x, y = _batch(s, rank)
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    return engine


def _reference(case, world=1, steps=STEPS):
    """Eager fp32, torch.optim.AdamW over the same groups, the ranks' batches as one."""
    ref = _model(0)
    opt = torch.optim.AdamW(_groups(ref, case), lr=LR, weight_decay=0.1)
    for s in range(steps):
        xs, ys = zip(*(_batch(s, r) for r in range(world)))
        F.mse_loss(ref(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in ref.named_parameters()}


def _assert_close(params, ref, what):
    for n, q in ref.items():
        err = float((params[n] - q).norm() / q.norm())
        assert err < 1e-6, f"{what}: {n} differs from eager AdamW by {err:.2e} (relative)"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["decay", "lr", "agree"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_groups_train_as_eager_adamw_over_the_same_groups(no_torchrun_env, stage, case):
    model = _model(0)
    engine = _train_zerofx(model, _groups(model, case), _cfg(stage))
    assert engine.runtime.spec.kind == ("adam" if case == "agree" else "torch")
    assert [len(g["params"]) for g in engine.optimizer.param_groups] == \
        ([2, 4] if case != "agree" else [6])
    with engine.runtime.gathered_parameters():
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    _assert_close(params, _reference(case), f"stage {stage}, {case}")


def _two_rank_body(rank, world, stage, case):
    model = _model(seed=0 if rank == 0 else 7)  # each rank its own start (rank 0 holds
    # the reference's): zerofx broadcasts rank 0's
    engine = _train_zerofx(model, _groups(model, case), _cfg(stage), rank=rank)
    with engine.runtime.gathered_parameters():
        return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_groups_at_two_ranks_train_as_one_process_on_both_batches(stage):
    ref = _reference("lr", world=2)
    for rank, params in enumerate(run_ranks(_two_rank_body, 2, args=(stage, "lr"))):
        _assert_close(params, ref, f"stage {stage}, rank {rank}")


@pytest.mark.slow
def test_warmup_cosine_scales_each_groups_own_lr(no_torchrun_env):
    """DeepSpeed's WarmupCosineLR multiplies every group's own lr by one ratio."""
    sched = {"type": "WarmupCosineLR", "params": {"total_num_steps": 6,
                                                 "warmup_num_steps": 2}}
    model, ref = _model(0), _model(0)
    engine, opt, *_ = zerofx.initialize(model=model, model_parameters=_groups(model, "lr"),
                                        config=_cfg(1, scheduler=sched))
    ref_opt = torch.optim.AdamW(_groups(ref, "lr"), lr=LR, weight_decay=0.1)
    bases = [g["lr"] for g in ref_opt.param_groups]
    ratios = []
    for s in range(STEPS):
        ratios.append(opt.param_groups[0]["lr"] / LR)  # the lr this step runs with
        x, y = _batch(s)
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
        for g, base in zip(ref_opt.param_groups, bases):
            g["lr"] = base * ratios[-1]
        F.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert len(set(ratios)) > 2  # the schedule moved the lr
    _assert_close({n: p.detach() for n, p in model.named_parameters()},
                  {n: p.detach() for n, p in ref.named_parameters()}, "WarmupCosineLR")


def test_parameters_left_out_or_frozen_do_not_train(no_torchrun_env):
    """DeepSpeed optimizes the listed parameters that require grad: one left out of
    model_parameters and one listed but frozen both keep their values (and the frozen one
    its flag)."""
    model = _model(0)
    model[1].weight.requires_grad_(False)
    listed = [p for n, p in model.named_parameters() if not n.startswith("3.")]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_zerofx(model, [{"params": listed, "weight_decay": 0.0}], _cfg(2), steps=2)
    after = dict(model.named_parameters())
    for n in ("1.weight", "3.weight", "3.bias"):
        assert torch.equal(after[n], before[n]), n
    assert not torch.equal(after["0.weight"], before["0.weight"])
    assert not model[1].weight.requires_grad


def test_a_client_optimizer_trains_only_its_parameters(no_torchrun_env):
    """As DeepSpeed: a torch optimizer object is stepped as given (the fused kernel here),
    over its own parameters only."""
    model = _model(0)
    before = model[3].weight.detach().clone()
    opt = torch.optim.AdamW(model[0].parameters(), lr=LR)
    cfg = {"train_micro_batch_size_per_gpu": BATCH, "zero_optimization": {"stage": 1}}
    engine, *_ = zerofx.initialize(model=model, optimizer=opt, config=cfg)
    for s in range(2):
        x, y = _batch(s)
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    assert torch.equal(model[3].weight.detach(), before)


def test_a_callable_optimizer_is_built_over_the_groups(no_torchrun_env):
    """DeepSpeed's optimizer=callable(model_parameters): called with the groups as given."""
    model = _model(0)
    cfg = {"train_micro_batch_size_per_gpu": BATCH, "zero_optimization": {"stage": 1}}
    engine, opt, *_ = zerofx.initialize(
        model=model, model_parameters=_groups(model, "decay"), config=cfg,
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=LR))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert engine.runtime.spec.kind == "torch"


def _refused(case, model):
    decay, rest = _split(model)
    cfg, params = _cfg(1), [{"params": decay, "weight_decay": 0.1},
                            {"params": rest, "weight_decay": 0.0}]
    if case == "listed twice":
        params = [{"params": decay}, {"params": rest + decay[:1]}]
    elif case == "not the model's":
        params = decay + [nn.Parameter(torch.zeros(3))]
    elif case == "empty":
        params = iter([])
    elif case == "mixed":
        params = [decay[0], {"params": decay[1:] + rest}]
    elif case == "nothing trainable":
        for p in model.parameters():
            p.requires_grad_(False)
        params = decay
    elif case == "lamb":
        cfg["optimizer"] = {"type": "Lamb", "params": {"lr": LR, "weight_decay": 0.1}}
    elif case == "no bias correction":
        cfg["optimizer"]["params"]["bias_correction"] = False
    elif case == "amsgrad":
        params = [{"params": decay + rest, "amsgrad": True}]
    elif case == "absolute schedule, own lrs":
        params = _groups(model, "lr")
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 2}}
    elif case == "onecycle momentum":
        cfg["scheduler"] = {"type": "OneCycle", "params": {"cycle_min_lr": 1e-3,
                                                          "cycle_max_lr": 1e-2}}
    elif case == "no optimizer (the runtime refuses)":
        del cfg["optimizer"]
    return params, cfg


REFUSALS = {"listed twice": "listed twice", "not the model's": "not one of the model's",
            "empty": "is empty", "mixed": "mixes", "nothing trainable": "requires grad",
            "lamb": "group 1 sets weight_decay", "no bias correction": "bias_correction",
            "amsgrad": "amsgrad", "absolute schedule, own lrs": "group 1 sets its own lr",
            "onecycle momentum": "cycle_momentum",
            "no optimizer (the runtime refuses)": "no optimizer"}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_culprit_and_leave_the_model_untouched(no_torchrun_env, case):
    model = _model(0)
    model[1].bias.requires_grad_(False)  # a frozen parameter stays as the user left it
    params, cfg = _refused(case, model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(zerofx.ConfigError, match=REFUSALS[case]):
        zerofx.initialize(model=model, model_parameters=params, config=cfg)
    assert [p.requires_grad for p in model.parameters()] == flags
