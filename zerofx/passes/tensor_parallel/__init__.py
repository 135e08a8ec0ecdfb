"""The tensor_parallel pass: Megatron's tensor parallelism on the joint graph.

    rewrite   the pass: sharding propagation over the graph and the per-node rewrites
    vocab     the vocabulary-parallel embedding and cross-entropy
    sequence  sequence parallelism between tensor-parallel regions
"""
from zerofx.passes.tensor_parallel.rewrite import tensor_parallel_pass

__all__ = ["tensor_parallel_pass"]
