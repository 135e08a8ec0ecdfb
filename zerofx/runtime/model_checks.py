"""What a model may hold that zerofx's runtime cannot train, refused before anything runs."""
from __future__ import annotations

from torch import nn

from zerofx.config import ConfigError


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
