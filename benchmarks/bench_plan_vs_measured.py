"""zerofx-plan's predictions against real training steps on this host.

    python benchmarks/bench_plan_vs_measured.py [--ranks 2 4] [--time_ranks 1 2] [--steps 3]
        [--only memory|time] [--case NAME] [--layers 2 4 8 12] [--hidden 256 512]
        [--save FILE] [--replay FILE ...]

``--layers``/``--hidden``: the memory table at each depth and width (the depth sweep: what
grows with the layers). ``--save`` appends each config's measurements to a file;
``--replay`` reads them back and predicts again (the same runs against a changed planner).

All sizes in MiB. Model: a Hugging Face GPT-2 built from a config (no download): 4 layers,
hidden 512, 8 heads, vocabulary 8192, micro-batch 4 x 256 tokens, bf16, AdamW; about 17M
parameters. Configs: ZeRO stages 1, 2 and 3, each with and without activation
checkpointing (Hugging Face's ``gradient_checkpointing_enable()``), and tensor parallelism 2
(stage 1, over the TP x DP grid) on 2 and 4 ranks.

Predicted: ``zerofx.planner.plan_rank`` (what ``zerofx-plan`` prints), in this process, for
rank 0 of the same world. Measured, per rank in fresh spawned processes (``run_ranks(...,
fresh=True)``):

    peak   the process's resident-set high-water mark (VmHWM) during training steps 2..k,
           minus its resident set before the model is built. Why RSS: torch's CPU tensors
           come from glibc's malloc, outside Python's allocator (tracemalloc cannot see
           them) and outside any torch peak counter (the CPU allocator keeps none unless
           the profiler runs); RSS is what the operating system charges the job. Two
           precautions keep it close to the bytes alive: malloc's mmap threshold is fixed
           at 64 KiB (``mallopt``), so a freed tensor goes back to the kernel at once
           instead of staying in a heap arena glibc has grown; and before the baseline is
           read, the rank compiles and trains a one-layer toy through the same engine and
           config, so zerofx's and the compiler's code, imports and caches are in the
           baseline and not counted as the model's. The high-water mark is reset
           (``/proc/self/clear_refs``) as each phase of a step starts (forward, backward,
           optimizer step), so each phase's peak is read apart; step 1 (the compile) is
           not counted.
    held   the resident set between steps (after step k) minus the same baseline: the
           model states and whatever else outlives a step, to say which component errs.
    tensors  the bytes of tensors alive, read two ways: between steps, every CPU tensor
           storage Python can reach (each once), minus those alive at the baseline (the
           warm-up's engine stays alive after ``del``); and within one more step, the
           allocator's allocation events under the profiler (``profile_memory``), the most
           bytes allocated beyond the step's start in each phase. Their sum is the bytes of
           tensors at each phase's peak: what the planner models, without the RSS's pages
           that are not tensors (the compiled graphs' Python objects, malloc's own).

The memory table is the largest rank's measured value against rank 0's prediction (ranks
differ by a bucket's padding only). The time table (1 and 2 ranks): ``predict_step_time`` on
``measure_host`` (one thread, as each rank has) against the slowest rank's steps in CPU
time (least and median) and wall time, timed in their own fresh ranks without the memory
runs' fixed mmap threshold (which makes every tensor fault fresh pages).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from multiproc import run_ranks  # noqa: E402  (the tests' N-process runner)

from zerofx.runtime.host_memory import process_status  # noqa: E402

MIB = float(1 << 20)
VOCAB, SEQ, MICRO, HIDDEN, LAYERS, HEADS = 8192, 256, 4, 512, 4, 8


def build(checkpointing: bool = False, *, hidden: int = HIDDEN, layers: int = LAYERS):
    import transformers as T

    model = T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=hidden, n_layer=layers, n_head=HEADS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


def batch(step: int = 0, micro: int = MICRO, seq: int = SEQ) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (micro, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def config(stage: int, tp: int = 1, micro: int = MICRO) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": micro, "bf16": {"enabled": True},
           "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": stage}}
    if tp > 1:
        cfg["tensor_parallel"] = {"size": tp}
    return cfg


CASES = [(f"stage {s}" + (", checkpointing" if ck else ""), s, ck, 1)
         for s in (1, 2, 3) for ck in (False, True)] + [("stage 1, TP 2", 1, False, 2)]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    hwm = (process_status() or {}).get("VmHWM")
    if hwm is None:
        raise RuntimeError("no VmHWM in /proc/self/status")
    return hwm


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (Linux >= 4.0)
        f.write("5")


def _train(model, cfg, steps, *, base=None):
    """Train ``steps`` steps; with ``base``, each phase's RSS high-water mark over it (the
    mark reset as the phase starts), the most over steps 2..k."""
    import zerofx

    engine, *_ = zerofx.initialize(model=model, config=cfg)
    times, cpu, peaks = [], [], {"forward": 0, "backward": 0, "step": 0}
    for i in range(steps):
        marks = {}
        t0, c0 = time.perf_counter(), time.process_time()
        _reset_hwm()
        loss = engine(**batch(i + 1, cfg["train_micro_batch_size_per_gpu"])).loss
        marks["forward"] = _hwm()
        _reset_hwm()
        engine.backward(loss)
        marks["backward"] = _hwm()
        _reset_hwm()
        engine.step()
        marks["step"] = _hwm()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if i > 0 and base is not None:
            peaks = {k: max(v, marks[k] - base) for k, v in peaks.items()}
    return engine, (times, cpu), peaks


def _measure(rank, world, stage, checkpointing, tp, steps, hidden=HIDDEN, layers=LAYERS):
    """({phase: peak bytes over baseline}, held bytes over baseline, tensor bytes held,
    step seconds of steps 2..k, {phase: tensor bytes over the step's start}, step CPU
    seconds of steps 2..k (all the process's threads)) of this rank."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: fixed, so freed tensors are unmapped
    torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    # warm-up: the engine, the passes and the compiler loaded and run once on the same
    # model at one layer of a tiny width (the same graphs' code paths and caches; one layer,
    # so the heap a deeper warm-up's compile leaves behind does not hide what depth costs)
    engine, *_ = _train(build(checkpointing, hidden=64, layers=1), config(stage, tp, 1), 1)
    del engine
    torch._dynamo.reset()
    gc.collect()
    base, base_tensors = _rss(), _tensor_bytes()  # the warm-up's engine outlives its del
    torch.manual_seed(0)
    model = build(checkpointing, hidden=hidden, layers=layers)
    engine, (times, cpu), peaks = _train(model, config(stage, tp), steps, base=base)
    del model
    gc.collect()
    held, tensors = _rss() - base, _tensor_bytes() - base_tensors
    return (peaks, held, tensors, times[1:], _tensor_peaks(engine, steps + 1), cpu[1:])


def _tensor_peaks(engine, seed) -> dict:
    """The most bytes of tensors the allocator holds beyond those alive at the step's start,
    per phase of one more step, from the profiler's allocation events (profile_memory)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("phase:forward"):
            loss = engine(**batch(seed)).loss
        with record_function("phase:backward"):
            engine.backward(loss)
        del loss
        with record_function("phase:step"):
            engine.step()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    allocated = [(e["ts"], e["args"]["Total Allocated"]) for e in events
                 if e.get("name") == "[memory]"]
    peaks = {}
    for e in events:
        if e.get("name", "").startswith("phase:"):
            t0, t1 = e["ts"], e["ts"] + e.get("dur", 0)
            peaks[e["name"][6:]] = max((a for t, a in allocated if t0 <= t <= t1), default=0)
    return peaks


def _tensor_bytes() -> int:
    """Bytes of the CPU tensor storages Python can reach (each once)."""
    seen = {}
    for o in gc.get_objects():
        if type(o) in (torch.Tensor, torch.nn.Parameter) and o.device.type == "cpu":
            try:
                s = o.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
            except RuntimeError:  # a fake tensor the compiler keeps: no storage
                pass
    return sum(seen.values())


_RUNS: dict = {}  # (ranks, config name, hidden, layers) -> (prediction, plan, measurements)
_MEASURED: dict = {}  # the same keys -> the ranks' measurements, read by --replay
_SAVE: list = []  # --save: the file each measurement is appended to (a JSON line)


def run(n, name, stage, ck, tp, steps, hidden=HIDDEN, layers=LAYERS):
    """zerofx-plan's prediction and the measured ranks of one config, once per invocation."""
    key = (n, name, hidden, layers)
    if key not in _RUNS:
        from zerofx.planner import plan_rank

        print(f"running {name} at {layers} x {hidden} on {n} rank(s) ...", file=sys.stderr,
              flush=True)
        mem, plan = plan_rank(lambda: build(ck, hidden=hidden, layers=layers),
                              config(stage, tp), batch(), world=n,
                              shm=True)  # the ranks share this host: the shm form is offered
        if key in _MEASURED:  # --replay: measured before, predicted by this planner now
            res = _MEASURED[key]
        else:
            res = run_ranks(_measure, n, args=(stage, ck, tp, steps, hidden, layers),
                            timeout_s=900, fresh=True)
            if _SAVE:
                with open(_SAVE[0], "a") as f:
                    f.write(json.dumps([list(key), res]) + "\n")
        _RUNS[key] = mem, plan, res
    return _RUNS[key]


def predicted_phases(mem) -> dict:
    """Predicted bytes over the baseline at each phase's peak (zerofx/planner/memory.py)."""
    held = mem.model_states + mem.comm_buffers + mem.compiled
    before, fw, bw = 0, 0, 0
    for g in mem.graphs:
        fw, bw = max(fw, before + g.fw_peak), max(bw, before + g.bw_peak)
        before += g.saved
    return {"forward": held + fw + mem.gathered, "backward": held + bw + mem.gathered,
            "step": held + mem.step_temporary}


def memory_table(ranks, steps, shapes=((LAYERS, HIDDEN),)):
    """One row per (ranks, layers x hidden, config): rank 0's prediction against the largest
    rank's measured peaks."""
    print("| config | ranks | layers x hidden | predicted peak | measured peak (RSS) | error | "
          "measured peak (tensors) | error | held between steps: predicted / RSS (tensors) | "
          "forward peak: pred. / RSS / tensors | backward peak: pred. / RSS / tensors | step "
          "peak: pred. / RSS / tensors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in ranks:
        for layers, hidden in shapes:
            for name, stage, ck, tp in CASES:
                if n % tp:
                    continue
                mem, _, res = run(n, name, stage, ck, tp, steps, hidden, layers)
                print(_memory_row(name, n, f"{layers} x {hidden}", mem, res), flush=True)


def _memory_row(name, n, shape, mem, res) -> str:
    top = max(res, key=lambda r: max(r[0].values()))
    phases, held, tensors, _, transient, _ = top
    live = {k: tensors + v for k, v in transient.items()}  # tensor bytes at each peak
    peak, tpeak = max(phases.values()), max(live.values())
    pred = predicted_phases(mem)
    assert max(pred.values()) == mem.peak
    cols = " | ".join(f"{pred[k] / MIB:.1f} / {phases[k] / MIB:.1f} / {live[k] / MIB:.1f}"
                      for k in ("forward", "backward", "step"))
    return (f"| {name} | {n} | {shape} | {mem.peak / MIB:.1f} | {peak / MIB:.1f} | "
            f"{(mem.peak - peak) / peak:+.1%} | {tpeak / MIB:.1f} | "
            f"{(mem.peak - tpeak) / tpeak:+.1%} | "
            f"{(mem.model_states + mem.comm_buffers + mem.compiled) / MIB:.1f} / "
            f"{held / MIB:.1f} "
            f"({tensors / MIB:.1f}) | {cols} |")


def _time_rank(rank, world, stage, checkpointing, tp, steps):
    """(wall seconds, CPU seconds, minor page faults) of each training step 2..k of this
    rank, in a fresh process with glibc's allocator as it comes (the memory runs fix its
    mmap threshold, which makes every tensor fault fresh pages: not a training run's cost)."""
    import resource

    import zerofx

    torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = config(stage, tp)
    engine, *_ = zerofx.initialize(model=build(checkpointing), config=cfg)
    out = []
    for i in range(steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0, c0 = time.perf_counter(), time.process_time()
        loss = engine(**batch(i + 1, cfg["train_micro_batch_size_per_gpu"])).loss
        engine.backward(loss)
        engine.step()
        out.append((time.perf_counter() - t0, time.process_time() - c0,
                    resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
    return out[1:]


def _flat_rates() -> tuple[float, float]:
    """The first planner's this-host rates (before issue 30's per-class pricing): a 1024^3
    bf16 matmul and a 64 MiB fp32 copy, best of 5 in wall time, one thread."""
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024).to(torch.bfloat16), torch.randn(1024, 1024).to(
        torch.bfloat16)
    src = torch.ones(1 << 24)
    dst = torch.empty_like(src)
    best = []
    for fn in (lambda: torch.mm(a, b), lambda: dst.copy_(src)):
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best.append(min(times))
    return 2 * 1024 ** 3 / best[0], 2 * src.nbytes / best[1]


def flat_prediction(mem, plan, step, rates) -> float:
    """The first planner's step time, for the "before" column: FLOPs at the matmul rate,
    every other op's bytes and 32 bytes per optimizer element at the copy bandwidth, plus
    the same collectives as now."""
    flops, bandwidth = rates
    work = sum(g.fw_flops + g.bw_flops for g in mem.graphs) / flops + (
        sum(g.fw_moved + g.bw_moved for g in mem.graphs) + 32 * plan.shard_numel) / bandwidth
    comm = sum(ms for what, ms, _ in step.items if "MiB x" in what)
    return work * 1e3 + comm


def time_table(ranks, steps):
    """Predicted (zerofx-plan --device this-host, each rank on one thread as run_ranks
    gives it) vs measured step time of the slowest rank over steps 2..k: its least CPU time
    (all the rank's threads; what a rank costs with a core of its own, the least inflated
    by other processes on a shared host: the calibration takes the least too), its median
    CPU and wall time, and the fresh pages the prediction charges against the page faults
    counted."""
    from zerofx.config import Config
    from zerofx.planner import plan_rank
    from zerofx.planner.step_time import measure_host, predict_step_time

    device = measure_host(torch.bfloat16, threads=1)
    flat = _flat_rates()
    print(f"\nthis host: {device.source}; load average {os.getloadavg()[0]:.1f}; the first "
          f"planner's rates: matmul {flat[0] / 1e9:.0f} GFLOP/s, copy {flat[1] / 1e9:.1f} "
          f"GB/s\n")
    print("| config | ranks | predicted step (ms) | measured CPU, least (ms) | error | "
          "measured CPU, median (ms) | error | measured wall, median (ms) | first planner "
          "(ms) | error | fresh pages: predicted / faulted (MiB) | load | largest predicted "
          "items (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in ranks:
        for name, stage, ck, tp in CASES:
            if n % tp or (n == 1 and (stage > 1 or tp > 1)):
                continue  # one rank: no ZeRO stage or TP to tell apart
            print(f"timing {name} on {n} rank(s) ...", file=sys.stderr, flush=True)
            mem, plan = plan_rank(lambda: build(ck), config(stage, tp), batch(), world=n,
                                  shm=True)
            step = predict_step_time(mem, plan, Config.from_dict(config(stage, tp)), device,
                                     shm=True)
            res = run_ranks(_time_rank, n, args=(stage, ck, tp, max(steps, 4)),
                            timeout_s=900, fresh=True)
            load = os.getloadavg()[0]
            least = max(min(c for _, c, _ in r) for r in res) * 1e3
            cpu = max(statistics.median(c for _, c, _ in r) for r in res) * 1e3
            wall = max(statistics.median(w for w, _, _ in r) for r in res) * 1e3
            faults = max(statistics.median(f for _, _, f in r) for r in res)
            fresh = next((what for what, _, _ in step.items if what.startswith("fresh")), "")
            fresh = fresh.split("(")[1].split(" MiB")[0] if fresh else "0"
            top = "; ".join(f"{what.split(' (')[0]} {t:.0f}" for what, t, _ in step.top(4))
            label = name if n > 1 else name.replace("stage 1", "one rank")
            before = flat_prediction(mem, plan, step, flat)
            print(f"| {label} | {n} | {step.ms:.0f} | {least:.0f} | "
                  f"{(step.ms - least) / least:+.1%} | {cpu:.0f} | {(step.ms - cpu) / cpu:+.1%} "
                  f"| {wall:.0f} | {before:.0f} | {(before - least) / least:+.1%} "
                  f"| {fresh} / {faults * os.sysconf('SC_PAGE_SIZE') / MIB:.0f} "
                  f"| {load:.1f} | {top} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="*", default=[2, 4])
    p.add_argument("--time_ranks", type=int, nargs="*", default=[1, 2])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--only", choices=["memory", "time"])
    p.add_argument("--case", help="run only the configs whose name contains this")
    p.add_argument("--layers", type=int, nargs="*", default=[LAYERS],
                   help="the memory table's depths (each at every --hidden)")
    p.add_argument("--hidden", type=int, nargs="*", default=[HIDDEN])
    p.add_argument("--save", help="append each config's measurements to this file")
    p.add_argument("--replay", nargs="*", default=[],
                   help="take the measurements from these --save files (the prediction is "
                        "made again: the same runs against a changed planner)")
    args = p.parse_args(argv)
    _SAVE[:] = [args.save] if args.save else []
    for path in args.replay:
        with open(path) as f:
            for line in f:
                key, res = json.loads(line)
                _MEASURED[tuple(key)] = res
    if args.case:
        CASES[:] = [c for c in CASES if args.case in c[0]]
    if args.only != "time":
        memory_table(args.ranks, args.steps,
                     [(n, h) for h in args.hidden for n in args.layers])
    if args.only != "memory":
        time_table(args.time_ranks, args.steps)


if __name__ == "__main__":
    main()
