"""The environment a multi-node launch carries to the remote hosts.

ssh starts remote commands with the login environment, not the launcher's. So the launcher
exports, explicitly:

- PATH and VIRTUAL_ENV, so the remote side finds the same python and tools;
- variables whose names start with a known prefix (PYTHON*, NCCL*, GLOO*, ...), the knobs
  that change how a distributed job runs;
- what ``.zerofx_env`` lists, in the home directory and then the working directory (the later
  file wins). Each line is ``NAME=value`` (export that value) or ``NAME`` (export the
  launcher's current value); ``#`` starts a comment.
"""
from __future__ import annotations

import logging
import os
import re

log = logging.getLogger(__name__)

ENV_FILE = ".zerofx_env"
ALWAYS = ("PATH", "VIRTUAL_ENV")
# CUDA_VISIBLE_DEVICES is deliberately not here: it is per host and set from the slots.
PREFIXES = ("PYTHON", "NCCL", "GLOO", "TORCH_", "OMP_", "MKL_", "KMP_", "UCX_", "FI_",
            "ZEROFX_", "MLFLOW", "WANDB_", "HF_")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EnvFileError(ValueError):
    """A malformed ``.zerofx_env`` line; the message names the file, line and text."""


def parse_env_file(text: str, *, path: str, environ: dict[str, str]) -> dict[str, str]:
    """Parse ``.zerofx_env`` text into the variables it exports."""
    exports: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if name.startswith("export "):  # tolerate shell-style lines
            name = name[len("export "):].strip()
        if not _NAME.fullmatch(name):
            raise EnvFileError(f"{path} line {number} ({raw.strip()!r}): expected NAME=value "
                               "or NAME, with NAME made of letters, digits and '_'")
        if sep:
            exports[name] = value.strip()
        elif name in environ:
            exports[name] = environ[name]
        else:
            log.warning("%s line %d: %s is not set here; not exported", path, number, name)
    return exports


def read_env_files(*, cwd: str, home: str, environ: dict[str, str]) -> dict[str, str]:
    """Variables from ``~/.zerofx_env`` then ``./.zerofx_env`` (later wins)."""
    exports: dict[str, str] = {}
    paths = [os.path.join(home, ENV_FILE), os.path.join(cwd, ENV_FILE)]
    for path in dict.fromkeys(os.path.abspath(p) for p in paths):  # home may be the cwd
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise EnvFileError(f"cannot read {path}: {e}; fix or remove the file") from None
        exports.update(parse_env_file(text, path=path, environ=environ))
    return exports


def remote_exports(environ: dict[str, str], *, cwd: str, home: str) -> dict[str, str]:
    """Everything to export on a remote host, in a stable (sorted) order."""
    exports = {k: v for k, v in environ.items()
               if _NAME.fullmatch(k) and (k in ALWAYS or k.startswith(PREFIXES))}
    exports.update(read_env_files(cwd=cwd, home=home, environ=environ))
    return dict(sorted(exports.items()))
