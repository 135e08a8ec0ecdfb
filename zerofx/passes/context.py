"""What a graph pass is given and how it is declared: PassContext and PassSpec.

Pass modules import these from here, never from the package, so importing a pass never
imports the pipeline that imports the passes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import fx

from zerofx.config import Config
from zerofx.plan import Plan

# "partitioned": the forward/backward pair right after the partitioner split the joint
# graph; a pass on it takes and returns the pair, ``fn((fw, bw), ctx) -> (fw, bw)``.
GRAPH_KINDS = ("joint", "partitioned", "forward", "backward", "inference", "optimizer")


@dataclass(frozen=True)
class PassContext:
    """What a pass may read: config, plan, and facts about the graph it is given."""

    config: Config
    plan: Plan
    graph_kind: str
    graph_name: str
    num_fwd_outputs: int | None = None  # joint graphs: outputs before the gradients
    state_id: int | None = None  # the ZeroRuntime the graph's zerofx ops talk to, if any
    roles: tuple = ()  # InputRole of each forward input (bucketing maps gradients by it)
    tp_group: str | None = None  # name of the tensor-parallel process group, if any
    # (role, kind) of the runtime's chosen collective forms (comm_cost's kinds: the dumps)
    comm_kinds: tuple[tuple[str, str], ...] = ()
    comm_cost: object = None  # zerofx.comm_cost.CommCost the dump predicts with (None: DEFAULT)
    # ((dtype, "native"|"fp32"), ...) for CPU bf16/fp16 matmuls, rank 0's (runtime/zero.py);
    # () without a runtime: this host's rule (zerofx/cpu_gemm.py)
    matmul_forms: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PassSpec:
    """A pass declared as data: name, function, where it runs and what it must follow."""

    name: str
    fn: Callable[[fx.GraphModule, PassContext], fx.GraphModule]
    graph_kinds: frozenset[str]
    after: tuple[str, ...] = ()  # must run after these when they are in the pipeline
    requires: tuple[str, ...] = ()  # these must be in the pipeline too
    enabled: Callable[[Config], bool] = field(default=lambda cfg: True)
    needs_runtime: bool = False  # only when a ZeroRuntime owns the training state
