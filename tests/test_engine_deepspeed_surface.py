"""DeepSpeed's engine surface beyond the loop: no_sync, explicit accumulation boundaries,
deepspeed.utils (logging, groups, safe_get_full_*, zero_to_fp32), the engine's readers.

References are plain torch: an eager copy of the model (same seed) whose gradients are
summed as DeepSpeed's rules say (each micro-batch's loss divided by the config's
gradient_accumulation_steps, averaged over data-parallel ranks), stepped by torch.optim.AdamW.
Adam's update hardly changes when every gradient is scaled, so the tests compare the
window's gradients too (safe_get_full_grad, before the step), not only the weights.
"""
import io
import logging
from contextlib import redirect_stdout

import pytest
import torch

import zerofx
from models import make, mlp_batch
from multiproc import run_ranks
from zerofx.ds_utils import safe_get_full_grad

LR = 1e-2


def _cfg(gas=1, stage=0, **extra):
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": gas,
           "gradient_clipping": 0.0, "steps_per_print": 1000,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
           "zero_optimization": {"stage": stage}}
    cfg.update(extra)
    return cfg


def _reference(windows, gas):
    """Eager torch: each window's gradients are sum(grad(loss) / gas) over its micro-batches
    (several lists of batches in a window: the ranks, averaged), then one AdamW step.
    Returns (model, optimizer, the last window's gradients by name)."""
    model = make("mlp")[0]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    grads = None
    for ranks in windows:
        opt.zero_grad()
        for batches in ranks:
            for x, y in batches:
                (model(x, y) / gas / len(ranks)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return model, opt, grads


def _close(got, want, what=""):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{what}: {m}")


def _batches(window, rank=0, n=3):
    return [mlp_batch(seed=100 * window + 10 * rank + k) for k in range(n)]


# ---- no_sync ----------------------------------------------------------------------------
def test_no_sync_sums_the_micro_batches_as_deepspeed(no_torchrun_env):
    """Backward passes inside no_sync accumulate; the backward after the block ends the
    window; step() updates with the sum (gas 1: DeepSpeed divides each loss by 1)."""
    model = make("mlp")[0]
    engine, *_ = zerofx.initialize(model=model, config=_cfg())
    seen = []
    for w in range(2):
        *inside, last = _batches(w)
        with engine.no_sync():
            for x, y in inside:
                engine.backward(engine(x, y))
                # DeepSpeed's counter still says boundary (gas 1): no_sync only holds the
                # reduction back, it does not move the window
                seen.append(engine.is_gradient_accumulation_boundary())
        engine.backward(engine(*last))
        grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters()}
        engine.step()
    assert seen == [True] * 4 and engine.global_steps == 2 and engine.micro_steps == 2
    ref, _, ref_grads = _reference([[_batches(w)] for w in range(2)], gas=1)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        _close(grads[n], ref_grads[n], n + " grad")
        _close(p, q, n)


def test_no_sync_refusals_are_deepspeeds(no_torchrun_env):
    """DeepSpeed asserts: no_sync at stage 2/3 (gradient partitioning), re-entry, and
    step() inside; each is one ConfigError here, and the engine trains on after."""
    engine, *_ = zerofx.initialize(model=make("mlp")[0], config=_cfg(stage=2))
    with pytest.raises(zerofx.ConfigError, match="no_sync.*stage 2.*gradient partitioning"):
        with engine.no_sync():
            pass
    engine, *_ = zerofx.initialize(model=make("mlp")[0], config=_cfg(stage=1))
    with engine.no_sync():
        with pytest.raises(zerofx.ConfigError, match="re-entry"):
            with engine.no_sync():
                pass
        engine.backward(engine(*mlp_batch(seed=1)))
        with pytest.raises(zerofx.ConfigError, match="step\\(\\) inside engine.no_sync"):
            engine.step()
    engine.backward(engine(*mlp_batch(seed=2)))
    engine.step()
    assert engine.global_steps == 1 and engine.was_step_applied()


def _no_sync_body(rank, world, stage):
    model = make("mlp")[0]
    engine, *_ = zerofx.initialize(model=model, config=_cfg(stage=stage))
    for w in range(2):
        *inside, last = _batches(w, rank)
        with engine.no_sync():
            for x, y in inside:
                engine.backward(engine(x, y))
        engine.backward(engine(*last))
        grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters()}
        engine.step()
    # a window whose every backward ran inside: DeepSpeed would step each rank's own sum
    # (the ranks drift apart); zerofx reduces it at the step
    with engine.no_sync():
        for x, y in _batches(2, rank):
            engine.backward(engine(x, y))
    engine.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, grads


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_no_sync_on_two_ranks_reduces_the_window_once(stage):
    """Two ranks, different data: the parameters equal one process stepping the rank-
    average of each rank's summed micro-batch gradients (stages 0 and 1, where DeepSpeed
    allows no_sync)."""
    results = run_ranks(_no_sync_body, 2, args=(stage,))
    windows = [[_batches(w, r) for r in range(2)] for w in range(3)]
    _, _, ref_grads = _reference(windows[:2], gas=1)  # the second window's gradients
    ref, _, _ = _reference(windows, gas=1)
    for rank, (params, grads) in enumerate(results):
        for n, q in ref.named_parameters():
            _close(grads[n], ref_grads[n], f"rank {rank} {n} grad")
            _close(params[n], q, f"rank {rank} {n}")


# ---- set_gradient_accumulation_boundary -------------------------------------------------
def test_explicit_boundary_deepspeeds_docstring_pattern(no_torchrun_env):
    """DeepSpeed's docstring: boundary False for gas-1 forward/backward passes, True for the
    last, one step() per window. The window is the mean of its gas micro-batches; one
    step() call per window (micro_steps counts step() calls, as DeepSpeed's)."""
    model = make("mlp")[0]
    engine, *_ = zerofx.initialize(model=model, config=_cfg(gas=4))
    for w in range(2):
        batches = _batches(w, n=4)
        engine.set_gradient_accumulation_boundary(False)
        for x, y in batches[:-1]:
            engine.backward(engine(x, y))
        assert not engine.is_gradient_accumulation_boundary()
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(engine(*batches[-1]))
        grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters()}
        engine.step()
    assert engine.global_steps == 2 and engine.micro_steps == 2
    ref, _, ref_grads = _reference([[_batches(w, n=4)] for w in range(2)], gas=4)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        _close(grads[n], ref_grads[n], n + " grad")
        _close(p, q, n)


def test_explicit_boundary_ends_windows_early_and_steps_there(no_torchrun_env, tmp_path):
    """gas 4 in the config, boundaries set every second micro-step with step() after each:
    the update happens at the marked micro-step, with the two gradients divided by 4
    (DeepSpeed's 1/gas at the loss), and the step count and checkpoints follow."""
    model = make("mlp")[0]
    engine, *_ = zerofx.initialize(model=model, config=_cfg(gas=4))
    updates = []
    for k in range(6):
        engine.set_gradient_accumulation_boundary(k % 2 == 1)
        engine.backward(engine(*mlp_batch(seed=k)))
        if k == 5:
            grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters()}
        before = engine.global_steps
        engine.step()
        updates.append(engine.global_steps - before)
    assert updates == [0, 1] * 3 and engine.micro_steps == 6
    windows = [[[mlp_batch(seed=k) for k in (2 * w, 2 * w + 1)]] for w in range(3)]
    ref, _, ref_grads = _reference(windows, gas=4)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        _close(grads[n], ref_grads[n], n + " grad")  # (g1 + g2) / 4: DeepSpeed's 1/gas
        _close(p, q, n)
    engine.save_checkpoint(tmp_path, tag="ok")  # a window just ended: allowed
    # gas 1 with the window held open: no counter shows it, the engine refuses the save
    one, *_ = zerofx.initialize(model=make("mlp")[0], config=_cfg(gas=1))
    one.set_gradient_accumulation_boundary(False)
    one.backward(one(*mlp_batch(seed=0)))
    one.step()
    assert one.global_steps == 0
    with pytest.raises(zerofx.checkpoint.CheckpointError, match="held open"):
        one.save_checkpoint(tmp_path, tag="open")
    one.set_gradient_accumulation_boundary(None)  # back to the counter: gas 1
    assert one.is_gradient_accumulation_boundary()
    with pytest.raises(zerofx.ConfigError, match="True, False or None"):
        one.set_gradient_accumulation_boundary("yes")


# ---- deepspeed.utils on two ranks -------------------------------------------------------
STAGES = (0, 1, 2, 3)


def _utils_body(rank, world):
    from zerofx.ds_utils import groups, safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for stage in STAGES:
        zero = {"stage": stage, "stage3_param_persistence_threshold": 0}
        model = make("mlp")[0]
        engine, *_ = zerofx.initialize(model=model, config=_cfg(gas=2, zero_optimization=zero))
        named = list(model.named_parameters())
        for w in range(2):
            for k, (x, y) in enumerate(_batches(w, rank, n=2)):
                engine.backward(engine(x, y))
                if k == 0:  # mid-window: not reduced yet
                    try:
                        safe_get_full_grad(named[0][1])
                    except zerofx.ConfigError:
                        pass
                    else:
                        raise AssertionError("safe_get_full_grad mid-window answered")
                else:
                    grads = {n: safe_get_full_grad(p) for n, p in named}
                engine.step()
        out[stage] = {
            "grad": grads,
            "param": {n: safe_get_full_fp32_param(p) for n, p in named},
            "exp_avg": {n: safe_get_full_optimizer_state(p, "exp_avg") for n, p in named},
            "exp_avg_sq": {n: safe_get_full_optimizer_state(p, "exp_avg_sq") for n, p in named},
        }
        if stage == 3:
            try:
                engine.state_dict()
            except zerofx.ConfigError as e:
                out["stage3_state_dict"] = str(e)
    out["groups"] = (groups._get_data_parallel_world_size(), groups._get_data_parallel_rank(),
                     groups.get_tensor_model_parallel_world_size(),
                     groups.get_model_parallel_rank(), groups._get_broadcast_src_rank(),
                     groups._get_data_parallel_group() is not None)
    out["engine"] = (engine.dp_world_size, engine.get_data_parallel_rank(),
                     engine.mp_world_size, engine.get_model_parallel_rank(),
                     engine.data_parallel_group is not None)
    # stage 2, gas 1, windows of two micro-steps marked by hand: the reduce-scatter path
    # accumulates across micro-steps it would otherwise reduce one by one
    model = make("mlp")[0]
    engine, *_ = zerofx.initialize(model=model, config=_cfg(gas=1, stage=2))
    for w in range(2):
        for k, (x, y) in enumerate(_batches(w, rank, n=2)):
            engine.set_gradient_accumulation_boundary(k == 1)
            engine.backward(engine(x, y))
            if k == 1:
                grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters()}
            engine.step()
    out["explicit_stage2"] = ({n: p.detach().clone() for n, p in model.named_parameters()},
                              grads, engine.global_steps)
    return out


@pytest.mark.slow
def test_utils_on_two_ranks_gather_what_one_process_computes():
    """safe_get_full_grad (after the boundary's backward), safe_get_full_fp32_param and
    safe_get_full_optimizer_state at stages 0-3 on 2 ranks equal one process's gradients,
    weights and AdamW moments; groups and the engine's readers give the layout; stage 3's
    state_dict is refused; an explicit boundary at stage 2 sums its window."""
    results = run_ranks(_utils_body, 2, timeout_s=280)
    windows = [[_batches(w, r, n=2) for r in range(2)] for w in range(2)]
    ref, opt, grads = _reference(windows, gas=2)
    for rank, out in enumerate(results):
        for stage in STAGES:
            got = out[stage]
            for n, p in ref.named_parameters():
                where = f"rank {rank} stage {stage} {n}"
                _close(got["grad"][n], grads[n], where + " grad")
                _close(got["param"][n], p.detach(), where + " param")
                _close(got["exp_avg"][n], opt.state[p]["exp_avg"], where + " exp_avg")
                _close(got["exp_avg_sq"][n], opt.state[p]["exp_avg_sq"], where + " exp_avg_sq")
        assert "stage 3" in out["stage3_state_dict"] and "GatheredParameters" in \
            out["stage3_state_dict"]
        assert out["groups"] == (2, rank, 1, 0, 0, True)
        assert out["engine"] == (2, rank, 1, 0, True)
        params, grads2, steps = out["explicit_stage2"]
        ref2, _, ref_grads2 = _reference(windows, gas=1)
        assert steps == 2
        for n, q in ref2.named_parameters():
            _close(grads2[n], ref_grads2[n], f"rank {rank} explicit stage 2 {n} grad")
            _close(params[n], q, f"rank {rank} explicit stage 2 {n}")


def _tp_body(rank, world):
    from zerofx.ds_utils import groups, safe_get_full_fp32_param

    model = make("mlp")[0]
    engine, *_ = zerofx.initialize(model=model, config=_cfg(tensor_parallel={
        "size": 2, "plan": {"fc1": "colwise", "fc2": "rowwise"}}))
    return ((groups._get_data_parallel_world_size(), groups._get_data_parallel_rank(),
             groups.get_tensor_model_parallel_world_size(),
             groups.get_tensor_model_parallel_rank(), groups.get_tensor_model_parallel_src_rank(),
             groups._get_data_parallel_group(), engine.mp_world_size,
             engine.get_model_parallel_rank(), engine.dp_world_size),
            safe_get_full_fp32_param(model.fc1.weight))


@pytest.mark.slow
def test_groups_and_pieces_with_tensor_parallelism():
    """tensor_parallel.size 2 on 2 ranks: the groups helpers and the engine's readers say
    TP 2 / DP 1, and safe_get_full_fp32_param gives this rank's column piece of fc1."""
    whole = make("mlp")[0].fc1.weight.detach()
    for rank, (layout, piece) in enumerate(run_ranks(_tp_body, 2)):
        assert layout == (1, 0, 2, rank, 0, None, 2, rank, 1)
        assert torch.equal(piece, whole[16 * rank:16 * (rank + 1)])


def test_safe_get_full_grad_refuses_outside_the_window(no_torchrun_env):
    from zerofx.ds_utils import safe_get_full_optimizer_state

    model = make("mlp")[0]
    engine, *_ = zerofx.initialize(model=model, config=_cfg())
    w = model.fc1.weight
    with pytest.raises(zerofx.ConfigError, match="before engine.step"):
        safe_get_full_grad(w)  # no backward yet: the buffer holds nothing of this window
    engine.backward(engine(*mlp_batch(seed=0)))
    ref = make("mlp")[0]
    ref(*mlp_batch(seed=0)).backward()
    _close(safe_get_full_grad(w), ref.fc1.weight.grad, "one process")
    engine.step()
    with pytest.raises(zerofx.ConfigError, match="accumulation boundary"):
        safe_get_full_grad(w)  # after the step: the buffer is the old window's
    with pytest.raises(zerofx.ConfigError, match="exp_avg, exp_avg_sq"):
        safe_get_full_optimizer_state(w, "momentum_buffer")
    plain = torch.nn.Linear(2, 2)  # trained by no zerofx runtime: DeepSpeed's None
    assert safe_get_full_grad(plain.weight) is None


# ---- the engine's DeepSpeed attributes --------------------------------------------------
def test_engine_attributes_and_deepspeeds_attribute_rule(no_torchrun_env):
    """state_dict is the model's under "module." once (the compiled wrapper is not a
    second copy), loading weights into a running engine is refused, unknown names go to the
    model, DeepSpeed features zerofx lacks are one AttributeError naming them."""
    model = make("mlp")[0]
    engine, *_ = zerofx.initialize(model=model, config=_cfg(
        bf16={"enabled": True}, scheduler={"type": "WarmupLR", "params": {}}))
    want = {"module." + k: v for k, v in model.state_dict().items()}
    got = engine.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    model.fc2.bias.requires_grad_(False)
    assert "fc2.bias" not in engine.module_state_dict(exclude_frozen_parameters=True)
    assert "fc2.bias" in engine.module_state_dict()
    for load in (engine.load_state_dict, engine.load_module_state_dict):
        with pytest.raises(zerofx.ConfigError, match="fp32 master copy"):
            load({})
    assert engine.fc1 is model.fc1  # DeepSpeedEngine.__getattr__ passes through
    with pytest.raises(AttributeError, match="offload_states.*not part of zerofx"):
        engine.offload_states()
    with pytest.raises(AttributeError, match="no attribute 'fc3'"):
        engine.fc3
    engine.eval()
    assert not model.training and not engine.training
    engine.train()
    assert model.training
    assert (engine.mp_world_size, engine.get_data_parallel_rank(),
            engine.get_model_parallel_rank(), engine.data_parallel_group) == (1, 0, 0, None)
    assert (engine.optimizer_name(), engine.scheduler_name()) == ("AdamW", "WarmupLR")
    assert engine.get_mom() == [(0.9, 0.999)] and engine.steps_per_print() == 1000
    assert engine.bfloat16_enabled() and not engine.zero_optimization_partition_gradients()
    assert engine.is_compiled and not engine.curriculum_learning_enabled()
    assert not engine.has_moe_layers and engine.sequence_parallel_size == 1
    loss = engine(*mlp_batch(seed=0))
    assert torch.equal(engine.scale(loss), loss)  # no fp16: the loss itself


@pytest.mark.parametrize("static", [0.0, 128.0])
def test_loss_scale_readers_follow_deepspeed(no_torchrun_env, static):
    """DeepSpeed's engine.loss_scale() is the config's fp16.loss_scale (0: dynamic) and
    dynamic_loss_scale() says whether it is 0; the scale in use is the optimizer's
    loss_scale / cur_scale, which a dynamic scaler halves on an overflow and a static one
    keeps."""
    fp16 = {"enabled": True, "loss_scale": static, "initial_scale_power": 4,
            "hysteresis": 1}
    engine, *_ = zerofx.initialize(model=make("mlp")[0], config=_cfg(fp16=fp16))
    assert engine.loss_scale() == static and engine.dynamic_loss_scale() == (static == 0)
    start = 16.0 if static == 0 else static
    assert engine.optimizer.loss_scale == engine.optimizer.cur_scale == start
    x, y = mlp_batch(seed=0)
    engine.backward(engine(x.masked_fill(x > 1, float("inf")), y))  # an overflow
    engine.step()
    assert engine.skipped_steps == 1 and not engine.was_step_applied()
    assert engine.optimizer.loss_scale == (start / 2 if static == 0 else start)
    assert engine.loss_scale() == static


# ---- deepspeed.utils: the module, logging, memory, zero_to_fp32 --------------------------
def test_as_deepspeed_installs_utils(as_deepspeed):
    import deepspeed
    import deepspeed.utils.groups
    from deepspeed.utils import groups, log_dist, logger, safe_get_full_grad  # noqa: F401
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    import zerofx.ds_utils as ds_utils

    assert deepspeed.utils is ds_utils and deepspeed.utils.groups is ds_utils.groups
    assert get_fp32_state_dict_from_zero_checkpoint is \
        ds_utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint
    with pytest.raises(ImportError, match="deepspeed.utils.timer"):
        import deepspeed.utils.timer  # noqa: F401
    with pytest.raises(AttributeError, match="safe_set_full_fp32_param.*GatheredParameters"):
        deepspeed.utils.safe_set_full_fp32_param
    with pytest.raises(AttributeError, match="Mixture-of-Experts"):
        groups._get_expert_parallel_group("ep_size_2")
    assert zerofx.utils is ds_utils  # `import zerofx as deepspeed` reaches it too


def test_log_dist_and_see_memory_usage_follow_deepspeed(no_torchrun_env):
    from zerofx.ds_utils import dist_log, log_dist, logger, see_memory_usage

    # no process group: every call logs, as "[Rank -1] ..." (DeepSpeed's rule)
    assert dist_log.get_dist_msg("hi", ranks=[0]) == "[Rank -1] hi"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        log_dist("info below the default level", ranks=[0])
        log_dist("a warning", ranks=[0], level=logging.WARNING)
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "[Rank -1] a warning\n"  # DeepSpeed's logger starts at WARNING
    out = io.StringIO()
    with redirect_stdout(out):
        see_memory_usage("quiet")
        see_memory_usage("after init", force=True)
    lines = out.getvalue().splitlines()
    assert lines[0] == "after init" and lines[1].startswith("MA ") and \
        lines[2].startswith("CPU Virtual Memory:  used = ")
    with pytest.raises(ValueError, match="not one of"):
        dist_log.set_log_level_from_string("loud")


def test_zero_to_fp32_reads_zerofx_checkpoints(no_torchrun_env, tmp_path):
    """get_fp32_state_dict_from_zero_checkpoint gives the fp32 master weights the engine
    trained (equal to safe_get_full_fp32_param), load_state_dict_from_zero_checkpoint
    puts them in a fresh model, and the converter names zerofx-consolidate."""
    from zerofx.ds_utils import safe_get_full_fp32_param, zero_to_fp32

    model = make("mlp")[0]
    engine, *_ = zerofx.initialize(model=model, config=_cfg(stage=1))
    for k in range(2):
        engine.backward(engine(*mlp_batch(seed=k)))
        engine.step()
    engine.save_checkpoint(tmp_path)
    state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(tmp_path)
    assert set(state) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert torch.equal(state[n], safe_get_full_fp32_param(p)) and torch.equal(state[n], p)
    fresh = zero_to_fp32.load_state_dict_from_zero_checkpoint(make("mlp", seed=5)[0], tmp_path)
    for (n, p), q in zip(fresh.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n
    # DeepSpeed's load_checkpoint options: the defaults load, the others are refused
    with pytest.raises(zerofx.ConfigError, match="load_module_only"):
        engine.load_checkpoint(tmp_path, load_module_only=True)
    path, _ = engine.load_checkpoint(tmp_path, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    assert path is not None and engine.global_steps == 2
    with pytest.raises(zerofx.checkpoint.CheckpointError, match="zerofx-consolidate"):
        zero_to_fp32.convert_zero_checkpoint_to_fp32_state_dict(tmp_path, tmp_path / "out")
    with pytest.raises(zerofx.checkpoint.CheckpointError, match="latest.*does not exist"):
        zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(tmp_path / "global_step2")


def test_a_runtime_kept_past_its_model_never_claims_a_later_parameter(no_torchrun_env):
    """Parameters are known by identity; a runtime that outlives its model (a cycle not yet
    collected, as between tests) must not take a parameter made later, which CPython gives
    a freed one's id within a few allocations, for its own: safe_get_full_grad once asked
    such a runtime (no engine left) and refused a live engine's parameter (a clean-clone CI
    failure of this file)."""
    import gc

    from torch import nn

    old = make("mlp")[0]
    kept = zerofx.ZeroRuntime(old, _cfg())
    ids = {id(p) for p in old.parameters()}
    del old
    gc.collect()
    fresh = []
    for _ in range(10_000):  # until CPython hands out a dead parameter's id again
        fresh.append(nn.Parameter(torch.zeros(1)))
        if id(fresh[-1]) in ids:
            break
    assert id(fresh[-1]) in ids, "no id was reused: the test proves nothing"
    assert kept.param_name(fresh[-1]) is None
    with pytest.raises(KeyError, match="not a parameter of this runtime's model"):
        kept.carriers.index_of(fresh[-1])
    # a live engine's gradients are found beside the kept runtime, whatever ids they have
    model = make("mlp")[0]
    engine, *_ = zerofx.initialize(model=model, config=_cfg())
    engine.backward(engine(*mlp_batch(seed=0)))
    assert all(safe_get_full_grad(p) is not None for p in model.parameters())
    kept.close()
