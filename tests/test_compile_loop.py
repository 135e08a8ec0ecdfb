"""A torch.compile user's own loop with ZeRO: ``opt.step(); opt.zero_grad()`` kept, the
optimizer handed to a ZeroRuntime (which then runs zerofx's sharded, fused step), a torch
LR scheduler on it, fp16 through ``rt.scale(loss).backward()``. Reference: one process,
torch AdamW and the same scheduler on the global batch."""
import pytest
import torch

from models import make, mlp_batch
from multiproc import run_ranks

STEPS = 6


def _schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))


def _body(rank, world, stage, fp16):
    import zerofx

    torch._dynamo.reset()
    model, _ = make("mlp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = _schedule(opt)
    cfg = {"zero_optimization": {"stage": stage, "reduce_bucket_size": 300}}
    if fp16:
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    rt = zerofx.ZeroRuntime(model, cfg, optimizer=opt)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    for step in range(STEPS):
        loss = compiled(*mlp_batch(seed=100 * step + rank))
        rt.scale(loss).backward()      # under bf16/fp32 the same as loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _reference(world):
    model, _ = make("mlp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = _schedule(opt)
    for step in range(STEPS):
        for r in range(world):
            (model(*mlp_batch(seed=100 * step + r)) / world).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("stage, fp16, tol", [(2, False, 1e-5), (1, False, 1e-5),
                                              (2, True, 2e-2)])
def test_own_loop_with_zero_matches_one_process(stage, fp16, tol):
    ref = _reference(2)
    for rank, params in enumerate(run_ranks(_body, 2, args=(stage, fp16))):
        for n, p in params.items():
            torch.testing.assert_close(p, ref[n], rtol=tol, atol=tol,
                                       msg=lambda m: f"stage {stage} fp16 {fp16} rank {rank} "
                                                     f"{n}: {m}")


def test_plain_backward_under_fp16_names_both_spellings(no_torchrun_env):
    import zerofx
    from zerofx.config import ConfigError

    model, batch = make("mlp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rt = zerofx.ZeroRuntime(model, {"fp16": {"enabled": True}}, optimizer=opt)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    compiled(*batch).backward()
    with pytest.raises(ConfigError, match=r"rt.scale\(loss\).backward\(\)"):
        opt.step()
