"""What a model may hold that zerofx cannot train (refused by name before anything runs),
or that trains otherwise than in eager PyTorch (said once)."""
from __future__ import annotations

import logging
import weakref

from torch import nn
from torch.fx import Node as fx_node

from zerofx.config import ConfigError

log = logging.getLogger(__name__)


def refuse_sparse_gradients(model: nn.Module) -> None:
    """An ``nn.Embedding``/``nn.EmbeddingBag`` built with ``sparse=True`` makes a sparse
    gradient, which zerofx's dense gradient buckets cannot take (the backward would fail
    deep in a reshape). DeepSpeed's answer is its ``sparse_gradients`` all-reduce, which
    zerofx does not have: the fix is the module's dense gradient, the same math."""
    for name, mod in model.named_modules():
        # the type first: reading ``weight`` runs a parametrization (spectral_norm's power
        # iteration updates its buffers), so only an embedding's is read
        if not isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) or not mod.sparse:
            continue
        weight = getattr(mod, "weight", None)
        if weight is not None and weight.requires_grad:
            kind = type(mod).__name__
            raise ConfigError(f"{name or 'the model'} is an {kind} with sparse=True: its "
                              f"gradient is sparse, and zerofx's gradient buckets are dense "
                              f"(DeepSpeed's sparse_gradients all-reduce is not supported). "
                              f"Build it with sparse=False (the same gradient, held dense), "
                              f"or set {name or 'the module'}.sparse = False before "
                              f"zerofx.initialize")


_TRAINED_DTYPES = ("float32", "bfloat16", "float16")


def refuse_unsupported_dtypes(named) -> None:
    """zerofx's flat buffers, fp32 master and fused kernels hold fp32/bf16/fp16 parameters; a
    float64 (or complex) one would be cast to fp32 in place, and the model's own float64
    inputs would then meet fp32 weights deep in the first forward."""
    bad = [(n, p.dtype) for n, p in named
           if str(p.dtype).removeprefix("torch.") not in _TRAINED_DTYPES]
    if bad:
        name, dtype = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigError(f"parameter {name!r} is {dtype}{more}: zerofx trains float32, "
                          f"bfloat16 and float16 parameters (an fp32 master copy, bf16/fp16 "
                          f"compute from the config). Cast the model and its inputs with "
                          f"model.float() before zerofx.initialize, or train it in eager "
                          f"PyTorch")


class TrainedSet:
    """Which of the model's parameters train, as zerofx planned them at initialize: its
    buffers, shards and graphs are built for exactly those. A parameter unfrozen later
    would never be stepped (its .grad piling up, silently), one frozen later would keep
    its slot and decay; eager PyTorch would train the new set. Checked at each step."""

    def __init__(self, model: nn.Module):
        # weak: a runtime kept past its model must not keep the model's weights alive
        self.params = [(n, weakref.ref(p), p.requires_grad)
                       for n, p in model.named_parameters()]

    def refuse_changes(self) -> None:
        for name, ref, planned in self.params:
            p = ref()
            if p is not None and p.requires_grad != planned:
                now = "unfrozen (requires_grad=True)" if p.requires_grad else \
                    "frozen (requires_grad=False)"
                raise ConfigError(
                    f"parameter {name!r} was {now} after zerofx.initialize: zerofx planned "
                    f"its buffers, shards and graphs for the parameters that trained then, "
                    f"and would not train the new set as asked. Set requires_grad before "
                    f"zerofx.initialize (for staged unfreezing, build a new engine from the "
                    f"saved checkpoint when the set changes)")


def refuse_sparse_graph(joint, num_fwd_outputs: int, names) -> None:
    """The same refusal from a joint training graph, for ``torch.compile(backend="zero")``
    without a runtime (and ``F.embedding(..., sparse=True)``, which no module shows): an
    embedding op asked for a sparse gradient of an input the graph makes a gradient for.
    ``names(node)``: a placeholder's name for the message."""
    import torch
    aten = torch.ops.aten
    sparse_arg = {aten.embedding.default: 4, aten._embedding_bag.default: 5,
                  aten._embedding_bag_forward_only.default: 5}
    # the joint's outputs: the forward's, then one gradient (or None) per primal, in order
    primals = [n for n in joint.graph.nodes
               if n.op == "placeholder" and not n.name.startswith("tangents")]
    grads = list(joint.graph.output_node().args[0])[num_fwd_outputs:]
    trained = {p for p, g in zip(primals, grads) if g is not None}
    for node in joint.graph.nodes:
        i = sparse_arg.get(node.target)
        if i is not None and len(node.args) > i and node.args[i] and node.args[0] in trained:
            raise ConfigError(f"{names(node.args[0])}: an embedding with sparse=True in a "
                              f"training graph: its gradient is sparse, and zerofx's gradient "
                              f"buckets are dense (DeepSpeed's sparse_gradients all-reduce is "
                              f"not supported). Build it with sparse=False (the same "
                              f"gradient, held dense)")


def warn_reentrant_checkpoint(gm) -> None:
    """A ``checkpoint(fn, *args, use_reentrant=True)`` none of whose (non-parameter) inputs
    requires grad gives ``fn``'s weights no gradient in eager PyTorch (torch warns "None of
    the inputs have requires_grad=True"), so under DeepSpeed they never train. Dynamo lifts
    the weights into the region's inputs and they get their gradients: the same model
    trains differently here. Said once per region, with the way to either behaviour."""
    import torch
    for node in gm.graph.nodes:
        if node.op != "call_function" or not node.kwargs.get("use_reentrant") or \
                "tag_activation_checkpoint" not in str(node.target):
            continue
        vals = [a.meta.get("example_value") for a in node.args[1:] if isinstance(a, fx_node)]
        inputs = [v for v in vals if isinstance(v, torch.Tensor) and
                  not isinstance(v, nn.Parameter)]
        if inputs and not any(v.requires_grad for v in inputs):
            log.warning("a checkpoint(..., use_reentrant=True) region (%s) has no input that "
                        "requires grad: eager PyTorch (and DeepSpeed) would give the weights "
                        "inside it no gradient; compiled, they train. For eager's behaviour "
                        "freeze them (requires_grad_(False)); to train them in eager too, "
                        "pass use_reentrant=False or an input that requires grad (HF: "
                        "model.enable_input_require_grads())", node.args[0])
