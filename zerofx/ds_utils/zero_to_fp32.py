"""``deepspeed.utils.zero_to_fp32``: a checkpoint's whole fp32 weights, for scripts that call
DeepSpeed's functions rather than the ``zerofx-consolidate`` command.

    state = get_fp32_state_dict_from_zero_checkpoint("ckpt")     # the tag `latest` names
    model.load_state_dict(state, strict=False)

They read zerofx checkpoints (what ``engine.save_checkpoint`` wrote) through the same
reader as ``zerofx-consolidate``: the fp32 master shards joined by parameter name (any
ZeRO stage and tensor-parallel size, no process group, no model). They return the trained
parameters only: frozen parameters are not in a zerofx checkpoint, and its buffers (which
engine.load_checkpoint restores) are not read here, where DeepSpeed adds both from its
module states; so load with ``strict=False``.
"""
from __future__ import annotations

from pathlib import Path

from zerofx.checkpoint.files import CheckpointError, full_state, resolve_tag, with_aliases


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=None,
                                             exclude_frozen_parameters=False,
                                             lazy_mode=False) -> dict:
    """{parameter name (and tied aliases): fp32 tensor on the CPU} of ``checkpoint_dir``'s
    ``tag`` (default: the one ``latest`` names). ``exclude_frozen_parameters`` and
    ``lazy_mode`` are accepted: frozen parameters are never saved by zerofx, and the
    tensors are ordinary ones (``.contiguous()`` works on them as on DeepSpeed's lazy ones)."""
    path = resolve_tag(checkpoint_dir, tag)
    if path is None:
        raise CheckpointError(f"{Path(checkpoint_dir) / 'latest'} does not exist; pass tag= "
                              f"(the tag directories in {checkpoint_dir})")
    return with_aliases(path, full_state(path, "master"))


def load_state_dict_from_zero_checkpoint(model, checkpoint_dir, tag=None):
    """DeepSpeed's: ``model`` moved to the CPU with the checkpoint's fp32 weights loaded
    (``strict=False``); returns it."""
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    model = model.cpu()
    model.load_state_dict(state, strict=False)
    return model


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_dir, *args, **kwargs):
    raise CheckpointError(
        "convert_zero_checkpoint_to_fp32_state_dict: zerofx writes the consolidated weights "
        "with its command, one file: zerofx-consolidate CHECKPOINT_DIR -o "
        "OUTPUT_DIR/pytorch_model.bin (or call get_fp32_state_dict_from_zero_checkpoint "
        "and torch.save the result)")


convert_zero_checkpoint_to_state_dict = convert_zero_checkpoint_to_fp32_state_dict
