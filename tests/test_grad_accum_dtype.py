"""data_types.grad_accum_dtype "fp32" under bf16: gradients summed and reduced in fp32.

DeepSpeed's rule (its BF16 optimizer, and its ZeRO optimizers' gradient_accumulation_dtype):
each micro-step's compute-dtype gradient is added into an fp32 accumulator. The inputs are
chosen so every micro-step's gradient is exact in bf16 while their sum is not: the fp32 sum
is then known exactly (plain arithmetic, below), and accumulating in bf16 would round it.
"""
import pytest
import torch
from torch import nn

from multiproc import run_ranks

GAS = 4
# micro-step inputs of a bias-free Linear(2, 1) under loss = sum(output): the weight's
# gradient is the input (divided by GAS, DeepSpeed's scaling), exact in bf16 each time
BIG, ONE = 256.0, 1.0
INPUTS = [[BIG, ONE], [ONE, BIG], [ONE, BIG], [ONE, BIG]]
EXACT = [sum(x[i] for x in INPUTS) / GAS for i in range(2)]  # 64.75, 192.25


def _bf16_sum():
    acc = torch.zeros(2, dtype=torch.bfloat16)
    for x in INPUTS:
        acc += torch.tensor(x, dtype=torch.bfloat16) / GAS
    return acc.float().tolist()


def _config(stage, accum):
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": GAS,
           "bf16": {"enabled": True}, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    if accum:
        cfg["data_types"] = {"grad_accum_dtype": accum}
    return cfg


def _window_grad(stage, accum, inputs):
    """The accumulated gradient at the window's last backward (before its step)."""
    import zerofx
    from zerofx.ds_utils import safe_get_full_grad

    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False)
    engine, *_ = zerofx.initialize(model=model, config=_config(stage, accum))
    for i, x in enumerate(inputs):
        engine.backward(engine(torch.tensor([x])).float().sum())
        if i < GAS - 1:
            engine.step()
    grad = safe_get_full_grad(model.weight).reshape(-1).tolist()
    dtype = engine.runtime.state.shard_grads.dtype
    engine.step()
    return grad, dtype


def test_the_sum_needs_fp32():  # the property below can fail: bf16 rounds this sum
    assert _bf16_sum() != EXACT


@pytest.mark.parametrize("stage", [0, 2])
def test_gradients_accumulate_in_fp32(stage, no_torchrun_env):
    grad, dtype = _window_grad(stage, "fp32", INPUTS)
    assert dtype == torch.float32
    assert grad == EXACT


def test_compute_dtype_accumulation_is_the_default(no_torchrun_env):
    grad, dtype = _window_grad(0, None, INPUTS)
    assert dtype == torch.bfloat16 and grad == _bf16_sum()


def _rank_body(rank, world, stage):
    # each rank its own inputs: the reduction (mean over ranks) is in fp32 too
    inputs = INPUTS if rank == 0 else [list(reversed(x)) for x in INPUTS]
    return _window_grad(stage, "fp32", inputs)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_reduce_in_fp32(stage):
    results = run_ranks(_rank_body, 2, args=(stage,))
    other = [sum(x[1 - i] for x in INPUTS) / GAS for i in range(2)]
    want = [(a + b) / 2 for a, b in zip(EXACT, other)]
    for grad, dtype in results:
        assert dtype == torch.float32 and grad == want
