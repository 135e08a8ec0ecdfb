"""DeepSpeed ZeRO checkpoints (stages 0-3, any data-parallel size) read into zerofx's format.

    convert("ds_ckpt", "zerofx_ckpt")            # the tag DeepSpeed's `latest` names
    engine.load_checkpoint("zerofx_ckpt")         # at any world size and stage

What DeepSpeed's engine.save_checkpoint writes in a tag directory, and where each piece is:

    mp_rank_00_model_states.pt          stages 0-2: module state, param_shapes (names and shapes
                                        in the flat order), counters, lr_scheduler, client state;
                                        stage 0: the optimizer's own state_dict too
    zero_pp_rank_{r}_mp_rank_00_model_states.pt     stage 3: the same, one per DP rank
    zero_pp_rank_{r}_mp_rank_00_optim_states.pt     stages 1-3: DP rank r's fp32 partition and
                                        its Adam moments (bf16_/fp16_ prefixes: other optimizers)

The whole fp32 master and both Adam moments are rebuilt per parameter
(deepspeed_layouts) and written as a one-rank, unsharded zerofx checkpoint, which zerofx
re-shards when it loads, with the step counts, the loss scaler, the scheduler's state,
the client state and the module's persistent buffers (those DeepSpeed's ``buffer_names`` lists,
from its ``module`` state: DP rank 0's, the file every rank reads at stages 0-2; at stage 3,
where each rank saved its own, rank 0's).

Nothing here imports deepspeed: its pickles are read by deepspeed_pickle's stub unpickler.
"""
from __future__ import annotations

import math
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zerofx.checkpoint.buffers import BUFFERS_KEY
from zerofx.checkpoint.deepspeed_layouts import check_adam, one_step, stage0, stage3, stage12
from zerofx.checkpoint.deepspeed_pickle import (DeepSpeedObject, is_deepspeed_object,
                                                load_deepspeed_file)
from zerofx.checkpoint.files import (FORMAT_VERSION, META_FILE, check_tag, rank_file,
                                     write_atomically)
from zerofx.checkpoint.schema import CheckpointError

_OPTIM = re.compile(r"(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
_MP = re.compile(r"mp_rank_(\d+)")
MODEL_FILE = "mp_rank_00_model_states.pt"
# DeepSpeed's own keys in a model-states file; every other key is the user's client_state
_DS_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
            "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler",
            "random_ltd", "sparse_tensor_module_names", "skipped_steps", "global_steps",
            "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
            "checkpoint_parallel_dimensions", "universal_checkpoint_info"}


@dataclass
class Imported:
    """A DeepSpeed checkpoint's training state, whole, by parameter name."""

    shapes: dict[str, tuple[int, ...]]  # trained parameters, in DeepSpeed's flat order
    master: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: int  # Adam steps taken (skipped ones not counted)
    lr: float
    scaler: dict[str, torch.Tensor]
    global_steps: int
    skipped: int
    client_state: dict
    aliases: dict[str, list[str]] = field(default_factory=dict)  # stored name -> tied names
    # persistent buffers; None: the files do not say which module entries are buffers
    buffers: dict[str, torch.Tensor] | None = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # frozen params, unlisted buffers
    source: dict = field(default_factory=dict)


# ---- finding and checking the files -------------------------------------------------------
def find_tag_dir(ds_dir, tag=None) -> Path:
    """The tag directory: ``ds_dir/tag``, the one ``ds_dir/latest`` names, or ``ds_dir``
    itself when it holds the files."""
    root = Path(ds_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such directory; pass the directory DeepSpeed's "
                              f"save_checkpoint wrote to")
    if tag is None and not (root / "latest").is_file() and _ds_files(root):
        return root
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise CheckpointError(f"{latest} does not exist; pass --tag (one of the tag "
                                  f"directories in {root})")
        tag = latest.read_text(encoding="utf-8").strip()
    path = root / check_tag(tag)
    if not path.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise CheckpointError(f"{path} does not exist; tags present: {', '.join(have) or 'none'}")
    return path


def _ds_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.endswith("_states.pt"))


def _check_layout(tag_dir: Path) -> dict[int, Path]:
    """{DP rank: optimizer file}, after refusing what zerofx cannot carry: pipeline and
    model-parallel checkpoints."""
    names = _ds_files(tag_dir)
    if not names:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed checkpoint files (*_model_states.pt,"
                              f" *_optim_states.pt); pass a tag directory save_checkpoint wrote")
    layers = [n for n in names if n.startswith("layer_")]
    if layers:
        raise CheckpointError(f"{tag_dir / layers[0]} is a pipeline-parallel layer file: "
                              f"pipeline checkpoints are not supported; convert with "
                              f"DeepSpeed's ds_to_universal.py, or save without pipelining")
    other_mp = [n for n in names if any(m != "00" for m in _MP.findall(n))]
    if other_mp:
        raise CheckpointError(f"{tag_dir / other_mp[0]} belongs to model-parallel rank "
                              f"{_MP.findall(other_mp[0])[0]}: tensor/model-parallel DeepSpeed "
                              f"checkpoints are not supported; save with model parallel size 1")
    optim: dict[int, Path] = {}
    for n in names:
        if m := _OPTIM.fullmatch(n):
            rank = int(m.group(1))
            if rank in optim:  # e.g. zero_pp_rank_0_... beside bf16_zero_pp_rank_0_...
                raise CheckpointError(f"{tag_dir} holds two optimizer files for DP rank {rank} "
                                      f"({optim[rank].name}, {n}): files of different saves "
                                      f"are mixed; copy the tag directory again from one save")
            optim[rank] = tag_dir / n
    return optim


def _check_ranks(optim: dict[int, Path], count: int, tag_dir: Path) -> None:
    missing = [rank for rank in range(count) if rank not in optim]
    if missing:
        raise CheckpointError(
            f"{tag_dir}: the checkpoint was saved by {count} data-parallel ranks, but "
            f"{', '.join(f'zero_pp_rank_{r}_mp_rank_00_optim_states.pt' for r in missing[:3])} "
            f"{'is' if len(missing) == 1 else 'are'} missing; copy every rank's file of this tag")
    extra = sorted(r for r in optim if r >= count)
    if extra:
        raise CheckpointError(
            f"{optim[extra[0]]} is from a save by more than the {count} data-parallel ranks "
            f"the other files name: files of saves at different world sizes are mixed; copy "
            f"the tag directory again from one save")


def _partition_count(osd: dict, path: Path) -> int:
    count = osd.get("partition_count")
    if isinstance(count, list):  # per parameter group; they differ only with expert groups
        if len(set(count)) != 1:
            raise CheckpointError(f"{path}: parameter groups are partitioned over different "
                                  f"ranks ({count}): mixture-of-experts checkpoints are not "
                                  f"supported")
        count = count[0]
    if not isinstance(count, int) or count < 1:
        raise CheckpointError(f"{path} has no valid partition_count ({count!r}); is it a "
                              f"complete DeepSpeed ZeRO optimizer file?")
    return count


# ---- the whole checkpoint -----------------------------------------------------------------
def read_deepspeed(ds_dir, tag=None, *, drop_client_keys=()) -> Imported:
    """Everything zerofx needs from a DeepSpeed checkpoint, checked, whole per parameter."""
    tag_dir = find_tag_dir(ds_dir, tag)
    optim = _check_layout(tag_dir)
    model_path = tag_dir / MODEL_FILE
    if not optim:
        stage = 0
    else:
        first = load_deepspeed_file(optim[min(optim)]).get("optimizer_state_dict")
        stage = first.get("zero_stage") if isinstance(first, dict) else None
        # no zero_stage: DeepSpeed's BF16_Optimizer, which lays its files out as stage 1
        stage = stage.value if isinstance(stage, DeepSpeedObject) else (stage or 1)
        if stage == 3:
            model_path = tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    model_states = load_deepspeed_file(model_path)
    _check_not_parallel(model_states, model_path)
    out = {k: {} for k in ("master", "exp_avg", "exp_avg_sq")}
    groups = None
    if stage == 0:
        states, groups = stage0(model_states, model_path, out)
        world = int(model_states.get("dp_world_size") or 1)
    else:
        world = _partition_count(first, optim[min(optim)])
        _check_ranks(optim, world, tag_dir)
        files = [optim[r] for r in range(world)]
        osds = [load_deepspeed_file(f).get("optimizer_state_dict") for f in files]
        for osd, f in zip(osds, files):
            if not isinstance(osd, dict) or _partition_count(osd, f) != world:
                raise CheckpointError(f"{f} is from a save by another number of data-parallel "
                                      f"ranks than {files[0]}: files of different saves are "
                                      f"mixed; copy the tag directory again from one save")
        states = (stage3 if stage == 3 else stage12)(model_states, osds, files, out)
        base = osds[0].get("optimizer_state_dict" if stage == 3 else "base_optimizer_state")
        groups = base.get("param_groups") if isinstance(base, dict) else None
    check_adam(model_states.get("ds_config"), states, model_path)
    return Imported(
        shapes={n: tuple(t.shape) for n, t in out["master"].items()}, **out,
        step=one_step(states, model_path), lr=_lr(groups, model_states, model_path),
        scaler=_scaler(first.get("loss_scaler") if stage else None),
        global_steps=int(model_states.get("global_steps") or 0),
        skipped=int(model_states.get("skipped_steps") or 0),
        client_state=_client_state(model_states, model_path, drop_client_keys),
        aliases=_aliases(model_states.get("shared_params")),
        buffers=_buffers(model_states),
        extra=_extra(model_states, tag_dir, stage, world, set(out["master"])),
        source={"deepspeed": model_states.get("ds_version"), "zero_stage": stage,
                "dp_size": world, "path": str(tag_dir)})


def _check_not_parallel(model_states: dict, path: Path) -> None:
    dims = model_states.get("checkpoint_parallel_dimensions") or {}
    mp = model_states.get("mp_world_size") or 1
    if mp > 1 or dims.get("tp_degree", 1) > 1 or dims.get("pp_degree", 1) > 1:
        raise CheckpointError(f"{path} was saved with model parallel size {mp} (tensor "
                              f"{dims.get('tp_degree', 1)}, pipeline {dims.get('pp_degree', 1)}):"
                              f" only data-parallel DeepSpeed checkpoints convert")


def _lr(groups, model_states: dict, path: Path) -> float:
    if groups:
        return float(groups[0]["lr"])
    config = model_states.get("ds_config") or {}
    lr = ((config.get("optimizer") or {}).get("params") or {}).get("lr")
    if lr is None:  # an elastic stage 1-2 checkpoint keeps no param_groups
        raise CheckpointError(f"{path}: neither the optimizer state nor ds_config records the "
                              f"learning rate; save with elastic_checkpoint off")
    return float(lr)


def _scaler(saved) -> dict[str, torch.Tensor]:
    """zerofx's loss-scaler state from DeepSpeed's LossScaler / DynamicLossScaler."""
    def t(v, dtype):
        return torch.tensor(v, dtype=dtype)

    if is_deepspeed_object(saved, "DynamicLossScaler"):
        return {"scale": t(float(saved.cur_scale), torch.float32),
                "hysteresis": t(int(saved.cur_hysteresis), torch.int64),
                "iter": t(int(saved.cur_iter), torch.int64),
                "last_overflow_iter": t(int(saved.last_overflow_iter), torch.int64)}
    scale = float(getattr(saved, "cur_scale", 1.0))  # static scaler, or none (stage 0, bf16)
    return {"scale": t(scale, torch.float32), "hysteresis": t(2, torch.int64),
            "iter": t(0, torch.int64), "last_overflow_iter": t(-1, torch.int64)}


def _client_state(model_states: dict, path: Path, drop) -> dict:
    """The user's client_state (DeepSpeed stores it among its own keys), plus the
    scheduler's state where zerofx's engine looks for it."""
    from zerofx.checkpoint.save_load import _check_plain
    from zerofx.engine import SCHEDULER_KEY

    state = {k: v for k, v in model_states.items() if k not in _DS_KEYS and k not in drop}
    for key, value in state.items():
        try:
            _check_plain(value, f"client_state[{key!r}]")
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}; or leave it out of the conversion with "
                                  f"--drop-client-key {key}") from None
    if model_states.get("lr_scheduler") is not None:
        state[SCHEDULER_KEY] = model_states["lr_scheduler"]
    return state


def _aliases(shared) -> dict[str, list[str]]:
    aliases: dict[str, list[str]] = {}
    for alias, stored in (shared or {}).items():  # DeepSpeed: {tied name: stored name}
        aliases.setdefault(stored, []).append(alias)
    return aliases


def _buffers(model_states: dict) -> dict[str, torch.Tensor] | None:
    """The persistent buffers DeepSpeed listed (``buffer_names``: its module walk, without
    the non-persistent ones), from its ``module`` state dict; None if it listed none."""
    names = model_states.get("buffer_names")
    if names is None:
        return None
    module = model_states.get("module") or {}
    return {n: module[n].detach().clone() for n in names if n in module}


def _extra(model_states: dict, tag_dir: Path, stage: int, world: int,
           trained: set) -> dict[str, torch.Tensor]:
    """Frozen parameters: model tensors that neither the optimizer state nor the buffers
    carry (and buffers too, from a save that did not list them)."""
    module = model_states.get("module") or {}
    tied = set(model_states.get("shared_params") or {})
    buffers = set(model_states.get("buffer_names") or [])
    extra = {n: t for n, t in module.items()
             if stage < 3 and n not in trained and n not in tied and n not in buffers}
    if stage == 3 and model_states.get("frozen_param_shapes"):
        frags = [load_deepspeed_file(tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
                 .get("frozen_param_fragments") or {} for r in range(world)]
        for name, shape in model_states["frozen_param_shapes"].items():
            n = math.prod(shape)
            extra[name] = torch.cat([f[name].reshape(-1) for f in frags])[:n].view(tuple(shape))
    return {n: t.detach().clone() for n, t in extra.items()}


# ---- writing zerofx's format --------------------------------------------------------------
def write_zerofx(imported: Imported, out_dir, tag: str) -> Path:
    """``imported`` as ``out_dir/tag`` (and ``latest``): one unsharded DP rank, which zerofx
    re-shards to any world size and stage when it loads. Returns the tag directory."""
    from zerofx.checkpoint.save_load import _prepare, _publish, _save

    tag = check_tag(tag)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / tag, root / f".{tag}.tmp"
    _prepare(tmp, final)
    save_id = secrets.token_hex(8)
    params, offset = [], 0
    for name, shape in imported.shapes.items():
        n = math.prod(shape)
        params.append({"name": name, "shape": list(shape), "offset": offset, "numel": n})
        offset += n
    flat = {k: torch.cat([t.reshape(-1) for t in getattr(imported, k).values()]
                         or [torch.zeros(0)]) for k in ("master", "exp_avg", "exp_avg_sq")}
    try:
        _save({"format": FORMAT_VERSION, "save_id": save_id, "world_size": 1, "dp_size": 1,
               "zero_stage": 0, "sharded": False, "padded_numel": offset,
               "compute_dtype": torch.float32, "params": params, "aliases": imported.aliases,
               "client_state": imported.client_state,
               "converted_from": {k: v for k, v in imported.source.items() if k != "path"}},
              tmp / META_FILE)
        _save({"dp_rank": 0, "save_id": save_id, "ranges": [[0, offset, 0]], **flat,
               "step_count": torch.tensor(float(imported.step)),
               "lr": torch.tensor(imported.lr, dtype=torch.float32),
               "skipped": torch.tensor(imported.skipped, dtype=torch.int64),
               # one micro-step per optimizer step here; the loader scales by its own gas
               "micro_steps": imported.global_steps, "gas": 1, "scaler": imported.scaler,
               **({BUFFERS_KEY: imported.buffers} if imported.buffers is not None else {})},
              tmp / rank_file(0))
        _publish(root, tmp, final, tag, True)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if imported.extra:
        write_atomically(extra_file(root, tag), lambda f: torch.save(imported.extra, f))
    return final


def extra_file(out_dir, tag: str) -> Path:
    """Where the frozen parameters of a converted tag go (zerofx checkpoints hold what the
    optimizer trains and the buffers): load them with model.load_state_dict(...,
    strict=False) before zerofx.initialize."""
    return Path(out_dir) / f"{tag}_module_extras.pt"


def convert(ds_dir, out_dir, *, tag=None, drop_client_keys=()) -> tuple[Path, Imported]:
    """Convert DeepSpeed's ``ds_dir`` (``tag``, default the one ``latest`` names) into a
    zerofx checkpoint in ``out_dir`` under the same tag."""
    imported = read_deepspeed(ds_dir, tag, drop_client_keys=drop_client_keys)
    return write_zerofx(imported, out_dir, Path(imported.source["path"]).name), imported
