"""Megatron's tensor parallelism, decided per model from its traced graph (below the passes:
the tensor_parallel pass and the runtime read what is decided here).

    rules        the sharding algebra: replicated, partial sum, split along a dimension
    propagation  how a split flows through one aten node (an op-keyed rule table)
    propagation_cuts  its rules for ops that cut, join and index (slice, select, stack, index)
    discovery    which weights split how, read from the traced forward graph
    layout       the decided layout of a model (TPLayout), with user plans and reasons
"""
