"""The DeepSpeed config's ``"auto"`` values, filled from ``TrainingArguments`` by Hugging Face's
rules (``HfTrainerDeepSpeedConfig.trainer_config_process`` and ``trainer_config_finalize`` of
transformers' DeepSpeed integration), so one config file serves both.

    cfg = fill_auto(raw, args, model=model, num_training_steps=max_steps)

Each rule either replaces an ``"auto"`` with the argument's value, or, where the config holds a
number, checks it equals the argument (a mismatch is an error listing every one, as HF's);
``fill_only`` rules never check. Keys HF does not fill stay ``"auto"`` and are refused here by
name: zerofx's config reader would refuse them anyway, with a message about a Trainer that is
not running.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping

from zerofx.config import ConfigError
from zerofx.config.schema import dotted, find_path

# the keys HF fills from the model's hidden size (trainer_config_finalize)
_HIDDEN_SIZE_KEYS = ("zero_optimization.reduce_bucket_size",
                     "zero_optimization.stage3_prefetch_bucket_size",
                     "zero_optimization.stage3_param_persistence_threshold")


def load_raw(config: str | os.PathLike | Mapping) -> dict:
    """A deep copy of the config (a dict, or a JSON file's path): filling never edits the
    caller's dict."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    raise ConfigError(f"zerofx_config must be a dict or a JSON file's path, not "
                      f"{type(config).__name__}", key="zerofx_config")


class _Filler:
    """HF's fill_match / fill_only over one config dict, collecting mismatches."""

    def __init__(self, config: dict):
        self.config = config
        self.mismatches: list[str] = []

    def node(self, key: str) -> tuple[dict | None, str]:
        """The dict holding ``key``'s last part, or None where a parent block is absent
        (HF's find_config_node: such a rule does nothing)."""
        *parents, leaf = key.split(".")
        node: Any = self.config
        for p in parents:
            node = node.get(p) if isinstance(node, Mapping) else None
            if node is None:
                return None, leaf
        return (node if isinstance(node, dict) else None), leaf

    def get(self, key: str) -> Any:
        node, leaf = self.node(key)
        return None if node is None else node.get(leaf)

    def match(self, key: str, value: Any, hf_name: str, must_match: bool = True) -> None:
        node, leaf = self.node(key)
        if node is None:
            return
        if node.get(leaf) == "auto":
            node[leaf] = value
            return
        if must_match and node.get(leaf) is not None and node[leaf] != value:
            self.mismatches.append(f"- ds {key}={node[leaf]} vs hf {hf_name}={value}")

    def only(self, key: str, value: Any) -> None:
        self.match(key, value, "", must_match=False)


def fill_from_args(f: _Filler, args) -> None:
    """HF's trainer_config_process: what TrainingArguments alone decide."""
    micro, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
    f.match("train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size")
    f.match("gradient_accumulation_steps", gas, "gradient_accumulation_steps")
    f.match("train_batch_size", args.world_size * micro * gas, "train_batch_size (calculated)")
    f.match("gradient_clipping", args.max_grad_norm, "max_grad_norm")
    f.match("optimizer.params.lr", args.learning_rate, "learning_rate")
    f.match("optimizer.params.betas", [args.adam_beta1, args.adam_beta2], "adam_beta1+adam_beta2")
    f.match("optimizer.params.eps", args.adam_epsilon, "adam_epsilon")
    f.match("optimizer.params.weight_decay", args.weight_decay, "weight_decay")
    f.only("scheduler.params.warmup_min_lr", 0)  # not a Trainer argument
    f.match("scheduler.params.warmup_max_lr", args.learning_rate, "learning_rate")
    if args.save_on_each_node:
        f.config.setdefault("checkpoint", {})["use_node_local_storage"] = True
    f.match("fp16.enabled", bool(args.fp16 or args.fp16_full_eval), "fp16|fp16_full_eval")
    f.match("bf16.enabled", bool(args.bf16 or args.bf16_full_eval), "bf16|bf16_full_eval")


def fill_from_model(f: _Filler, args, model, num_training_steps: int) -> None:
    """HF's trainer_config_finalize: what needs the model and the number of steps."""
    if any(f.get(k) == "auto" for k in _HIDDEN_SIZE_KEYS):
        h = _hidden_size(model)
        f.only("zero_optimization.reduce_bucket_size", h * h)
        if f.get("zero_optimization.stage") == 3:
            f.only("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * h * h))
            f.only("zero_optimization.stage3_param_persistence_threshold", 10 * h)
    f.match("scheduler.params.total_num_steps", num_training_steps,
            "num_training_steps (calculated)")
    # HF keeps it positive: DeepSpeed refuses a warmup of 0 steps
    f.match("scheduler.params.warmup_num_steps", max(1, args.get_warmup_steps(num_training_steps)),
            "warmup_steps")


def _hidden_size(model) -> int:
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if hasattr(c, "hidden_size"):
            return c.hidden_size
        if hasattr(c, "hidden_sizes"):  # several: the largest, as HF
            return max(c.hidden_sizes)
    raise ConfigError(f"the model's config has neither hidden_size nor hidden_sizes, so the "
                      f"\"auto\" values of {', '.join(_HIDDEN_SIZE_KEYS)} cannot be filled: "
                      f"write numbers there", key="zero_optimization.reduce_bucket_size")


def fill_auto(config: str | os.PathLike | Mapping, args, *, model,
              num_training_steps: int) -> dict:
    """The config with every ``"auto"`` HF fills replaced by ``args``' value (a copy); a
    ConfigError lists the numbers that contradict ``args``, or names an ``"auto"`` left
    that HF's rules do not fill."""
    f = _Filler(load_raw(config))
    fill_from_args(f, args)
    fill_from_model(f, args, model, num_training_steps)
    if f.mismatches:
        raise ConfigError("these DeepSpeed config values contradict the TrainingArguments:\n"
                          + "\n".join(f.mismatches)
                          + "\nmake them equal, or set them to \"auto\"")
    left = find_path(f.config, lambda v: isinstance(v, str) and v == "auto")
    if left is not None:
        path = dotted(left[0])
        raise ConfigError(f"config key '{path}' is \"auto\", which the Hugging Face Trainer's "
                          f"rules do not fill: write the number", key=path)
    return f.config
