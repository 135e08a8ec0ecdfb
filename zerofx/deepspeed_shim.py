"""``zerofx.as_deepspeed()``: make ``import deepspeed`` give zerofx, only when asked.

DeepSpeed's scripts import more than the top-level package (``from deepspeed.accelerator
import get_accelerator``), which ``import zerofx as deepspeed`` cannot serve: a submodule
import looks the package up by name. Aliasing on request, never at ``import zerofx``, keeps a
real DeepSpeed installed beside zerofx untouched and makes the switch one visible line.
What zerofx does not provide is one ImportError naming the module and the reason.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import types

# deepspeed.<module> -> the zerofx module that serves it
PROVIDED = {"accelerator": "zerofx.accelerator", "comm": "zerofx.comm",
            "checkpointing": "zerofx.checkpointing", "zero": "zerofx.zero",
            "utils": "zerofx.ds_utils"}
# submodules of a provided package, registered under deepspeed's names too: otherwise
# `import deepspeed.utils.groups` would load a second copy of the module under that name
SUBMODULES = {"utils": {"groups": "zerofx.ds_utils.groups",
                        "zero_to_fp32": "zerofx.ds_utils.zero_to_fp32",
                        "logging": "zerofx.ds_utils.dist_log"}}
# deepspeed.<package> of which zerofx serves only some modules: {package: {module: ours}}
# (a dotted module makes the packages between too, holding only what is served)
PARTIAL = {"moe": {"utils": "zerofx.moe_utils"},
           "runtime": {"lr_schedules": "zerofx.lr_schedules", "engine": "zerofx.engine",
                       "utils": "zerofx.ds_utils.runtime_utils",
                       "activation_checkpointing.checkpointing": "zerofx.checkpointing"}}
WHY = {
    "moe": "Mixture-of-Experts layers are not part of zerofx",
    "pipe": "pipeline parallelism is not part of zerofx (tensor parallelism and ZeRO are)",
    "runtime": "it is DeepSpeed's engine internals, which zerofx's graphs do instead "
               "(zerofx serves deepspeed.runtime.lr_schedules, .engine, .utils and "
               ".activation_checkpointing.checkpointing)",
}


class _Refuse(importlib.abc.MetaPathFinder):
    """deepspeed.<x> that zerofx lacks: one clear ImportError instead of a bare
    "No module named"."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("deepspeed.") or fullname in sys.modules:
            return None
        parts = fullname.split(".")
        top = parts[1]
        if top in PROVIDED and (len(parts) == 2 or top not in SUBMODULES):
            return None
        why = WHY.get(top, "zerofx does not provide it yet")
        raise ImportError(f"{fullname}: {why}. zerofx stands in for deepspeed "
                          f"(zerofx.as_deepspeed()) with: deepspeed.initialize, "
                          f"add_config_arguments, init_distributed and "
                          f"{', '.join('deepspeed.' + m for m in PROVIDED)}", name=fullname)


def as_deepspeed():
    """Register zerofx as ``deepspeed`` (and its submodules) in ``sys.modules``; returns it.
    Refuses when a real DeepSpeed is already imported in this process."""
    import zerofx

    have = sys.modules.get("deepspeed")
    if have is not None and have is not zerofx:
        raise ImportError("deepspeed is already imported (a real DeepSpeed): call "
                          "zerofx.as_deepspeed() before anything imports deepspeed")
    sys.modules["deepspeed"] = zerofx
    for name, module in PROVIDED.items():
        sys.modules[f"deepspeed.{name}"] = importlib.import_module(module)
    for package, modules in SUBMODULES.items():
        for name, module in modules.items():
            sys.modules[f"deepspeed.{package}.{name}"] = importlib.import_module(module)
    for package, modules in PARTIAL.items():  # a package holding only what zerofx serves
        for name, module in modules.items():
            *packages, leaf = f"deepspeed.{package}.{name}".split(".")
            holder = _holder(".".join(packages))
            sys.modules[f"{holder.__name__}.{leaf}"] = importlib.import_module(module)
            setattr(holder, leaf, sys.modules[f"{holder.__name__}.{leaf}"])
    if not any(isinstance(f, _Refuse) for f in sys.meta_path):
        sys.meta_path.insert(0, _Refuse())
    return zerofx


def _holder(name: str) -> types.ModuleType:
    """The package ``name`` (and those above it, below ``deepspeed``), made once: empty but
    for what zerofx serves; its other modules go through _Refuse."""
    if name in sys.modules:
        return sys.modules[name]
    holder = types.ModuleType(name)
    holder.__path__ = []
    sys.modules[name] = holder
    parent, _, leaf = name.rpartition(".")
    if parent != "deepspeed":  # not on zerofx itself: zerofx.runtime is zerofx's own
        setattr(_holder(parent), leaf, holder)
    return holder
