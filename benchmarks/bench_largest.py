"""The largest GPT-style model each training system trains for 5 steps on this box (issues 30,
31): torch DDP, FSDP2, DeepSpeed ZeRO-3, zerofx stage 3, zerofx stage 3 + NVMe offload.

    python benchmarks/bench_largest.py --memory-gib 8 --seq 1024 [--methods ddp fsdp2 ...]

Model: the main job's GPT (examples/train_gpt.py), width and depth scaled together on GPT-2
small's aspect: size s has s layers of width 64*s with s heads of 64 (s = 12 is GPT-2 small's
body), vocabulary 50304, context --seq, micro-batch 1 per rank, 2 ranks on gloo with one
thread each, bf16 compute, AdamW. A trial is two fresh rank processes training 5 steps;
it fits when both finish. The same memory budget for every method: a watchdog in this
process samples the resident set of both ranks' process trees every 50 ms and kills the
trial (it does not fit) when their sum passes --memory-gib; an exception (an OOM included)
or --trial-timeout also fails it, with the reason recorded.

Methods, each at its memory-lean setting:
    ddp      DistributedDataParallel(gradient_as_bucket_view), autocast bf16, AdamW fused
    fsdp2    fully_shard per block and the root, MixedPrecisionPolicy(bf16 params,
             fp32 reduce), reshard_after_forward, built on meta (no whole model), AdamW fused
    deepspeed  DeepSpeed 0.19.8 (run with /work/dsenv/bin/python) ZeRO-3 bf16, zero.Init
             (each rank builds only its shard), torch AdamW (its CPU build has no FusedAdam)
    zerofx   stage 3, bf16, zerofx.activation_memory_budget (--budget), gloo collectives
    zerofx_nvme  the same + offload_optimizer {device: nvme} under --nvme-path
    zerofx_nvme_param  + offload_param {device: nvme}, when this tree accepts the config
The ZeRO methods share one zero_optimization block (bucket sizes, live-parameter limit).
Every method runs with glibc's mmap threshold fixed at 128 KiB (--malloc fixed, the default:
zerofx by its host_mmap_threshold, the peers by MALLOC_MMAP_THRESHOLD_), so freed activations
leave the resident set; --malloc dynamic leaves glibc's own, rising threshold to all.

Before any trial the limit of each method is predicted and the search starts there: zerofx's
rows from zerofx.planner.plan_rank (the per-rank peak of the same config, world 2); the peers
from ZeRO's model-state formulas (DDP 16 bytes/parameter + the autocast cache's 2; FSDP2 and
ZeRO-3 16/2 per rank + a layer gathered) plus the planner's activations of the unsharded
graphs. Every prediction adds the process's fixed cost (libraries, compiler, allocator),
measured once per method by a trial at the smallest size (the search's floor). Bisection on
s: the prediction, then galloping away from it until the boundary is bracketed, then halving.
For the NVMe rows, the optimizer state bytes moved per step (steps 2-5) over the disk's read
and write bandwidth measured in the same run (bench_offload._bandwidth) is the physical
limit of their optimizer step.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # rss_watchdog beside this file, as a worker re-runs it
from rss_watchdog import run_watched  # noqa: E402
ROOT = HERE.parent
DS_PYTHON = "/work/dsenv/bin/python"
VOCAB = 50304
GIB = float(1 << 30)
MMAP_THRESHOLD = 128 << 10  # glibc's starting value, fixed (zerofx.host_mmap_threshold)
METHODS = ("ddp", "fsdp2", "deepspeed", "zerofx", "zerofx_nvme", "zerofx_nvme_param")
ZERO_BLOCK = {"reduce_bucket_size": 20_000_000, "stage3_prefetch_bucket_size": 10_000_000,
              "stage3_max_live_parameters": 30_000_000,
              "stage3_param_persistence_threshold": 100_000}


# --- the model -------------------------------------------------------------------------

def dims(size: int) -> tuple[int, int, int]:
    """(layers, width, heads) of size ``size``: GPT-2 small's aspect, heads of 64."""
    return size, 64 * size, size


def param_count(size: int, seq: int, vocab: int = VOCAB) -> int:
    """Parameters of examples/train_gpt.GPT at ``size``: per block two LayerNorms (4d),
    qkv (3d^2+3d), proj (d^2+d), fc1 (4d^2+4d), fc2 (4d^2+d); token and position
    embeddings, the final LayerNorm, an untied head without bias."""
    layers, d, _ = dims(size)
    return layers * (12 * d * d + 13 * d) + vocab * d + seq * d + 2 * d + vocab * d


def _train_gpt():
    sys.path.insert(0, str(ROOT))  # train_gpt imports zerofx (cheap: 2 MB, no transformers)
    spec = importlib.util.spec_from_file_location("train_gpt", ROOT / "examples" / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_gpt(size: int, seq: int, vocab: int = VOCAB):
    layers, d, heads = dims(size)
    return _train_gpt().GPT(vocab, block=seq, d=d, heads=heads, layers=layers)


# --- the search ------------------------------------------------------------------------

def find_largest(fits, start: int, lo: int, hi: int, max_trials: int):
    """The largest n in [lo, hi] with fits(n), fits monotone (true up to a boundary), lo known
    to fit. First fits(start); then galloping away from it (steps 1, 2, 4...) until a fitting
    and a failing size are both tested; then halving. Returns (largest fitting size found,
    [(n, fits), ...]); with trials left it is the boundary, exactly."""
    good, bad = lo, hi + 1  # bad: hi + 1 is assumed too large, never tested
    tried_good = tried_bad = False
    history, step = [], 1
    x = min(max(start, lo), hi)
    while bad - good > 1 and len(history) < max_trials:
        ok = bool(fits(x))
        history.append((x, ok))
        if ok:
            good, tried_good = max(good, x), True
        else:
            bad, tried_bad = min(bad, x), True
        if bad - good <= 1:
            break
        if tried_good and tried_bad:
            x = (good + bad) // 2
        elif ok:
            x, step = min(good + step, bad - 1), step * 2
        else:
            x, step = max(bad - step, good + 1), step * 2
    return good, history


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trial(method: str, size: int, args) -> dict:
    """Two ranks of ``method`` at ``size`` under the watchdog; the rank-0 record merged in."""
    python = DS_PYTHON if method == "deepspeed" else sys.executable
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [python, str(Path(__file__).resolve()), "--worker", method, "--size", str(size),
               "--seq", str(args.seq), "--budget", str(args.budget),
               "--checkpointing", str(args.checkpointing), "--chunk", str(args.chunk), "--steps",
               str(args.steps), "--nvme-path", args.nvme_path, "--malloc", args.malloc,
               "--result", out]
        envs = []
        for r in range(2):
            env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                       LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
            if method == "deepspeed":
                env["TORCH_EXTENSIONS_DIR"] = args.ext_dir
            if args.malloc == "fixed" and not method.startswith("zerofx"):
                # the peers get glibc's fixed mmap threshold too, through its own variable
                # (zerofx sets it from its host_mmap_threshold): a freed activation's pages
                # leave the resident set; it lowers their peaks more than zerofx's
                env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
            envs.append(env)
        t0 = time.monotonic()
        res = run_watched([cmd, cmd], envs, int(args.memory_gib * GIB), args.trial_timeout)
        res["wall"] = time.monotonic() - t0
        if os.path.exists(out):
            with open(out) as f:
                rec = json.load(f)
            if "error" in rec and not (res["reason"] or "").startswith(("memory", "timeout")):
                res.update(ok=False, reason=rec["error"])
            res.update({k: v for k, v in rec.items() if k != "error"})
        elif res["ok"]:
            res.update(ok=False, reason="no result written")
    return res


# --- the ranks (run as `bench_largest.py --worker METHOD`) -----------------------------

def zerofx_config(method: str, args) -> dict:
    zero = dict(ZERO_BLOCK, stage=3)
    if method.startswith("zerofx_nvme"):
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": args.nvme_path}
        zero["sub_group_size"] = args.chunk
    if method == "zerofx_nvme_param":
        zero["offload_param"] = {"device": "nvme", "nvme_path": args.nvme_path}
    # gloo's collectives, as the peers use: the shm forms map a bf16 mirror of the whole
    # model per rank (memory this benchmark is about)
    return {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
            "zero_optimization": zero,
            "zerofx": {"activation_memory_budget": args.budget,
                       "reduce_form": "reduce_scatter", "gather_form": "all_gather",
                       "host_mmap_threshold": None if getattr(args, "malloc", "fixed")
                       == "dynamic" else MMAP_THRESHOLD}}


def deepspeed_config(args) -> dict:
    # sub_group_size: the optimizer steps one flat group at a time, so its temporaries
    # are a group's, not the shard's; torch's fused AdamW (DeepSpeed's CPU build has no
    # FusedAdam; DeepSpeedCPUAdam serves offload only)
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True}, "steps_per_print": 10**9,
            "zero_optimization": dict(ZERO_BLOCK, stage=3, sub_group_size=args.chunk),
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01,
                                                      "torch_adam": True, "fused": True}}}


def _adamw(params):
    import torch

    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)


def setup_ddp(args):
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_gpt(args.size, args.seq)
    ddp = DDP(model, gradient_as_bucket_view=True)
    opt = _adamw(model.parameters())

    def step(idx, tgt):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ddp(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step, lambda: {}


def fsdp2_model(args):
    """The GPT sharded by FSDP2 (bf16 compute, fp32 reduce, resharded after forward)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.device("meta"):  # no whole model anywhere: each rank materialises its shard
        model = build_gpt(args.size, args.seq)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mp_policy=mp, reshard_after_forward=True)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def setup_fsdp2(args):
    model = fsdp2_model(args)
    opt = _adamw(model.parameters())

    def step(idx, tgt):
        loss = model(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step, lambda: {}


def setup_deepspeed(args):
    import deepspeed

    cfg = deepspeed_config(args)
    with deepspeed.zero.Init(config_dict_or_path=cfg):  # each rank builds its shard only
        model = build_gpt(args.size, args.seq)
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      model_parameters=model.parameters())

    def step(idx, tgt):
        loss = engine(idx, tgt)
        engine.backward(loss)
        engine.step()
        return loss
    return step, lambda: {}


def checkpoint_blocks(model):
    """Each block's activations recomputed in its backward (zerofx.checkpointing, as a
    Megatron-style model calls it): the forward saves only the blocks' inputs."""
    from zerofx import checkpointing

    for block in model.blocks:
        block.forward = lambda x, f=block.forward: checkpointing.checkpoint(f, x)
    return model


def setup_zerofx(args):
    import zerofx

    model = build_gpt(args.size, args.seq)
    if args.checkpointing:
        checkpoint_blocks(model)
    engine, *_ = zerofx.initialize(model=model, config=zerofx_config(args.worker, args))
    del model
    opt_times = []

    def step(idx, tgt):
        loss = engine(idx, tgt)
        engine.backward(loss)
        t0 = time.perf_counter()
        engine.step()
        opt_times.append(time.perf_counter() - t0)
        return loss

    def extra():
        off = engine.runtime.state.offload
        io = 0 if off is None else off.stream.bytes_read + off.stream.bytes_written
        return {"io_bytes": io, "opt": opt_times[-1]}
    return step, extra


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    rec = {}
    try:
        if args.worker == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        else:
            dist.init_process_group("gloo")
        setup = {"ddp": setup_ddp, "fsdp2": setup_fsdp2, "deepspeed": setup_deepspeed}.get(
            args.worker, setup_zerofx)
        torch.manual_seed(0)
        step, extra = setup(args)
        g = torch.Generator().manual_seed(1 + rank)
        times, losses, io, opt = [], [], [], []
        for _ in range(args.steps):
            idx = torch.randint(VOCAB, (1, args.seq), generator=g)
            t0 = time.perf_counter()
            losses.append(float(step(idx, torch.roll(idx, -1, 1))))
            times.append(time.perf_counter() - t0)
            more = extra()
            io.append(more.get("io_bytes", 0))
            opt.append(more.get("opt", 0.0))
        rec = {"numel": param_count(args.size, args.seq), "step": statistics.median(times[1:]),
               "times": times, "losses": losses, "opt": statistics.median(opt[1:]),
               "io_per_step": (io[-1] - io[0]) / max(1, len(io) - 1)}
    except Exception as e:  # noqa: BLE001 - the reason the trial failed, in the table
        rec = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    if rank == 0 or "error" in rec:
        tmp = f"{args.result}.{rank}"
        with open(tmp, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, args.result)
    if "error" in rec:
        os._exit(1)  # a peer may wait in a collective for ever: leave now
    dist.barrier()
    dist.destroy_process_group()


# --- the predictions -------------------------------------------------------------------

class Predictor:
    """Per-rank bytes of each method at a size, without the process's fixed cost (module
    doc). zerofx-plan's numbers are cached by (size, checkpointing)."""

    def __init__(self, args):
        self.args, self.cache = args, {}

    def plan(self, size: int, checkpointing: bool):
        if (size, checkpointing) not in self.cache:
            import torch

            from zerofx.planner import plan_rank

            def build():
                model = build_gpt(size, self.args.seq)
                return checkpoint_blocks(model) if checkpointing else model
            ids = torch.zeros(1, self.args.seq, dtype=torch.long)
            mem, _ = plan_rank(build, zerofx_config("zerofx", self.args), (ids, ids), world=2)
            self.cache[size, checkpointing] = mem
        return self.cache[size, checkpointing]

    def __call__(self, method: str, size: int) -> int:
        n = param_count(size, self.args.seq)
        layers, d, _ = dims(size)
        if method.startswith("zerofx"):
            mem = self.plan(size, bool(self.args.checkpointing))
            if method == "zerofx":
                # zerofx.initialize takes a whole fp32 model: it is alive while the flat
                # states are allocated from it
                return max(mem.peak, 4 * n + mem.model_states)
            # NVMe: the moments and the master live in the file; in memory, buffer_count (4)
            # chunks of master, exp_avg, exp_avg_sq. At the start the whole fp32 model is
            # alive beside the 16-bit parameters and gradients; the master goes from it to
            # the file chunk by chunk (TrainState.fill_shard), never whole (this counted a
            # whole 4-byte master shard, 2n per rank, before fill_shard streamed it: the
            # 2026-12-04 run found 1.28x and 1.45x the limits predicted with that term)
            # (with offload_param the 16-bit shard is in its own file: not resident; the
            # plan traced here has no offload, so its parameters row is taken out)
            params = 0 if method == "zerofx_nvme_param" else mem.parameters
            train = mem.peak - mem.optimizer + 4 * 12 * self.args.chunk
            return max(train, 4 * n + params + mem.gradients)
        mem = self.plan(size, False)
        acts = mem.activations + mem.working
        layer, root = 12 * d * d, 2 * VOCAB * d + self.args.seq * d
        if method == "ddp":  # fp32 weights, gradients, Adam's 2 moments; autocast's bf16 copy
            return 18 * n + acts
        if method == "fsdp2":  # ZeRO-3's 16/world, two blocks gathered (one prefetched) in
            # bf16, the root's (embeddings, head) bf16 weights and fp32 gradients unsharded
            return 8 * n + 2 * 2 * layer + 2 * root + 4 * root + acts
        z = ZERO_BLOCK  # DeepSpeed ZeRO-3: 16/world, live gathered bf16, the reduce bucket
        return (8 * n + 2 * max(z["stage3_max_live_parameters"], root)
                + 4 * z["reduce_bucket_size"] + acts)


def predicted_limit(predict, method, overhead, args) -> int:
    """The largest size whose prediction fits; the search starts where model states alone
    (bytes per parameter, per rank) would stop it, so the planner traces few sizes."""
    budget = args.memory_gib * GIB
    per_param = {"ddp": 18, "zerofx_nvme": 6, "zerofx_nvme_param": 6}.get(method, 8)
    start, _ = find_largest(
        lambda s: 2 * per_param * param_count(s, args.seq) + overhead <= budget,
        start=args.floor, lo=args.floor, hi=args.max_size, max_trials=64)
    best, _ = find_largest(lambda s: 2 * predict(method, s) + overhead <= budget,
                           start=start, lo=args.floor, hi=args.max_size, max_trials=64)
    return best


# --- the run ---------------------------------------------------------------------------

def machine() -> str:
    flags = set()
    name = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    have = [x for x in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if x in flags]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return f"{name}, {os.cpu_count()} cores, {mem:.0f} GiB, flags: {' '.join(have)}"


def deepspeed_ready(args) -> str | None:
    """None if DeepSpeed imports and its CPU comm op is built (into a private extensions
    directory, before any trial: a compiler under the watchdog would count as the model's
    memory, and a build killed mid-way leaves a lock that hangs the next); else why not."""
    code = ("import deepspeed, torch; from deepspeed.comm.torch import build_shm_op; "
            "build_shm_op(); print(deepspeed.__version__, torch.__version__)")
    try:
        out = subprocess.run([DS_PYTHON, "-c", code], capture_output=True, text=True,
                             timeout=900, env=dict(os.environ, TORCH_EXTENSIONS_DIR=args.ext_dir))
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    if out.returncode:
        return "DeepSpeed: " + " | ".join(out.stderr.strip().splitlines()[-2:])
    print(f"DeepSpeed {out.stdout.strip().splitlines()[-1]} ready", flush=True)
    return None


def zerofx_accepts(method, args) -> str | None:
    """None if this tree takes the method's config; zerofx's C++ kernels built first
    (outside the watchdog, as DeepSpeed's: a compiler is not the model's memory)."""
    from zerofx.config import Config, ConfigError
    from zerofx.runtime.kernels import load_kernels

    load_kernels()
    try:
        Config.from_dict(zerofx_config(method, args))
    except ConfigError as e:
        return f"not in this tree: {e}"
    return None


def search(method, args, predict) -> dict:
    """The floor trial (calibration), the prediction, then the bisection."""
    floor = run_trial(method, args.floor, args)
    log(method, args.floor, floor, args)
    row = {"method": method, "trials": [(args.floor, floor)]}
    if not floor["ok"]:
        return dict(row, best=None, reason=floor["reason"])
    overhead = floor["peak"] - 2 * predict(method, args.floor)
    row["overhead"] = overhead
    row["predicted"] = predicted_limit(predict, method, overhead, args)
    print(f"{method}: fixed cost {overhead / GIB:.2f} GiB (2 ranks); predicted limit size "
          f"{row['predicted']} ({param_count(row['predicted'], args.seq) / 1e6:.0f}M)",
          flush=True)
    results = {args.floor: floor}

    def fits(size):
        results[size] = run_trial(method, size, args)
        log(method, size, results[size], args)
        return results[size]["ok"]
    best, history = find_largest(fits, row["predicted"], args.floor, args.max_size,
                                 args.max_trials)
    row["trials"] += [(s, results[s]) for s, _ in history]
    return dict(row, best=best, at=results[best])


def log(method, size, res, args) -> None:
    what = (f"ok, step {res['step']:.2f} s" if res["ok"] else f"FAILS ({res['reason']})")
    print(f"  {method} size {size} ({param_count(size, args.seq) / 1e6:.0f}M): {what}; "
          f"peak RSS {res['peak'] / GIB:.2f} GiB, {res['wall']:.0f} s", flush=True)


def disk_limit(row, args) -> dict:
    """The NVMe row's physical limit: both ranks' state bytes moved per step (steps 2-5)
    over the disk's buffered read and write bandwidth, measured now the way the offload
    moves bytes (bench_offload._bandwidth: 1 MiB calls over a file of one rank's bytes)."""
    sys.path.insert(0, str(HERE))
    from bench_offload import _bandwidth

    moved = 2 * row["at"]["io_per_step"]  # each rank moves its own shard's state
    wb, rb = _bandwidth(args.nvme_path, int(moved / 4), 1 << 20, direct=False)
    limit = moved / 2 / rb + moved / 2 / wb
    return {"moved": moved, "read_bw": rb, "write_bw": wb, "limit": limit,
            "ratio": row["at"]["opt"] / limit}


def table(rows, args) -> str:
    lines = ["| method | largest size (layers x width) | parameters | step (s) | "
             "optimizer step (s) | peak RSS, 2 ranks (GiB) | predicted limit | found / "
             "predicted | trials (size: fits) | NVMe: GiB moved per step, disk limit (s), "
             "optimizer step / limit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        trials = ", ".join(f"{s}: {'yes' if t['ok'] else 'no (' + _short(t['reason']) + ')'}"
                           for s, t in r.get("trials", []))
        if r.get("best") is None:
            lines.append(f"| {r['method']} | - | - | - | - | - | - | - | {trials or r['reason']} | - |")
            continue
        b, at = r["best"], r["at"]
        layers, d, _ = dims(b)
        p = r["predicted"]
        disk = r.get("disk")
        io = (f"{disk['moved'] / GIB:.2f}, {disk['limit']:.2f}, {disk['ratio']:.2f}"
              if disk else "-")
        lines.append(
            f"| {r['method']} | {b} ({layers} x {d}) | {param_count(b, args.seq) / 1e6:.0f}M "
            f"| {at['step']:.2f} | {at['opt']:.2f} | {at['peak'] / GIB:.2f} "
            f"| {p} ({param_count(p, args.seq) / 1e6:.0f}M) "
            f"| {param_count(b, args.seq) / param_count(p, args.seq):.2f} | {trials} | {io} |")
    return "\n".join(lines)


def _short(reason) -> str:
    return (reason or "?").split(":")[0] if (reason or "").startswith(("memory", "timeout")) \
        else (reason or "?")[:60].replace("|", "/")


def main(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # the planner's tracing repeats torch's deprecations
    t0 = time.monotonic()
    print(f"command: python benchmarks/bench_largest.py {' '.join(sys.argv[1:])}")
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
          f"before: {os.getloadavg()}", flush=True)
    predict, rows = Predictor(args), []
    for method in args.methods:
        why = (deepspeed_ready(args) if method == "deepspeed" else
               zerofx_accepts(method, args) if method.startswith("zerofx") else None)
        if why:
            print(f"{method}: skipped: {why}", flush=True)
            rows.append({"method": method, "best": None, "reason": why})
            continue
        row = search(method, args, predict)
        if row.get("best") is not None and method.startswith("zerofx_nvme"):
            row["disk"] = disk_limit(row, args)
        rows.append(row)
    print(f"load average after: {os.getloadavg()}; {(time.monotonic() - t0) / 60:.1f} min")
    print(table(rows, args))
    best = {r["method"]: param_count(r["best"], args.seq) for r in rows if r.get("best")}
    peers = [best[m] for m in ("ddp", "fsdp2", "deepspeed") if m in best]
    for m in (m for m in best if m.startswith("zerofx") and peers):
        print(f"{m}: {best[m] / max(peers):.2f}x the best peer's largest model")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory-gib", type=float, default=8.0,
                   help="budget for the sum of both ranks' RSS (every method the same)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.0,
                   help="zerofx.activation_memory_budget of the zerofx rows")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--floor", type=int, default=2, help="the smallest size (calibration)")
    p.add_argument("--max-trials", type=int, default=5, help="per method, the floor aside")
    p.add_argument("--trial-timeout", type=float, default=300.0)
    p.add_argument("--checkpointing", type=int, default=1,
                   help="1: the zerofx rows checkpoint each block (zerofx.checkpointing)")
    p.add_argument("--chunk", type=int, default=1 << 22,
                   help="sub_group_size (elements): NVMe chunks, DeepSpeed's groups")
    p.add_argument("--max-size", type=int, default=40, help="the search's ceiling")
    p.add_argument("--nvme-path", default=tempfile.gettempdir())
    p.add_argument("--ext-dir", default=os.path.join(tempfile.gettempdir(),
                                                     "bench_largest_ext"),
                   help="TORCH_EXTENSIONS_DIR of the DeepSpeed ranks (built once, first)")
    p.add_argument("--malloc", choices=("fixed", "dynamic"), default="fixed",
                   help="glibc's mmap threshold for every method: fixed at zerofx's default "
                        "(the peers through MALLOC_MMAP_THRESHOLD_) or glibc's dynamic one")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    _args = parse_args()
    if _args.worker:
        worker(_args)
    else:
        main(_args)
