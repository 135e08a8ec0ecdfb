"""The pass pipeline: one ordered list of graph passes, built from the config and run by one runner.

Each pass is a plain function ``xxx_pass(gm, ctx) -> gm`` in a module of its own. It is
declared here once, as data: the graph kinds it runs on, the passes it must follow, and when
the config turns it on. ``build_pipeline`` checks the order constraints; ``run_pipeline``
logs, times, lints, tags the nodes each pass adds, keeps fake values valid, and dumps.

Graph kinds (AOTAutograd's aten graphs, never a split of the Dynamo graph):
    joint      forward + backward traced together, before partitioning: passes that must
               change both sides consistently (dtype casts, loss scaling) run here
    forward    the partitioned forward graph
    backward   the partitioned backward graph (gradient buckets, collectives)
    inference  a forward graph compiled without autograd
    optimizer  the optimizer step (ZeroRuntime), traced with make_fx
"""
from __future__ import annotations

import difflib
import logging
import time

from torch import fx

from zerofx.config import Config, ConfigError
from zerofx.passes.context import PassContext, PassSpec
from zerofx.passes.dump import GraphDump
from zerofx.passes.dump_collectives import collective_rows, render_collectives
from zerofx.passes.fake_vals import (fill_fake_vals, forget_inputs, stale_fake_vals,
                                     val_summary)
from zerofx.passes.nodes import META_PARTITIONED, tag_new_nodes
from zerofx.passes.region_inputs import budget_for

log = logging.getLogger(__name__)


def declared_passes() -> tuple[PassSpec, ...]:
    """Every zerofx pass, in pipeline order. Importing here keeps pass modules independent."""
    from zerofx.passes.bucketing import bucketing_pass
    from zerofx.passes.gather_out import gather_out_pass
    from zerofx.passes.matmul_form import matmul_form_pass
    from zerofx.passes.mixed_precision import mixed_precision_pass
    from zerofx.passes.param_identity import param_identity_pass
    from zerofx.passes.partition_activations import partition_activations_pass
    from zerofx.passes.schedule import schedule_pass
    from zerofx.passes.tensor_parallel import tensor_parallel_pass
    from zerofx.passes.zero3 import regather_pass, zero3_pass

    return (
        PassSpec("mixed_precision", mixed_precision_pass, frozenset({"joint", "inference"}),
                 enabled=lambda cfg: cfg.fp16.enabled or cfg.bf16.enabled),
        PassSpec("tensor_parallel", tensor_parallel_pass, frozenset({"joint", "inference"}),
                 after=("mixed_precision",),
                 enabled=lambda cfg: cfg.tensor_parallel.size > 1, needs_runtime=True),
        # Last on the joint graph: tags the final parameter gradients of each call.
        PassSpec("param_identity", param_identity_pass, frozenset({"joint"}),
                 after=("mixed_precision", "tensor_parallel"), requires=("bucketing",),
                 needs_runtime=True),
        # After param_identity: reads its per-call slots; the partitioner then sees the
        # gathered weights (regather_for_backward runs on the partitioned pair).
        PassSpec("zero3", zero3_pass, frozenset({"joint", "inference"}),
                 after=("param_identity", "mixed_precision"),
                 enabled=lambda cfg: cfg.zero_optimization.stage == 3, needs_runtime=True),
        # ZeRO-3's second all-gather: the pair keeps no gathered weight alive in between.
        PassSpec("zero3_regather", regather_pass, frozenset({"partitioned"}),
                 after=("zero3",), enabled=lambda cfg: cfg.zero_optimization.stage == 3,
                 needs_runtime=True),
        # DeepSpeed's partition_activations: a checkpointed region's replicated saved input
        # kept as 1/tp per TP rank, all-gathered for the recompute (reads tensor_parallel's
        # shardings; after zero3_regather, so the saved values are final)
        PassSpec("partition_activations", partition_activations_pass,
                 frozenset({"partitioned"}), after=("tensor_parallel", "zero3_regather"),
                 enabled=lambda cfg: cfg.activation_checkpointing.partition_activations,
                 needs_runtime=True),
        PassSpec("bucketing", bucketing_pass, frozenset({"backward"}),
                 requires=("param_identity",), needs_runtime=True),
        # Eager execution only: Inductor picks its own GEMM forms.
        PassSpec("matmul_form", matmul_form_pass,
                 frozenset({"forward", "backward", "inference"}), after=("bucketing",),
                 enabled=lambda cfg: (cfg.fp16.enabled or cfg.bf16.enabled)
                 and not cfg.zerofx.inductor),
        # The optimizer step's all-gathers: several in flight instead of one at a time.
        PassSpec("schedule", schedule_pass, frozenset({"optimizer"}), needs_runtime=True),
        # Last on every executed graph: gloo's coalesced all-gather corrupts the heap
        # (gather_out.py); its _out form is the plain all-gather. On wherever a graph can
        # hold a functional all-gather: tensor parallelism's (sequence parallelism,
        # partition_activations) and the step's (stages 1-2; stage 3's persistent buckets).
        PassSpec("gather_out", gather_out_pass,
                 frozenset({"forward", "backward", "inference", "optimizer"}),
                 after=("matmul_form", "schedule", "bucketing"),
                 enabled=lambda cfg: cfg.tensor_parallel.size > 1
                 or cfg.zero_optimization.stage > 0),
    )


def build_pipeline(config: Config, *, extra: tuple[PassSpec, ...] = (),
                   with_runtime: bool = False) -> tuple[PassSpec, ...]:
    """The passes this config runs, in order; ``extra`` (tests, plugins) go last.

    Passes that hand state to a ZeroRuntime (loss scale, buckets) run only ``with_runtime``.
    """
    declared = declared_passes() + tuple(extra)
    names = [p.name for p in declared]
    for bad in set(config.zerofx.disable_passes) - set(names):
        close = difflib.get_close_matches(bad, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"zerofx.disable_passes: no pass named {bad!r}{hint} "
                          f"(passes: {', '.join(names)})")
    if "mixed_precision" in config.zerofx.disable_passes and with_runtime and (
            config.fp16.enabled or config.bf16.enabled):
        # The runtime stores parameters in the compute dtype; without the casts the graph
        # would mix dtypes 30 frames deep.
        raise ConfigError("zerofx.disable_passes: 'mixed_precision' cannot be disabled while "
                          "bf16 or fp16 is enabled; disable bf16/fp16 instead")
    chosen = tuple(p for p in declared
                   if p.enabled(config) and p.name not in config.zerofx.disable_passes
                   and (with_runtime or not p.needs_runtime))
    check_order(chosen)
    return chosen


def partitioner(config: Config):
    """How the joint graph is split into forward and backward. With
    zerofx.activation_memory_budget below 1: torch's min-cut partitioner under that budget
    (it solves a knapsack over the joint graph: which activations to save, which ops to
    recompute in the backward, least recompute first). Else Inductor's min-cut
    rematerialisation when zerofx.inductor is on, the default partitioner (saves what the
    backward reads) otherwise. Checkpointed regions are recomputed by both."""
    from torch._functorch import config as functorch_config
    from torch._functorch.partitioners import (default_partition,
                                               min_cut_rematerialization_partition)

    budget = config.zerofx.activation_memory_budget
    if budget < 1.0:
        def within_budget(joint, *args, **kwargs):
            # checkpointed regions keep their inputs (region_inputs.py: at budget 0 torch
            # would recompute the whole forward at the backward's start, holding it all)
            with functorch_config.patch(activation_memory_budget=budget_for(joint, budget)):
                return min_cut_rematerialization_partition(joint, *args, **kwargs)
        return within_budget
    return min_cut_rematerialization_partition if config.zerofx.inductor else default_partition


def saved_report(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> str:
    """What the forward saves for the backward (bytes each) and which forward ops the
    backward recomputes: the dump's partitioned/saved.txt."""
    saved = [o for o in fw.graph.output_node().args[0][num_fwd_outputs:]
             if isinstance(o, fx.Node)]
    rows, total, whole, parted = [], 0, 0, []
    for o in saved:
        val = o.meta.get("val")
        # int(): with dynamic shapes the sizes are symbols; their hint is the traced size
        nbytes = int(val.numel() * val.element_size()) if hasattr(val, "numel") else 0
        own = o.op != "placeholder"  # a saved input (a weight) costs no memory of its own
        total += nbytes if own else 0
        shape = list(val.shape) if hasattr(val, "shape") else "?"
        part = o.meta.get(META_PARTITIONED)
        if part:  # partition_activations: this rank's chunk of a whole value
            whole += part["bytes"]
            parted.append(part)
        note = (f"  (1/{part['tp']} of {part['of']} {part['shape']}, {part['bytes']:,d} B "
                f"whole: partition_activations)" if part else
                "" if own else "  (an input: no memory of its own)")
        rows.append(f"  {o.name:<28} {str(shape):<20} {nbytes:>12,d} B{note}")
    forward = {n.name for n in fw.graph.nodes}
    again = [n.name for n in bw.graph.nodes if n.op == "call_function" and n.name in forward]
    kept = sum(int(o.meta["val"].numel() * o.meta["val"].element_size())
               for o in saved if o.meta.get(META_PARTITIONED))
    split = (f"partition_activations: {len(parted)} values kept as 1/tp chunks, "
             f"{whole:,d} B whole -> {kept:,d} B on this rank\n") if parted else ""
    return (f"saved for the backward: {len(saved)} values, {total:,d} bytes of activations\n"
            + split + "\n".join(rows) + f"\nrecomputed in the backward ({len(again)} ops): "
            + (", ".join(again) or "none") + "\n")


def run_partitioned(pair, ctx: PassContext, passes: tuple[PassSpec, ...], *,
                    dump: GraphDump | None = None):
    """Run the passes declared on the "partitioned" pair (fw, bw); lint both after each;
    with a dump, write what the forward saves and the backward recomputes (saved.txt)."""
    for p in passes:
        if "partitioned" not in p.graph_kinds:
            continue
        before = {n for gm in pair for n in gm.graph.nodes}
        try:
            pair = p.fn(pair, ctx)
            for gm in pair:
                tag_new_nodes(gm.graph, before, p.name)
                gm.graph.lint()
        except Exception as e:
            e.add_note(f"(zerofx: raised in pass {p.name!r} on the partitioned pair "
                       f"{ctx.graph_name})")
            raise
        for gm in pair:
            gm.recompile()
        trace_artifact(ctx.graph_name + "_forward", p.name, pair[0])
        trace_artifact(ctx.graph_name + "_backward", p.name, pair[1])
    if dump is not None:
        dump.write_text("saved.txt", saved_report(*pair, ctx.num_fwd_outputs))
    return pair


def check_order(passes: tuple[PassSpec, ...]) -> None:
    """Order constraints are data; a violated one is a bug or a bad disable_passes."""
    position = {p.name: i for i, p in enumerate(passes)}
    for i, p in enumerate(passes):
        for dep in p.requires:
            if dep not in position:
                raise ConfigError(f"pass {p.name!r} requires pass {dep!r}, which is disabled "
                                  f"or off in this config; re-enable it or disable {p.name!r}")
        for dep in p.after:
            if position.get(dep, -1) > i:
                raise ValueError(f"pass {p.name!r} must run after {dep!r}, but is before it")


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, passes: tuple[PassSpec, ...], *,
                 dump: GraphDump | None = None) -> fx.GraphModule:
    """Run the passes that apply to ``ctx.graph_kind`` over ``gm``, checking after each."""
    if dump is not None:
        dump.record("input", gm, added=0, removed=0, ms=0.0)
    for p in passes:
        if ctx.graph_kind not in p.graph_kinds:
            continue
        # each node's call and value before the pass: what the check compares with
        before = {n: ((n.target, n.args, n.kwargs), n.meta.get("val")) for n in gm.graph.nodes}
        t0 = time.perf_counter()
        try:
            gm = p.fn(gm, ctx)
            new = tag_new_nodes(gm.graph, set(before), p.name)
            fill_fake_vals(gm)
            gm.graph.lint()
            _check_fake_vals(gm, p.name, new, before)
        except Exception as e:
            if dump is not None:
                dump.failure(p.name, gm, e)
            e.add_note(f"(zerofx: raised in pass {p.name!r} on graph {ctx.graph_name}"
                       f"{'; see failure.txt in the dump' if dump is not None else ''})")
            raise
        gm.recompile()
        ms = (time.perf_counter() - t0) * 1e3
        removed = len(set(before) - set(gm.graph.nodes))
        log.debug("%s on %s: +%d -%d nodes in %.1f ms", p.name, ctx.graph_name, len(new),
                  removed, ms)
        if dump is not None:
            dump.record(p.name, gm, added=len(new), removed=removed, ms=ms)
        trace_artifact(ctx.graph_name, p.name, gm)
    forget_inputs(gm)
    if dump is not None:
        dump.write_text("collectives.txt", render_collectives(collective_rows(
            gm, tp_group=ctx.tp_group, dp_size=ctx.plan.grid.dp_size, kinds=dict(ctx.comm_kinds),
            cost=ctx.comm_cost)))
    return gm


def _check_fake_vals(gm: fx.GraphModule, name: str, new, before: dict) -> None:
    """Graph rule 4, enforced where it breaks: every node the pass added, whose inputs it
    changed, whose value it replaced, or that reads a value whose dtype or shape it changed,
    carries the fake value its inputs compute (passes fill values as they go; the pipeline
    fills the ones a pass left out, and checks them here)."""
    suspects = list(new)
    for n in gm.graph.nodes:
        if n not in before:
            continue
        call, val = before[n]
        if _changed(call, n):
            suspects.append(n)
        if n.meta.get("val") is not val:
            suspects.append(n)
            # (a value the pipeline filled for the first time, fill_fake_vals, is no change
            # of the pass's: its readers were traced with their own values)
            if val is not None and val_summary(n.meta.get("val")) != val_summary(val):
                suspects.extend(n.users)
    bad = stale_fake_vals(gm, list(dict.fromkeys(suspects)))
    if bad:
        raise RuntimeError(f"pass {name!r} left {len(bad)} node(s) with a wrong fake value "
                           f"(graph rule 4, passes/README.md): " + "; ".join(bad[:5]))


def _changed(was: tuple, node: fx.Node) -> bool:
    try:
        return was != (node.target, node.args, node.kwargs)
    except RuntimeError:  # a tensor constant replaced by another: ambiguous equality
        return True


def trace_artifact(graph_name: str, pass_name: str, gm: fx.GraphModule) -> None:
    """The graph after a pass as a structured-trace artifact: with TORCH_TRACE set, tlparse
    shows zerofx's graphs next to Dynamo's and AOTAutograd's (a no-op otherwise)."""
    try:
        from torch._logging import trace_structured
    except ImportError:
        return
    trace_structured("artifact", metadata_fn=lambda: {
        "name": f"zerofx_{graph_name}_{pass_name}", "encoding": "string"},
        payload_fn=lambda: gm.print_readable(print_output=False))
