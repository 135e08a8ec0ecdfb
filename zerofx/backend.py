"""The ``zero`` torch.compile backend: Dynamo graph → AOTAutograd → pass pipeline → executable.

    torch.compile(model, backend="zero", options={"config": "ds_config.json"})

Registered through the ``torch_dynamo_backends`` entry point, so no ``import zerofx`` is
needed. The pipeline runs on AOTAutograd's joint graph (inside the partitioner, before the
split) and on the forward, backward and inference graphs it produces. The transformed graphs
run eagerly by default; ``{"zerofx": {"inductor": true}}`` hands them to Inductor instead.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass

import torch
from torch import fx
from torch._dynamo.backends.common import aot_autograd
from torch._guards import CompileContext
from functorch.compile import make_boxed_func

from zerofx.cpu_gemm import describe as describe_cpu_gemm, host_forms
from zerofx.config import Config, ConfigError
from zerofx.dynamo_settings import skip_once_logging
from zerofx.passes import (PassContext, PassSpec, build_pipeline, partitioner,
                           run_partitioned, run_pipeline)
from zerofx.passes.dump import GraphDump
from zerofx.passes.nodes import META_INPUT, InputRole
from zerofx.plan import Plan, make_plan
from zerofx.runtime.comm.dist import init_distributed
from zerofx.runtime.model_checks import refuse_sparse_graph, warn_reentrant_checkpoint

log = logging.getLogger(__name__)
# torch.compile(backend="zero") imports this module before Dynamo traces the model: a model
# from transformers (imported by then) compiles without a graph break at each print-once
# advisory.
skip_once_logging()

OPTION_KEYS = ("config", "runtime", "extra_passes")
DUMP_ENV = "ZEROFX_DUMP"


@dataclass(frozen=True)
class Compilation:
    """Everything one call of the backend shares across its graphs (no module globals)."""

    config: Config
    plan: Plan
    passes: tuple[PassSpec, ...]
    roles: tuple[InputRole, ...]
    graph_id: str
    rank: int
    dump_root: str | None
    runtime: object | None  # a ZeroRuntime: ZeRO buckets, loss scale and the step graph
    params: tuple = ()  # (name, tensor) of the graph's parameters (plain path: averaged)


def zero_backend(gm: fx.GraphModule, example_inputs, *, options: dict | None = None,
                 mode: str | None = None):
    """The torch.compile entry point (``backend="zero"``)."""
    if mode is not None:
        raise ConfigError(f"torch.compile(mode={mode!r}) is not used by the zero backend; "
                          f"drop mode= and put settings in options={{'config': ...}}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ConfigError(f"unknown zero backend option(s) {unknown}; "
                          f"allowed: {list(OPTION_KEYS)}")
    runtime = options.get("runtime")
    config = Config.from_any(options.get("config"))
    if runtime is not None:
        if options.get("config") is not None and config != runtime.config:
            raise ConfigError("options 'config' differs from the config the ZeroRuntime was "
                              "built with; pass only options={'runtime': rt}")
        config = runtime.config
    warn_reentrant_checkpoint(gm)
    comp = _prepare(gm, example_inputs, config, tuple(options.get("extra_passes", ())),
                    runtime)
    return aot_autograd(
        # Inductor lowers only graphs decomposed with its own table. Without tensor
        # parallelism the passes see the decomposed graph it will compile; with it they see
        # the ops their sharding rules name (a cross-entropy, a slice's backward, as in
        # eager) and the table is applied after them (_decompose_after_passes).
        decompositions=_inductor_decompositions()
        if comp.config.zerofx.inductor and not _passes_before_decomposing(comp.config) else {},
        fw_compiler=lambda g, ins: _compile_graph(g, ins, comp, "forward"),
        bw_compiler=lambda g, ins: _compile_graph(g, ins, comp, "backward"),
        inference_compiler=lambda g, ins: _compile_graph(g, ins, comp, "inference"),
        partition_fn=lambda joint, ins, **kw: _partition(joint, ins, comp, **kw),
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


def _inductor_decompositions():
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def _passes_before_decomposing(config: Config) -> bool:
    """Whether the passes run on undecomposed graphs under Inductor: with tensor
    parallelism, whose rules (and the vocabulary-parallel cross-entropy) are written for
    the ops models call; Inductor's table would hand them amax/gather/slice_scatter."""
    return config.tensor_parallel.size > 1


def _decompose_after_passes(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` traced again through Inductor's decomposition table, on its own fake inputs:
    the graph Inductor would have been given had it been decomposed first, with the passes'
    changes in it (zerofx's ops and functional collectives pass through unchanged)."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    with detect_fake_mode(vals):
        return make_fx(gm, decomposition_table=_inductor_decompositions())(*vals)


def _prepare(gm, example_inputs, config: Config, extra, runtime) -> Compilation:
    if config.tensor_parallel.size > 1 and runtime is None:
        raise ConfigError("tensor_parallel.size > 1 needs zerofx to hold the split weights: "
                          "use zerofx.initialize(model=..., config=...), or pass "
                          "options={'runtime': ZeroRuntime(model, config)}")
    world = init_distributed()
    roles = input_roles(gm, example_inputs, runtime=runtime)
    params = [(r.name, t) for r, t in zip(roles, _flat_inputs(gm, example_inputs))
              if r.kind == "param"]
    # With a runtime, its plan (made from the whole model) is the one layout everyone uses.
    plan = runtime.plan if runtime is not None else \
        make_plan(params, config, rank=world.rank, world_size=world.world_size)
    cid = CompileContext.current_compile_id()
    graph_id = "g" + re.sub(r"[^0-9]+", "_", str(cid)).strip("_") if cid else "g"
    dump_root = dump_root_of(config)
    passes = build_pipeline(config, extra=extra, with_runtime=runtime is not None)
    comp = Compilation(config, plan, passes, roles, graph_id, world.rank, dump_root, runtime,
                       tuple(params))
    if dump_root:
        try:
            gd = GraphDump.create(dump_root, rank=world.rank, graph=graph_id)
        except OSError as e:
            raise ConfigError(f"zerofx.dump_dir (or ZEROFX_DUMP) {dump_root!r} cannot be "
                              f"written ({e.strerror}); pick a writable directory") from None
        forms = runtime.comm.forms if runtime is not None else {}
        reduce = forms["reduce"].form if "reduce" in forms else None
        gd.write_text("plan.txt", plan.describe(reduce) + "\n" +
                      (runtime.describe_forms() if runtime is not None else "") +
                      _describe_matmul_forms(config, runtime))
        gd.write_text("graph.txt", describe_graph(graph_id, roles, plan, _break_reason()))
    if runtime is not None:
        if dump_root:
            runtime.log_comm_to(dump_root)  # rank<r>/comm_measured.txt, written as it trains
        offer_step_program(runtime, passes, dump_root=dump_root, graph_id=graph_id)
    log.info("zero backend: compiling %s (%d inputs, %d params, passes: %s)", graph_id,
             len(roles), len(params), ", ".join(p.name for p in comp.passes) or "none")
    return comp


def dump_root_of(config: Config) -> str | None:
    """Where graph dumps go: $ZEROFX_DUMP, else the config's zerofx.dump_dir (None: off)."""
    return os.environ.get(DUMP_ENV) or config.zerofx.dump_dir


def offer_step_program(runtime, passes, *, dump_root: str | None, graph_id: str,
                       fallback: bool = False) -> None:
    """Offer ``runtime`` how to trace its optimizer-step graph through ``passes``: traced at
    the first step, outside Dynamo's tracing context (whose fake mode would make the step's
    buffer sizes symbolic). ``fallback``: the engine's offer, for a model Dynamo compiles
    nothing of."""
    from zerofx.step_graph import build_step_program

    runtime.offer_step_builder(functools.partial(
        build_step_program, runtime, passes=passes, dump_root=dump_root, graph_id=graph_id),
        fallback=fallback)


def _describe_matmul_forms(config: Config, runtime) -> str:
    """plan.txt's line on how CPU bf16/fp16 matmuls run (the matmul_form pass), and who
    decided it; empty in fp32."""
    if not (config.bf16.enabled or config.fp16.enabled):
        return ""
    pin = config.zerofx.matmul_form
    forms, whose = (runtime.matmul_forms, "rank 0's") if runtime is not None \
        else (host_forms(pin), "this host's")
    return "\n" + describe_cpu_gemm(forms, source=f"{whose} CPU, zerofx.matmul_form {pin}") \
        + "\n"


def _break_reason() -> str | None:
    """Why Dynamo ended this graph here: its reason and the model's file:line (None when
    the graph ends at the function's return)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        reason = InstructionTranslator.current_tx().output.compile_subgraph_reason
    except Exception:  # noqa: BLE001 - a private API: the dump goes on without it
        return None
    if reason is None or not reason.graph_break:
        return None
    where = [f"{f.filename}:{f.lineno}" for f in reason.user_stack][-1:] or ["?"]
    return f"{reason.reason.strip().splitlines()[0]} at {where[0]}"


def describe_graph(graph_id: str, roles, plan: Plan, reason: str | None) -> str:
    """graph.txt: where this graph ends and which trained parameters it owns."""
    planned = {s.name for s in plan.params}
    owned = [r.name for r in roles if r.kind == "param" and r.name in planned]
    end = f"ends at a graph break: {reason}" if reason else "ends at the function's return"
    lines = [f"graph {graph_id}: {end}",
             f"trained parameters in this graph: {len(owned)} of {len(plan.params)}",
             *(f"  {n}" for n in owned)]
    return "\n".join(lines) + "\n"


def _flat_inputs(gm: fx.GraphModule, example_inputs) -> list:
    # aot_module_simplified lifts the graph module's own parameters and buffers first (only
    # present when Dynamo does not inline nn.Modules), then the graph's inputs.
    return [*gm.parameters(), *gm.buffers(), *example_inputs]


def input_roles(gm: fx.GraphModule, example_inputs, *, runtime=None) -> tuple[InputRole, ...]:
    """Role and name of each flat AOTAutograd input, in order.

    A parameter is named by identity when a runtime holds it (the graph may reach a tied
    weight or an alias under another attribute path); else by Dynamo's source.
    """
    def param(tensor, source: str) -> InputRole:
        name = runtime.param_name(tensor) if runtime is not None else None
        return InputRole("param", name or source)

    roles = [param(t, n) for n, t in gm.named_parameters()]
    roles += [InputRole("buffer", n) for n, _ in gm.named_buffers()]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        grapharg = node.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None else node.name
        source = source() if callable(source) else source
        if isinstance(value, torch.nn.Parameter):
            roles.append(param(value, _fqn(source, "_parameters")))
        elif "_buffers[" in source:
            roles.append(InputRole("buffer", _fqn(source, "_buffers")))
        else:
            roles.append(InputRole("input", source))
    return tuple(roles)


def _fqn(source: str, leaf: str) -> str:
    """L['self']._modules['fc1']._parameters['weight'] -> fc1.weight"""
    parts = re.findall(r"(?:_modules|%s)\['([^']+)'\]" % leaf, source)
    return ".".join(parts) if parts else source


def _partition(joint: fx.GraphModule, joint_inputs, comp: Compilation, **kw):
    if comp.runtime is None:  # a training graph without zerofx's training state
        check_plain_training(comp.config)
        _plain_data_parallel(comp)
    num_fwd = kw["num_fwd_outputs"]
    _annotate(joint, comp.roles, tangents=True)
    refuse_sparse_graph(joint, num_fwd,
                        lambda n: getattr(n.meta.get(META_INPUT), "name", n.name))
    joint = _run(joint, comp, "joint", num_fwd_outputs=num_fwd)
    fw, bw = partitioner(comp.config)(joint, joint_inputs, **kw)
    return _run_pair((fw, bw), comp, num_fwd_outputs=num_fwd)


def _plain_data_parallel(comp: Compilation) -> None:
    """On several ranks, average this graph's parameter gradients as DDP does."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from zerofx.runtime import plain_dp

        plain_dp.attach(comp.params, module=_frame_module(),
                        bucket_numel=comp.config.zero_optimization.reduce_bucket_size)


def _frame_module():
    """The nn.Module whose forward Dynamo is compiling (the frame's ``self``), if any."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        owner = InstructionTranslator.current_tx().f_locals.get("self")
    except Exception:  # noqa: BLE001 - a private API: fall back to the graph's own inputs
        return None
    return owner if isinstance(owner, torch.nn.Module) else None


def check_plain_training(config: Config) -> None:
    """Training with plain torch.compile(backend="zero"): refuse, in one error, everything
    it would not do. Without a ZeroRuntime gradients are averaged across ranks (DDP's
    data parallelism, runtime/plain_dp.py) and stepped by the user's own optimizer; no config
    optimizer, schedule, loss scale or ZeRO sharding exists, so going on would train wrong."""
    ignored = [what for what, on in (
        ("the optimizer block (step your own torch optimizer)", config.optimizer is not None),
        ("the scheduler block", config.scheduler is not None),
        (f"zero_optimization.stage {config.zero_optimization.stage}",
         config.zero_optimization.stage >= 1),
        ("fp16 loss scaling (set fp16.loss_scale 1 to train fp16 without it)",
         config.fp16.enabled and config.fp16.loss_scale != 1.0),
        ("gradient_clipping (call torch.nn.utils.clip_grad_norm_ after backward)",
         bool(config.gradient_clipping)),  # given: None leaves it to the loop
        ("gradient_accumulation_steps > 1 (accumulate in your loop, inside "
         "zerofx.no_sync(model) but for the last micro-batch)",
         (config.gradient_accumulation_steps or 1) > 1),
    ) if on]
    if ignored:
        raise ConfigError(
            "plain torch.compile(model, backend='zero') applies the casts and averages "
            "gradients across ranks; your loop and optimizer do the rest, so it cannot "
            f"apply: {'; '.join(ignored)}. Use engine, *_ = zerofx.initialize("
            "model=model, config=cfg) (engine(x), engine.backward(loss), engine.step()), or "
            "rt = zerofx.ZeroRuntime(model, cfg) with options={'runtime': rt} and "
            "rt.backward(loss); rt.step()")


def _compile_graph(gm: fx.GraphModule, example_inputs, comp: Compilation, kind: str):
    if kind == "inference":
        _annotate(gm, comp.roles, tangents=False)
    gm = _run(gm, comp, kind)
    if comp.config.zerofx.inductor:
        from torch._inductor.compile_fx import compile_fx_inner

        if _passes_before_decomposing(comp.config):
            gm = _decompose_after_passes(gm)
        return compile_fx_inner(gm, example_inputs, is_backward=kind == "backward",
                                is_inference=kind == "inference")
    return make_boxed_func(gm.forward)


def _context(comp: Compilation, kind: str, **facts) -> PassContext:
    rt = comp.runtime
    return PassContext(comp.config, comp.plan, kind, f"{comp.graph_id}_{kind}",
                       state_id=rt.id if rt is not None else None, roles=comp.roles,
                       tp_group=rt.tp_group_name if rt is not None else None,
                       **(rt.pass_facts() if rt is not None else {}), **facts)


def _run_pair(pair, comp: Compilation, **facts):
    dump = GraphDump.create(comp.dump_root, rank=comp.rank, graph=comp.graph_id,
                            kind="partitioned") if comp.dump_root else None
    return run_partitioned(pair, _context(comp, "partitioned", **facts), comp.passes,
                           dump=dump)


def _run(gm: fx.GraphModule, comp: Compilation, kind: str, **facts) -> fx.GraphModule:
    ctx = _context(comp, kind, **facts)
    dump = GraphDump.create(comp.dump_root, rank=comp.rank, graph=comp.graph_id, kind=kind) \
        if comp.dump_root else None
    return run_pipeline(gm, ctx, comp.passes, dump=dump)


def _annotate(gm: fx.GraphModule, roles, *, tangents: bool) -> None:
    """Mark placeholders with their InputRole; partitioning carries the meta to both halves."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    primals = [n for n in placeholders if not n.name.startswith("tangents")]
    for node, role in zip(primals, roles):
        node.meta[META_INPUT] = role
    if tangents:
        for i, node in enumerate(p for p in placeholders if p.name.startswith("tangents")):
            node.meta[META_INPUT] = InputRole("tangent", str(i))


def _register_by_name() -> None:
    """Register ``backend="zero"`` at import when no entry point serves it. The entry point
    exists only once the package is installed; a checkout on PYTHONPATH (a shared file
    system on a cluster, a lent GPU machine) had every ``zerofx.initialize`` die in torch's
    InvalidBackend. Where the entry point exists this module is what it loads, and torch
    registers the name itself right after: registering here too would be a duplicate."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if "zero" in registry._COMPILER_FNS or \
            "zero" in entry_points(group="torch_dynamo_backends").names:
        return
    registry.register_backend(zero_backend, name="zero")


_register_by_name()
