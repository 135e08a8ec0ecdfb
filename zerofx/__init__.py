"""zerofx: DeepSpeed-style ZeRO training as a torch.compile backend made of torch.fx passes.

    model = torch.compile(model, backend="zero", options={"config": "ds_config.json"})
"""
import os as _os

from zerofx.config import Config, ConfigError

if _os.environ.get("RANK", "").isdigit() and _os.environ.get("WORLD_SIZE", "1") != "1":
    # A launched rank: zerofx's errors met before the process group forms (a config typo)
    # are one line per rank too, not a traceback each (runtime/comm/error_report.py).
    from zerofx.runtime.comm import error_report as _error_report

    _error_report.install(int(_os.environ["RANK"]))


def _tools_of_a_checkout() -> None:
    """``zerofx.tools`` for a checkout run from PYTHONPATH, not installed (a cluster's shared
    file system, a lent GPU machine): setup.py maps the repository's tools/ to that name, so
    without an install ``python -m zerofx.tools.launch`` and the tests of the tools found
    nothing. Appended last to sys.meta_path: an installed zerofx (a copy or an editable
    install's own finder) is found first and this finder never answers."""
    import importlib.util
    import sys

    tools = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))),
                          "tools")
    init = _os.path.join(tools, "__init__.py")
    if not _os.path.isfile(init):  # an installed copy: no tools/ beside the package
        return

    class _CheckoutTools:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "zerofx.tools":
                return None
            return importlib.util.spec_from_file_location(
                name, init, submodule_search_locations=[tools])

    if not any(getattr(f, "__name__", "") == "_CheckoutTools" for f in sys.meta_path):
        sys.meta_path.append(_CheckoutTools)


_tools_of_a_checkout()

__all__ = ["Config", "ConfigError", "ZeroRuntime", "ZeroEngine", "initialize",
           "add_config_arguments", "no_sync", "init_distributed", "as_deepspeed"]
__version__ = "0.1.0"


def __getattr__(name):
    # The runtime and engine pull in torch.distributed and the kernels: load on first use.
    if name == "ZeroRuntime":
        from zerofx.runtime.zero import ZeroRuntime

        return ZeroRuntime
    if name == "no_sync":  # plain torch.compile on several ranks: DDP's accumulation switch
        from zerofx.runtime.plain_dp import no_sync

        return no_sync
    if name == "as_deepspeed":  # `import deepspeed` gives zerofx, only when asked
        from zerofx.deepspeed_shim import as_deepspeed

        return as_deepspeed
    if name in ("accelerator", "comm", "checkpointing", "zero"):  # deepspeed.<name>
        import importlib

        return importlib.import_module(f"zerofx.{name}")
    if name == "utils":  # deepspeed.utils
        import importlib

        return importlib.import_module("zerofx.ds_utils")
    if name == "init_distributed":  # DeepSpeed's name and arguments
        from zerofx.runtime.comm.dist import init_distributed_like_deepspeed

        return init_distributed_like_deepspeed
    if name in ("ZeroEngine", "initialize", "add_config_arguments"):
        from zerofx import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'zerofx' has no attribute {name!r}")
