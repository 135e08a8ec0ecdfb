"""ParamCarriers: the model's trained parameters as the runtime holds them, and who they are.

After ``install`` a parameter's ``.data`` is a view of the flat compute-dtype buffer
(TrainState.flat_params), or, for a stage-3 partitioned one, an empty tensor: its value
lives as shards. A tensor-parallel or partitioned parameter also has a *carrier*, a
full-shape stand-in owning one element, swapped in while the model is traced or run
(``shape_carriers``), because the model's code is written for whole weights. Identities:
a parameter's plan name by object (aliases share one), and its plan index by object or by
storage address, the only thing a graph call sees.
"""
from __future__ import annotations

import bisect
import contextlib
import weakref

import torch
from torch import nn

from zerofx.plan import Plan


class ParamCarriers:
    """The trained parameters' carriers and identities (see the module doc)."""

    def __init__(self, model: nn.Module, named: list, plan: Plan):
        self.plan = plan
        self._name_by_id = {id(p): n for n, p in named}
        # id() alone is not an identity: a runtime can outlive its model (a cycle not yet
        # collected, a runtime kept for its state), and a parameter made later may get a
        # dead one's id: it would be taken for that runtime's (its name, its gradient)
        self._refs = {id(p): weakref.ref(p) for _, p in named}
        index = {s.name: i for i, s in enumerate(plan.params)}
        self._slot_by_id = {pid: index[n] for pid, n in self._name_by_id.items()}
        self._slot_by_ptr: dict[int, int] = {}
        self._carriers: list[tuple] = []  # (param, full-shape stand-in, value between calls)
        self.aliases = _aliases(model, self._name_by_id)

    def install(self, named, state) -> None:
        """Move each parameter into TrainState ``state``: its value into ``flat_params``,
        this rank's owned pieces of it into the fp32 master (``state.fill_shard``: chunk by
        chunk, to the file under NVMe offload); give split and partitioned ones their
        carriers. A partitioned parameter's own storage is dropped (a model built under
        zero.Init(remote_device="nvme") frees its file mappings here)."""
        plan = self.plan
        params = dict(named)
        state.fill_shard(_MasterFill(plan, params).fill)  # reads the values: first
        flat_params = state.flat_params
        low, dev = plan.compute_dtype, flat_params.device
        base = plan.persist_offset
        for name, p in named:
            s = plan.slot(name)
            if plan.partitioned and not s.persistent:
                # Stage 3: the graphs read the gathered bucket (zerofx.gather_bucket), never
                # this stand-in; NaN so that an eager read of it cannot pass for a weight.
                # A tensor-parallel weight is traced whole too (the tensor_parallel pass
                # splits it): its bucket holds this rank's piece.
                shape = s.tp.full_shape if s.tp is not None else s.shape
                stand_in = torch.full([1] * len(shape), float("nan"), dtype=low, device=dev)
                self._carriers.append((p, stand_in.expand(shape),
                                       torch.empty(0, dtype=low, device=dev)))
                p.data = self._carriers[-1][2]
                continue
            flat_params[s.offset - base:s.end - base].copy_(_local(plan, s, p).reshape(-1))
            # The parameter now lives in the flat buffer, in the compute dtype: the
            # all-gather writes straight into the model and no per-step cast is needed.
            p.data = flat_params[s.offset - base:s.end - base].view(s.shape)
            if s.tp is not None:  # one element of storage each: distinct inputs to AOT
                stand_in = torch.zeros(1, dtype=low, device=dev).view([1] * len(s.shape))
                self._carriers.append((p, stand_in.expand(s.tp.full_shape), p.data))
        self._slot_by_ptr = {p.data_ptr(): self._slot_by_id[id(p)] for _, p in named
                             if p.numel()}
        for p, full, _ in self._carriers:  # traced and run with the stand-in in place
            self._slot_by_ptr[full.data_ptr()] = self._slot_by_id[id(p)]

    @contextlib.contextmanager
    def shape_carriers(self):
        """Every carried parameter at its full shape inside (see ZeroRuntime.shape_carriers)."""
        for p, full, _ in self._carriers:
            p.data = full
        try:
            yield
        finally:
            for p, _, local in self._carriers:
                p.data = local

    def between_calls(self) -> dict[int, torch.Tensor]:
        """{id(param): its value outside calls} of every carried parameter."""
        return {id(p): local for p, _, local in self._carriers}

    def carried(self, params=None) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
        """(name, param, value between calls) of the carried parameters (of ``params``)."""
        wanted = {id(p) for p in params} if params is not None else None
        return [(self._name_by_id[id(p)], p, local) for p, _, local in self._carriers
                if wanted is None or id(p) in wanted]

    def _is_mine(self, param) -> bool:
        ref = self._refs.get(id(param))
        return ref is not None and ref() is param

    def name_of(self, param) -> str | None:
        """The plan's name of a trained parameter, by identity (aliases share one name)."""
        return self._name_by_id[id(param)] if self._is_mine(param) else None

    def index_of(self, param) -> int:
        """The plan index of trained parameter ``param`` (by identity)."""
        if not self._is_mine(param):
            raise KeyError(f"not a parameter of this runtime's model: {type(param).__name__} "
                           f"of shape {tuple(param.shape)}")
        return self._slot_by_id[id(param)]

    def slot_of(self, tensor: torch.Tensor) -> int:
        """The plan index of the trained parameter whose storage ``tensor`` is (-1: none).
        Parameters are views of flat_params (TP ones: their stand-ins), so the address
        identifies them in any graph call, whatever object carries it."""
        if tensor.numel() == 0:
            return self._slot_by_id[id(tensor)] if self._is_mine(tensor) else -1
        return self._slot_by_ptr.get(tensor.data_ptr(), -1)


class _MasterFill:
    """Shard ranges of the fp32 master from the parameters' values, for any [a, b) in
    shard order: what install hands TrainState.fill_shard."""

    def __init__(self, plan: Plan, params: dict):
        self.plan, self.params = plan, params
        self.pieces = sorted(plan.owned_pieces(), key=lambda o: o.at)
        self.ends = [o.at + o.numel for o in self.pieces]
        self._last: tuple = (None, None)  # (name, its local values): TP pieces made once

    def fill(self, a: int, b: int, out: torch.Tensor) -> None:
        out.zero_()  # padding belongs to no parameter: zeros, as the zeroed master has
        for o in self.pieces[bisect.bisect_right(self.ends, a):]:
            if o.at >= b:
                break
            lo, hi = max(a, o.at), min(b, o.at + o.numel)
            flat = self._flat(o.slot.name)
            start = o.start + lo - o.at
            out[lo - a:hi - a].copy_(flat[start:start + hi - lo])

    def _flat(self, name: str) -> torch.Tensor:
        if self._last[0] != name:
            s = self.plan.slot(name)
            self._last = (name, _local(self.plan, s, self.params[name]).reshape(-1))
        return self._last[1]


def _local(plan: Plan, s, p) -> torch.Tensor:
    """This rank's part of parameter ``p`` (its tensor-parallel piece, or all of it)."""
    if s.tp is None:
        return p.detach()
    return s.tp.local_piece(p.detach(), plan.grid.tp_size, plan.grid.tp_rank(plan.rank))


def _aliases(model: nn.Module, names_by_id: dict) -> dict[str, tuple[str, ...]]:
    """{plan name: the other names model.state_dict() uses for the same tensor} (tied
    embeddings, BERT's decoder bias): one parameter in the layout, every name on save."""
    out: dict[str, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        canon = names_by_id.get(id(p))
        if canon is not None and n != canon:
            out.setdefault(canon, []).append(n)
    return {k: tuple(v) for k, v in out.items()}
