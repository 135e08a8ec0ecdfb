"""zerofx: DeepSpeed-style ZeRO training as a torch.compile backend made of torch.fx passes.

    model = torch.compile(model, backend="zero", options={"config": "ds_config.json"})
"""
from zerofx.config import Config, ConfigError

__all__ = ["Config", "ConfigError"]
__version__ = "0.1.0"
