"""DeepSpeed's accelerator object and the `import deepspeed` shim (zerofx.as_deepspeed)."""
import sys

import pytest
import torch

import zerofx
from zerofx.accelerator import Accelerator, get_accelerator


def test_cpu_accelerator_answers_as_deepspeeds_cpu_accelerator(monkeypatch):
    """DeepSpeed's CPU_Accelerator without oneCCL: device 'cpu', backend gloo, the local
    rank as the current device, pinning is the identity."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    acc = Accelerator("cpu")
    assert (acc.device_name(), acc.device_name(3), acc.current_device_name()) == \
        ("cpu", "cpu", "cpu")
    assert acc.current_device() == 1 and acc.communication_backend_name() == "gloo"
    assert acc.is_available() and acc.is_synchronized_device() and acc.is_bf16_supported()
    t = torch.ones(3)
    assert acc.pin_memory(t) is t and not acc.is_pinned(t) and acc.on_accelerator(t)
    acc.manual_seed(7)
    a = torch.rand(2)
    acc.manual_seed_all(7)
    assert torch.equal(a, torch.rand(2))  # seeds the generator scripts draw from
    state = acc.get_rng_state()
    b = torch.rand(2)
    acc.set_rng_state(state)
    assert torch.equal(b, torch.rand(2))


def test_cuda_names_follow_deepspeeds_cuda_accelerator():
    acc = Accelerator("cuda")
    assert (acc.device_name(), acc.device_name(2), acc.communication_backend_name()) == \
        ("cuda", "cuda:2", "nccl")


def test_get_accelerator_matches_this_machine():
    assert get_accelerator().device_name() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_as_deepspeed_serves_the_imports_scripts_write(as_deepspeed):
    import deepspeed
    from deepspeed.accelerator import get_accelerator as ds_get

    assert deepspeed is zerofx and deepspeed.initialize is zerofx.initialize
    assert ds_get() is get_accelerator()
    from deepspeed import comm as dist

    assert dist.get_world_size() >= 1 and dist.ReduceOp.SUM is not None
    with pytest.raises(ImportError, match="deepspeed.moe.layer: Mixture-of-Experts"):
        from deepspeed.moe.layer import MoE  # noqa: F401
    # the group helper DeepSpeed's CIFAR example imports at its top, MoE or not
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer as split

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert split({"params": iter(params), "lr": 1}) == [{"params": params, "lr": 1}]
    expert = torch.nn.Parameter(torch.zeros(2))
    expert.allreduce = False  # DeepSpeed's mark of an expert parameter
    with pytest.raises(zerofx.ConfigError, match="Mixture-of-Experts"):
        split([{"params": [expert]}])
    with pytest.raises(ImportError, match="deepspeed.pipe: pipeline parallelism"):
        from deepspeed.pipe import PipelineModule  # noqa: F401


def test_as_deepspeed_refuses_beside_a_real_deepspeed(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", type(sys)("deepspeed"))
    with pytest.raises(ImportError, match="already imported"):
        zerofx.as_deepspeed()


def test_as_deepspeed_serves_deepspeed_runtimes_script_facing_modules(as_deepspeed):
    """What scripts import from deepspeed.runtime: the schedules (with DeepSpeed's type list),
    the engine class, see_memory_usage / move_to_device, Megatron's checkpointing; DeepSpeed's
    internals are one ImportError saying why."""
    import zerofx.checkpointing
    from deepspeed.runtime.activation_checkpointing import checkpointing
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES, WarmupLR
    from deepspeed.runtime.utils import move_to_device, see_memory_usage

    assert checkpointing is zerofx.checkpointing and DeepSpeedEngine is zerofx.ZeroEngine
    assert WarmupLR is zerofx.lr_schedules.WarmupLR and see_memory_usage is not None
    # the types listed are the ones the config takes (DeepSpeed 0.19 lists five)
    from zerofx.config.scheduler import _SCHEDULES

    assert sorted(VALID_LR_SCHEDULES) == sorted(_SCHEDULES) and len(VALID_LR_SCHEDULES) == 5
    moved = move_to_device({"a": [torch.ones(1), 3], "b": (torch.ones(1),)}, "meta")
    assert moved["a"][0].is_meta and moved["a"][1] == 3 and moved["b"][0].is_meta
    with pytest.raises(ImportError, match="engine internals"):
        from deepspeed.runtime.utils import clip_grad_norm_  # noqa: F401
    with pytest.raises(ImportError, match="deepspeed.runtime.zero: it is DeepSpeed.s"):
        import deepspeed.runtime.zero.stage3  # noqa: F401
    import zerofx.runtime

    assert zerofx.runtime.__name__ == "zerofx.runtime"  # zerofx's own package untouched
