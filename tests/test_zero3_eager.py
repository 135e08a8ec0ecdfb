"""ZeRO-3 outside the compiled graphs (2 real gloo ranks, slow): a module called eagerly
gathers its own weights for the call and releases them after, as DeepSpeed's stage 3 does,
so ``engine.module(x)`` and Hugging Face ``generate`` run. With tensor parallelism an eager
call is refused by name (each rank holds pieces)."""
import pytest
import torch

from models import block_batch, make
from multiproc import run_ranks

ZERO3 = {"stage": 3, "reduce_bucket_size": 2000, "stage3_param_persistence_threshold": 0}
CFG = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
       "train_micro_batch_size_per_gpu": 2, "zero_optimization": ZERO3}


def _block_body(rank, world):
    import zerofx

    engine, *_ = zerofx.initialize(model=make("block")[0], config=CFG)
    for step in range(2):
        engine.backward(engine(*block_batch(seed=10 * step + rank)))
        engine.step()
    x, y = block_batch(seed=99)
    with torch.no_grad():
        eager = float(engine.module(x, y))  # the user's model, called directly
        engine.eval()
        compiled = float(engine(x, y))
    empty = all(p.numel() == 0 for _, p in engine.runtime.named_partitioned())
    return eager, compiled, empty


@pytest.mark.slow
def test_an_eager_call_of_the_model_gathers_its_weights_and_releases_them():
    for eager, compiled, empty in run_ranks(_block_body, 2):
        assert eager == pytest.approx(compiled, rel=1e-6)
        assert empty  # partitioned again after the call


def _generate_body(rank, world, tp):
    import zerofx
    from hf_models import make_hf

    cfg = dict(CFG, tensor_parallel={"size": tp})
    engine, *_ = zerofx.initialize(model=make_hf("gpt2"), config=cfg)
    ids = torch.tensor([[3, 14, 15, 9, 26]])
    try:
        with torch.no_grad():
            return engine.module.eval().generate(ids, max_new_tokens=6, do_sample=False,
                                                 pad_token_id=0).tolist()
    except zerofx.ConfigError as e:
        return str(e)


@pytest.mark.slow
def test_hugging_face_generate_runs_at_stage_3_like_the_whole_model():
    pytest.importorskip("transformers")
    from hf_models import make_hf

    ids = torch.tensor([[3, 14, 15, 9, 26]])
    with torch.no_grad():
        want = make_hf("gpt2").eval().generate(ids, max_new_tokens=6, do_sample=False,
                                               pad_token_id=0).tolist()
    assert run_ranks(_generate_body, 2, args=(1,)) == [want, want]
    for message in run_ranks(_generate_body, 2, args=(2,)):
        assert isinstance(message, str) and "split across the tensor-parallel" in message
        assert "engine(...)" in message
