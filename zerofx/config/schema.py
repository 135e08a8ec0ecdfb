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
import stat
from collections.abc import Iterator, Mapping
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
    return ConfigError(f"config key '{clip(key)}'{tail}", key=key, tail=tail)


class Invalid(Exception):
    """Raised by a checker; its message says what would have been allowed."""


SHOWN_CHARS = 80
"""The most of any user-provided key or value an error message shows: a 10 MB key in a
config must not become a 10 MB message (every dotted path zerofx knows is shorter)."""

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = SHOWN_CHARS
_REPR.maxlevel = 2  # bounded, so even absurdly nested input cannot blow the stack here


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text`, or its first `limit` characters and "..." (a prefix, so the start still
    identifies it)."""
    return text if len(text) <= limit else text[:limit] + "..."


def show(value: Any) -> str:
    try:
        return clip(_REPR.repr(value))  # reprlib bounds each part; clip bounds the whole
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


def _because(allowed: str, why: str) -> str:
    return f"{allowed} ({why})" if why else allowed


def integer(lo: int, hi: int | None = None, *, ceiling: str = "") -> Callable[[Any], int]:
    """An integer in [lo, hi]. `ceiling` words an upper bound too long to read as digits,
    with why it is there: the message then says "an integer >= lo (ceiling)"."""
    allowed = (f"an integer >= {lo}" + (f" ({ceiling})" if ceiling else "")
               if hi is None or ceiling else f"an integer in [{lo}, {hi}]")

    def check(v: Any) -> int:
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # JSON writers and humans write sizes as 5e8
        if not is_int(v) or v < lo or (hi is not None and v > hi):
            raise Invalid(allowed)
        return v
    return check


def number(lo: float, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, why: str = "") -> Callable[[Any], float]:
    """A finite number in [lo, hi] (or open at either end); `why` says in the error message
    why the bounds are there."""
    low = f"> {lo}" if lo_open else f">= {lo}"
    allowed = _because(
        f"a number {low}" if hi is None
        else f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}", why)

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


def zero_or(check: Callable[[Any], float], meaning: str = "off") -> Callable[[Any], float]:
    """0 (the setting's `meaning`, usually off) or a value `check` accepts: for settings such
    as a clipping norm, where 0 switches them off and a tiny positive value is a mistake."""
    def run(v: Any) -> float:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0:
            return 0.0
        try:
            return check(v)
        except Invalid as e:
            raise Invalid(f"a number >= 0: 0 ({meaning}), or {e}") from None
    return run


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
    # difflib indexes every character of the key: a 10 MB key cost seconds and 380 MB, and
    # nothing that long is a typo of a valid key
    close = difflib.get_close_matches(key, valid, n=1) if len(key) <= SHOWN_CHARS else []
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


# ---- walking JSON trees ----

_LEAVES = frozenset((str, int, float, bool, type(None)))  # json.loads's values but containers


def _items(node: Any) -> tuple[Iterator, bool] | None:
    """(iterator over (key, child), whether the keys are list indices), or None for a leaf."""
    if isinstance(node, Mapping):
        return iter(node.items()), False
    if isinstance(node, list):
        return enumerate(node), True
    return None


def dotted(parts: list[tuple[Any, bool]]) -> str:
    """The path of (key, is_index) parts as messages write it: a.b[0].c."""
    out = ""
    for key, is_index in parts:
        out = f"{out or '(top)'}[{key}]" if is_index else (f"{out}.{key}" if out else str(key))
    return out


def find_path(tree: Any, hit: Callable[[Any], bool]) -> tuple[list[tuple[Any, bool]], Any] | None:
    """(path parts for `dotted`, node) of the first node of `tree` in document order with
    hit(node) true (the root's path is []), or None.

    Iterative, holding one iterator per open container and building only the path it
    returns: the walk that made a tuple and a path string per element cost 1.15 GB for a
    10 MB array, and a recursive one fails on deep nesting. A container that contains
    itself (a dict built in Python can) is a ConfigError, not an endless walk.
    """
    if hit(tree):
        return [], tree
    root = _items(tree)
    if root is None:
        return None
    stack = [(*root, id(tree))]  # (items, keys are indices, id) per open container
    keys: list = []  # the key of each open container but the root, in its parent
    open_ids = {id(tree)}
    while stack:
        for key, child in stack[-1][0]:
            if hit(child):
                return _parts(stack, keys + [key]), child
            if type(child) in _LEAVES:  # most elements: skip the ABC checks of _items
                continue
            inner = _items(child)
            if inner is not None:
                if id(child) in open_ids:
                    raise key_error(dotted(_parts(stack, keys + [key])),
                                    " contains itself; a config is a tree")
                stack.append((*inner, id(child)))
                keys.append(key)
                open_ids.add(id(child))
                break
        else:  # this container is done
            open_ids.discard(stack.pop()[2])
            if keys:
                keys.pop()
    return None


def _parts(stack: list, keys: list) -> list[tuple[Any, bool]]:
    """Each key with whether it indexes a list (known from the container it is in)."""
    return [(key, is_index) for key, (_, is_index, _) in zip(keys, stack)]


# ---- reading JSON files ----

MAX_CONFIG_BYTES = 16 << 20
"""The largest config file read. A DeepSpeed config is a few KB; the cap keeps a wrong path
(a log, a checkpoint, a data set) from being read whole into memory."""

_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"))


def _check_regular(st: os.stat_result) -> None:
    """A regular file under the size cap, or a ConfigError saying what it is instead."""
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _NOT_REGULAR if test(st.st_mode)), "not a file")
        raise ConfigError(f"cannot read the config file: it is {kind}, not a regular file; "
                          f"give the path of a JSON file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(_too_big(st.st_size))


def _too_big(size: int | str) -> str:
    return (f"the config file is {size} bytes, over the {MAX_CONFIG_BYTES >> 20} MiB limit "
            f"for a config (a DeepSpeed config is a few KB): is this the right file?")


_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))


def _read_config_file(name: str) -> bytes:
    """The bytes of regular file `name`, at most MAX_CONFIG_BYTES.

    Checked before opening: opening a FIFO for reading blocks until a writer comes, and
    reading /dev/zero never ends. Checked again on the open file (fstat), in case the name
    was replaced in between; the open is non-blocking so even then a FIFO cannot hang it.
    """
    try:
        _check_regular(os.stat(name))
        fd = os.open(name, _OPEN_FLAGS)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise ConfigError(f"cannot read the config file: {getattr(e, 'strerror', None) or e}"
                          ) from None
    with os.fdopen(fd, "rb") as fh:
        try:
            _check_regular(os.fstat(fd))
            data = fh.read(MAX_CONFIG_BYTES + 1)  # + 1: a file that grew since the check
        except OSError as e:
            raise ConfigError(f"cannot read the config file: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(_too_big(f"more than {MAX_CONFIG_BYTES}"))
    return data


class _Object(dict):
    """A JSON object with keys written twice (a plain dict keeps the last silently)."""

    duplicates: tuple[str, ...] = ()


def _object_from_pairs(found: list, pairs: list[tuple[str, Any]]) -> dict:
    """json's object_pairs_hook: a dict, or an _Object naming its duplicate keys (noted in
    `found`, so the tree is searched for the path only when there is one)."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    marked = _Object(obj)
    marked.duplicates = tuple(k for k, _ in pairs if k in seen or seen.add(k))
    found.append(True)
    return marked


def _first_duplicate(tree: Any) -> str | None:
    """Dotted path of the first key written twice in `tree`, in document order."""
    found = find_path(tree, lambda node: isinstance(node, _Object))
    if found is None:
        return None
    parts, obj = found
    return dotted(parts + [(obj.duplicates[0], False)])


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and every other reader of the file) does not.
    raise ValueError(f"{name} is not valid JSON")


def load_json(name: str) -> Any:
    """The JSON value in file `name`; ConfigError (without the file name) on any failure."""
    data = _read_config_file(name)
    try:
        text = data.decode("utf-8-sig")  # tolerate the BOM some Windows editors write
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (bad byte at offset {e.start})") from None
    del data  # one copy of a large file at a time
    found: list = []
    try:
        tree = json.loads(text, object_pairs_hook=partial(_object_from_pairs, found),
                          parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(f"line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # e.g. NaN, ints too long, absurd nesting
        raise ConfigError(f"invalid JSON: {str(e)[:200]}") from None
    duplicate = _first_duplicate(tree) if found else None
    if duplicate is not None:
        raise key_error(duplicate, " appears twice; JSON keys must be unique in an object")
    return tree
