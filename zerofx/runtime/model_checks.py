"""What a model may hold that zerofx cannot train (refused by name before anything runs),
or that trains otherwise than in eager PyTorch (said once)."""
from __future__ import annotations

import logging

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
        weight = getattr(mod, "weight", None)
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.sparse and \
                weight is not None and weight.requires_grad:
            kind = type(mod).__name__
            raise ConfigError(f"{name or 'the model'} is an {kind} with sparse=True: its "
                              f"gradient is sparse, and zerofx's gradient buckets are dense "
                              f"(DeepSpeed's sparse_gradients all-reduce is not supported). "
                              f"Build it with sparse=False (the same gradient, held dense), "
                              f"or set {name or 'the module'}.sparse = False before "
                              f"zerofx.initialize")


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
