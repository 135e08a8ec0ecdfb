"""Hugging Face integration: ``transformers.Trainer`` training through zerofx.

    from zerofx.hf import ZerofxTrainer
    trainer = ZerofxTrainer(model=model, args=training_args, train_dataset=ds,
                            zerofx_config="ds_config.json")   # "auto" filled from args

``fill_auto`` alone resolves a config's ``"auto"`` values as HF's DeepSpeed integration does.
Needs ``pip install 'zerofx[hf]'`` (transformers and accelerate, which the Trainer requires).
"""
from zerofx.hf.auto_config import fill_auto

__all__ = ["ZerofxTrainer", "fill_auto"]


def __getattr__(name):
    # transformers' Trainer is slow to import: only when asked
    if name == "ZerofxTrainer":
        from zerofx.hf.trainer import ZerofxTrainer

        return ZerofxTrainer
    raise AttributeError(f"module 'zerofx.hf' has no attribute {name!r}")
