"""DeepSpeed's own keys: applied, accepted without effect, or refused by feature name; never
"not known". Checked on the 74 training configs of DeepSpeed's examples repository."""
import json
from pathlib import Path

import pytest
import torch

from zerofx.config import Config, ConfigError

EXAMPLES = sorted((Path(__file__).parent / "data" / "deepspeed_examples").glob("*.json"))


def test_the_examples_are_all_here():
    assert len(EXAMPLES) == 74


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name[:60])
def test_example_config_loads_or_is_refused_by_feature_name(path):
    try:
        Config.from_file(path)
    except ConfigError as e:
        message = str(e)
        assert "is not known" not in message, message
        assert "is not supported by zerofx" in message or '"auto"' in message, message


def test_most_examples_load():
    loaded = 0
    for path in EXAMPLES:
        try:
            Config.from_file(path)
            loaded += 1
        except ConfigError:
            pass
    assert loaded >= 11  # the others use features zerofx refuses by name, or "auto"


@pytest.mark.parametrize("raw, culprit", [
    ({"train_batch_size": "auto"}, "'train_batch_size' is \"auto\""),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, "'optimizer.params.lr'"),
    ({"optimizer": {"type": "OneBitAdam"}}, "1-bit communication"),
    ({"compression_training": {"weight_quantization": {}}}, "compression"),
    ({"comet": {"enabled": True}}, "Comet"),
    ({"torch_autocast": {"enabled": True, "lower_precision_safe_modules": ["my.Mod"]}},
     "per-module autocast"),
    ({"torch_autocast": {"enabled": True}, "bf16": {"enabled": True}},
     "torch_autocast together"),
    ({"gradient_allreduce_op": "sum"}, "gradient_allreduce_op"),
    ({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp16"}},
     "grad_accum_dtype 'fp16' with bf16 compute"),
    ({"data_types": {"grad_accum_dtype": "bf16"}}, "grad_accum_dtype 'bf16' with fp32 compute"),
    ({"expert_parallel": {"enabled": True}}, "expert parallelism"),
    ({"compile": {"deepcompile": True, "passes": ["autosp"]}}, "AutoSP"),
    ({"compile": {"deepcompile": True, "passes": ["z3"]}, "zero_optimization": {"stage": 2}},
     "'z3' with zero_optimization.stage 2"),
    ({"compile": {"deepcompile": True, "passes": ["z1"]}}, "'z1' with zero_optimization.stage 0"),
    ({"compile": {"deepcompile": True, "passes": ["autotp"]}}, "'autotp' without"),
    ({"compile": {"deepcompile": True, "passes": ["z2"]}}, "DeepCompile pass 'z2'"),
    ({"compile": {"deepcompile": True, "passes": "z1"}}, "compile.passes 'z1'"),
    # DeepSpeed: every step() is then a boundary (engine.backward only accumulates)
    ({"managed_gradient_accumulation": False}, "managed_gradient_accumulation false"),
])
def test_refusals_name_the_feature(raw, culprit):
    with pytest.raises(ConfigError, match="not supported by zerofx|auto") as info:
        Config.from_dict(raw)
    assert culprit in str(info.value)


def test_switched_off_and_no_effect_blocks_are_accepted(caplog):
    import logging

    raw = {"tensorboard": {"enabled": False}, "zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "none"}, "stage3_max_live_parameters": 1,
        "allgather_partitions": True}, "autotuning": {"enabled": True},
        "cuda_visible_devices": "0,1", "compile": {"deepcompile": False}}
    with caplog.at_level(logging.INFO, logger="zerofx.config.deepspeed_keys"):
        cfg = Config.from_dict(raw)
    assert cfg.zero_optimization.stage == 2
    text = caplog.text
    assert "autotuning" in text and "cuda_visible_devices" in text and "stage3_" in text


def test_fp32_gradient_accumulation_under_bf16_loads():
    cfg = Config.from_dict({"bf16": {"enabled": True},
                            "data_types": {"grad_accum_dtype": "float32"}})
    assert cfg.grad_dtype == torch.float32 and cfg.compute_dtype == torch.bfloat16
    assert Config.from_dict(cfg.to_dict()) == cfg
    plain = Config.from_dict({"bf16": {"enabled": True}})
    assert plain.grad_dtype == torch.bfloat16


def test_deepcompile_passes_that_agree_with_the_config_load():
    """compile.passes names DeepCompile's passes (deepspeed.compile.config.PassName): z1 is
    ZeRO-1/2, z3 ZeRO-3, autotp AutoTP; zerofx's stage and tensor_parallel do those jobs."""
    cfg = Config.from_dict({"compile": {"deepcompile": True, "passes": ["z1"]},
                            "zero_optimization": {"stage": 2}})
    assert cfg.zero_optimization.stage == 2
    cfg = Config.from_dict({"compile": {"deepcompile": True, "passes": ["z3", "autotp"]},
                            "zero_optimization": {"stage": 3},
                            "tensor_parallel": {"autotp_size": 2}})
    assert cfg.zero_optimization.stage == 3 and cfg.tensor_parallel.size == 2


def test_keys_that_mean_what_zerofx_does_load():
    cfg = Config.from_dict({"bf16": {"enabled": True}, "gradient_allreduce_op": "mean",
                            "data_types": {"grad_accum_dtype": "bf16"},
                            "zero_optimization": {"stage": 1, "max_live_parameters": 10},
                            "disable_allgather": False, "timers": {},
                            "managed_gradient_accumulation": True})
    assert cfg.bf16.enabled and cfg.zero_optimization.stage == 1


def test_typos_still_suggest_the_key():
    with pytest.raises(ConfigError, match="did you mean 'prescale_gradients'"):
        Config.from_dict({"prescale_gradient": True})


def test_applied_keys_parse():
    cfg = Config.from_dict(json.loads('{"prescale_gradients": true, "gradient_predivide_factor"'
                                      ': 2.0, "zero_allow_untested_optimizer": true, '
                                      '"dataloader_drop_last": true}'))
    assert cfg.pre_reduce_factor is None and cfg.dataloader_drop_last
    assert Config.from_dict({"gradient_predivide_factor": 4}).pre_reduce_factor == 0.25


@pytest.mark.parametrize("dtype, block", [("bfloat16", "bf16"), ("float16", "fp16"),
                                          ("torch.bfloat16", "bf16")])
def test_torch_autocast_maps_onto_the_precision_blocks(dtype, block):
    cfg = Config.from_dict({"torch_autocast": {"enabled": True, "dtype": dtype,
                                               "lower_precision_safe_modules":
                                                   ["torch.nn.Linear"]}})
    assert getattr(cfg, block).enabled and cfg.compute_dtype is not None
    off = Config.from_dict({"torch_autocast": {"enabled": False, "dtype": dtype}})
    assert not off.bf16.enabled and not off.fp16.enabled


def test_fp16_auto_cast_casts_the_engine_inputs(no_torchrun_env):
    import torch

    import zerofx

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, extra):
            seen.append((x.dtype, extra["ids"].dtype))
            return self.lin(x).float().mean()

    for auto, want in ((True, torch.float16), (False, torch.float32)):
        engine, *_ = zerofx.initialize(model=Probe(), config={
            "train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True, "auto_cast": auto},
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}})
        engine(torch.randn(2, 4), {"ids": torch.arange(2)})
        assert seen[-1] == (want, torch.int64)


def test_deepspeeds_compile_block_is_accepted_but_offload_refused():
    cfg = Config.from_dict({"compile": {"deepcompile": True, "double_buffer": False}})
    assert cfg == Config.from_dict({})
    with pytest.raises(ConfigError, match="DeepCompile offload"):
        Config.from_dict({"compile": {"deepcompile": True, "offload_opt_states": True}})


def test_autotp_size_is_zerofx_tensor_parallel_size():
    assert Config.from_dict({"tensor_parallel": {"autotp_size": 2}}).tensor_parallel.size == 2
    cfg = Config.from_dict({"tensor_parallel": {"autotp_size": 2, "tp_overlap_comm": True}})
    assert cfg.tensor_parallel.size == 2
    assert Config.from_dict({"tensor_parallel": {"autotp_size": 0}}).tensor_parallel.size == 1
    with pytest.raises(ConfigError, match="sizes"):
        Config.from_dict({"tensor_parallel": {"autotp_size": 2, "size": 4}})
    with pytest.raises(ConfigError, match="partition rules"):
        Config.from_dict({"tensor_parallel": {"autotp_size": 2, "partition_config": {"a": 1}}})


def test_stage3_keys_with_and_without_prefix_act_at_stage_3(caplog):
    import logging

    z = Config.from_dict({"zero_optimization": {
        "stage": 3, "prefetch_bucket_size": 7, "stage3_param_persistence_threshold": 0,
        "stage3_gather_fp16_weights_on_model_save": True,
        "stage3_module_granularity_threshold": 5}}).zero_optimization
    assert (z.stage3_prefetch_bucket_size, z.stage3_param_persistence_threshold) == (7, 0)
    assert z.stage3_gather_16bit_weights_on_model_save  # DeepSpeed's old spelling
    with caplog.at_level(logging.INFO, logger="zerofx"):
        low = Config.from_dict({"zero_optimization": {
            "stage": 2, "stage3_prefetch_bucket_size": 7}}).zero_optimization
    assert low.stage3_prefetch_bucket_size == 50_000_000  # below stage 3: noted, unused
    assert "only read at stage 3" in caplog.text
    with pytest.raises(ConfigError, match="spell one setting"):
        Config.from_dict({"zero_optimization": {"stage": 3, "prefetch_bucket_size": 5,
                                                "stage3_prefetch_bucket_size": 6}})


def test_keys_without_effect_are_said_at_warning_level_and_truly(caplog):
    # a note at INFO is invisible by default; and bf16's overflow check describes what
    # zerofx does (it skips non-finite steps), not the opposite
    import logging

    import zerofx

    with caplog.at_level(logging.WARNING, logger="zerofx.config.deepspeed_keys"):
        zerofx.Config.from_dict({"bf16": {"enabled": True, "check_grad_overflow": False}})
    assert "accepted without effect" in caplog.text
    assert "always skips a step whose gradients are not finite" in caplog.text


def test_optimizer_offload_to_cpu_with_a_gpu_is_kept_at_stages_1_to_3(monkeypatch):
    import torch
    import zerofx

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for stage in (1, 2, 3):
        cfg = zerofx.Config.from_dict({"zero_optimization": {"stage": stage, "offload_optimizer": {
            "device": "cpu", "pin_memory": False, "cpuadam_cores_perc": 0.5}}})
        off = cfg.zero_optimization.offload_optimizer
        assert (off.device, off.pin_memory) == ("cpu", False)
    with pytest.raises(zerofx.ConfigError, match="'cpu' at stage 0.*stage to 1, 2 or 3"):
        zerofx.Config.from_dict({"zero_optimization": {"stage": 0, "offload_optimizer": {
            "device": "cpu"}}})
    with pytest.raises(zerofx.ConfigError, match="ratio"):  # ZeRO-Offload++'s partial split
        zerofx.Config.from_dict({"zero_optimization": {"stage": 2, "offload_optimizer": {
            "device": "cpu", "ratio": 0.3}}})
    # no GPU: dropped (met as it stands), unless the tests' switch keeps it for the runtime
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    raw = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert zerofx.Config.from_dict(raw).zero_optimization.offload_optimizer.device == "none"
    monkeypatch.setenv("ZEROFX_FORCE_HOST_OFFLOAD", "1")
    assert zerofx.Config.from_dict(raw).zero_optimization.offload_optimizer.device == "cpu"


@pytest.mark.parametrize("zero", [
    {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": True}},  # HelloDeepSpeed
    {"stage": 3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}},
    {"stage": 2, "cpu_offload": True},
])
def test_offload_to_cpu_on_a_cpu_only_run_is_met_as_it_stands(caplog, monkeypatch, zero):
    import logging

    import torch
    import zerofx

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="zerofx.config.deepspeed_keys"):
        cfg = zerofx.Config.from_dict({"zero_optimization": zero})
    assert cfg.zero_optimization.stage == zero["stage"]
    assert "already live in host memory" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if set(zero) == {"stage", "offload_optimizer"}:  # a GPU: ZeRO-Offload of the optimizer
        cfg = zerofx.Config.from_dict({"zero_optimization": zero})
        assert cfg.zero_optimization.offload_optimizer.device == "cpu"
    else:  # a GPU and parameters to the host: refused
        with pytest.raises(zerofx.ConfigError, match="offload"):
            zerofx.Config.from_dict({"zero_optimization": zero})
    if "offload_param" in zero:  # with a GPU, parameters to the host: refused by name
        with pytest.raises(zerofx.ConfigError, match="parameter offload to the host"):
            zerofx.Config.from_dict({"zero_optimization": {"stage": 3, "offload_param": {
                "device": "cpu"}}})
    # parameters on NVMe: read at stage 3 (tests/test_offload_param.py), refused below it
    raw = {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}}
    assert zerofx.Config.from_dict({"zero_optimization": raw}).zero_optimization \
        .offload_param.device == "nvme"
    with pytest.raises(zerofx.ConfigError, match="offload_param.device' is 'nvme' at stage 1"):
        zerofx.Config.from_dict({"zero_optimization": {**raw, "stage": 1}})


def test_torch_adam_trains_as_deepspeeds_torch_optim_adamw(no_torchrun_env):
    """DeepSpeed's engine (get_optimizer_configuration): torch_adam true builds
    torch.optim.AdamW (adam_w_mode's default) over the remaining params, torch's own
    ``fused``/``foreach`` included; the reference is that optimizer, eager."""
    import zerofx
    params = {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-6}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ref = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ref.load_state_dict(model.state_dict())
    engine, *_ = zerofx.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
        "optimizer": {"type": "Adam", "params": dict(params, torch_adam=True, fused=False,
                                                     amsgrad=False)}})
    opt = torch.optim.AdamW(ref.parameters(), **params)
    for step in range(4):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        engine.backward(engine(x).pow(2).mean())
        engine.step()
        ref(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_amsgrad_is_refused_with_the_way_to_run_it():
    with pytest.raises(ConfigError, match=r"optimizer.params.amsgrad.*optimizer=torch.optim"):
        Config.from_any({"train_micro_batch_size_per_gpu": 1, "optimizer": {
            "type": "AdamW", "params": {"amsgrad": True}}})


def test_fp32_grad_accumulation_refusal_names_one_fix_once():
    with pytest.raises(ConfigError, match=r"set it to 'fp32'$"):
        Config.from_any({"train_micro_batch_size_per_gpu": 1,
                         "data_types": {"grad_accum_dtype": "bf16"}})
