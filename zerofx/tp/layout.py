"""Which weights are tensor-parallel, and how: Megatron's column and row split, decided per model.

    colwise  Linear(in, out): weight [out, in] and bias [out] split along out (dim 0); each
             rank computes out/tp of the features. A fused q|k|v projection is split per part
             (rank r takes rows r of q, of k and of v), so each rank holds whole heads.
    rowwise  Linear(in, out): weight split along in (dim 1); each rank's output is a partial
             sum, all-reduced by the tensor_parallel pass; the bias stays whole (added once).

The layout must exist before the runtime allocates its shards, which is before the training
graphs are traced, so it comes from, in this order:

1. the config's ``tensor_parallel.plan`` patterns (nn.Linear and Hugging Face's Conv1D);
2. the model's forward graph, traced once on example inputs (``example_inputs=`` of
   ZeroRuntime or zerofx.initialize; a Hugging Face model's own ``dummy_inputs`` otherwise):
   tp/discovery.py finds Megatron's regions by propagating splits with the tensor_parallel
   pass's own rules, so heads, fused projections, gated MLPs and Conv1D need no names;
3. without anything to trace, the module tree: an attention module with a head count
   attribute (fused qkv Linear(d, 3d), or q/k/v Linears by name) and an MLP (Linear(d, h)
   registered right before Linear(h, d'), only activations or dropout between them).

The tensor_parallel pass then proves the choice on the joint graph (sharding propagation,
backward included) or names the op it cannot shard.
"""
from __future__ import annotations

import fnmatch
import inspect
import math
import logging
from dataclasses import dataclass

import torch
from torch import nn

from zerofx.config import Config, ConfigError
import zerofx.tp.discovery as tp_discovery
import zerofx.tp.rules as R

log = logging.getLogger(__name__)

HEAD_ATTRS = ("heads", "n_head", "n_heads", "num_heads", "num_attention_heads")


class TPPlanError(ConfigError):
    """A tensor-parallel plan that cannot be applied to this model."""


@dataclass(frozen=True)
class TPShard:
    """How one parameter is split over the tensor-parallel group."""

    dim: int  # the split dimension of the full parameter
    parts: int  # equal parts along dim, each split separately (3 for a fused qkv)
    full_shape: tuple[int, ...]
    # Unequal parts instead, [(size, whole)] in order: each split separately or, where
    # whole, held whole by every rank (a fused q|k|v with grouped or multi-query key/value
    # heads: Megatron's GQA layout, tp/rules.py Regions), or, where ``whole`` is a group
    # count g, in g groups each held by tp/g ranks (key/value heads fewer than the ranks).
    # Empty: ``parts`` equal ones.
    regions: tuple[tuple[int, bool | int], ...] = ()

    def _regions(self) -> list[tuple[int, bool | int]]:
        n = self.full_shape[self.dim]
        return list(self.regions) or [(n // self.parts, False)] * self.parts

    def sharding(self):
        """The parameter's split in the sharding algebra (tp/rules.py)."""
        return R.regions(self.dim, self._regions())

    def local_shape(self, tp: int) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] = sum(n // R.ways(w, tp) for n, w in self._regions())
        return tuple(shape)

    def _spans(self, tp: int, tp_rank: int):
        """(start, length) of each of this rank's rows (dim) in the full parameter."""
        at = 0
        for n, w in self._regions():
            g = R.ways(w, tp)
            yield at + (tp_rank * g // tp) * (n // g), n // g
            at += n

    def replicated_spans(self, tp: int) -> list[tuple[int, int]]:
        """[start, end) ranges of the flat local piece that other ranks hold alike, sorted,
        each listed once per distinct copy over the group: a whole region (every rank holds
        it) once, a region in g groups (each held by tp/g ranks) g times. Gradient norms
        count each listing 1/tp of the local sum of squares, so summed over the group every
        distinct row counts once, not tp (or tp/g) times."""
        if all(w is False for _, w in self._regions()):
            return []
        shape = self.local_shape(tp)
        inner, outer = math.prod(shape[self.dim + 1:]), math.prod(shape[:self.dim])
        spans, at = [], 0
        for n, w in self._regions():
            g = R.ways(w, tp)
            m = n // g
            if w is not False:
                spans += [((o * shape[self.dim] + at) * inner, (o * shape[self.dim] + at + m)
                           * inner, g) for o in range(outer)]
            at += m
        merged: list[tuple[int, int, int]] = []
        for a, b, g in sorted(spans):  # adjacent regions of one count: one span
            merged[-1:] = [(merged[-1][0], b, g)] if merged and merged[-1][1:] == (a, g) \
                else merged[-1:] + [(a, b, g)]
        return [(a, b) for a, b, g in merged for _ in range(g)]

    def local_piece(self, full: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
        """This rank's piece of ``full`` (a copy, contiguous)."""
        return torch.cat([full.narrow(self.dim, at, n) for at, n in self._spans(tp, tp_rank)],
                         dim=self.dim).contiguous()

    def whole(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The full parameter from every rank's ``local_piece``, in rank order (its inverse):
        each split part from every rank in turn, each whole part from the first rank."""
        d, tp = self.dim, len(pieces)
        out, local = [], 0
        for n, w in self._regions():
            g = R.ways(w, tp)
            out += [pieces[k * tp // g].narrow(d, local, n // g) for k in range(g)]
            local += n // g
        return torch.cat(out, dim=d)


@dataclass(frozen=True)
class TPChoice:
    """One Linear the layout splits, and why (shown in the plan dump)."""

    module: str
    style: str  # "colwise" | "rowwise"
    parts: int
    reason: str


@dataclass(frozen=True)
class TPLayout:
    size: int
    shards: dict  # parameter name -> TPShard (absent: replicated)
    choices: tuple[TPChoice, ...]
    left_whole: tuple[tuple[str, str], ...] = ()  # (projection weight, why it is not split)


def resolve_tp_layout(model: nn.Module, config: Config, example_inputs=None) -> TPLayout:
    """The tensor-parallel layout of ``model`` under ``config`` (empty when size is 1)."""
    tp = config.tensor_parallel.size
    modules = dict(model.named_modules())
    if tp == 1:
        if config.tensor_parallel.plan:  # checked anyway: a typo must not wait for size 2
            _from_plan(modules, config.tensor_parallel.plan)
        return TPLayout(1, {}, ())
    if config.tensor_parallel.plan:
        choices = _from_plan(modules, config.tensor_parallel.plan)
    else:
        example = example_inputs if example_inputs is not None else hf_example(model)
        if example is not None:
            return _check_lamb(_from_graph(model, example, tp,
                                           config.tensor_parallel.vocab_parallel), config)
        choices = _detect(modules, tp)
    if not choices:
        raise _nothing_to_split(tp)
    shards = {}
    for c in choices:
        lin = modules[c.module]
        _check_divisible(c, lin, modules, tp)
        prefix = f"{c.module}." if c.module else ""
        out_dim = _out_dim(lin)
        shards[prefix + "weight"] = TPShard(out_dim if c.style == "colwise" else 1 - out_dim,
                                            c.parts, tuple(lin.weight.shape))
        if lin.bias is not None and c.style == "colwise":
            shards[prefix + "bias"] = TPShard(0, c.parts, tuple(lin.bias.shape))
    return TPLayout(tp, shards, tuple(choices))


def _nothing_to_split(tp: int) -> TPPlanError:
    return TPPlanError(
        f"tensor_parallel.size={tp} but no Linear layer to split was found: give "
        f"tensor_parallel.plan, e.g. {{\"blocks.*.mlp.fc1\": \"colwise\", "
        f"\"blocks.*.mlp.fc2\": \"rowwise\"}}")


def hf_example(model: nn.Module, batch: int | None = None, seq: int | None = None):
    """Inputs a Hugging Face model is trained on, made from its class and config: its main
    input (token ids: ``dummy_inputs``', or ``batch`` x ``seq`` random ones; images of
    ``num_channels`` x ``image_size``; ``num_mel_bins`` audio features) and ``labels``
    shaped for its task, so the traced graph holds the loss (and the LM head's split can
    end there). None: not a model this knows."""
    config, main = getattr(model, "config", None), getattr(model, "main_input_name", None)
    if config is None or main not in _MAIN_INPUTS:
        return None
    g = torch.Generator().manual_seed(0)
    if main == "input_ids" and (batch or seq):
        ids = torch.randint(0, getattr(config, "vocab_size", 2), (batch or 2, seq or 8),
                            generator=g)
    else:
        ids = _MAIN_INPUTS[main](model, config, g)
        if ids is not None and batch:
            ids = ids[:1].expand(batch, *ids.shape[1:]).contiguous()
    example = {main: ids}
    if example[main] is None:
        return None
    if "labels" in inspect.signature(model.forward).parameters:
        labels = _task_labels(type(model).__name__, config, example, g)
        if labels is not None:
            example["labels"] = labels
    return example


def _token_ids(model, config, g):
    example = getattr(model, "dummy_inputs", None)
    return dict(example).get("input_ids") if isinstance(example, dict) else None


def _images(model, config, g):
    size = getattr(config, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return torch.randn(2, getattr(config, "num_channels", 3), h, w, generator=g)


def _audio(model, config, g):  # Whisper-style encoders: 2 frames per source position
    return torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions, generator=g)


_MAIN_INPUTS = {"input_ids": _token_ids, "pixel_values": _images, "input_features": _audio}


def _task_labels(cls: str, config, example: dict, g):
    """``labels`` as the task head of class ``cls`` takes them (None: it takes none)."""
    inputs = next(iter(example.values()))
    n, batch = getattr(config, "num_labels", 2), inputs.shape[0]
    if cls.endswith(("ForSequenceClassification", "ForImageClassification",
                     "ForAudioClassification")):
        if n == 1 or getattr(config, "problem_type", None) == "regression":
            return torch.randn(batch, generator=g)
        return torch.randint(0, n, (batch,), generator=g)
    if cls.endswith("ForTokenClassification"):
        return torch.randint(0, n, tuple(inputs.shape[:2]), generator=g)
    vocab = getattr(config, "vocab_size", None)
    if getattr(config, "is_encoder_decoder", False) and vocab:  # the decoder's targets:
        return torch.randint(1, vocab, (batch, 4), generator=g)  # the model shifts them in
    if "input_ids" in example:  # a language model: the next (or masked) tokens
        return example["input_ids"]
    return None


def _from_graph(model: nn.Module, example, tp: int, vocab: bool) -> TPLayout:
    """Megatron's regions found on the traced forward graph (tp/discovery.py)."""
    try:
        gm, names = tp_discovery.trace_forward(model, example)
    except Exception as e:  # the model's own error on these inputs, whatever its type
        raise TPPlanError(
            f"zerofx traces the model once on example inputs to find its tensor-parallel "
            f"layout, and the model raised {type(e).__name__}: {e}. Pass inputs it accepts "
            f"(example_inputs= of zerofx.initialize or ZeroRuntime: a dict of keyword "
            f"arguments or a tuple), or give tensor_parallel.plan") from e
    whole: dict[str, str] = {}
    found = tp_discovery.discover(gm, tp_discovery.find_weights(gm, names), tp, vocab=vocab,
                                  whole=whole)
    if whole:  # never silently: the plan dump lists them too
        log.warning("tensor_parallel.size=%d leaves %d projection weight(s) whole on every "
                    "rank: %s", tp, len(whole), "; ".join(f"{n} ({why})" for n, why in
                                                            sorted(whole.items())))
    if not found:
        raise _nothing_to_split(tp)
    params = dict(model.named_parameters())
    shards, choices = {}, []
    for f in found:
        shards[f.name] = TPShard(f.dim, f.parts, tuple(params[f.name].shape), f.regions)
        if f.bias is not None:
            shards[f.bias] = TPShard(0, f.parts, tuple(params[f.bias].shape), f.regions)
        choices.append(TPChoice(f.name.rpartition(".")[0], f.style, f.parts, f.reason))
    order = list(params)
    choices.sort(key=lambda c: order.index(f"{c.module}.weight" if c.module else "weight"))
    return TPLayout(tp, shards, tuple(choices), tuple(sorted(whole.items())))


def _check_lamb(layout: TPLayout, config: Config) -> TPLayout:
    """``layout``, unless LAMB would train it wrong: its trust ratio sums each tensor's
    squares over the TP pieces, so rows a split weight holds whole on every rank (a
    multi-query key/value) would count tp times."""
    opt = config.optimizer
    mixed = [n for n, s in layout.shards.items() if any(w is not False for _, w in s.regions)]
    if mixed and opt is not None and opt.type.lower() == "lamb":
        raise TPPlanError(
            f"{mixed[0]} is split over tensor-parallel ranks with rows whole on every rank "
            f"(a multi-query key/value beside split query heads) or on every rank of a group "
            f"(key/value heads fewer than the ranks), which LAMB's per-tensor trust ratio "
            f"would count several times: use Adam or AdamW, or give tensor_parallel.plan "
            f"without that layer")
    return layout


def _is_projection(m: nn.Module) -> bool:
    """nn.Linear, or Hugging Face's Conv1D (GPT-2: a Linear with its weight transposed)."""
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))


def _out_dim(m: nn.Module) -> int:
    """The weight dimension of output features: 0 for nn.Linear, 1 for Conv1D."""
    return 0 if isinstance(m, nn.Linear) else 1


def _features(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a projection."""
    w = m.weight.shape
    return (w[1], w[0]) if isinstance(m, nn.Linear) else (w[0], w[1])


def _from_plan(modules: dict, plan) -> list[TPChoice]:
    linears = [name for name, m in modules.items() if _is_projection(m)]
    chosen: dict[str, TPChoice] = {}
    for pattern, style in plan:
        # A pattern may name the module ("mlp.fc1") or one of its parameters ("mlp.fc1.weight").
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern)
                or fnmatch.fnmatchcase(f"{n}.weight", pattern)]
        if not hits:
            close = [n for n in linears if fnmatch.fnmatchcase(n, f"*{pattern.split('.')[-1]}*")]
            hint = f" (Linear layers with a similar name: {close[:4]})" if close else \
                f" (Linear layers: {linears[:6]}{'...' if len(linears) > 6 else ''})"
            raise TPPlanError(f"tensor_parallel.plan: pattern {pattern!r} matches no Linear "
                              f"layer{hint}; fix or remove it")
        for n in hits:
            if n in chosen and chosen[n].style != style:
                raise TPPlanError(f"tensor_parallel.plan: {n!r} is matched as "
                                  f"{chosen[n].style} and as {style} (pattern {pattern!r}); "
                                  f"make the patterns disjoint")
            chosen[n] = TPChoice(n, style, _fused_parts(n, modules) if style == "colwise"
                                 else 1, f"plan pattern {pattern!r}")
    return sorted(chosen.values(), key=lambda c: list(modules).index(c.module))


def _fused_parts(name: str, modules: dict) -> int:
    """3 for a fused q|k|v projection (Linear(d, 3d) inside a module with a head count)."""
    lin, parent = modules[name], modules[name.rpartition(".")[0]]
    d_in, d_out = _features(lin)
    return 3 if _heads(parent) and d_out == 3 * d_in else 1


def _heads(module: nn.Module) -> int | None:
    for attr in HEAD_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _detect(modules: dict, tp: int) -> list[TPChoice]:
    """Megatron's attention and MLP patterns, found among each module's direct Linears.

    Only candidates whose split dimension divides by ``tp`` are taken (an explicit plan
    that names an indivisible layer is an error instead).
    """
    choices: list[TPChoice] = []
    for name, mod in modules.items():
        prefix = f"{name}." if name else ""
        lins = [(prefix + n, m) for n, m in mod.named_children() if isinstance(m, nn.Linear)]
        attention = _attention(mod, lins, tp)
        choices += attention
        taken = {c.module for c in attention}
        rest = [(n, m) for n, m in lins if n not in taken]
        order = [prefix + n for n, _ in mod.named_children()]
        for (n1, a), (n2, b) in zip(rest, rest[1:]):
            if n1 in taken or not _only_elementwise_between(mod, order, n1, n2):
                continue
            if a.out_features == b.in_features and a.out_features % tp == 0:
                taken |= {n1, n2}
                why = f"module tree: MLP {a.in_features}->{a.out_features}->{b.out_features}"
                choices += [TPChoice(n1, "colwise", 1, why), TPChoice(n2, "rowwise", 1, why)]
    return choices


# Projection names of attention modules with separate q, k, v (HF/Llama-style and others).
_QKV_NAMES = {"q", "k", "v", "query", "key", "value", "q_proj", "k_proj", "v_proj", "wq", "wk",
              "wv"}
_OUT_NAMES = {"o", "out", "proj", "o_proj", "out_proj", "c_proj", "dense", "wo"}


def _attention(mod: nn.Module, lins: list, tp: int) -> list[TPChoice]:
    """A module with a head count: fused qkv Linear(d, 3d), or q/k/v Linears by name, split by
    columns; its Linear(d, d) output projection by rows."""
    heads = _heads(mod)
    if not heads or heads % tp:
        return []
    why = f"module tree: attention ({heads} heads)"
    fused = [(n, m) for n, m in lins if m.out_features == 3 * m.in_features]
    named = [(n, m) for n, m in lins if n.rpartition(".")[2] in _QKV_NAMES]
    if len(fused) == 1:
        inputs, parts, kind = fused, 3, "fused qkv"
    elif len(named) == 3:
        inputs, parts, kind = named, 1, "q, k, v"
    else:
        return []
    d = inputs[0][1].in_features
    out = [(n, m) for n, m in lins if (m.in_features, m.out_features) == (d, d)
           and n not in {x for x, _ in inputs}]
    if len(out) > 1:  # several square Linears besides q/k/v: go by name
        out = [(n, m) for n, m in out if n.rpartition(".")[2] in _OUT_NAMES]
    if len(out) != 1 or d % tp or any(m.out_features % (parts * tp) for _, m in inputs):
        return []
    return [TPChoice(n, "colwise", parts, f"{why}: {kind}") for n, _ in inputs] + \
        [TPChoice(out[0][0], "rowwise", 1, f"{why}: output projection")]


# Modules that may sit between an MLP's two Linears (registration order): elementwise only.
_ELEMENTWISE = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU, nn.ELU,
                nn.Dropout, nn.Identity)


def _only_elementwise_between(mod: nn.Module, order: list[str], first: str, second: str) -> bool:
    children = dict(mod.named_children())
    between = order[order.index(first) + 1:order.index(second)]
    return all(isinstance(children[n.rpartition(".")[2]], _ELEMENTWISE) for n in between)


def _check_divisible(c: TPChoice, lin: nn.Module, modules: dict, tp: int) -> None:
    d_in, d_out = _features(lin)
    n = d_out if c.style == "colwise" else d_in
    what = "out_features" if c.style == "colwise" else "in_features"
    if n % (c.parts * tp):
        per = f" per part (a fused q|k|v of {c.parts} parts)" if c.parts > 1 else ""
        raise TPPlanError(f"{c.module} ({c.style}): {what}={n}{per} is not divisible by "
                          f"tensor_parallel.size={tp}; choose a size that divides it or "
                          f"leave the layer out of tensor_parallel.plan")
    parent = modules[c.module.rpartition(".")[0]]
    heads = _heads(parent)
    if heads and heads % tp and (c.parts > 1 or d_in == d_out):
        raise TPPlanError(f"{c.module}: {heads} attention heads are not divisible by "
                          f"tensor_parallel.size={tp}; each rank must hold whole heads")
