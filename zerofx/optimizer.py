"""ZeroOptimizer: the optimizer ``zerofx.initialize`` returns, shaped like DeepSpeed's ZeRO
optimizer wrapper so scripts and torch LR schedulers work on it.

    engine, optimizer, _, _ = zerofx.initialize(model=model, config=cfg)
    sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)  # moves zerofx's lr
    optimizer.param_groups[0]["lr"]         # the lr the next step uses
    sd = optimizer.state_dict()             # this rank's partition, as DeepSpeed's

It is a ``torch.optim.Optimizer`` (torch's schedulers insist) over the model's trained
parameters, one group, whose ``lr`` is the source of the next step's learning rate: ``step``
writes it into the runtime before the runtime's own step (the fused Adam/LAMB or a torch
optimizer on the shard). The engine's config schedules write it there too, so the group
always shows the lr in use. Gradients live in zerofx's buckets: ``zero_grad`` has nothing
to clear. ``state_dict`` holds this rank's partition of the fp32 master weights and moments
(DeepSpeed's ``single_partition_of_fp32_groups`` and ``base_optimizer_state``), and
``load_state_dict`` restores it into the same layout (same data-parallel size, stage and
buckets), rebuilding the parameters from every rank's master partition; a different layout
is refused: ``engine.load_checkpoint`` re-shards.
"""
from __future__ import annotations

import torch

from zerofx.config import ConfigError
from zerofx.runtime.comm.forms import all_gather_into

_STATE = ("master", "exp_avg", "exp_avg_sq")


class ZeroOptimizer(torch.optim.Optimizer):
    """See the module doc."""

    def __init__(self, runtime, params, *, client=None):
        """``client``: the torch optimizer the user handed to zerofx, whose groups (and lr)
        this one shows; None: one group with the config optimizer's hyperparameters."""
        self.runtime = runtime
        spec = runtime.spec
        defaults = {"lr": spec.lr}
        if spec.hyper is not None:
            defaults.update(betas=tuple(spec.hyper.betas), eps=spec.hyper.eps,
                            weight_decay=spec.hyper.weight_decay)
        super().__init__(list(params), defaults)
        if client is not None:  # the user's torch optimizer: its groups are the truth
            self.param_groups = client.param_groups
            self.defaults = client.defaults

    @property
    def loss_scale(self) -> float:
        """The current loss scale (DeepSpeed's fp16 and ZeRO optimizers' ``loss_scale``;
        1 without fp16)."""
        return self.runtime.loss_scale

    @property
    def cur_scale(self) -> float:
        return self.runtime.loss_scale

    @torch.no_grad()
    def step(self, closure=None):
        """Count a micro-step; at the accumulation boundary update the weights with this
        group's lr (the engine's ``step`` calls it there)."""
        if closure is not None:
            raise ConfigError("optimizer.step(closure) is not supported by zerofx: compute "
                              "the loss, call engine.backward(loss), then engine.step()")
        self.runtime.set_lr(float(self.param_groups[0]["lr"]))
        return self.runtime.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: gradients live in zerofx's buckets, emptied by every step."""

    def show_lr(self, lr: float) -> None:
        """The lr the runtime will use (a config schedule moved it), in every group."""
        for group in self.param_groups:
            group["lr"] = lr

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's partition of the optimizer state, and the layout it belongs to."""
        rt, st = self.runtime, self.runtime.state
        return {
            "state": _read_state(st),
            "step": st.step_count.clone(), "skipped": st.skipped.clone(),
            "loss_scaler": st.scaler.state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"}
                             for g in self.param_groups],
            "layout": _layout(rt),
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict`` of this rank in the same layout (a collective: every
        data-parallel rank loads its own, then the parameters are rebuilt from all of them)."""
        rt, st = self.runtime, self.runtime.state
        saved = state_dict.get("layout") if isinstance(state_dict, dict) else None
        if saved != _layout(rt):
            raise ConfigError(
                f"optimizer.load_state_dict: the state was saved in another layout ({saved}) "
                f"than this run's ({_layout(rt)}); a ZeRO optimizer's state is this rank's "
                f"partition. Use engine.save_checkpoint / engine.load_checkpoint, which "
                f"re-shard across data-parallel sizes and stages")
        with st.optimizer_state("write") as fp32:  # offloaded: written to its file
            for k in _STATE:
                fp32[k].copy_(state_dict["state"][k])
        st.step_count.copy_(state_dict["step"])
        st.skipped.copy_(state_dict["skipped"])
        st.scaler.load_state_dict(state_dict["loss_scaler"])
        for group, hyper in zip(self.param_groups, state_dict["param_groups"]):
            group.update(hyper)
        _parameters_from_master(rt)
        rt.mark_skips_reported()


def _read_state(st) -> dict:
    """Copies of this rank's fp32 master and moments (offloaded: read from its file)."""
    with st.optimizer_state() as fp32:
        return {k: fp32[k].clone() for k in _STATE}


def _layout(rt) -> dict:
    """What a partition's meaning depends on: who owns which elements of which buckets."""
    plan = rt.plan
    return {"rank": plan.rank, "dp_size": plan.grid.dp_size, "tp_size": plan.grid.tp_size,
            "zero_stage": plan.zero_stage, "shard_numel": plan.shard_numel,
            "buckets": [b.padded for b in plan.buckets]}


def _parameters_from_master(rt) -> None:
    """The model's parameters from the master weights of every data-parallel rank: each
    bucket is rank-major, rank r's piece of it at its owned range of r's partition (the
    layout the step's all-gather fills)."""
    plan, st, group = rt.plan, rt.state, rt.comm.group
    with st.optimizer_state() as fp32:  # offloaded: read from its file (or host memory:
        master = fp32["master"].to(st.flat_params.device)  # the collective's device)
    if plan.partitioned:  # stage 3: the compute-dtype partition is the parameters' home
        st.set_param_shard(master)  # offload_param: into its file
    if plan.sharded:  # [dp rank, its partition]
        every = torch.empty(plan.grid.dp_size, master.numel(), dtype=master.dtype,
                            device=master.device)
        all_gather_into(every.view(-1), master, group=group)
    else:  # one partition: every bucket whole
        every = master.view(1, -1)
    base = plan.persist_offset
    for r, b in zip(plan.owned(), plan.buckets):
        if b.offset < base:
            continue  # stage 3: gathered by the graphs from shard_lowp when read
        rows = every[:, r.at:r.at + r.numel]
        st.flat_params[b.offset - base:b.offset - base + b.padded].copy_(rows.reshape(-1))
