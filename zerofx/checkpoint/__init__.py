"""DeepSpeed-shaped checkpoints of a ZeroRuntime.

    save_load  save_checkpoint / load_checkpoint: atomic saves, loads that re-shard
    files      the files on disk: names, format, checked reading, safe writing, full tensors
    schema     what a readable file must contain, checked before anything is restored
    buffers    the model's persistent buffers: each rank's saved, whose restored
"""
from zerofx.checkpoint.files import CheckpointError
from zerofx.checkpoint.save_load import load_checkpoint, save_checkpoint

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]
