"""Per-phase anonymous memory of one size of bench_largest's GPT, zerofx stage 3 against FSDP2
(issue 30 item 3: why zerofx trains a smaller model in memory than FSDP2).

    python benchmarks/mem_phases.py --size 11 --methods zerofx fsdp2 [--profile]

Two ranks on gloo (bench_largest's set-ups, its environment). In each rank a thread reads
RssAnon (/proc/self/status) every 5 ms; at each phase's end the rank records the value then
and the peak since the previous mark: start (imports, process group), built (the model as
the method builds it: zerofx a whole fp32 model, FSDP2 its shard on meta), initialized
(zerofx.initialize / fully_shard + optimizer), then per step: forward, backward, step.
``--profile``: the last step runs under torch.profiler (rank 0, profile_memory): CPU time
and bytes allocated per op (where the step time goes), and the CPU allocator's own peak in
the step with the allocations alive at it, by the op that made them (what the peak is).
``--plan``: ZeRO-3's model-state formula and zerofx-plan's per-rank items beside them.
Results: benchmarks/RESULTS.md, "Why zerofx's stage 3 trained less than FSDP2".
Every number is a rank's own; rank 0's and rank 1's are printed side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_largest as bl  # noqa: E402
from rss_watchdog import run_watched  # noqa: E402

from zerofx.runtime.host_memory import process_status  # noqa: E402

MIB = float(1 << 20)


def rss_anon() -> int:
    return (process_status() or {}).get("RssAnon", 0)


class Phases:
    """RssAnon sampled every ``period`` s; ``mark(name)``: (now, peak since the last mark)."""

    def __init__(self, period: float = 0.005):
        self.peak, self.rows, self._stop = rss_anon(), [], False
        self._lock = threading.Lock()
        threading.Thread(target=self._run, args=(period,), daemon=True).start()

    def _run(self, period):
        while not self._stop:
            v = rss_anon()
            with self._lock:
                self.peak = max(self.peak, v)
            time.sleep(period)

    def mark(self, name: str) -> None:
        now = rss_anon()
        with self._lock:
            peak, self.peak = max(self.peak, now), now
        self.rows.append((name, now, peak))


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of tensors Python can reach (gc), a lower bound of what
    is held: autograd's saved tensors and C++-held buffers are not reachable this way."""
    import gc

    import torch
    seen, total = set(), 0
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu" and not o.is_meta:
                s = o.untyped_storage()
                if s.data_ptr() not in seen:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
        except Exception:  # noqa: BLE001 - fakes, subclasses without storage
            continue
    return total


def setup(method: str, args, ph: Phases):
    """(step parts: forward, backward, step) of ``method``, phases built/initialized marked."""
    if method == "fsdp2":
        model = bl.fsdp2_model(args)
        ph.mark("built")
        opt = bl._adamw(model.parameters())
        ph.mark("initialized")

        def step():
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, lambda loss: loss.backward(), step
    import zerofx
    model = bl.build_gpt(args.size, args.seq)
    if args.checkpointing:
        bl.checkpoint_blocks(model)
    ph.mark("built")
    zcfg = bl.zerofx_config("zerofx", args)
    zcfg["zerofx"]["host_mmap_threshold"] = (None if args.malloc[0] == "dynamic"
                                              else int(args.malloc[0]))
    engine, *_ = zerofx.initialize(model=model, config=zcfg)
    del model
    ph.mark("initialized")
    return engine, engine.backward, engine.step


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    ph = Phases()
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    ph.mark("start")
    torch.manual_seed(0)
    fwd, bwd, opt_step = setup(args.worker, args, ph)
    g = torch.Generator().manual_seed(1 + rank)
    rec, times = {"phases": ph.rows, "live": {}}, []
    for k in range(args.steps):
        idx = torch.randint(bl.VOCAB, (1, args.seq), generator=g)
        prof = None
        if args.profile and k == args.steps - 1 and rank == 0:  # a steady step
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                          profile_memory=True, with_stack=False)
            prof.__enter__()
        t0 = time.perf_counter()
        loss = fwd(idx, torch.roll(idx, -1, 1))
        ph.mark(f"s{k} forward")
        bwd(loss)
        ph.mark(f"s{k} backward")
        opt_step()
        ph.mark(f"s{k} step")
        times.append(time.perf_counter() - t0)
        if prof is not None:
            prof.__exit__(None, None, None)
            rec["profile"] = _profile_rows(prof)
        if k in (0, args.steps - 1):
            rec["live"][k] = live_tensor_bytes()
    rec["times"] = times
    with open(f"{args.result}.{rank}", "w") as f:
        json.dump(rec, f)
    dist.barrier()
    dist.destroy_process_group()


def _profile_rows(prof, top: int = 25) -> list:
    rows = []
    for e in prof.key_averages():
        rows.append((e.key, e.count, e.self_cpu_time_total / 1e6, e.cpu_time_total / 1e6,
                     getattr(e, "self_cpu_memory_usage", 0), getattr(e, "cpu_memory_usage", 0)))
    by_time = sorted(rows, key=lambda r: -r[2])[:top]
    by_mem = sorted(rows, key=lambda r: -r[4])[:top]
    return {"by_time": by_time, "by_mem": by_mem, "peak": live_at_peak(prof)}


def _chain(e) -> str:
    """The op that allocated, under its outermost op (a compiled graph, an optimizer step)."""
    names = []
    while e is not None:
        if not e.name.startswith("[memory]"):
            names.append(e.name)
        e = e.parent
    return " < ".join(names[:2] + names[-1:]) if len(names) > 2 else " < ".join(names or ["?"])


def live_at_peak(prof, top: int = 20) -> dict:
    """The allocator's peak in the profiled region (bytes allocated since profiling began,
    CPU allocator's own count) and the allocations alive at that moment, by op."""
    from torch._C._profiler import _EventType
    allocs, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        e = todo.pop()
        todo.extend(e.children)
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            allocs.append((e.start_time_ns, f.ptr, f.alloc_size, f.total_allocated, e))
    allocs.sort(key=lambda a: a[0])
    if not allocs:
        return {}
    at = max(range(len(allocs)), key=lambda i: allocs[i][3])
    live = {}
    for t, ptr, size, _, e in allocs[:at + 1]:
        if size > 0:
            live[ptr] = (size, _chain(e))
        else:
            live.pop(ptr, None)
    by_op: dict = {}
    for size, name in live.values():
        n, b = by_op.get(name, (0, 0))
        by_op[name] = (n + 1, b + size)
    first = allocs[0][3] - allocs[0][2]
    return {"peak": allocs[at][3] - first, "during": _chain(allocs[at][4]),
            "live": sorted(([k, n, b] for k, (n, b) in by_op.items()), key=lambda r: -r[2])[:top],
            "biggest": sorted(([b, k] for b, k in live.values()), reverse=True)[:top]}


def run(method: str, malloc: str, args) -> list:
    port = bl._free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method,
               "--size", str(args.size), "--seq", str(args.seq), "--steps", str(args.steps),
               "--budget", str(args.budget), "--checkpointing", str(args.checkpointing),
               "--result", out, "--malloc", malloc] + (["--profile"] if args.profile else [])
        # zerofx fixes it from its config (host_mmap_threshold); the peers' processes get
        # the same threshold through glibc's own variable
        fixed = {} if malloc == "dynamic" or method == "zerofx" else \
            {"MALLOC_MMAP_THRESHOLD_": malloc}
        envs = [dict(os.environ, **fixed, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                     LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                     OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
                for r in range(2)]
        res = run_watched([cmd, cmd], envs, int(args.memory_gib * bl.GIB), args.timeout)
        print(f"{method}, malloc {malloc}: both ranks' process trees, private bytes "
              f"(bench_largest's watchdog), peak {res['peak'] / bl.GIB:.2f} GiB", flush=True)
        recs = []
        for r in range(2):
            try:
                with open(f"{out}.{r}") as f:
                    recs.append(json.load(f))
            except FileNotFoundError:
                recs.append(None)
        if not res["ok"]:
            print(f"{method}: {res['reason']}", flush=True)
        return recs


def report(method: str, recs, args) -> None:
    print(f"\n## {method}, malloc {args.malloc_now}, size {args.size} "
          f"({bl.param_count(args.size, args.seq) / 1e6:.1f}M "
          f"parameters), RssAnon MiB per rank: value at the phase's end / peak in the phase")
    if recs[0] is None:
        print("no result")
        return
    for i, (name, now, peak) in enumerate(recs[0]["phases"]):
        other = recs[1]["phases"][i] if recs[1] else (name, 0, 0)
        print(f"  {name:16s} r0 {now / MIB:8.0f} / {peak / MIB:8.0f}   "
              f"r1 {other[1] / MIB:8.0f} / {other[2] / MIB:8.0f}")
    print("  live tensors reachable by gc (r0, MiB):",
          {k: round(v / MIB) for k, v in recs[0]["live"].items()})
    print("  step times (r0, s):", [round(t, 2) for t in recs[0]["times"]])
    prof = recs[0].get("profile")
    if prof:
        print("  profile of the last step (r0): op, calls, self CPU s, total CPU s, "
              "self MiB allocated, total MiB")
        pk = prof.get("peak") or {}
        print(f"  allocator peak in the step: {pk.get('peak', 0) / MIB:.0f} MiB above its "
              f"start, during {pk.get('during')}; alive then, by op (count, MiB):")
        for k, n, b in pk.get("live", []):
            print(f"    {k[:110]:110s} {n:5d} {b / MIB:9.1f}")
        print("  biggest single allocations alive at the peak (MiB):",
              [(round(b / MIB, 1), k.split(" < ")[0]) for b, k in pk.get("biggest", [])[:12]])
        for key in ("by_time", "by_mem"):
            print(f"  -- {key}")
            for k, n, st, tt, sm, tm in prof[key]:
                print(f"    {k[:60]:60s} {n:6d} {st:8.3f} {tt:8.3f} {sm / MIB:9.1f} "
                      f"{tm / MIB:9.1f}")


def formula(args) -> None:
    """ZeRO-3's model states per rank (16 bytes/param / 2) and zerofx-plan's per-rank items."""
    import torch

    from zerofx.planner import plan_rank
    n = bl.param_count(args.size, args.seq)
    print(f"ZeRO-3 model states per rank: 16 * {n / 1e6:.1f}M / 2 = {8 * n / MIB:.0f} MiB")

    def build():
        m = bl.build_gpt(args.size, args.seq)
        return bl.checkpoint_blocks(m) if args.checkpointing else m
    ids = torch.zeros(1, args.seq, dtype=torch.long)
    mem, _ = plan_rank(build, bl.zerofx_config("zerofx", args), (ids, ids), world=2)
    print("zerofx-plan per rank (MiB):", {k: round(v / MIB) for k, v in vars(mem).items()
                                          if isinstance(v, int)})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=11)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--budget", type=float, default=0.0)
    p.add_argument("--checkpointing", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["zerofx", "fsdp2"])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--plan", action="store_true", help="print zerofx-plan's items too")
    p.add_argument("--memory-gib", type=float, default=6.0, help="kill past this (2 ranks)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--malloc", nargs="+", default=["131072"],
                   help="glibc's mmap threshold, each in turn: bytes (fixed: zerofx's "
                        "host_mmap_threshold, the peers' MALLOC_MMAP_THRESHOLD_) or dynamic "
                        "(glibc's default)")
    p.add_argument("--worker")
    p.add_argument("--result")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"machine: {bl.machine()}; load {os.getloadavg()}")
    if args.plan:
        formula(args)
    for malloc in args.malloc:
        args.malloc_now = malloc
        for m in args.methods:
            report(m, run(m, malloc, args), args)


if __name__ == "__main__":
    main()
