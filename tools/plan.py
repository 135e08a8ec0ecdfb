"""zerofx-plan: whether a job fits, per rank, before any machine is rented.

    zerofx-plan --config ds.json --model my_models:build --world 64 --micro_batch 1 --seq 4096
    zerofx-plan --config ds.json --model my_models:build --inputs my_models:batch --world 8

``--model MODULE:FUNCTION`` builds the model (called with no arguments, under a fake-tensor
mode: no weights are allocated, so a 70B model plans on one CPU). Its inputs: a Hugging Face
model's own (token ids of --micro_batch x --seq, labels for its task), or ``--inputs
MODULE:FUNCTION`` returning one micro-batch (a dict of keyword arguments or a tuple).
Prints rank 0's parameters, gradients, optimizer states, the step's temporary, the
activations saved for the backward (from the partitioned graphs: casts, checkpointing and
zerofx.activation_memory_budget included), ZeRO-3's gathered parameters and the peak; with
``--memory GiB``, whether it fits and what to change. Then the predicted step time on
``--device`` (h100, h200, or this-host: timed here, the default): each op of the graphs
priced by its class (matmul, attention, copy, cast, arithmetic, transcendental, reduction,
softmax, norm, lookup, scatter) at the device's rates, the ops' dispatch, page faults, the
optimizer step and the collectives the plan implies (zerofx/planner/step_time.py,
rates.py), with the items that dominate.

Offload (zerofx/planner/offload.py): with offload_optimizer or offload_param on NVMe the
rows hold what stays in memory (the chunk and read buffers, the step's read of the
parameter shard) and a row "on NVMe" the files' bytes per rank; the step time adds the
state the step reads and writes at the disk's bandwidth (``--disk-gbps``, else timed under
the nvme_path). With ``--device h100``/``h200`` and offload_optimizer device cpu the rows
are the GPU's, and the host memory the state takes is its own row.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from tabulate import tabulate

GIB = float(1 << 30)


def _load(spec: str, what: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise SystemExit(f"zerofx-plan: {what} {spec!r} is not MODULE:FUNCTION (e.g. "
                         f"my_models:build)")
    sys.path.insert(0, "")  # the current directory, as `python -m` would
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"zerofx-plan: cannot load {what} {spec!r}: {e}") from None
    if not callable(fn):
        raise SystemExit(f"zerofx-plan: {what} {spec!r} is not callable")
    return fn


def _inputs(args):
    """One micro-batch, or a function making it from the model the planner builds (so the
    model, which may be 70B parameters of fake tensors, is built once)."""
    if args.inputs:
        return _load(args.inputs, "--inputs")()
    from zerofx.tp.layout import hf_example

    def made_for(model):
        example = hf_example(model, batch=args.micro_batch, seq=args.seq)
        if example is None:
            raise SystemExit("zerofx-plan: the model is not a Hugging Face model whose "
                             "inputs zerofx can make; pass --inputs MODULE:FUNCTION returning "
                             "one micro-batch (a dict of keyword arguments or a tuple)")
        return example
    return made_for


def advice(mem, config, limit: float, *, gpu: bool = False, dp: int = 1) -> list[str]:
    """What would bring the peak under ``limit`` bytes, largest lever first; ``gpu``: the
    ranks are GPUs; ``dp``: data-parallel ranks."""
    out = []
    zero = config.zero_optimization
    stage = zero.stage
    if stage < 3 and mem.parameters + mem.gradients + mem.optimizer > 0.3 * limit:
        out.append(f"a higher ZeRO stage (now {stage}) shards more of the model states")
    if mem.model_states > 0.3 * limit:
        out += _offload_advice(mem, zero, gpu=gpu, dp=dp)
    if mem.activations + mem.working > 0.3 * limit:
        out.append("a lower zerofx.activation_memory_budget (recompute in the backward), "
                   "activation checkpointing, or a smaller --micro_batch / --seq")
    if mem.gathered > 0.2 * limit:
        out.append("a lower zero_optimization.stage3_max_live_parameters")
    return out or ["more ranks, or tensor parallelism (tensor_parallel.size)"]


def _offload_advice(mem, zero, *, gpu: bool, dp: int) -> list[str]:
    """Offload, where the model states do not fit and the run may take it."""
    out = []
    if zero.stage >= 1 and zero.offload_optimizer.device == "none" and mem.optimizer:
        where = ("device cpu: the state in host memory" if gpu else
                 "device nvme: the state in a file, streamed by each step")
        out.append(f"zero_optimization.offload_optimizer ({where}) takes the "
                   f"{mem.optimizer / GIB:.2f} GiB of optimizer states out of memory")
    if not gpu and zero.stage == 3 and dp >= 2 and zero.offload_param.device == "none":
        out.append("zero_optimization.offload_param device nvme keeps the 16-bit parameter "
                   "shard in a file between uses (the optimizer step writes it back by chunk)")
    return out


def time_report(step) -> str:
    """The predicted step and its largest items."""
    lines = [f"step time on {step.device.name} ({step.device.source}): {step.ms:.4g} ms "
             f"predicted; largest items:"]
    lines += [f"  {ms:10.2f} ms  {what}" + ("  (overlaps compute)" if ov else "")
              for what, ms, ov in step.top()]
    return "\n".join(lines)


def report(mem, plan, config, memory_gib: float | None, *, gpu: bool = False) -> str:
    rows = [(kind, f"{n / GIB:.3f}", f"{n / 2**20:.1f}") for kind, n in mem.rows()]
    text = (f"rank 0 of {plan.grid.world_size} (data-parallel {plan.grid.dp_size}, "
            f"tensor-parallel {plan.grid.tp_size}), ZeRO stage {plan.zero_stage}, "
            f"{plan.compute_dtype}\n" + tabulate(rows, headers=["per rank", "GiB", "MiB"]))
    if plan.grid.tp_size > 1:  # what the layout split, and what it could not (never silent)
        text += (f"\ntensor-parallel layout: {len(plan.tp_choices)} layer(s) split, "
                 f"{len(plan.tp_left_whole)} weight(s) left whole")
        text += "".join(f"\n  whole: {n} ({why})" for n, why in plan.tp_left_whole[:10])
    if memory_gib is not None:
        limit = memory_gib * GIB
        if mem.peak <= limit:
            text += f"\nfits in {memory_gib:g} GiB ({mem.peak / limit:.0%} of it)"
        else:
            text += (f"\ndoes NOT fit in {memory_gib:g} GiB (peak {mem.peak / GIB:.2f} GiB); "
                     f"try: " + "; ".join(advice(mem, config, limit, gpu=gpu,
                                                 dp=plan.grid.dp_size)))
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="zerofx-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the DeepSpeed JSON config")
    p.add_argument("--model", required=True, help="MODULE:FUNCTION building the model")
    p.add_argument("--inputs", help="MODULE:FUNCTION returning one micro-batch")
    p.add_argument("--world", type=int, default=1, help="ranks in the job (default 1)")
    p.add_argument("--micro_batch", type=int, default=None, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    p.add_argument("--memory", type=float, default=None, help="GiB per rank to fit in")
    p.add_argument("--device", default="this-host",
                   help="what the step time is predicted on: h100, h200 or this-host "
                        "(timed here; the default)")
    p.add_argument("--disk-gbps", type=float, default=None,
                   help="NVMe offload: the disk's bandwidth in GB/s (default: timed under "
                        "the config's nvme_path, ~0.1 s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from zerofx.config import ConfigError
    from zerofx.planner import plan_rank, read_config
    from zerofx.planner.step_time import (DEVICES, GPUS, device_named, disk_of,
                                          predict_step_time)

    if args.world < 1:
        raise SystemExit(f"zerofx-plan: --world {args.world}: at least 1 rank")
    if args.device not in DEVICES:
        raise SystemExit(f"zerofx-plan: --device {args.device!r} is not a device zerofx-plan "
                         f"knows; use one of {', '.join(DEVICES)} (this-host times this "
                         f"machine)")
    build = _load(args.model, "--model")
    shm = args.device == "this-host"  # a CPU job here: gloo, ranks share the host
    gpu = args.device in GPUS
    if args.disk_gbps is not None and args.disk_gbps <= 0:
        raise SystemExit(f"zerofx-plan: --disk-gbps {args.disk_gbps:g}: a bandwidth > 0")
    try:
        config = read_config(args.config, gpu=gpu)
        mem, plan = plan_rank(build, config, _inputs(args), world=args.world, shm=shm,
                              gpu=gpu)
        device = device_named(args.device, dtype=plan.compute_dtype, ranks_here=args.world)
        disk = None
        if mem.offload.optimizer_nvme or mem.offload.params_nvme:
            disk = disk_of(mem, config, ranks_here=args.world, gbps=args.disk_gbps)
        step = predict_step_time(mem, plan, config, device, shm=shm, disk=disk)
    except ConfigError as e:
        print(f"zerofx-plan: {e}", file=sys.stderr)
        return 2
    print(report(mem, plan, config, args.memory, gpu=gpu))
    print(time_report(step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
