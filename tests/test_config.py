"""zerofx.config: DeepSpeed defaults, round trip, error messages, batch sizes, files, fuzzing."""
import copy
import json
import pathlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerofx.config import (
    BatchSizes, BF16Config, Config, ConfigError, FP16Config, LRRangeTestParams, OneCycleParams,
    OptimizerConfig, SchedulerConfig, TensorParallelConfig, WarmupDecayLRParams, WarmupLRParams,
    ZeroConfig, ZerofxConfig,
)

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def error_of(source) -> str:
    with pytest.raises(ConfigError) as info:
        Config.from_any(source)
    return str(info.value)


# ---- defaults are DeepSpeed's ----

DEEPSPEED_DEFAULTS = [
    (Config(), {"train_batch_size": None, "train_micro_batch_size_per_gpu": None,
                "gradient_accumulation_steps": None, "steps_per_print": 10, "optimizer": None,
                "scheduler": None, "gradient_clipping": None, "wall_clock_breakdown": False}),
    (FP16Config(), {"enabled": False, "loss_scale": 0.0, "initial_scale_power": 16,
                    "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1.0}),
    (BF16Config(), {"enabled": False}),
    (ZeroConfig(), {"stage": 0, "reduce_bucket_size": 500_000_000,
                    "allgather_bucket_size": 500_000_000, "overlap_comm": False,
                    "contiguous_gradients": True, "reduce_scatter": True}),
    (OptimizerConfig(type="Adam"), {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                                    "weight_decay": 0.0, "bias_correction": True,
                                    "adam_w_mode": True}),
    (OptimizerConfig(type="Lamb"), {"max_coeff": 10.0, "min_coeff": 0.01,
                                    "eps_inside_sqrt": False, "bias_correction": True}),
    (WarmupLRParams(), {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000,
                        "warmup_type": "log"}),
    (WarmupDecayLRParams(total_num_steps=5), {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001,
                                              "warmup_num_steps": 1000, "warmup_type": "log"}),
    (OneCycleParams(cycle_min_lr=0.0, cycle_max_lr=1.0),
     {"decay_lr_rate": 0.0, "cycle_first_step_size": 2000, "cycle_second_step_size": None,
      "cycle_first_stair_count": 0, "cycle_second_stair_count": None, "decay_step_size": 0,
      "cycle_momentum": True, "cycle_min_mom": 0.8, "cycle_max_mom": 0.9,
      "decay_mom_rate": 0.0}),
    (LRRangeTestParams(), {"lr_range_test_min_lr": 1e-3, "lr_range_test_step_size": 2000,
                           "lr_range_test_step_rate": 1.0, "lr_range_test_staircase": False}),
    (TensorParallelConfig(), {"size": 1, "plan": ()}),
    (ZerofxConfig(), {"inductor": False, "dump_dir": None, "disable_passes": ()}),
]


@pytest.mark.parametrize("obj,expected", DEEPSPEED_DEFAULTS,
                         ids=[type(o).__name__ for o, _ in DEEPSPEED_DEFAULTS])
def test_defaults_are_deepspeeds(obj, expected):
    assert {k: getattr(obj, k) for k in expected} == expected


def test_defaults_from_none_and_empty_dict_agree():
    assert Config.from_any(None) == Config.from_dict({}) == Config()
    assert Config().compute_dtype == torch.float32


# ---- a realistic config, read and written ----

FULL = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 4,
    "steps_per_print": 50,
    "optimizer": {"type": "adamw", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-6,
                                             "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupDecayLR",
                  "params": {"total_num_steps": 10000, "warmup_num_steps": 100,
                             "warmup_type": "linear"}},
    "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "hysteresis": 1},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8, "overlap_comm": True},
    "gradient_clipping": 1.0,
    "tensor_parallel": {"size": 2, "plan": {"*.q_proj": "colwise", "*.o_proj": "rowwise"}},
    "zerofx": {"inductor": False, "dump_dir": "/tmp/zerofx-dump", "disable_passes": ["schedule"]},
}


def test_full_config_reads_as_typed_values():
    c = Config.from_dict(FULL)
    assert c.optimizer.type == "AdamW" and c.optimizer.betas == (0.9, 0.95)
    assert isinstance(c.scheduler.params, WarmupDecayLRParams)
    assert (c.scheduler.params.total_num_steps, c.scheduler.params.warmup_type) == (10000, "linear")
    assert c.zero_optimization.reduce_bucket_size == 500_000_000
    assert type(c.zero_optimization.reduce_bucket_size) is int
    assert c.fp16.loss_scale == 0.0 and type(c.fp16.loss_scale) is float
    assert c.tensor_parallel.plan == (("*.q_proj", "colwise"), ("*.o_proj", "rowwise"))
    assert c.zerofx.disable_passes == ("schedule",)
    assert c.compute_dtype == torch.float16


@pytest.mark.parametrize("raw, culprit", [
    ({"fp16": {"loss_scale": 1e-300}}, "'fp16.loss_scale'"),
    ({"fp16": {"loss_scale": 1e300}}, "'fp16.loss_scale'"),
    ({"fp16": {"min_loss_scale": 1e39}}, "'fp16.min_loss_scale'"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 1e308}}}, "'optimizer.params.lr'"),
    ({"train_batch_size": 2**63}, "'train_batch_size'"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}},
     "'scheduler.params.warmup_num_steps'"),
])
def test_numbers_are_bounded_where_they_enter(raw, culprit):
    with pytest.raises(ConfigError, match=culprit):
        Config.from_dict(raw)


def test_round_trip_through_json_text():
    c = Config.from_dict(FULL)
    text = json.dumps(c.to_dict(), allow_nan=False)
    assert Config.from_dict(json.loads(text)) == c
    assert list(json.loads(text)["tensor_parallel"]["plan"]) == ["*.q_proj", "*.o_proj"]


def test_configs_are_frozen_and_hashable():
    c = Config.from_dict(FULL)
    with pytest.raises(AttributeError):
        c.steps_per_print = 1
    assert hash(c) == hash(Config.from_dict(FULL))


def test_keyword_construction_is_validated_and_normalised():
    assert ZeroConfig(reduce_bucket_size=5e8).reduce_bucket_size == 500_000_000
    assert OptimizerConfig(type="lamb").type == "Lamb"
    assert OptimizerConfig(type="Adam", betas=[0.8, 0.9]).betas == (0.8, 0.9)
    assert TensorParallelConfig(plan={"a": "colwise"}).plan == (("a", "colwise"),)
    assert ZerofxConfig(dump_dir=pathlib.Path("/tmp/d")).dump_dir == "/tmp/d"
    with pytest.raises(ConfigError, match="hysteresis"):
        FP16Config(hysteresis=0)
    with pytest.raises(ConfigError, match="max_coeff"):
        OptimizerConfig(type="Adam", max_coeff=2.0)
    with pytest.raises(ConfigError, match="WarmupLRParams"):
        SchedulerConfig(type="WarmupLR", params=LRRangeTestParams())
    with pytest.raises(ConfigError, match="fp16"):
        Config(fp16=FP16Config(enabled=True), bf16=BF16Config(enabled=True))
    with pytest.raises(ConfigError, match="FP16Config"):
        Config(fp16={"enabled": True})


def test_scheduler_params_default_per_type():
    assert SchedulerConfig(type="WarmupLR").params == WarmupLRParams()
    assert Config.from_dict({"scheduler": {"type": "LRRangeTest"}}).scheduler.params == \
        LRRangeTestParams()
    with pytest.raises(ConfigError, match="total_num_steps"):
        SchedulerConfig(type="WarmupDecayLR")


# ---- the 2020 boolean ZeRO form and friendly spellings ----

@pytest.mark.parametrize("raw,stage", [(True, 1), (False, 0), ({"stage": 2}, 2)])
def test_zero_optimization_boolean_form(raw, stage):
    c = Config.from_dict({"zero_optimization": raw})
    assert c.zero_optimization == ZeroConfig(stage=stage)
    assert Config.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("spelling,name", [("adam", "Adam"), ("ADAMW", "AdamW"),
                                           ("lamb", "Lamb"), ("AdamW", "AdamW")])
def test_optimizer_type_is_case_insensitive(spelling, name):
    assert Config.from_dict({"optimizer": {"type": spelling}}).optimizer.type == name


def test_lamb_takes_its_own_params():
    params = {"max_coeff": 0.3, "min_coeff": 0.01, "eps_inside_sqrt": True}
    opt = Config.from_dict({"optimizer": {"type": "Lamb", "params": params}}).optimizer
    assert (opt.max_coeff, opt.eps_inside_sqrt) == (0.3, True)


@pytest.mark.parametrize("kind", ["Lamb", "AdamW"])
def test_max_grad_norm_is_refused_with_deepspeeds_advice(kind):
    # DeepSpeed's _configure_basic_optimizer raises for it whatever the optimizer type
    with pytest.raises(ConfigError, match="max_grad_norm.*gradient_clipping"):
        Config.from_dict({"optimizer": {"type": kind, "params": {"max_grad_norm": 1.0}}})


@pytest.mark.parametrize("kind,params,cls", [
    ("WarmupLR", {"warmup_max_lr": 0.01}, WarmupLRParams),
    ("OneCycle", {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-2, "cycle_second_step_size": 10},
     OneCycleParams),
    ("LRRangeTest", {"lr_range_test_staircase": True}, LRRangeTestParams),
])
def test_each_scheduler_type_parses_to_its_params_class(kind, params, cls):
    s = Config.from_dict({"scheduler": {"type": kind, "params": params}}).scheduler
    assert s.type == kind and type(s.params) is cls
    assert {k: getattr(s.params, k) for k in params} == params


# ---- every class of error names the key path, the value, and what is allowed ----

BAD = [
    ({"zero_optimization": {"stgae": 2}},
     ["'zero_optimization.stgae'", "2", "did you mean 'stage'?", "valid keys:", "reduce_scatter"]),
    ({"zero_optimisation": {}}, ["'zero_optimisation'", "did you mean 'zero_optimization'?"]),
    ({"totally_unrelated_key": 1}, ["'totally_unrelated_key'", "is not known", "valid keys:"]),
    ({"zero_optimization": {"stage": 4}}, ["'zero_optimization.stage'", "4", "[0, 3]"]),
    ({"zero_optimization": {"stage": "2"}}, ["'zero_optimization.stage'", "'2'", "integer"]),
    ({"zero_optimization": {"stage": True}}, ["'zero_optimization.stage'", "True", "integer"]),
    ({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": -1}},
     ["'zero_optimization.stage3_param_persistence_threshold'", "-1", ">= 0"]),
    ({"zero_optimization": 1}, ["'zero_optimization'", "1", "true/false"]),
    ({"zero_optimization": {"reduce_bucket_size": 1.5}},
     ["'zero_optimization.reduce_bucket_size'", "1.5", "integer >= 1"]),
    ({"zero_optimization": {"allgather_bucket_size": -5e8}},
     ["'zero_optimization.allgather_bucket_size'", "-5", "integer >= 1"]),
    ({"zero_optimization": {"overlap_comm": "yes"}},
     ["'zero_optimization.overlap_comm'", "'yes'", "true or false"]),
    ({"fp16": {"enabled": 1}}, ["'fp16.enabled'", "1", "true or false"]),
    ({"bf16": {"enabled": None}}, ["'bf16.enabled'", "None", "true or false"]),
    ({"fp16": {"initial_scale_power": True}}, ["'fp16.initial_scale_power'", "True", "integer"]),
    ({"fp16": {"loss_scale_window": 0}}, ["'fp16.loss_scale_window'", "0", ">= 1"]),
    ({"fp16": {"hysteresis": 0}}, ["'fp16.hysteresis'", "0", ">= 1"]),
    ({"fp16": {"loss_scale": -1}}, ["'fp16.loss_scale'", "-1", "[0.0,"]),
    ({"fp16": {"min_loss_scale": 0}}, ["'fp16.min_loss_scale'", "0", "(0.0,"]),
    ({"fp16": {"loss_scale": float("nan")}}, ["'fp16.loss_scale'", "nan", "[0.0,"]),
    ({"fp16": []}, ["'fp16'", "[]", "a JSON object"]),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}},
     ["'bf16.enabled'", "true", "'fp16.enabled'", "at most one"]),
    ({"optimizer": {"type": "SGD"}}, ["'optimizer.type'", "'SGD'", "'Adam', 'AdamW', 'Lamb'"]),
    ({"optimizer": {"params": {}}}, ["'optimizer.type'", "required"]),
    ({"optimizer": {"type": "adam", "parms": {}}}, ["'optimizer.parms'", "did you mean 'params'?"]),
    ({"optimizer": {"type": "adam", "params": {"lr": -1}}},
     ["'optimizer.params.lr'", "-1", "[0.0, 1000.0]"]),
    ({"optimizer": {"type": "adam", "params": {"betas": [0.9, 1.0]}}},
     ["'optimizer.params.betas'", "[0.9, 1.0]", "two numbers in [0, 1)"]),
    ({"optimizer": {"type": "adam", "params": {"betas": 0.9}}},
     ["'optimizer.params.betas'", "0.9", "two numbers"]),
    ({"optimizer": {"type": "adam", "params": {"max_coeff": 1.0}}},
     ["'optimizer.params.max_coeff'", "1.0", "Lamb parameter", "optimizer type Adam"]),
    ({"optimizer": {"type": "lamb", "params": {"adam_w_mode": True}}},
     ["'optimizer.params.adam_w_mode'", "True", "Adam/AdamW parameter"]),
    ({"optimizer": {"type": "adamw", "params": {"adam_w_mode": False}}},
     ["'optimizer.params.adam_w_mode'", "False", "AdamW always decouples"]),
    ({"optimizer": {"type": "lamb", "params": {"min_coeff": 5, "max_coeff": 1}}},
     ["'optimizer.params.min_coeff'", "5", "max_coeff"]),
    ({"optimizer": {"type": "adam", "params": {"weight_decya": 0.1}}},
     ["'optimizer.params.weight_decya'", "0.1", "did you mean 'weight_decay'?"]),
    ({"scheduler": {"type": "Cosine"}}, ["'scheduler.type'", "'Cosine'", "'WarmupLR'"]),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {}}},
     ["'scheduler.params.total_num_steps'", "required"]),
    ({"scheduler": {"type": "OneCycle", "params": {"cycle_max_lr": 1}}},
     ["'scheduler.params.cycle_min_lr'", "required"]),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "exp"}}},
     ["'scheduler.params.warmup_type'", "'exp'", "'log', 'linear'"]),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 5}}},
     ["'scheduler.params.warmup_num_step'", "5", "did you mean 'warmup_num_steps'?"]),
    ({"scheduler": {"type": "WarmupLR", "params": {"cycle_min_lr": 0}}},
     ["'scheduler.params.cycle_min_lr'", "is not known"]),
    ({"tensor_parallel": {"size": 0}}, ["'tensor_parallel.size'", "0", ">= 1"]),
    ({"tensor_parallel": {"plan": {"*.q": "diagonal"}}},
     ["'tensor_parallel.plan'", "diagonal", "colwise", "rowwise"]),
    ({"tensor_parallel": {"plan": ["*.q"]}}, ["'tensor_parallel.plan'", "['*.q']", "colwise"]),
    ({"zerofx": {"inductr": True}}, ["'zerofx.inductr'", "True", "did you mean 'inductor'?"]),
    ({"zerofx": {"disable_passes": "zero"}},
     ["'zerofx.disable_passes'", "'zero'", "list of non-empty strings"]),
    ({"zerofx": {"dump_dir": 3}}, ["'zerofx.dump_dir'", "3", "path"]),
    ({"gradient_clipping": -1.0}, ["'gradient_clipping'", "-1.0", ">= 0"]),
    ({"train_batch_size": 0}, ["'train_batch_size'", "0", "[1, 2147483647]"]),
    ({"train_micro_batch_size_per_gpu": True}, ["'train_micro_batch_size_per_gpu'", "True"]),
    ({"steps_per_print": 2.5}, ["'steps_per_print'", "2.5", "integer"]),
    ({"wall_clock_breakdown": 0}, ["'wall_clock_breakdown'", "0", "true or false"]),
    ({3: 1}, ["'3'", "not a string"]),
]


@pytest.mark.parametrize("raw,fragments", BAD, ids=[str(i) for i in range(len(BAD))])
def test_error_names_key_value_and_allowed(raw, fragments):
    message = error_of(raw)
    assert message.startswith("config key '")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_error_carries_the_key_path():
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": -1}}})
    assert info.value.key == "scheduler.params.warmup_num_steps"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("source,fragment", [
    ([1, 2], "got list"), (3, "got int"), (b"{}", "got bytes"),
])
def test_from_any_rejects_other_types(source, fragment):
    assert fragment in error_of(source)


# ---- batch sizes: DeepSpeed's three keys and the data-parallel world size ----

BATCHES = [  # (train_batch_size, micro, gas, world) -> (train_batch_size, micro, gas)
    ((32, None, None, 4), (32, 8, 1)),
    ((None, 8, None, 4), (32, 8, 1)),
    ((None, 8, 2, 4), (64, 8, 2)),
    ((64, 8, None, 4), (64, 8, 2)),
    ((64, None, 2, 4), (64, 8, 2)),
    ((64, 8, 2, 4), (64, 8, 2)),
    ((7, None, None, 1), (7, 7, 1)),
]


@pytest.mark.parametrize("given,resolved", BATCHES)
def test_batch_sizes_resolve(given, resolved):
    total, micro, gas, world = given
    c = Config(train_batch_size=total, train_micro_batch_size_per_gpu=micro,
               gradient_accumulation_steps=gas)
    assert c.batch_sizes(world) == BatchSizes(*resolved)


BATCH_ERRORS = [
    ((30, 4, 2, 2), "train_batch_size=30 is not micro(4) x gradient_accumulation_steps(2) x "
                    "world(2) = 16"),
    ((64, 8, 2, 2), "train_batch_size=64 is not micro(8) x gradient_accumulation_steps(2) x "
                    "world(2) = 32"),  # agrees for world 4, not for world 2
    ((30, 4, None, 2), "train_batch_size=30 is not divisible by micro(4) x world(2) = 8"),
    ((30, None, 4, 2), "train_batch_size=30 is not divisible by gradient_accumulation_steps(4) x"),
    ((3, None, None, 4), "train_batch_size=3 is not divisible by gradient_accumulation_steps(1)"),
    ((None, None, 4, 2), "gradient_accumulation_steps alone"),
    ((None, None, None, 2), "set train_batch_size and/or train_micro_batch_size_per_gpu"),
]


@pytest.mark.parametrize("given,fragment", BATCH_ERRORS)
def test_batch_size_errors_show_the_arithmetic(given, fragment):
    total, micro, gas, world = given
    c = Config(train_batch_size=total, train_micro_batch_size_per_gpu=micro,
               gradient_accumulation_steps=gas)
    with pytest.raises(ConfigError) as info:
        c.batch_sizes(world)
    assert fragment in str(info.value)


@pytest.mark.parametrize("world", [0, -1, 2.0, True, "2"])
def test_batch_sizes_rejects_bad_world_size(world):
    with pytest.raises(ConfigError, match="dp_world_size"):
        Config(train_batch_size=8).batch_sizes(world)


@given(micro=st.integers(1, 64), gas=st.integers(1, 16), world=st.integers(1, 64))
@settings(max_examples=100, deadline=None)
def test_any_two_batch_keys_determine_the_third(micro, gas, world):
    total = micro * gas * world
    want = BatchSizes(total, micro, gas)
    for keys in [(total, micro, None), (total, None, gas), (None, micro, gas), (total, micro, gas)]:
        c = Config(train_batch_size=keys[0], train_micro_batch_size_per_gpu=keys[1],
                   gradient_accumulation_steps=keys[2])
        assert c.batch_sizes(world) == want


# ---- files ----

def write(tmp_path, text, name="ds_config.json"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_from_file_and_from_any_with_paths(tmp_path):
    path = write(tmp_path, json.dumps(FULL, indent=2))
    assert Config.from_file(path) == Config.from_any(str(path)) == Config.from_dict(FULL)
    assert Config.from_any(write(tmp_path, "\ufeff{}", "bom.json")) == Config()


def test_duplicate_key_in_file_is_an_error(tmp_path):
    path = write(tmp_path, '{"fp16": {"enabled": true,\n          "enabled": false}}')
    message = error_of(path)
    assert message.startswith(str(path)) and "'fp16.enabled' appears twice" in message


def test_duplicate_key_inside_a_list_is_found(tmp_path):
    path = write(tmp_path, '{"zerofx": {"disable_passes": [{"a": 1, "a": 2}]}}')
    assert "'zerofx.disable_passes[0].a' appears twice" in error_of(path)


def test_invalid_json_names_file_line_and_column(tmp_path):
    path = write(tmp_path, '{\n  "fp16": {\n    "enabled": true,\n  }\n}')
    message = error_of(path)
    assert message.startswith(f"{path}: line 4 column 3: invalid JSON")


@pytest.mark.parametrize("text,fragment", [
    ('{"fp16": {"loss_scale": NaN}}', "NaN is not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    ("[1, 2]", "must be a JSON object"),
    ("", "line 1 column 1"),
    ("1" * 5000, "invalid JSON"),
    ("[" * 100_000, "invalid JSON"),
])
def test_unusable_file_contents(tmp_path, text, fragment):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(str(path)) and fragment in message


def test_value_errors_in_files_are_prefixed_with_the_file(tmp_path):
    path = write(tmp_path, '{"zero_optimization": {"stage": 4}}')
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    assert str(info.value).startswith(f"{path}: config key 'zero_optimization.stage'")
    assert info.value.key == "zero_optimization.stage"


def test_unreadable_paths(tmp_path):
    assert "cannot read" in error_of(tmp_path / "missing.json")
    assert "cannot read" in error_of(tmp_path)
    assert "cannot read" in error_of("bad\0name.json")


# ---- fuzzing: any input parses or raises ConfigError, nothing else ----

KNOWN_KEYS = sorted({k for k, _ in json.loads(json.dumps(FULL)).items()} | {
    "stage", "enabled", "type", "params", "lr", "betas", "plan", "size", "loss_scale",
    "total_num_steps", "cycle_min_lr", "cycle_max_lr", "disable_passes", "dump_dir", "max_coeff",
    "bf16", "wall_clock_breakdown", "adam_w_mode", "warmup_type"})
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
           | st.text(max_size=8) | st.sampled_from(["Adam", "lamb", "WarmupLR", "OneCycle",
                                                    "colwise", "log"]))
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), inner, max_size=4),
    max_leaves=16)


def parses_or_config_error(make):
    """make() returns a Config (that then round-trips) or raises ConfigError; nothing else."""
    try:
        c = make()
    except ConfigError as e:
        assert str(e)
        return None
    assert isinstance(c, Config)
    assert Config.from_dict(json.loads(json.dumps(c.to_dict(), allow_nan=False))) == c
    return c


@FUZZ
@given(raw=st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), JSON_VALUES,
                           max_size=5) | JSON_VALUES)
def test_fuzz_arbitrary_json_values(raw):
    parses_or_config_error(lambda: Config.from_dict(raw))


def paths_of(tree, prefix=()):
    """Every (container path, key) in a nested dict/list."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        yield prefix + (key,)
        if isinstance(value, (dict, list)):
            yield from paths_of(value, prefix + (key,))


ALL_PATHS = sorted(paths_of(FULL), key=repr)


def mutate(tree, path, op, value):
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = value
    elif isinstance(parent, dict):  # misspell: drop or double a character of the key
        cut = len(key) // 2
        parent[key[:cut] + key[cut + 1:] if value else key[:cut] + key[cut] + key[cut:]] = \
            parent.pop(key)


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_valid_config(data):
    tree = copy.deepcopy(FULL)
    for _ in range(data.draw(st.integers(1, 3))):
        live = [p for p in ALL_PATHS if _reachable(tree, p)]
        if not live:
            break
        path = data.draw(st.sampled_from(live))
        op = data.draw(st.sampled_from(["delete", "replace", "misspell"]))
        mutate(tree, path, op, data.draw(JSON_VALUES if op == "replace" else st.booleans()))
    parses_or_config_error(lambda: Config.from_dict(tree))


def _reachable(tree, path):
    node = tree
    for key in path:
        if isinstance(node, dict) and key in node or isinstance(node, list) and \
                isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return False
    return True


@FUZZ
@given(blob=st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_fuzz_from_file_bytes(tmp_path, blob):
    path = tmp_path / "fuzz.json"
    path.write_bytes(blob)
    parses_or_config_error(lambda: Config.from_file(path))


@FUZZ
@given(cut=st.integers(0, 2000), junk=st.sampled_from(["", "}", ",", "\"", "\n", "{", "]", "1"]))
def test_fuzz_truncated_and_corrupted_files(tmp_path, cut, junk):
    text = json.dumps(FULL, indent=1)
    path = tmp_path / "fuzz.json"
    path.write_text(text[:cut] + junk + text[cut:][len(junk):])
    parses_or_config_error(lambda: Config.from_file(path))


# ---- round trip over generated valid configs ----

OPTIMIZERS = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["Adam", "adamw"])}, optional={
        "params": st.fixed_dictionaries({}, optional={
            "lr": st.floats(0, 1), "betas": st.tuples(st.floats(0, 0.99), st.floats(0, 0.99)),
            "weight_decay": st.floats(0, 1), "bias_correction": st.booleans()})}),
    st.fixed_dictionaries({"type": st.just("LAMB"), "params": st.fixed_dictionaries({}, optional={
        "max_coeff": st.floats(1, 10), "min_coeff": st.floats(0, 1),
        "eps_inside_sqrt": st.booleans()})}),
)
SCHEDULERS = st.one_of(
    st.fixed_dictionaries({"type": st.just("WarmupLR"), "params": st.fixed_dictionaries(
        {}, optional={"warmup_num_steps": st.integers(1, 10**6),
                      "warmup_type": st.sampled_from(["log", "linear"])})}),
    st.fixed_dictionaries({"type": st.just("OneCycle"), "params": st.fixed_dictionaries(
        {"cycle_min_lr": st.floats(0, 1), "cycle_max_lr": st.floats(0, 1)},
        optional={"cycle_second_stair_count": st.none() | st.integers(0, 9)})}),
)
VALID = st.fixed_dictionaries({}, optional={
    "train_batch_size": st.integers(1, 4096), "gradient_accumulation_steps": st.integers(1, 64),
    "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS,
    "fp16": st.fixed_dictionaries({}, optional={"enabled": st.booleans(),
                                                "loss_scale": st.just(0.0) |
                                                st.floats(2**-24, 2**24),
                                                "initial_scale_power": st.integers(0, 32)}),
    "zero_optimization": st.booleans() | st.fixed_dictionaries({}, optional={
        "stage": st.integers(0, 2), "reduce_bucket_size": st.integers(1, 10**9).map(float)}),
    "tensor_parallel": st.fixed_dictionaries({}, optional={
        "size": st.integers(1, 8), "plan": st.dictionaries(
            st.text(min_size=1, max_size=5), st.sampled_from(["colwise", "rowwise"]))}),
    "zerofx": st.fixed_dictionaries({}, optional={"disable_passes": st.lists(
        st.text(min_size=1, max_size=5)), "dump_dir": st.none() | st.text(min_size=1)}),
})


@settings(max_examples=150, deadline=None)
@given(raw=VALID)
def test_round_trip_of_generated_valid_configs(raw):
    c = Config.from_dict(raw)
    assert Config.from_dict(c.to_dict()) == c
    assert Config.from_dict(json.loads(json.dumps(c.to_dict(), allow_nan=False))) == c


def test_gradient_clipping_left_out_is_deepspeeds_default():
    # DeepSpeed 0.19.3+ (runtime/constants.py): GRADIENT_CLIPPING_DEFAULT = 1.0 for the
    # engine; plain torch.compile leaves clipping to the user's loop
    from zerofx.backend import check_plain_training

    cfg = Config.from_dict({})
    assert cfg.gradient_clipping is None and cfg.clip_norm == 1.0
    check_plain_training(cfg)  # not refused: the user did not ask for clipping
    assert Config.from_dict({"gradient_clipping": 0}).clip_norm == 0.0
    with pytest.raises(ConfigError, match="gradient_clipping"):
        check_plain_training(Config.from_dict({"gradient_clipping": 1.0}))
