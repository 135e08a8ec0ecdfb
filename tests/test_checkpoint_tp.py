"""Checkpoints with tensor parallelism: bitwise resume at TP 2, and re-sharding to TP 1.

The files hold each TP rank's pieces; reading joins them into whole parameters, so a TP 2
checkpoint loads into one process (and zerofx-consolidate reads it) with no conversion.
"""
import pytest
import torch

from models import block_batch, make
from multiproc import run_ranks

CFG = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
       "tensor_parallel": {"size": 2}, "train_micro_batch_size_per_gpu": 2,
       "zero_optimization": {"stage": 2, "reduce_bucket_size": 2000},
       "gradient_clipping": 1.0}


def _train(engine, steps, start):
    losses = []
    for step in range(start, start + steps):
        loss = engine(*block_batch(seed=step))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _body(rank, world, ckpt):
    import zerofx

    model, _ = make("block")
    engine, *_ = zerofx.initialize(model=model, config=CFG)
    _train(engine, 3, 0)
    engine.save_checkpoint(ckpt, client_state={"note": "tp"})
    saved = {s.name: engine.runtime.local_param(s.name).clone()
             for s in engine.runtime.plan.params}
    shards = {s.name: s.tp for s in engine.runtime.plan.params}
    after = _train(engine, 3, 3)
    fresh, *_ = zerofx.initialize(model=make("block", seed=7)[0], config=CFG)
    _, client = fresh.load_checkpoint(ckpt)
    resumed = _train(fresh, 3, 3)
    return saved, shards, after, resumed, client


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt_tp"))
    return ckpt, run_ranks(_body, 2, args=(ckpt,))


@pytest.mark.slow
def test_tp2_resume_is_bitwise(tp_run):
    _, results = tp_run
    for rank, (_, _, after, resumed, client) in enumerate(results):
        assert resumed == after, f"rank {rank}"
        assert client == {"note": "tp"}


@pytest.mark.slow
def test_tp2_checkpoint_joins_into_whole_parameters(tp_run, tmp_path, no_torchrun_env):
    import zerofx
    from zerofx.checkpoint import load_checkpoint
    from zerofx.checkpoint.files import full_state

    ckpt, results = tp_run
    tag = open(f"{ckpt}/latest").read().strip()
    whole = full_state(f"{ckpt}/{tag}", "master")
    for rank, (saved, shards, *_) in enumerate(results):
        for name, piece in saved.items():
            want = whole[name] if shards[name] is None else \
                shards[name].local_piece(whole[name], 2, rank)
            torch.testing.assert_close(piece, want, rtol=0, atol=0, msg=name)
    # assembled and joined in file-backed tensors (an NVMe-offloaded run's load): the same
    from zerofx.checkpoint.files import full_states
    from zerofx.runtime.offload.scratch import scratch_tensors

    staged, _ = full_states(f"{ckpt}/{tag}", alloc=lambda n: scratch_tensors(
        str(tmp_path), {"t": n}, rank=0)["t"])
    in_memory, _ = full_states(f"{ckpt}/{tag}")
    for key, by_name in in_memory.items():
        for name, t in by_name.items():
            assert torch.equal(staged[key][name], t), (key, name)
    # and loads into one process (TP 1): the whole model, as the pieces say
    cfg = {k: v for k, v in CFG.items() if k != "tensor_parallel"}
    model = make("block", seed=7)[0]
    rt = zerofx.ZeroRuntime(model, cfg)
    load_checkpoint(rt, ckpt)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), whole[name], rtol=0, atol=0, msg=name)


def test_join_is_the_inverse_of_the_split():
    from zerofx.checkpoint.files import join_tp_pieces
    from zerofx.tp.layout import TPShard

    w = torch.randn(12, 5)
    for shard in (TPShard(0, 3, (12, 5)), TPShard(0, 1, (12, 5))):
        pieces = [shard.local_piece(w, 2, r) for r in range(2)]
        torch.testing.assert_close(join_tp_pieces(pieces, shard.dim, shard.parts), w)
    shard = TPShard(1, 1, (12, 4))
    w = torch.randn(12, 4)
    torch.testing.assert_close(join_tp_pieces([shard.local_piece(w, 2, r) for r in range(2)],
                                              1, 1), w)


def _hf_body(rank, world, ckpt):
    import zerofx
    from hf_models import hf_batch, make_hf

    engine, *_ = zerofx.initialize(model=make_hf("gpt2"), config=HF_CFG)
    for step in range(2):
        engine.backward(engine(**hf_batch("gpt2", step)).loss)
        engine.step()
    engine.save_checkpoint(ckpt)
    styles = {s.name: (s.tp.dim, s.tp.parts) for s in engine.runtime.plan.params
              if s.tp is not None}
    return float(engine(**hf_batch("gpt2", 2)).loss), styles


HF_CFG = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
          "tensor_parallel": {"size": 2}, "train_micro_batch_size_per_gpu": 2,
          "zero_optimization": {"stage": 1}}


@pytest.mark.slow
def test_hf_gpt2_without_a_plan_saved_at_tp2_loads_into_one_process(tmp_path, no_torchrun_env):
    """GPT-2 as its users call it, split by the layout read from its graph (the tied word
    embedding by vocabulary rows, the fused q|k|v Conv1D in three parts): the TP 2 files join
    into the whole model, which computes the next batch's loss as the two ranks did."""
    pytest.importorskip("transformers")
    import zerofx
    from hf_models import hf_batch, make_hf
    from zerofx.checkpoint import load_checkpoint

    ckpt = str(tmp_path / "ckpt")
    (loss, styles), _ = run_ranks(_hf_body, 2, args=(ckpt,), timeout_s=240)
    assert styles["transformer.wte.weight"] == (0, 1)  # vocabulary rows
    assert styles["transformer.h.0.attn.c_attn.weight"] == (1, 3)  # Conv1D: q|k|v columns
    torch.manual_seed(5)
    model = make_hf("gpt2")
    for p in model.parameters():  # nothing of the fresh model may survive the load
        p.data.normal_()
    cfg = {k: v for k, v in HF_CFG.items() if k != "tensor_parallel"}
    load_checkpoint(zerofx.ZeroRuntime(model, cfg), ckpt)
    with torch.no_grad():
        got = float(model(**hf_batch("gpt2", 2)).loss)
    assert got == pytest.approx(loss, rel=1e-5), (got, loss)
