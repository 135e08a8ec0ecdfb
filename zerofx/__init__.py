"""zerofx: DeepSpeed-style ZeRO training as a torch.compile backend made of torch.fx passes.

    model = torch.compile(model, backend="zero", options={"config": "ds_config.json"})
"""
from zerofx.config import Config, ConfigError

__all__ = ["Config", "ConfigError", "ZeroRuntime"]
__version__ = "0.1.0"


def __getattr__(name):
    # ZeroRuntime pulls in torch.distributed and the kernels: load it on first use only.
    if name == "ZeroRuntime":
        from zerofx.runtime.zero import ZeroRuntime

        return ZeroRuntime
    raise AttributeError(f"module 'zerofx' has no attribute {name!r}")
