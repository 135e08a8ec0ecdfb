"""The collective forms timed on this host, kept for the next run: a rerun compiles the same
program (docs/design.md, convention 10) and pays no timing.

One JSON file, ``$ZEROFX_CACHE_DIR/collective_forms.json`` (default ``~/.cache/zerofx``), read
and written by rank 0 only (its choice is broadcast). An entry's key names everything that
could change the answer: the host, the world and backend, the role and its candidates, the
size and dtype, the torch version. A file that cannot be read is ignored (the forms are timed
again); writes go to a private temporary file renamed over the old one, so a crash or a
concurrent writer never leaves half a file.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
FILE = "collective_forms.json"
_MEMORY: dict[str, dict] = {}  # this process's entries: the file may be unwritable


def cache_dir() -> Path:
    return Path(os.environ.get("ZEROFX_CACHE_DIR") or Path.home() / ".cache" / "zerofx")


def key_of(role: str, forms: tuple[str, ...], world: int, backend: str, numel: int,
           dtype: torch.dtype) -> str:
    host = f"{platform.node()}/{platform.machine()}/{os.cpu_count()}"
    return "|".join((host, f"torch {torch.__version__}", backend, f"world {world}", role,
                     ",".join(forms), str(numel), str(dtype)))


def load(key: str) -> dict | None:
    """{"form": ..., "times_ms": [[form, ms], ...]} for ``key``, or None."""
    if key in _MEMORY:
        return _MEMORY[key]
    entry = _read().get(key)
    if isinstance(entry, dict) and isinstance(entry.get("form"), str):
        _MEMORY[key] = entry
        return entry
    return None


def store(key: str, form: str, times_ms) -> None:
    _MEMORY[key] = {"form": form, "times_ms": [list(t) for t in times_ms]}
    path = cache_dir() / FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read()
        entries[key] = _MEMORY[key]
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".collective_forms.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:  # a read-only home: the choice still holds for this process
        log.info("collective forms not cached in %s (%s)", path, e.strerror or e)


def _read() -> dict:
    path = cache_dir() / FILE
    try:
        if path.stat().st_size > 1 << 20:  # one entry per size and role: never this large
            return {}
        with open(path) as f:
            entries = json.load(f)
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}
