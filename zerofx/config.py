"""Typed zerofx configuration and the reader for DeepSpeed's JSON config format.

The only module that knows raw JSON key strings (DESIGN.md rule 5): everything downstream reads
the frozen dataclasses below. Attribute names mirror DeepSpeed's JSON keys so a DeepSpeed user
recognises them, and the defaults are DeepSpeed's.

    cfg = Config.from_any("ds_config.json")          # or a dict, a Config, or None
    cfg.zero_optimization.stage, cfg.compute_dtype, cfg.batch_sizes(dp_world_size=4)

Every check lives in a field's `check` (run by `__post_init__`), so a config built with keywords
is validated exactly like one read from JSON. Any bad input raises ConfigError, whose message
names the key path, the value given and what is allowed.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import reprlib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from functools import partial
from typing import Any, Callable

__all__ = [
    "BF16Config", "BatchSizes", "Config", "ConfigError", "FP16Config", "LRRangeTestParams",
    "OneCycleParams", "OptimizerConfig", "SchedulerConfig", "TensorParallelConfig",
    "WarmupDecayLRParams", "WarmupLRParams", "ZeroConfig", "ZerofxConfig",
]


class ConfigError(ValueError):
    """A config zerofx cannot use. The only exception parsing raises, whatever the input."""

    def __init__(self, message: str, *, key: str | None = None, tail: str = ""):
        super().__init__(message)
        self.key = key
        """Dotted path of the offending key (None when the error is not about one key)."""
        self._tail = tail

    def under(self, prefix: str) -> ConfigError:
        """The same error as seen from the enclosing block `prefix`."""
        return self if self.key is None else _key_error(f"{prefix}.{self.key}", self._tail)


def _key_error(key: str, tail: str) -> ConfigError:
    return ConfigError(f"config key '{key}'{tail}", key=key, tail=tail)


class _Invalid(Exception):
    """Raised by a checker; its message says what would have been allowed."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 2  # bounded, so even absurdly nested input cannot blow the stack here


def _show(value: Any) -> str:
    try:
        return _REPR.repr(value)
    except Exception:  # e.g. an int too long for str(); the message must still come out
        return f"<{type(value).__name__}>"


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return _key_error(key, f" has value {_show(value)}; expected {expected}")


def _checked(key: str, value: Any, check: Callable[[Any], Any]) -> Any:
    try:
        return check(value)
    except _Invalid as e:
        raise _bad(key, value, str(e)) from None


# ---- checkers: value -> normalised value, or _Invalid(what is allowed) ----

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int in Python, not here


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Invalid("true or false")
    return v


def _int(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def check(v: Any) -> int:
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # JSON writers and humans write sizes as 5e8
        if not _is_int(v) or v < lo or (hi is not None and v > hi):
            raise _Invalid(allowed)
        return v
    return check


def _float(lo: float, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[Any], float]:
    low = f"> {lo}" if lo_open else f">= {lo}"
    allowed = (f"a number {low}" if hi is None
               else f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")

    def check(v: Any) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise _Invalid(allowed)
        try:
            v = float(v)
        except OverflowError:
            raise _Invalid(allowed) from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo)
        if not ok or (hi is not None and (v >= hi if hi_open else v > hi)):
            raise _Invalid(allowed)
        return v
    return check


def _choice(*options: str, fold: bool = False) -> Callable[[Any], str]:
    """One of `options`; with `fold`, matched case-insensitively and returned as spelt here."""
    allowed = "one of " + ", ".join(repr(o) for o in options)
    by_key = {(o.lower() if fold else o): o for o in options}

    def check(v: Any) -> str:
        key = v.lower() if fold and isinstance(v, str) else v
        if not isinstance(key, str) or key not in by_key:
            raise _Invalid(allowed + (" (case-insensitive)" if fold else ""))
        return by_key[key]
    return check


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


def _instance(cls: type) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if not isinstance(v, cls):
            raise _Invalid(f"a {cls.__name__}")
        return v
    return check


def _path(v: Any) -> str:
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str) or not v:
        raise _Invalid("a non-empty path string")
    return v


def _names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
        raise _Invalid("a list of non-empty strings")
    return tuple(v)


def _betas(v: Any) -> tuple[float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise _Invalid("a list of two numbers in [0, 1)")
    return tuple(_float(0.0, 1.0, hi_open=True)(b) for b in v)


_TP_STYLES = _choice("colwise", "rowwise")


def _tp_plan(v: Any) -> tuple[tuple[str, str], ...]:
    """{"pattern": "colwise"|"rowwise"} (JSON) or ((pattern, style), ...) -> ordered pairs."""
    allowed = 'an object mapping glob patterns to "colwise" or "rowwise"'
    if isinstance(v, Mapping):
        pairs = list(v.items())
    elif isinstance(v, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2
                                              for p in v):
        pairs = [tuple(p) for p in v]
    else:
        raise _Invalid(allowed)
    patterns = [p for p, _ in pairs]
    if not all(isinstance(p, str) and p for p in patterns) or len(set(patterns)) < len(pairs):
        raise _Invalid(allowed + " (non-empty, distinct patterns)")
    try:
        return tuple((p, _TP_STYLES(s)) for p, s in pairs)
    except _Invalid:
        raise _Invalid(allowed) from None


# ---- fields ----

def _f(default: Any, check: Callable[[Any], Any], **meta: Any) -> Any:
    return field(default=default, metadata={"check": check, **meta})


def _req(check: Callable[[Any], Any]) -> Any:
    """A field with no default: a required JSON key."""
    return field(metadata={"check": check})


def _block(cls: type, **meta: Any) -> Any:
    return field(default_factory=cls, metadata={"check": _instance(cls), **meta})


def _validate(obj: Any) -> None:
    """Run every field's check, storing the normalised value (frozen, hence object.__setattr__)."""
    for f in fields(obj):
        if "check" in f.metadata:
            object.__setattr__(obj, f.name, _checked(f.name, getattr(obj, f.name),
                                                     f.metadata["check"]))


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in fields(cls) if f.name == name)


def _required(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls)
                 if f.default is MISSING and f.default_factory is MISSING)


# ---- the config blocks ----

@dataclass(frozen=True)
class FP16Config:
    """DeepSpeed's "fp16" block: float16 compute with fp32 master weights and loss scaling."""

    enabled: bool = _f(False, _bool)
    """Compute in float16; the optimizer keeps an fp32 master copy of the parameters."""
    loss_scale: float = _f(0.0, _float(0.0))
    """0 selects dynamic loss scaling; a positive value is a fixed (static) scale."""
    initial_scale_power: int = _f(16, _int(0, 127))
    """Dynamic scaling starts at 2**initial_scale_power (<= 127 keeps it a finite float32)."""
    loss_scale_window: int = _f(1000, _int(1))
    """Overflow-free steps after which the dynamic scale doubles."""
    hysteresis: int = _f(2, _int(1))
    """Overflows tolerated before the dynamic scale is halved (DeepSpeed's delayed shift)."""
    min_loss_scale: float = _f(1.0, _float(0.0, lo_open=True))
    """The dynamic scale never drops below this."""

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class BF16Config:
    """DeepSpeed's "bf16" block: bfloat16 compute, fp32 master weights, no loss scaling."""

    enabled: bool = _f(False, _bool)
    """Compute in bfloat16; the optimizer keeps an fp32 master copy of the parameters."""

    def __post_init__(self) -> None:
        _validate(self)


def _zero_stage(v: Any) -> int:
    try:
        return _int(0, 2)(v)
    except _Invalid:
        why = " (ZeRO stage 3 is not supported; stages 0-2 are)" if _is_int(v) and v == 3 else ""
        raise _Invalid("0, 1 or 2" + why) from None


@dataclass(frozen=True)
class ZeroConfig:
    """DeepSpeed's "zero_optimization" block (ZeRO, Rajbhandari et al. 2020)."""

    stage: int = _f(0, _zero_stage)
    """0: plain data parallel; 1: shard optimizer state; 2: also shard gradients."""
    reduce_bucket_size: int = _f(500_000_000, _int(1))
    """Elements per gradient reduction bucket."""
    allgather_bucket_size: int = _f(500_000_000, _int(1))
    """Elements per all-gather of updated parameter shards."""
    overlap_comm: bool = _f(False, _bool)
    """Issue gradient reductions during the backward pass instead of after it."""
    contiguous_gradients: bool = _f(True, _bool)
    """Copy gradients into one contiguous buffer as they are produced."""
    reduce_scatter: bool = _f(True, _bool)
    """Reduce gradients with reduce-scatter (True) or all-reduce (False)."""

    def __post_init__(self) -> None:
        _validate(self)


_OPTIMIZER_TYPE = _choice("Adam", "AdamW", "Lamb", fold=True)
_ADAM_ONLY = ("adam_w_mode",)
_LAMB_ONLY = ("max_coeff", "min_coeff", "max_grad_norm", "eps_inside_sqrt")


@dataclass(frozen=True)
class OptimizerConfig:
    """DeepSpeed's "optimizer" block, {"type": ..., "params": {...}}, flattened."""

    type: str = _req(_OPTIMIZER_TYPE)
    """"Adam", "AdamW" or "Lamb" (JSON spelling is case-insensitive)."""
    lr: float = _f(1e-3, _float(0.0))
    """Learning rate (a scheduler, if configured, overrides it each step)."""
    betas: tuple[float, float] = _f((0.9, 0.999), _betas)
    """Decay rates of the first and second moment estimates."""
    eps: float = _f(1e-8, _float(0.0))
    """Added to the denominator for numerical stability."""
    weight_decay: float = _f(0.0, _float(0.0))
    """Weight decay coefficient."""
    bias_correction: bool = _f(True, _bool)
    """Apply Adam's bias correction to the moment estimates."""
    adam_w_mode: bool = _f(True, _bool)
    """Adam/AdamW only: decoupled weight decay (DeepSpeed's default, required for AdamW)."""
    max_coeff: float = _f(10.0, _float(0.0, lo_open=True))
    """Lamb only: upper clamp of the trust ratio."""
    min_coeff: float = _f(0.01, _float(0.0))
    """Lamb only: lower clamp of the trust ratio."""
    max_grad_norm: float = _f(0.0, _float(0.0))
    """Lamb only: clip gradients to this global norm first (0 disables)."""
    eps_inside_sqrt: bool = _f(False, _bool)
    """Lamb only: add eps inside the square root of the second moment."""

    def __post_init__(self) -> None:
        _validate(self)
        foreign = _ADAM_ONLY if self.type == "Lamb" else _LAMB_ONLY
        for name in foreign:  # a value set for the other optimizer is a mistake, not a no-op
            if getattr(self, name) != _default(OptimizerConfig, name):
                raise _key_error(name, f" is not a parameter of optimizer type {self.type}")
        if self.type == "AdamW" and not self.adam_w_mode:
            raise _bad("adam_w_mode", False, "true: AdamW always decouples weight decay")
        if self.min_coeff > self.max_coeff:
            raise _bad("min_coeff", self.min_coeff, f"<= max_coeff ({self.max_coeff})")


@dataclass(frozen=True, kw_only=True)
class WarmupLRParams:
    """DeepSpeed WarmupLR: lr rises from min to max over warmup_num_steps, then stays."""

    warmup_min_lr: float = _f(0.0, _float(0.0))
    """Learning rate at step 0."""
    warmup_max_lr: float = _f(0.001, _float(0.0))
    """Learning rate reached at the end of warmup."""
    warmup_num_steps: int = _f(1000, _int(0))
    """Length of the warmup in optimizer steps."""
    warmup_type: str = _f("log", _choice("log", "linear"))
    """Shape of the rise: "log" or "linear"."""

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True, kw_only=True)
class WarmupDecayLRParams(WarmupLRParams):
    """DeepSpeed WarmupDecayLR: WarmupLR, then linear decay to 0 at total_num_steps."""

    total_num_steps: int = _req(_int(1))
    """Step at which the learning rate reaches 0 (required)."""


@dataclass(frozen=True, kw_only=True)
class OneCycleParams:
    """DeepSpeed OneCycle: one triangular lr (and momentum) cycle, then optional decay."""

    cycle_min_lr: float = _req(_float(0.0))
    """Learning rate at the start and end of the cycle (required)."""
    cycle_max_lr: float = _req(_float(0.0))
    """Learning rate at the peak of the cycle (required)."""
    decay_lr_rate: float = _f(0.0, _float(0.0))
    """Learning rate decay rate after the cycle."""
    cycle_first_step_size: int = _f(2000, _int(1))
    """Steps in the rising half of the cycle."""
    cycle_second_step_size: int | None = _f(None, _optional(_int(1)))
    """Steps in the falling half (None: same as the rising half)."""
    cycle_first_stair_count: int = _f(0, _int(0))
    """Stairs in the rising half (0: continuous)."""
    cycle_second_stair_count: int | None = _f(None, _optional(_int(0)))
    """Stairs in the falling half (None: same as the rising half)."""
    decay_step_size: int = _f(0, _int(0))
    """Steps between decays after the cycle (0: no decay)."""
    cycle_momentum: bool = _f(True, _bool)
    """Cycle beta1 inversely to the learning rate."""
    cycle_min_mom: float = _f(0.8, _float(0.0, 1.0))
    """Lowest beta1 of the cycle."""
    cycle_max_mom: float = _f(0.9, _float(0.0, 1.0))
    """Highest beta1 of the cycle."""
    decay_mom_rate: float = _f(0.0, _float(0.0))
    """Momentum decay rate after the cycle."""

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True, kw_only=True)
class LRRangeTestParams:
    """DeepSpeed LRRangeTest: lr grows from lr_range_test_min_lr to find a usable maximum."""

    lr_range_test_min_lr: float = _f(1e-3, _float(0.0))
    """Starting learning rate."""
    lr_range_test_step_size: int = _f(2000, _int(1))
    """Steps per increase interval."""
    lr_range_test_step_rate: float = _f(1.0, _float(0.0))
    """Increase per interval, as a fraction of the starting learning rate."""
    lr_range_test_staircase: bool = _f(False, _bool)
    """Increase in steps instead of continuously."""

    def __post_init__(self) -> None:
        _validate(self)


SchedulerParams = WarmupLRParams | WarmupDecayLRParams | OneCycleParams | LRRangeTestParams
_SCHEDULES: dict[str, type] = {
    "WarmupLR": WarmupLRParams, "WarmupDecayLR": WarmupDecayLRParams,
    "OneCycle": OneCycleParams, "LRRangeTest": LRRangeTestParams,
}


@dataclass(frozen=True)
class SchedulerConfig:
    """DeepSpeed's "scheduler" block: {"type": ..., "params": {...}}."""

    type: str = _req(_choice(*_SCHEDULES))
    """"WarmupLR", "WarmupDecayLR", "OneCycle" or "LRRangeTest"."""
    params: SchedulerParams | None = None
    """The typed parameters for `type` (None: that type's defaults)."""

    def __post_init__(self) -> None:
        _validate(self)
        want = _SCHEDULES[self.type]
        if self.params is None:
            missing = _required(want)
            if missing:
                raise _key_error(f"params.{missing[0]}",
                                 f" is required for scheduler type {self.type}")
            object.__setattr__(self, "params", want())
        if type(self.params) is not want:
            raise _bad("params", self.params, f"a {want.__name__} for type {self.type}")


@dataclass(frozen=True)
class TensorParallelConfig:
    """The "tensor_parallel" block: Megatron-style sharding of matching weights."""

    size: int = _f(1, _int(1))
    """Ranks per tensor-parallel group (1: off)."""
    plan: tuple[tuple[str, str], ...] = _f((), _tp_plan, dump=dict)
    """(glob pattern over parameter/module names, "colwise"|"rowwise"), in JSON order."""

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class ZerofxConfig:
    """The "zerofx" block: zerofx's own settings, not DeepSpeed's."""

    inductor: bool = _f(False, _bool)
    """Hand the transformed graphs to Inductor instead of running them eagerly."""
    dump_dir: str | None = _f(None, _optional(_path))
    """Write per-pass graph dumps into this directory."""
    disable_passes: tuple[str, ...] = _f((), _names)
    """Names of passes to skip (checked against the pass registry by the pipeline)."""

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class BatchSizes:
    """Resolved batch sizes: train_batch_size = micro x accumulation steps x DP world size."""

    train_batch_size: int
    """Samples per optimizer step, over all data-parallel ranks."""
    train_micro_batch_size_per_gpu: int
    """Samples per forward/backward on one rank."""
    gradient_accumulation_steps: int
    """Micro-batches accumulated per optimizer step."""


# ---- reading JSON-shaped dicts (raw keys are the field names above plus "type"/"params") ----

def _unknown(key: str, value: Any, valid: tuple[str, ...], note: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    return _key_error(key, f" (value {_show(value)}) is not known{note}{hint} "
                           f"valid keys: {', '.join(valid)}")


def _check_keys(block: Mapping, valid: tuple[str, ...], *, required: tuple[str, ...] = (),
                notes: Mapping[str, str] | None = None) -> None:
    """Every key of `block` is in `valid` and every `required` key is present."""
    for key, value in block.items():
        if not isinstance(key, str):
            raise _key_error(_show(key), " is not a string; JSON object keys are strings")
        if key not in valid:
            raise _unknown(key, value, valid, (notes or {}).get(key, ""))
    for key in required:
        if key not in block:
            raise _key_error(key, " is required but missing")


def _object(raw: Any) -> Mapping:
    if not isinstance(raw, Mapping):
        raise _Invalid("a JSON object")
    return raw


def _parse_in(key: str, parse: Callable[[Any], Any], raw: Any) -> Any:
    """parse(raw), with errors reported under `key`."""
    try:
        return parse(raw)
    except _Invalid as e:
        raise _bad(key, raw, str(e)) from None
    except ConfigError as e:
        raise e.under(key) from None


def _parse_block(cls: type, raw: Any) -> Any:
    """A JSON object -> cls, recursing into fields that declare their own `parse`."""
    block = _object(raw)
    _check_keys(block, tuple(f.name for f in fields(cls)), required=_required(cls))
    kwargs = {}
    for f in fields(cls):
        if f.name in block:
            parse = f.metadata.get("parse")
            value = block[f.name]
            kwargs[f.name] = value if parse is None else _parse_in(f.name, parse, value)
    return cls(**kwargs)


def _parse_zero(raw: Any) -> ZeroConfig:
    if isinstance(raw, bool):  # the original 2020 form: "zero_optimization": true means stage 1
        return ZeroConfig(stage=int(raw))
    return _parse_block(ZeroConfig, raw)


def _parse_optimizer(raw: Any) -> OptimizerConfig | None:
    if raw is None:
        return None
    block = _object(raw)
    _check_keys(block, ("type", "params"), required=("type",))
    kind = _checked("type", block["type"], _OPTIMIZER_TYPE)
    return _parse_in("params", partial(_optimizer_params, kind), block.get("params", {}))


def _optimizer_params(kind: str, raw: Any) -> OptimizerConfig:
    params = _object(raw)
    foreign = _ADAM_ONLY if kind == "Lamb" else _LAMB_ONLY
    valid = tuple(f.name for f in fields(OptimizerConfig)
                  if f.name != "type" and f.name not in foreign)
    owner = "Adam/AdamW" if kind == "Lamb" else "Lamb"
    notes = {name: f" for optimizer type {kind} (it is a {owner} parameter)" for name in foreign}
    _check_keys(params, valid, notes=notes)
    return OptimizerConfig(type=kind, **params)


def _parse_scheduler(raw: Any) -> SchedulerConfig | None:
    if raw is None:
        return None
    block = _object(raw)
    _check_keys(block, ("type", "params"), required=("type",))
    kind = _checked("type", block["type"], _choice(*_SCHEDULES))
    params = _parse_in("params", partial(_parse_block, _SCHEDULES[kind]), block.get("params", {}))
    return SchedulerConfig(type=kind, params=params)


def _dump(obj: Any) -> dict[str, Any]:
    """A config dataclass -> its JSON object; None-valued keys are left out (they are defaults)."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is not None:
            out[f.name] = f.metadata.get("dump", _jsonable)(value)
    return out


def _jsonable(value: Any) -> Any:
    if is_dataclass(value):
        return _dump(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _dump_optimizer(opt: OptimizerConfig) -> dict[str, Any]:
    params = {k: v for k, v in _dump(opt).items()
              if k != "type" and k not in (_ADAM_ONLY if opt.type == "Lamb" else _LAMB_ONLY)}
    return {"type": opt.type, "params": params}


# ---- reading JSON files ----

class _Object(dict):
    """A JSON object that remembers keys written twice (a plain dict keeps the last silently)."""

    duplicates: tuple[str, ...] = ()


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _first_duplicate(tree: Any) -> str | None:
    """Dotted path of the first key written twice in `tree` (iterative: no recursion limit)."""
    stack = [("", tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, _Object):
            if node.duplicates:
                return f"{path}{node.duplicates[0]}"
            stack.extend((f"{path}{k}.", v) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}].", v) for i, v in reversed(list(enumerate(node))))
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # Python's json accepts NaN/Infinity; JSON does not


def _load_json(name: str) -> Any:
    """The JSON value in file `name`; ConfigError (without the file name) on any failure."""
    try:
        with open(name, "rb") as fh:
            data = fh.read()
        text = data.decode("utf-8-sig")  # tolerate the BOM some Windows editors write
    except OSError as e:
        raise ConfigError(f"cannot read the config file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        tree = json.loads(text, object_pairs_hook=_object_from_pairs,
                          parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(f"line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # e.g. NaN, ints too long, absurd nesting
        raise ConfigError(f"invalid JSON: {_show(str(e))}") from None
    duplicate = _first_duplicate(tree)
    if duplicate is not None:
        raise _key_error(duplicate, " appears twice; JSON keys must be unique in an object")
    return tree


# ---- the whole config ----

_OPT_BATCH = _optional(_int(1))


@dataclass(frozen=True)
class Config:
    """A DeepSpeed JSON config, typed. Build with from_any/from_dict/from_file or keywords."""

    train_batch_size: int | None = _f(None, _OPT_BATCH)
    """Samples per optimizer step over all data-parallel ranks (see batch_sizes)."""
    train_micro_batch_size_per_gpu: int | None = _f(None, _OPT_BATCH)
    """Samples per forward/backward on one rank (see batch_sizes)."""
    gradient_accumulation_steps: int | None = _f(None, _OPT_BATCH)
    """Micro-batches per optimizer step (see batch_sizes)."""
    steps_per_print: int = _f(10, _int(1))
    """Log progress every this many optimizer steps."""
    optimizer: OptimizerConfig | None = _f(None, _optional(_instance(OptimizerConfig)),
                                           parse=_parse_optimizer, dump=_dump_optimizer)
    """The optimizer zerofx builds (None: the user passes one in)."""
    scheduler: SchedulerConfig | None = _f(None, _optional(_instance(SchedulerConfig)),
                                           parse=_parse_scheduler)
    """The learning-rate schedule (None: constant lr)."""
    fp16: FP16Config = _block(FP16Config, parse=partial(_parse_block, FP16Config))
    """float16 mixed precision with loss scaling."""
    bf16: BF16Config = _block(BF16Config, parse=partial(_parse_block, BF16Config))
    """bfloat16 mixed precision."""
    zero_optimization: ZeroConfig = _block(ZeroConfig, parse=_parse_zero)
    """ZeRO stage and bucketing; JSON also takes DeepSpeed 2020's true (stage 1) / false."""
    gradient_clipping: float = _f(0.0, _float(0.0))
    """Clip gradients to this global L2 norm (0 disables)."""
    wall_clock_breakdown: bool = _f(False, _bool)
    """Log per-phase step timings (forward, backward, step)."""
    tensor_parallel: TensorParallelConfig = _block(
        TensorParallelConfig, parse=partial(_parse_block, TensorParallelConfig))
    """Tensor (model) parallelism."""
    zerofx: ZerofxConfig = _block(ZerofxConfig, parse=partial(_parse_block, ZerofxConfig))
    """zerofx's own settings."""

    def __post_init__(self) -> None:
        _validate(self)
        if self.fp16.enabled and self.bf16.enabled:
            raise _key_error("bf16.enabled", " is true and so is 'fp16.enabled'; enable at most one")
        total, micro, gas = (self.train_batch_size, self.train_micro_batch_size_per_gpu,
                             self.gradient_accumulation_steps)
        if None not in (total, micro, gas) and total % (micro * gas):
            raise _key_error("train_batch_size", f" has value {total}, not a multiple of micro"
                             f"({micro}) x gradient_accumulation_steps({gas}) = {micro * gas}; "
                             "no data-parallel world size fits")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        """Parse a DeepSpeed-style config dict (as json.load returns it)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a config must be a JSON object (dict); got {_show(d)}")
        return _parse_block(cls, d)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Config:
        """Parse a JSON config file; messages start with the file name."""
        name = os.fsdecode(path)
        try:
            return cls.from_dict(_load_json(name))
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}", key=e.key, tail=e._tail) from None

    @classmethod
    def from_any(cls, source: Config | Mapping | str | os.PathLike | None) -> Config:
        """None (defaults), a dict, a JSON file path, or a Config (returned as is)."""
        if source is None:
            return cls()
        if isinstance(source, Config):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        if isinstance(source, (str, os.PathLike)):
            return cls.from_file(source)
        raise ConfigError("expected a Config, a dict, a JSON file path or None; "
                          f"got {type(source).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict; Config.from_dict(c.to_dict()) == c."""
        return _dump(self)

    @property
    def compute_dtype(self) -> Any:
        """torch.float16 (fp16), torch.bfloat16 (bf16) or torch.float32."""
        import torch  # lazily: reading a config (e.g. in zerofx-launch) should not need torch

        if self.fp16.enabled:
            return torch.float16
        return torch.bfloat16 if self.bf16.enabled else torch.float32

    def batch_sizes(self, dp_world_size: int) -> BatchSizes:
        """Resolve DeepSpeed's three batch keys for `dp_world_size` data-parallel ranks."""
        if not _is_int(dp_world_size) or dp_world_size < 1:
            raise ConfigError(f"dp_world_size must be an integer >= 1; got {_show(dp_world_size)}")
        return _resolve_batch(self.train_batch_size, self.train_micro_batch_size_per_gpu,
                              self.gradient_accumulation_steps, dp_world_size)


def _resolve_batch(total: int | None, micro: int | None, gas: int | None,
                   world: int) -> BatchSizes:
    """total = micro x gas x world; any two given determine the third, a lone total or micro
    means gas = 1 (DeepSpeed's rules)."""
    if total is None and micro is None:
        raise ConfigError("the batch size is not set: set train_batch_size and/or "
                          "train_micro_batch_size_per_gpu (gradient_accumulation_steps alone "
                          "does not determine it)")
    if total is None:
        gas = gas or 1
        total = micro * gas * world
    elif micro is None:
        gas = gas or 1
        micro = total // (gas * world)
        if micro * gas * world != total:
            raise ConfigError(f"train_batch_size={total} is not divisible by "
                              f"gradient_accumulation_steps({gas}) x world({world}) = {gas * world}")
    elif gas is None:
        gas = total // (micro * world)
        if micro * gas * world != total:
            raise ConfigError(f"train_batch_size={total} is not divisible by "
                              f"micro({micro}) x world({world}) = {micro * world}")
    if micro * gas * world != total:
        raise ConfigError(f"train_batch_size={total} is not micro({micro}) x "
                          f"gradient_accumulation_steps({gas}) x world({world}) = "
                          f"{micro * gas * world}")
    return BatchSizes(total, micro, gas)
