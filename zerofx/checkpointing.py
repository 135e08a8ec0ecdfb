"""``deepspeed.checkpointing``: activation checkpointing as Megatron-style models call it.

    from zerofx import checkpointing               # or deepspeed.checkpointing, as_deepspeed()
    checkpointing.configure(mpu, deepspeed_config="ds.json", num_checkpoints=24)
    h = checkpointing.checkpoint(block, h, mask)   # block's activations recomputed in backward

A checkpointed call is torch's non-reentrant ``torch.utils.checkpoint``: inside a compiled
graph Dynamo traces it as a region whose ops the partitioner tags for recomputation, so the
forward graph saves only the region's inputs and the backward graph runs the region again
before its gradients (the dump's forward and backward graphs show it); eagerly it behaves the
same. Gradients are those of the plain call (recomputation is deterministic: same ops, same
inputs, and dropout's RNG state replayed by torch).

The ``activation_checkpointing`` block's options, what they do here:
    partition_activations           with tensor parallelism (tensor_parallel.size > 1),
                                    a region's saved input that is the same on every TP
                                    rank is kept as this rank's 1/tp flat chunk and
                                    all-gathered over the TP group before the recompute
                                    (the partition_activations pass, passes/
                                    partition_activations.py, on the engine's config;
                                    gradients unchanged, bit for bit). With an mpu (the
                                    model splits itself) the engine refuses it: zerofx
                                    cannot tell which saved values are replicated. Without
                                    TP it changes nothing (no group to split over), said once
    cpu_checkpointing               keeps saved inputs in host memory on a GPU; on a CPU run
                                    they are in host memory already: said once, no effect
    contiguous_memory_optimization  DeepSpeed's defragmentation buffers: the caching
    synchronize_checkpoint_boundary   allocator and the compiled graphs' own scheduling make
    number_checkpoints                them moot here; accepted, no effect (said once)
    profile                         logs each checkpointed call's recomputation at debug level
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.utils.checkpoint as torch_checkpoint

from zerofx.config import Config, ConfigError

log = logging.getLogger(__name__)

_STATE: dict = {"configured": False, "mpu": None, "profile": False, "num_checkpoints": None}
_NO_EFFECT = ("contiguous_memory_optimization", "synchronize_checkpoint_boundary",
              "number_checkpoints")


def checkpoint(function, *args):
    """``function(*args)``, its activations recomputed in the backward instead of saved."""
    # Logging inside a frame Dynamo traces is a graph break before every region (and the
    # region then runs apart from its neighbours): compiled, the dump's backward graphs show
    # the recompute instead.
    if _STATE["profile"] and not torch.compiler.is_compiling():
        log.debug("checkpointing %s: recomputed in the backward",
                  getattr(function, "__qualname__", function))
    return torch_checkpoint.checkpoint(function, *args, use_reentrant=False)


non_reentrant_checkpoint = checkpoint  # DeepSpeed's name for the non-reentrant variant


def configure(mpu_, deepspeed_config=None, partition_activations=None,
              contiguous_checkpointing=None, num_checkpoints=None, checkpoint_in_cpu=None,
              synchronize=None, profile=None) -> None:
    """DeepSpeed's ``configure``: the config's ``activation_checkpointing`` block, then the
    keyword arguments over it (see the module doc for what each does here)."""
    config = Config.from_any(deepspeed_config)
    block = dict(vars(config.activation_checkpointing))
    given = {"partition_activations": partition_activations,
             "contiguous_memory_optimization": contiguous_checkpointing,
             "number_checkpoints": num_checkpoints, "cpu_checkpointing": checkpoint_in_cpu,
             "synchronize_checkpoint_boundary": synchronize, "profile": profile}
    block.update({k: v for k, v in given.items() if v is not None})
    tp = mpu_.get_model_parallel_world_size() if mpu_ is not None else \
        config.tensor_parallel.size
    split = bool(block.get("partition_activations")) and tp > 1
    if split and not config.activation_checkpointing.partition_activations:
        # the pass reads the engine's config, which configure cannot reach: say where it goes
        log.warning("activation_checkpointing: partition_activations=True given to "
                    "configure takes effect through the engine's config: set "
                    "activation_checkpointing.partition_activations true there")
    said = [k for k in ("partition_activations", "cpu_checkpointing", *_NO_EFFECT)
            if block.get(k) and not (k == "partition_activations" and split)]
    if said:
        log.warning("activation_checkpointing: %s change nothing here (no tensor-parallel "
                    "group to partition over; saved inputs already in host memory on CPU; "
                    "the allocator and compiled graphs handle buffers and boundaries)",
                    ", ".join(said))
    _STATE.update(configured=True, mpu=mpu_, profile=bool(block.get("profile")),
                  num_checkpoints=block.get("number_checkpoints"))


def is_configured() -> bool:
    return _STATE["configured"]


def reset() -> None:
    """DeepSpeed frees its contiguous buffers here; zerofx keeps none."""


def set_num_layers(nlayers) -> None:
    _STATE["num_checkpoints"] = nlayers


# ---- Megatron's model-parallel RNG tracker, which checkpointed Megatron code calls ---------
class _RngTracker:
    """Named RNG states: ``fork(name)`` runs its block on that state and keeps its advance
    (Megatron's CudaRNGStatesTracker, on the current device's generator)."""

    def __init__(self):
        self.states: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.states = {}

    def get_states(self) -> dict:
        return dict(self.states)

    def set_states(self, states: dict) -> None:
        self.states = dict(states)

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ConfigError(f"RNG state {name!r} already exists")
        saved = _get_rng()
        torch.manual_seed(seed)
        self.states[name] = _get_rng()
        _set_rng(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states:
            raise ConfigError(f"RNG state {name!r} was never added: call "
                              f"model_parallel_cuda_manual_seed(seed) first")
        saved = _get_rng()
        _set_rng(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_rng()
            _set_rng(saved)


_TRACKER = _RngTracker()


def get_cuda_rng_tracker() -> _RngTracker:
    return _TRACKER


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Megatron's seeding: the default generator gets ``seed`` (the same on every TP rank),
    the tracker's model-parallel state ``seed + 2718 + tp_rank`` (different per TP rank, for
    dropout inside split regions)."""
    mpu = _STATE["mpu"]
    tp_rank = mpu.get_model_parallel_rank() if mpu is not None else 0
    _TRACKER.reset()
    torch.manual_seed(seed)
    _TRACKER.add("model-parallel-rng", seed + 2718 + tp_rank)


def _get_rng() -> torch.Tensor:
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()


def _set_rng(state: torch.Tensor) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)
