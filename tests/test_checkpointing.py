"""zerofx.checkpointing (deepspeed.checkpointing): a checkpointed region is recomputed in the
backward, its gradients equal to the plain call's, and the forward graph saves less."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zerofx
from zerofx import checkpointing
from zerofx.passes import PassSpec
from multiproc import run_ranks


class Stack(nn.Module):
    """Blocks of Linear-GELU-Linear with residuals; ``ckpt`` wraps each block."""

    def __init__(self, ckpt: bool, d: int = 32, depth: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(),
                                                  nn.Linear(4 * d, d)) for _ in range(depth))
        self.head = nn.Linear(d, 4)
        self.ckpt = ckpt

    def forward(self, x, y):
        for block in self.blocks:
            x = x + (checkpointing.checkpoint(block, x) if self.ckpt else block(x))
        return F.cross_entropy(self.head(torch.tanh(x)), y)


def _batch(k):
    g = torch.Generator().manual_seed(k)
    return torch.randn(16, 32, generator=g), torch.randint(4, (16,), generator=g)


def _cfg(stage):
    return {"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "Adam", "params": {"lr": 1e-2}}}


def _saved_bytes_recorder(seen: list):
    def record(pair, ctx):
        fw, _ = pair
        outs = fw.graph.output_node().args[0][ctx.num_fwd_outputs:]
        # activations only: a saved graph input (a weight) costs no memory of its own
        seen.append(sum(o.meta["val"].numel() * o.meta["val"].element_size()
                        for o in outs if hasattr(o, "meta") and "val" in o.meta
                        and o.op != "placeholder"))
        return pair
    return PassSpec("record_saved", record, frozenset({"partitioned"}))


def _train(ckpt, stage, steps=4, seen=None):
    model = Stack(ckpt)
    rt = zerofx.ZeroRuntime(model, _cfg(stage))
    extra = (_saved_bytes_recorder(seen),) if seen is not None else ()
    compiled = torch.compile(model, backend="zero",
                             options={"runtime": rt, "extra_passes": extra})
    losses = []
    for k in range(steps):
        with rt.shape_carriers():
            loss = compiled(*_batch(k))
        loss.backward()
        rt.step()
        losses.append(loss.detach())
    with rt.gathered_parameters():
        return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("stage", [0, 2])
def test_checkpointed_training_equals_the_plain_one(no_torchrun_env, stage):
    torch._dynamo.reset()
    plain_seen, ckpt_seen = [], []
    losses, params = _train(False, stage, seen=plain_seen)
    torch._dynamo.reset()
    c_losses, c_params = _train(True, stage, seen=ckpt_seen)
    assert torch.equal(losses, c_losses)  # fp32, the same ops recomputed: the same bits
    assert all(torch.equal(a, b) for a, b in zip(params, c_params))
    # the forward keeps each block's input instead of its 4x-wide hidden activations
    assert ckpt_seen and plain_seen and ckpt_seen[0] < plain_seen[0] / 2, (ckpt_seen,
                                                                           plain_seen)


def _stage3_body(rank, world):
    torch._dynamo.reset()
    plain = _train(False, 3)
    torch._dynamo.reset()
    ckpt = _train(True, 3)
    return plain, ckpt


@pytest.mark.slow
def test_checkpointing_at_stage_3_on_two_ranks():
    for (losses, params), (c_losses, c_params) in run_ranks(_stage3_body, 2):
        assert torch.equal(losses, c_losses)
        assert all(torch.equal(a, b) for a, b in zip(params, c_params))


def test_configure_reads_the_block_and_says_what_changes_nothing(no_torchrun_env, caplog):
    class MPU:
        def get_model_parallel_world_size(self):
            return 2

        def get_model_parallel_rank(self):
            return 0

    cfg = {"activation_checkpointing": {"partition_activations": True,
                                        "cpu_checkpointing": True, "profile": True}}
    with caplog.at_level("WARNING"):  # with TP, partition_activations acts (its own tests)
        checkpointing.configure(MPU(), deepspeed_config=cfg)
    assert "cpu_checkpointing" in caplog.text and "partition_activations" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # given only to configure: said where it must go
        checkpointing.configure(MPU(), partition_activations=True)
    assert "engine's config" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # without TP it changes nothing, and says so
        checkpointing.configure(None, deepspeed_config=cfg, num_checkpoints=4)
    assert checkpointing.is_configured()
    assert all(k in caplog.text for k in ("partition_activations", "cpu_checkpointing",
                                          "number_checkpoints"))
    with pytest.raises(zerofx.ConfigError, match="partiton_activations|did you mean"):
        checkpointing.configure(None, deepspeed_config={
            "activation_checkpointing": {"partiton_activations": True}})


def test_megatron_rng_tracker_forks_a_separate_stream(no_torchrun_env):
    checkpointing.model_parallel_cuda_manual_seed(123)
    tracker = checkpointing.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advanced
    torch.manual_seed(123 + 2718)
    assert torch.equal(a, torch.rand(3))  # Megatron's offset, TP rank 0


def test_deepspeed_names(no_torchrun_env, as_deepspeed):
    ds = as_deepspeed
    import deepspeed.checkpointing as dc
    import deepspeed.zero as dz

    assert dc.checkpoint is checkpointing.checkpoint and ds.checkpointing is dc
    assert dz.GatheredParameters is zerofx.zero.GatheredParameters


def _hf_train(name, ckpt_kwargs, steps=3):
    from hf_models import hf_batch, make_hf

    torch._dynamo.reset()
    model = make_hf(name)
    if ckpt_kwargs is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    engine, *_ = zerofx.initialize(model=model, config=_cfg(2))
    losses = []
    for k in range(steps):
        loss = engine(**hf_batch(name, k)).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", [("gpt2", {}), ("gpt2", {"use_reentrant": False}),
                                          ("llama", {"use_reentrant": False})])
def test_hugging_face_gradient_checkpointing_keeps_training_exact(no_torchrun_env, name,
                                                                    kwargs):
    # {}: Hugging Face's default checkpoint function and arguments
    losses, params = _hf_train(name, None)
    c_losses, c_params = _hf_train(name, kwargs)
    torch.testing.assert_close(c_losses, losses, rtol=0, atol=0)
    for a, b in zip(params, c_params):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def _budget_run(budget, tmp_path, stage=2):
    torch._dynamo.reset()
    model = Stack(False)
    cfg = {**_cfg(stage), "zerofx": {"activation_memory_budget": budget,
                                     "dump_dir": str(tmp_path / f"b{budget}")}}
    rt = zerofx.ZeroRuntime(model, cfg)
    seen = []
    compiled = torch.compile(model, backend="zero", options={
        "runtime": rt, "extra_passes": (_saved_bytes_recorder(seen),)})
    losses = []
    for k in range(3):
        loss = compiled(*_batch(k))
        loss.backward()
        rt.step()
        losses.append(loss.detach())
    report = next((tmp_path / f"b{budget}").rglob("saved.txt")).read_text()
    with rt.gathered_parameters():  # stage 3: whole values, not the empty stand-ins
        params = [p.detach().clone() for p in model.parameters()]
    assert all(p.numel() for p in params)
    return torch.stack(losses), params, seen[0], report


def test_an_activation_memory_budget_trades_saved_bytes_for_recompute(no_torchrun_env,
                                                                       tmp_path):
    runs = {b: _budget_run(b, tmp_path) for b in (1.0, 0.5, 0.0)}
    losses, params, _, _ = runs[1.0]
    for b, (l, p, _, _) in runs.items():  # recomputing changes no value (fp32, same ops)
        assert torch.equal(l, losses), b
        assert all(torch.equal(x, y) for x, y in zip(p, params)), b
    saved = {b: r[2] for b, r in runs.items()}
    assert saved[0.0] <= saved[0.5] < saved[1.0], saved
    assert "recomputed in the backward (0 ops)" in runs[1.0][3]
    assert "recomputed in the backward (0 ops)" not in runs[0.0][3]  # the dump names them
    assert "gelu" in runs[0.0][3]


def _budget_stage3_body(rank, world, root):
    import pathlib

    out = {}
    for b in (1.0, 0.0):
        losses, params, saved, _ = _budget_run(b, pathlib.Path(root) / f"r{rank}", stage=3)
        out[b] = (losses, params, saved)
    return out


@pytest.mark.slow
def test_a_budget_at_stage_3_on_two_ranks_changes_no_value(tmp_path):
    for out in run_ranks(_budget_stage3_body, 2, args=(str(tmp_path),)):
        (l1, p1, s1), (l0, p0, s0) = out[1.0], out[0.0]
        assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(p0, p1))
        assert s0 < s1


def _hf_tp_body(rank, world, name, steps):
    from hf_models import make_hf, train_on_hf_batches
    from test_tensor_parallel import _cfg as tp_cfg

    model = make_hf(name)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, *_ = zerofx.initialize(model=model, config=tp_cfg(clip=1.0, stage=1))
    losses, _ = train_on_hf_batches(engine, name, steps, 0)
    rt = engine.runtime
    return losses, {s.name: rt.local_param(s.name).float().clone() for s in rt.plan.params}, \
        {s.name: s.tp for s in rt.plan.params}


@pytest.mark.slow
def test_hf_llama_gradient_checkpointing_at_tp2_trains_like_one_process():
    """transformers 5.25's Llama layers set a context variable in their forward (the kernel
    hub's decoration), a side effect Dynamo will not trace inside a checkpointed region by
    default: the whole decoder layer then ran eagerly, where tensor-parallel weights cannot
    run (a ConfigError at the first backward). The engine has Dynamo trace such regions;
    the TP 2 run equals one process."""
    pytest.importorskip("transformers")
    from hf_models import one_process_reference
    from test_tensor_parallel import LR as TP_LR
    from test_tensor_parallel import _relative_difference

    steps = 3
    results = run_ranks(_hf_tp_body, 2, args=("llama", steps), timeout_s=300)
    model, (want,), _ = one_process_reference("llama", steps, 1, TP_LR)
    for rank, (losses, pieces, shards) in enumerate(results):
        assert any(s is not None for s in shards.values())  # some weights really split
        torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-5)
        assert _relative_difference(model, pieces, shards, tp_rank=rank) <= 1e-5


def test_profile_does_not_break_the_compiled_graph(no_torchrun_env):
    """profile: true logs each eager checkpointed call; compiled, a log call inside the
    traced forward would break the graph before every region (fullgraph raises on one)."""
    checkpointing.configure(None, deepspeed_config={"activation_checkpointing":
                                                    {"profile": True}})
    try:
        model = Stack(ckpt=True)
        torch._dynamo.reset()
        torch.compile(model, backend="aot_eager", fullgraph=True)(*_batch(0)).backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        checkpointing.configure(None, deepspeed_config={})
