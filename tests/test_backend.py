"""The zero backend end to end: registration, options, equivalence with eager, Inductor."""
import json
import subprocess
import sys

import pytest
import torch

import zerofx
from models import make
from multiproc import run_ranks
from zerofx.backend import input_roles


def _loss_and_grads(model, batch):
    loss = model(*batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _compiled_vs_eager(name, config=None, seed=0):
    model, batch = make(name, seed)
    ref, _ = make(name, seed)
    compiled = torch.compile(model, backend="zero", options={"config": config or {}})
    return _loss_and_grads(compiled, batch), _loss_and_grads(ref, batch)


@pytest.mark.slow
def test_backend_found_without_importing_zerofx():
    code = ("import sys, torch\n"
            "assert 'zero' in torch._dynamo.list_backends(), torch._dynamo.list_backends()\n"
            "m = torch.compile(torch.nn.Linear(4, 2), backend='zero')\n"
            "x = torch.randn(3, 4)\n"
            "assert torch.allclose(m(x), m._orig_mod(x))\n"
            "print('ok', 'zerofx' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", "True"]  # loaded through the entry point


@pytest.mark.parametrize("name", ["mlp", "block"])
def test_fp32_matches_eager(name, no_torchrun_env):
    (loss, grads), (ref_loss, ref_grads) = _compiled_vs_eager(name)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_config_as_dict_path_or_config(tmp_path, no_torchrun_env):
    d = {"bf16": {"enabled": True}, "zero_optimization": {"reduce_bucket_size": 100}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(d))
    results = [_compiled_vs_eager("mlp", cfg)[0][0]
               for cfg in (d, str(path), zerofx.Config.from_dict(d), zerofx.Config.from_file(path))]
    fp32 = _compiled_vs_eager("mlp")[0][0]
    assert all(torch.equal(r, results[0]) for r in results)
    assert not torch.equal(results[0], fp32)  # bf16 really took effect


def test_unknown_option_and_bad_config_are_named(no_torchrun_env):
    model, batch = make("mlp")
    with pytest.raises(Exception, match=r"unknown zero backend option\(s\) \['confg'\]"):
        torch.compile(model, backend="zero", options={"confg": {}})(*batch)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"zero_optimization\.stgae.*stage"):
        torch.compile(model, backend="zero",
                      options={"config": {"zero_optimization": {"stgae": 1}}})(*batch)


def test_input_roles_name_parameters():
    model, batch = make("mlp")
    seen = {}

    def spy(gm, example_inputs, **kw):
        seen["roles"] = input_roles(gm, example_inputs)
        return gm.forward

    torch.compile(model, backend=spy)(*batch)
    params = [r.name for r in seen["roles"] if r.kind == "param"]
    assert sorted(params) == sorted(n for n, _ in model.named_parameters())
    assert sum(r.kind == "input" for r in seen["roles"]) == 2


def _two_rank_body(rank, world_size, name):
    """Inference on several ranks (training there is refused: see below)."""
    import torch.distributed as dist

    model, batch = make(name, rank)
    ref, _ = make(name, rank)
    compiled = torch.compile(model, backend="zero", options={"config": {}})
    with torch.no_grad():
        out = compiled(*batch)
    assert dist.is_initialized() and dist.get_world_size() == world_size  # backend bootstrapped
    torch.testing.assert_close(out, ref(*batch), rtol=1e-6, atol=1e-6)
    return dist.get_rank()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "block"])
def test_two_ranks_match_eager(name):
    assert run_ranks(_two_rank_body, 2, args=(name,)) == [0, 1]


@pytest.mark.slow
def test_inductor_switch_matches_eager(no_torchrun_env):
    (loss, grads), (ref_loss, ref_grads) = _compiled_vs_eager("mlp", {"zerofx": {"inductor": True}})
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_runtime_and_a_different_config_are_refused(no_torchrun_env):
    model, batch = make("mlp")
    rt = zerofx.ZeroRuntime(model, {"optimizer": {"type": "AdamW"}})
    same = torch.compile(model, backend="zero",
                         options={"runtime": rt, "config": {"optimizer": {"type": "AdamW"}}})
    same(*batch).backward()  # the same config twice is fine
    torch._dynamo.reset()
    other = torch.compile(model, backend="zero",
                          options={"runtime": rt, "config": {"bf16": {"enabled": True}}})
    with pytest.raises(Exception, match="differs from the config the ZeroRuntime"):
        other(*batch)


@pytest.mark.parametrize("config, culprit", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "the optimizer block"),
    ({"scheduler": {"type": "WarmupLR"}}, "the scheduler block"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage 2"),
    ({"fp16": {"enabled": True}}, "fp16 loss scaling"),
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
])
def test_plain_training_refuses_what_it_cannot_apply(no_torchrun_env, config, culprit):
    from zerofx.config import ConfigError

    model, batch = make("mlp")
    compiled = torch.compile(model, backend="zero", options={"config": config})
    with torch.no_grad():  # inference needs none of it: allowed with the same config
        torch.testing.assert_close(compiled(*batch), make("mlp")[0](*batch), rtol=1e-2,
                                   atol=1e-3)  # (fp16 compute for the fp16 case)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        compiled(*batch)
    assert isinstance(info.value.inner_exception, ConfigError)
    assert culprit in str(info.value) and "zerofx.initialize" in str(info.value)
