"""DeepSpeed's own keys: applied, accepted without effect, or refused by feature name; never
"not known". Checked on the 74 training configs of DeepSpeed's examples repository."""
import json
from pathlib import Path

import pytest

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
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload"),
    ({"wandb": {"enabled": True}}, "Weights & Biases"),
    ({"fp16": {"enabled": True, "auto_cast": True}}, "fp16.auto_cast"),
    ({"gradient_allreduce_op": "sum"}, "gradient_allreduce_op"),
    ({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
     "grad_accum_dtype 'fp32' with bf16 compute"),
    ({"expert_parallel": {"enabled": True}}, "expert parallelism"),
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
    with caplog.at_level(logging.INFO, logger="zerofx.config_deepspeed"):
        cfg = Config.from_dict(raw)
    assert cfg.zero_optimization.stage == 2
    text = caplog.text
    assert "autotuning" in text and "cuda_visible_devices" in text and "stage3_" in text


def test_keys_that_mean_what_zerofx_does_load():
    cfg = Config.from_dict({"bf16": {"enabled": True}, "gradient_allreduce_op": "mean",
                            "data_types": {"grad_accum_dtype": "bf16"},
                            "zero_optimization": {"stage": 1, "max_live_parameters": 10},
                            "disable_allgather": False, "timers": {}})
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
