"""zerofx-plan on a Llama-3-70B shape at world 1024 (issue 30 item 2): wall time, peak RSS
and rank 0's rows, through the same path ``zerofx-plan --model benchmarks.bench_plan_70b:build``
takes (tools/plan.main: the model built under a fake-tensor mode, no weights).

    python benchmarks/bench_plan_70b.py --tp 8      # ZeRO-3, tensor-parallel 8 x dp 128
    python benchmarks/bench_plan_70b.py --tp 1      # plain ZeRO-3 over 1024 ranks

One run at a time: each takes about a minute and ~3 GiB (benchmarks/RESULTS.md). Peak RSS is the process's
ru_maxrss (the whole process: interpreter, torch, transformers, the traced graphs).
The model-state rows are also printed next to ZeRO's formulas (2Ψ/N parameters and
gradients, 12Ψ/N optimizer states, Ψ the parameters one tensor-parallel rank holds).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
from contextlib import redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = float(1 << 30)
MIB = float(1 << 20)
_SEEN = {}  # what the planner built and returned, for the formula rows


def build():
    """The Llama-3-70B shape (meta-llama/Meta-Llama-3-70B's config.json), no weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _recording(plan_rank):
    """plan_rank, keeping its model, RankMemory and Plan (``--model`` loads this file as
    another module than __main__: its build cannot record into this one's globals)."""
    def wrapped(build_model, *args, **kwargs):
        def recorded():
            _SEEN["model"] = build_model()
            return _SEEN["model"]
        _SEEN["mem"], _SEEN["plan"] = plan_rank(recorded, *args, **kwargs)
        return _SEEN["mem"], _SEEN["plan"]
    return wrapped


def formula_rows() -> str:
    """Rank 0's model-state rows next to ZeRO's formulas (Psi: the elements this
    tensor-parallel rank's plan holds, N: data-parallel ranks) and, without tensor
    parallelism, DeepSpeed's estimate_zero3_model_states_mem_needs (offload none, zero_init;
    tests/test_planner_deepspeed_estimate.py: what each term is). model_to_params counts by
    data_ptr, which fake tensors lack: parameters are counted once by identity here."""
    mem, plan, model = _SEEN["mem"], _SEEN["plan"], _SEEN["model"]
    psi, n = plan.numel, plan.grid.dp_size
    kept = plan.padded_numel - plan.persist_offset  # persistent parameters, kept whole
    lines = [f"Psi {psi} elements on this TP rank ({kept} of them persistent, kept whole), "
             f"N {n}: row = formula (MiB)",
             f"  parameters {mem.parameters / MIB:.1f} = 2(Psi-kept)/N + 2 kept "
             f"{(2 * (psi - kept) / n + 2 * kept) / MIB:.1f}",
             f"  gradients  {mem.gradients / MIB:.1f} = 2Psi/N {2 * psi / n / MIB:.1f}",
             f"  optimizer  {mem.optimizer / MIB:.1f} = 12Psi/N {12 * psi / n / MIB:.1f}"]
    if plan.grid.tp_size == 1:
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        largest = max(sum(p.numel() for p in m.parameters(recurse=False))
                      for m in model.modules())
        ds = 4 * largest + int(18 * total / n)
        ours = mem.model_states + mem.gathered
        lines.append(f"  DeepSpeed estimate (offload none): 4 x largest layer {largest} + "
                     f"18Psi/N = {ds / MIB:.1f} MiB; zerofx model states + gathered "
                     f"{ours / MIB:.1f} MiB (16Psi/N: no fp32 gradient copy; gathered: "
                     f"parameters only, max(largest bucket, stage3_max_live_parameters))")
    return "\n".join(lines)


def ds_config(tp: int) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": 3}}
    if tp > 1:
        cfg["tensor_parallel"] = {"size": tp}
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--world", type=int, default=1024)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--device", default="h100")
    args = p.parse_args(argv)
    from tools import plan as plan_cli
    import zerofx.planner
    zerofx.planner.plan_rank = _recording(zerofx.planner.plan_rank)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ds_config(args.tp), f)
    cli = ["--config", f.name, "--model", "benchmarks.bench_plan_70b:build",
           "--world", str(args.world), "--micro_batch", "1", "--seq", str(args.seq),
           "--device", args.device, "--memory", "80"]
    out = io.StringIO()
    t0 = time.perf_counter()
    try:
        with redirect_stdout(out):
            rc = plan_cli.main(cli)
    finally:
        os.unlink(f.name)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(f"zerofx-plan {' '.join(cli[2:])} (config: ZeRO-3, bf16, tp {args.tp})")
    print(out.getvalue())
    if rc == 0:
        print(formula_rows())
    print(f"wall {wall:.1f} s, peak RSS {rss / GIB:.2f} GiB (rc {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
