"""The flat layouts of DeepSpeed's ZeRO optimizer files, cut back into whole parameters.

Stages 1-2 flatten each parameter group in param_shapes order (with per-parameter alignment
padding where ``param_alignment_paddings`` says so), pad the group to a multiple of the DP
size, and give rank r the r-th equal slice; the ZeRO optimizer saves the fp32 slice without
the trailing padding and the moments with it, DeepSpeed's BF16_Optimizer (stage 1 in bf16,
``bf16_`` files without a ``zero_stage``) both with it, so the fp32 slice's own length says
how much of each moment slice to keep. Stage 3 cuts every parameter separately into DP-size
slices of ceil(numel / dp) (the last one padded), each rank concatenating its slices in
parameter order, in optimizer sub-groups. Stage 0 saves whole weights in ``module`` and a plain torch
optimizer state_dict. Each reader fills ``out[key][name]`` for key in master, exp_avg,
exp_avg_sq and returns the optimizer states it saw (to check they are Adam's).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from zerofx.checkpoint.schema import CheckpointError

ADAM_TYPES = ("adam", "adamw")
_ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}


def check_adam(ds_config, states: list[dict], path: Path) -> None:
    """Adam/AdamW only: zerofx carries exp_avg, exp_avg_sq and one step count."""
    optimizer = (ds_config or {}).get("optimizer") if isinstance(ds_config, dict) else None
    kind = optimizer.get("type") if isinstance(optimizer, dict) else None
    if kind is not None and str(kind).lower() not in ADAM_TYPES:
        raise CheckpointError(f"{path}: the checkpoint's optimizer is {kind!r}; only Adam and "
                              f"AdamW states convert (zerofx carries exp_avg, exp_avg_sq and "
                              f"the step count); load only the weights (DeepSpeed's "
                              f"zero_to_fp32.py) to switch optimizers")
    for state in states:
        keys = set(state)
        if not keys:
            continue  # a parameter that never had a gradient has no state yet
        if not {"exp_avg", "exp_avg_sq"} <= keys or keys - _ADAM_STATE:
            raise CheckpointError(f"{path}: optimizer state with keys {sorted(keys)} is not "
                                  f"Adam's ({sorted(_ADAM_STATE)}); only Adam/AdamW states "
                                  f"convert: load only the weights (zero_to_fp32.py) instead")


def one_step(states: list[dict], path: Path) -> int:
    """The step count. DeepSpeed's FusedAdam advances only the last state of a group (the
    others keep 0), torch's Adam every one, so the non-zero counts must agree."""
    steps = {int(s["step"]) for s in states if "step" in s} - {0}
    if len(steps) > 1:
        raise CheckpointError(f"{path}: the optimizer states hold different step counts "
                              f"{sorted(steps)}; zerofx keeps one step count for all "
                              f"parameters, so this state cannot carry over")
    return steps.pop() if steps else 0


def torch_states(osd: dict, path: Path) -> tuple[list[dict], list[dict]]:
    """(per-tensor states in parameter order, param_groups) of a torch optimizer state_dict."""
    if not isinstance(osd, dict) or "state" not in osd or "param_groups" not in osd:
        raise CheckpointError(f"{path}: the optimizer state is not a torch optimizer "
                              f"state_dict (fp16/bf16 stage-0 optimizers are not supported); "
                              f"save with ZeRO stage 1 or more")
    order = [i for group in osd["param_groups"] for i in group["params"]]
    return [osd["state"].get(i, {}) for i in order], osd["param_groups"]


def _shapes(model_states: dict, path: Path) -> list[dict[str, tuple]]:
    groups = model_states.get("param_shapes")
    if not isinstance(groups, list):
        raise CheckpointError(f"{path} has no param_shapes list; not a ZeRO checkpoint of "
                              f"DeepSpeed's engine.save_checkpoint")
    return [{n: tuple(s) for n, s in g.items()} for g in groups]


def _walk(shapes: dict[str, tuple], flats: dict[str, torch.Tensor], paddings, out: dict,
          where: str) -> int:
    """Cut stage 1-2's flat group (each of master/exp_avg/exp_avg_sq) into parameters;
    returns the elements used."""
    offset, size = 0, next(iter(flats.values())).numel()
    for (name, shape), pad in zip(shapes.items(), paddings):
        n = math.prod(shape)
        if offset + n > size:
            raise CheckpointError(f"{where}: parameter {name} {list(shape)} runs past the "
                                  f"{size} saved elements; the files are from different saves")
        for key, flat in flats.items():
            out[key][name] = flat[offset:offset + n].view(shape).clone()
        offset += n + pad
    return offset


def stage12(model_states: dict, osds: list[dict], files: list[Path], out: dict) -> list[dict]:
    """Fill ``out`` from stage 1-2 partitions; returns the Adam states seen."""
    groups = _shapes(model_states, files[0])
    seen = []
    per_rank = []
    for osd, path in zip(osds, files):
        fp32 = osd.get("single_partition_of_fp32_groups")
        base = osd.get("base_optimizer_state")
        if not isinstance(fp32, list) or len(fp32) != len(groups) or base is None:
            raise CheckpointError(f"{path}: {len(fp32) if isinstance(fp32, list) else 'no'} fp32 "
                                  f"partitions for {len(groups)} parameter groups; the files "
                                  f"are from different saves")
        states = base if isinstance(base, list) else torch_states(base, path)[0]
        if len(states) != len(groups):
            raise CheckpointError(f"{path}: {len(states)} optimizer states for {len(groups)} "
                                  f"parameter groups; the files are from different saves")
        seen += states
        per_rank.append((fp32, states))
    pads = osds[0].get("param_alignment_paddings") or [[0] * len(g) for g in groups]
    for i, shapes in enumerate(groups):
        # moments keep the last rank's alignment padding; the fp32 slice says what to keep
        flats = {"master": torch.cat([fp32[i].float() for fp32, _ in per_rank])}
        for key in ("exp_avg", "exp_avg_sq"):
            flats[key] = torch.cat([st[i][key].reshape(-1)[:fp32[i].numel()].float()
                                    for fp32, st in per_rank])
        where = f"{files[0].parent} parameter group {i}"
        used, size = _walk(shapes, flats, pads[i], out, where), flats["master"].numel()
        # what is left is the group's padding (kept by BF16_Optimizer) or nothing
        padding = sum(osd.get("group_paddings", [0] * len(groups))[i] for osd in osds)
        if size - used not in (0, padding):
            raise CheckpointError(f"{where}: the parameters use {used} of the {size} saved "
                                  f"elements (padding {padding}); the files do not match "
                                  f"their param_shapes, or are from different saves")
    return seen


def stage3(model_states: dict, osds: list[dict], files: list[Path], out: dict) -> list[dict]:
    """Fill ``out`` from stage 3's per-parameter partitions; returns the Adam states seen."""
    shapes = {n: s for g in _shapes(model_states, files[0]) for n, s in g.items()}
    world = len(osds)
    flat = {k: [] for k in ("master", "exp_avg", "exp_avg_sq")}
    seen = []
    for osd, path in zip(osds, files):
        groups = osd.get("fp32_flat_groups")
        states, _ = torch_states(osd.get("optimizer_state_dict"), path)
        if not isinstance(groups, list) or len(states) != len(groups):
            raise CheckpointError(f"{path}: optimizer sub-groups and fp32 partitions do not "
                                  f"pair up; the files are from different saves")
        seen += states
        flat["master"].append(torch.cat([g.reshape(-1).float() for g in groups]))
        for key in ("exp_avg", "exp_avg_sq"):
            flat[key].append(torch.cat([s[key].reshape(-1).float() for s in states]))
    offset = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        part = math.ceil(n / world)
        for key, ranks in flat.items():
            if offset + part > ranks[0].numel():
                raise CheckpointError(f"{files[0]}: parameter {name} {list(shape)} runs past "
                                      f"the saved partition; the files are from different "
                                      f"saves")
            whole = torch.cat([r[offset:offset + part] for r in ranks])[:n]
            out[key][name] = whole.view(shape).clone()
        offset += part
    if offset != flat["master"][0].numel():
        raise CheckpointError(f"{files[0]}: the parameters use {offset} of the "
                              f"{flat['master'][0].numel()} saved elements per rank; the "
                              f"files do not match their param_shapes")
    return seen


def stage0(model_states: dict, path: Path, out: dict) -> tuple[list[dict], list[dict]]:
    """Stage 0 keeps whole weights in ``module`` and a plain optimizer state_dict."""
    states, groups = torch_states(model_states.get("optimizer"), path)
    if len(groups) != 1:
        # the groups' order of parameters is not saved with names: no safe mapping
        raise CheckpointError(f"{path}: a stage-0 checkpoint with {len(groups)} parameter "
                              f"groups cannot be matched to parameter names; save it with "
                              f"ZeRO stage 1 or more")
    buffers = set(model_states.get("buffer_names") or [])
    seen_storage, names = set(), []
    for name, t in model_states["module"].items():
        if name in buffers or t.untyped_storage().data_ptr() in seen_storage:
            continue  # tied weights: the state dict repeats them, the optimizer does not
        seen_storage.add(t.untyped_storage().data_ptr())
        names.append(name)
    if len(names) != len(states):
        raise CheckpointError(f"{path}: {len(names)} parameters in the module state but "
                              f"{len(states)} in the optimizer (frozen parameters?); stage-0 "
                              f"checkpoints convert only when every parameter is trained")
    for name, state in zip(names, states):
        weight = model_states["module"][name]
        if tuple(state.get("exp_avg", weight).shape) != tuple(weight.shape):
            raise CheckpointError(f"{path}: the optimizer state of {name} has shape "
                                  f"{list(state['exp_avg'].shape)}, the weight "
                                  f"{list(weight.shape)}: the optimizer's parameter order is "
                                  f"not the module's; this checkpoint cannot be converted")
        out["master"][name] = weight.detach().float().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[key][name] = state.get(key, torch.zeros_like(weight)).float().clone()
    return states, groups
