"""Models as their authors wrote them, on 2 real gloo ranks, against single-process AdamW.

Graph breaks, host reads, branches that differ per rank, tied and aliased weights, frozen,
unused and eagerly-run parameters, at ZeRO stages 0-2 and with gradient accumulation. The
parameters after training are compared as one vector (fp32: relative difference <= 1e-5).
"""
import pytest
import torch

from multiproc import run_ranks
from reference import deepspeed_step
from zoo_models import ZOO, make_zoo, zoo_batch

STEPS = 4
LR = 1e-2
CASES = [(0, 1), (1, 1), (2, 1), (2, 2)]  # (ZeRO stage, accumulation steps)


def _cfg(stage, gas):
    return {"optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 200},
            "gradient_accumulation_steps": gas, "gradient_clipping": 1.0}


def _seed(step, micro, rank):
    return 1000 * step + 10 * micro + rank


def _vector(model):
    return torch.cat([p.detach().float().reshape(-1) for _, p in model.named_parameters()])


def _body(rank, world, name):
    import zerofx

    out = []
    for stage, gas in CASES:
        torch._dynamo.reset()
        model = make_zoo(name)
        rt = zerofx.ZeroRuntime(model, _cfg(stage, gas))
        compiled = torch.compile(model, backend="zero", options={"runtime": rt})
        for step in range(STEPS):
            for micro in range(gas):
                rt.backward(compiled(*zoo_batch(_seed(step, micro, rank))))
                rt.step()
        out.append(_vector(model))
    return out


def _reference(name, world, gas):
    model = make_zoo(name)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    for step in range(STEPS):
        for micro in range(gas):
            for r in range(world):  # each rank's loss, as that rank computes it
                (model(*zoo_batch(_seed(step, micro, r))) / (world * gas)).backward()
        deepspeed_step(model, opt, 1.0)
    return _vector(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_matches_single_process(name):
    results = run_ranks(_body, 2, args=(name,), timeout_s=240)
    for (stage, gas), *per_rank in zip(CASES, *results):
        want = _reference(name, 2, gas)
        for rank, got in enumerate(per_rank):
            rel = float((got - want).norm() / want.norm())
            assert rel <= 1e-5, f"{name} stage {stage} gas {gas} rank {rank}: {rel:.2e}"


def test_branch_really_differs_between_the_ranks_batches():
    """In some step the two ranks of the 'breaks' model must take different branches, or
    the test above proves nothing about per-rank control flow."""
    taken = [tuple(bool(zoo_batch(_seed(step, 0, r))[0].mean() > 0) for r in range(2))
             for step in range(STEPS)]
    assert any(a != b for a, b in taken), taken


def test_tied_and_aliased_weights_are_one_parameter(no_torchrun_env):
    import zerofx

    model = make_zoo("shared")
    rt = zerofx.ZeroRuntime(model, _cfg(0, 1))
    names = [s.name for s in rt.plan.params]
    # named_parameters() order decides the plan's name (a module's own parameters first)
    assert "dec.weight" not in names and "dec.bias" not in names
    assert "frozen.weight" not in names  # frozen: not trained, not in the layout
    assert rt.aliases == {"enc.weight": ("dec.weight",), "bias_alias": ("dec.bias",)}


@pytest.mark.slow  # multi-rank or compile heavy: several seconds
def test_recompiles_and_eval_between_steps_share_one_layout(no_torchrun_env, tmp_path):
    import zerofx

    model, ref = make_zoo("breaks"), make_zoo("breaks")
    cfg = dict(_cfg(2, 1), zerofx={"dump_dir": str(tmp_path)})
    rt = zerofx.ZeroRuntime(model, cfg)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.01)
    programs = set()
    for step, n in enumerate((4, 6, 3, 4)):  # new batch sizes: Dynamo recompiles
        batch = zoo_batch(step, n=n)
        rt.backward(compiled(*batch))
        rt.step()
        programs.add(id(rt.step_program))
        with torch.no_grad():  # an eval graph between steps
            evaluated = compiled(*zoo_batch(99, n=n))
        ref(*batch).backward()
        deepspeed_step(ref, opt, 1.0)
        with torch.no_grad():
            torch.testing.assert_close(evaluated, ref(*zoo_batch(99, n=n)), rtol=1e-5, atol=1e-6)
    assert len(programs) == 1  # one step graph, one set of buckets, whatever recompiled
    rel = float((_vector(model) - _vector(ref)).norm() / _vector(ref).norm())
    assert rel <= 1e-5
    texts = [p.read_text() for p in tmp_path.glob("rank0/*/graph.txt")]
    breaks = [t for t in texts if "ends at a graph break" in t]
    assert any("zoo_models.py:" in t for t in breaks), texts
    assert any("inp.weight" in t for t in texts)  # which graph owns which parameters
