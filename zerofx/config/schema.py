"""Schema machinery for zerofx.config: checkers, typed fields, dict and JSON-file readers.

Generic: it knows no config key. zerofx/config/blocks.py declares the config blocks as frozen
dataclasses whose fields carry a `check` (value -> normalised value, or Invalid saying what is
allowed), optionally a `parse` (JSON value -> field value) and a `dump` (field value -> JSON);
this module runs them and turns every failure into a ConfigError naming the key path.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import reprlib
from collections.abc import Mapping
from dataclasses import MISSING, field, fields, is_dataclass
from functools import partial
from typing import Any, Callable


class ConfigError(ValueError):
    """A config zerofx cannot use. The only exception parsing raises, whatever the input."""

    def __init__(self, message: str, *, key: str | None = None, tail: str = ""):
        super().__init__(message)
        self.key = key
        """Dotted path of the offending key (None when the error is not about one key)."""
        self._tail = tail

    def under(self, prefix: str) -> ConfigError:
        """The same error as seen from the enclosing block `prefix`."""
        return self if self.key is None else key_error(f"{prefix}.{self.key}", self._tail)

    def in_file(self, name: str) -> ConfigError:
        """The same error, its message prefixed with the file it came from."""
        return ConfigError(f"{name}: {self}", key=self.key, tail=self._tail)


def key_error(key: str, tail: str) -> ConfigError:
    return ConfigError(f"config key '{key}'{tail}", key=key, tail=tail)


class Invalid(Exception):
    """Raised by a checker; its message says what would have been allowed."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 2  # bounded, so even absurdly nested input cannot blow the stack here


def show(value: Any) -> str:
    try:
        return _REPR.repr(value)
    except Exception:  # e.g. an int too long for str(); the message must still come out
        return f"<{type(value).__name__}>"


def bad(key: str, value: Any, expected: str) -> ConfigError:
    return key_error(key, f" has value {show(value)}; expected {expected}")


def checked(key: str, value: Any, check: Callable[[Any], Any]) -> Any:
    try:
        return check(value)
    except Invalid as e:
        raise bad(key, value, str(e)) from None


# ---- checkers: value -> normalised value, or Invalid(what is allowed) ----

def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int in Python, not here


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise Invalid("true or false")
    return v


def integer(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def check(v: Any) -> int:
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # JSON writers and humans write sizes as 5e8
        if not is_int(v) or v < lo or (hi is not None and v > hi):
            raise Invalid(allowed)
        return v
    return check


def number(lo: float, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[Any], float]:
    low = f"> {lo}" if lo_open else f">= {lo}"
    allowed = (f"a number {low}" if hi is None
               else f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")

    def check(v: Any) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise Invalid(allowed)
        try:
            v = float(v)
        except OverflowError:
            raise Invalid(allowed) from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo)
        if not ok or (hi is not None and (v >= hi if hi_open else v > hi)):
            raise Invalid(allowed)
        return v
    return check


def choice(*options: str, fold: bool = False) -> Callable[[Any], str]:
    """One of `options`; with `fold`, matched case-insensitively and returned as spelt here."""
    allowed = "one of " + ", ".join(repr(o) for o in options)
    by_key = {(o.lower() if fold else o): o for o in options}

    def check(v: Any) -> str:
        key = v.lower() if fold and isinstance(v, str) else v
        if not isinstance(key, str) or key not in by_key:
            raise Invalid(allowed + (" (case-insensitive)" if fold else ""))
        return by_key[key]
    return check


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


def instance(cls: type) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if not isinstance(v, cls):
            raise Invalid(f"a {cls.__name__}")
        return v
    return check


def path_string(v: Any) -> str:
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str) or not v:
        raise Invalid("a non-empty path string")
    return v


def names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
        raise Invalid("a list of non-empty strings")
    return tuple(v)


# ---- fields ----

def setting(default: Any, check: Callable[[Any], Any], **meta: Any) -> Any:
    return field(default=default, metadata={"check": check, **meta})


def required_setting(check: Callable[[Any], Any]) -> Any:
    """A field with no default: a required JSON key."""
    return field(metadata={"check": check})


def nested_setting(cls: type, **meta: Any) -> Any:
    """A field holding another config block: default-constructed, parsed as a JSON object
    unless `meta` brings its own `parse`."""
    meta = {"check": instance(cls), "parse": partial(parse_block, cls), **meta}
    return field(default_factory=cls, metadata=meta)


def validate(obj: Any) -> None:
    """Run every field's check, storing the normalised value (frozen, hence object.__setattr__)."""
    for f in fields(obj):
        if "check" in f.metadata:
            value = checked(f.name, getattr(obj, f.name), f.metadata["check"])
            object.__setattr__(obj, f.name, value)


def default_of(cls: type, name: str) -> Any:
    return next(f.default for f in fields(cls) if f.name == name)


def required_keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls)
                 if f.default is MISSING and f.default_factory is MISSING)


# ---- reading JSON-shaped dicts: a block's keys are its dataclass's field names ----

def _unknown(key: str, value: Any, valid: tuple[str, ...], note: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    return key_error(key, f" (value {show(value)}) is not known{note}{hint} "
                          f"valid keys: {', '.join(valid)}")


def check_keys(obj: Mapping, valid: tuple[str, ...], *, required: tuple[str, ...] = (),
               notes: Mapping[str, str] | None = None) -> None:
    """Every key of `obj` is in `valid` and every `required` key is present; `notes` adds a
    reason to the message for particular unknown keys."""
    for key, value in obj.items():
        if not isinstance(key, str):
            raise key_error(show(key), " is not a string; JSON object keys are strings")
        if key not in valid:
            raise _unknown(key, value, valid, (notes or {}).get(key, ""))
    for key in required:
        if key not in obj:
            raise key_error(key, " is required but missing")


def json_object(raw: Any) -> Mapping:
    if not isinstance(raw, Mapping):
        raise Invalid("a JSON object")
    return raw


def parse_in(key: str, parse: Callable[[Any], Any], raw: Any) -> Any:
    """parse(raw), with errors reported under `key`."""
    try:
        return parse(raw)
    except Invalid as e:
        raise bad(key, raw, str(e)) from None
    except ConfigError as e:
        raise e.under(key) from None


def parse_block(cls: type, raw: Any) -> Any:
    """A JSON object -> cls, recursing into fields that declare their own `parse`."""
    obj = json_object(raw)
    check_keys(obj, tuple(f.name for f in fields(cls)), required=required_keys(cls))
    kwargs = {}
    for f in fields(cls):
        if f.name in obj:
            parse = f.metadata.get("parse")
            value = obj[f.name]
            kwargs[f.name] = value if parse is None else parse_in(f.name, parse, value)
    return cls(**kwargs)


def dump(obj: Any) -> dict[str, Any]:
    """A config dataclass -> its JSON object; None-valued keys are left out (they are defaults)."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is not None:
            out[f.name] = f.metadata.get("dump", _jsonable)(value)
    return out


def _jsonable(value: Any) -> Any:
    if is_dataclass(value):
        return dump(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


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
            where = path[:-1] or "(top)"
            stack.extend((f"{where}[{i}].", v) for i, v in reversed(list(enumerate(node))))
    return None


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and every other reader of the file) does not.
    raise ValueError(f"{name} is not valid JSON")


def load_json(name: str) -> Any:
    """The JSON value in file `name`; ConfigError (without the file name) on any failure."""
    try:
        with open(name, "rb") as fh:
            data = fh.read()
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise ConfigError(f"cannot read the config file: {getattr(e, 'strerror', None) or e}"
                          ) from None
    try:
        text = data.decode("utf-8-sig")  # tolerate the BOM some Windows editors write
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        tree = json.loads(text, object_pairs_hook=_object_from_pairs,
                          parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(f"line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # e.g. NaN, ints too long, absurd nesting
        raise ConfigError(f"invalid JSON: {str(e)[:200]}") from None
    duplicate = _first_duplicate(tree)
    if duplicate is not None:
        raise key_error(duplicate, " appears twice; JSON keys must be unique in an object")
    return tree
