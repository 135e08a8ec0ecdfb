"""The Dynamo settings zerofx traces model code under.

Both exist so that a model's forward reaches zerofx's passes as whole graphs: code Dynamo
would otherwise run eagerly, or split at, never meets the casts, the ZeRO-3 gathers or the
tensor-parallel splits.
"""
from __future__ import annotations

import contextlib
import logging

import torch._dynamo.config as dynamo_config

# transformers patches these onto logging.Logger (utils/logging.py): advisories printed once
# per process. Dynamo cannot trace a Logger method, so each call in a forward is a graph
# break: GPT-2's loss (`loss_function` warns once that its config names no loss type) split
# its forward into six graphs, compiled again for eval (a tiny GPT-2 under the Trainer:
# 12 compiles, 8 s, against 2 and 4 s with them skipped).
ONCE_METHODS = ("warning_once", "info_once")
# Dynamo's set of logging calls it traces as no-ops: `ignore_logger_methods` in torch 2.11,
# renamed in 2.13 (the old name an alias, which breaks if anything sets it as a plain
# attribute: use the name this torch stores).
IGNORED_LOGGING = next((n for n in ("ignore_logging_functions", "ignore_logger_methods")
                        if hasattr(dynamo_config, n)), None)


def skip_once_logging() -> None:
    """Let Dynamo trace through transformers' print-once advisories (as no-ops) instead of
    breaking the graph at each. What is lost: such a message, when its first call is in
    traced code, is not printed. Idempotent; a no-op before transformers is imported
    (called again when the engine is built and when the backend is resolved)."""
    if IGNORED_LOGGING is None:  # a torch without the setting: the advisories break the graph
        return
    methods = {getattr(logging.Logger, m) for m in ONCE_METHODS if hasattr(logging.Logger, m)}
    ignored = getattr(dynamo_config, IGNORED_LOGGING)
    if not methods <= ignored:
        setattr(dynamo_config, IGNORED_LOGGING, ignored | methods)


@contextlib.contextmanager
def once_logging_breaks():
    """Dynamo's default inside: each print-once advisory breaks the graph, and an engine
    built here does not change that (for comparisons: the benchmark's before, the test's
    reference). Both halves are needed: the engine calls skip_once_logging again."""
    global ONCE_METHODS
    kept = ONCE_METHODS
    ONCE_METHODS = ()
    try:
        if IGNORED_LOGGING is None:
            yield
        else:
            with dynamo_config.patch({IGNORED_LOGGING: set()}):
                yield
    finally:
        ONCE_METHODS = kept


def traced_checkpoint_side_effects():
    """Dynamo traces a checkpointed region whose forward has a side effect (Hugging Face's
    kernel hub sets a context variable in every decorated layer's forward, transformers
    5.25+) instead of running the whole region eagerly: eagerly, zerofx's passes never see
    it (no casts, no ZeRO-3 graph gathers) and tensor-parallel weights cannot run at all.
    The side effect then happens once, in the forward, not again in the backward's
    recompute (docs/memory.md)."""
    if not hasattr(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return contextlib.nullcontext()  # an older torch: regions with side effects run eagerly
    return dynamo_config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
