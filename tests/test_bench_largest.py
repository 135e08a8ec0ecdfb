"""benchmarks/bench_largest.py's pure parts: the search, the memory watchdog, the size ->
parameter-count formula (the trials themselves are the benchmark, not a test)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_largest.py"
_spec = importlib.util.spec_from_file_location("bench_largest", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("boundary", [2, 3, 7, 15, 16, 29, 40])
@pytest.mark.parametrize("start", [2, 9, 16, 40])
def test_find_largest_finds_the_boundary(boundary, start):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= boundary

    best, history = bench.find_largest(fits, start, lo=2, hi=40, max_trials=20)
    assert best == boundary
    assert [n for n, _ in history] == calls
    assert all(ok == (n <= boundary) for n, ok in history)
    assert len(set(calls)) == len(calls)  # never the same size twice
    assert all(2 <= n <= 40 for n in calls)
    # galloping from the start, then halving: logarithmic in the distance, never linear
    assert len(calls) <= 2 * (abs(boundary - start) + 1).bit_length() + 2


def test_find_largest_exact_start_costs_two_trials():
    best, history = bench.find_largest(lambda n: n <= 17, 17, lo=2, hi=40, max_trials=20)
    assert (best, history) == (17, [(17, True), (18, False)])


@pytest.mark.parametrize("boundary", [5, 12, 33])
def test_find_largest_out_of_trials_claims_only_a_fitting_size(boundary):
    for trials in range(1, 4):
        best, history = bench.find_largest(lambda n: n <= boundary, 20, lo=2, hi=40,
                                           max_trials=trials)
        assert len(history) <= trials
        assert best <= boundary  # never a size that failed
        assert best == max([2] + [n for n, ok in history if ok])


_ALLOC = ("import time; b = bytearray({n}); b[::4096] = b'x' * len(b[::4096]); "
          "time.sleep({sleep})")


def test_watchdog_kills_a_trial_past_its_budget():
    mib = 1 << 20
    cmd = [sys.executable, "-c", _ALLOC.format(n=400 * mib, sleep=30)]
    res = bench.run_watched([cmd, cmd], [None, None], budget_bytes=300 * mib, timeout_s=20)
    assert not res["ok"]
    assert res["reason"].startswith("memory")
    assert res["peak"] > 300 * mib
    assert all(c == -9 for c in res["codes"])  # killed, not left to finish its sleep


def test_watchdog_passes_a_trial_within_budget_and_sums_the_ranks():
    mib = 1 << 20
    cmd = [sys.executable, "-c", _ALLOC.format(n=100 * mib, sleep=0.5)]
    res = bench.run_watched([cmd, cmd], [None, None], budget_bytes=600 * mib, timeout_s=20)
    assert res["ok"], res["reason"]
    assert res["codes"] == [0, 0]
    assert res["peak"] > 200 * mib  # both ranks' 100 MiB, counted together


def test_watchdog_reports_a_failing_rank_and_stops_its_peer():
    fail = [sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"]
    wait = [sys.executable, "-c", "import time; time.sleep(30)"]
    res = bench.run_watched([fail, wait], [None, None], budget_bytes=1 << 40, timeout_s=20)
    assert not res["ok"]
    assert "rank 0 exit 3" in res["reason"] and "boom" in res["reason"]
    assert res["codes"][1] == -9


@pytest.mark.parametrize("size,seq", [(1, 16), (2, 64), (3, 32)])
def test_param_count_matches_the_built_model(size, seq):
    model = bench.build_gpt(size, seq, vocab=1000)
    assert bench.param_count(size, seq, vocab=1000) == sum(p.numel() for p in model.parameters())
    layers, d, heads = bench.dims(size)
    assert len(model.blocks) == layers and model.tok.embedding_dim == d
    assert d // heads == 64


def test_param_count_default_vocab_on_meta():
    with torch.device("meta"):
        model = bench.build_gpt(12, 1024)
    assert bench.param_count(12, 1024) == sum(p.numel() for p in model.parameters())


def test_watchdog_counts_a_forked_child_only_for_its_own_pages():
    # DeepSpeed's op builder forks a CPUID probe: its copy-on-write pages are the rank's,
    # not more memory; a child that allocates is counted (the first test)
    mib = 1 << 20
    fork = ("import os, time; b = bytearray({n}); b[::4096] = b'x' * len(b[::4096]); "
            "pid = os.fork(); time.sleep(1.0); pid and os.waitpid(pid, 0)").format(n=200 * mib)
    res = bench.run_watched([[sys.executable, "-c", fork]], [None], budget_bytes=330 * mib,
                            timeout_s=20)
    assert res["ok"], res["reason"]
    assert 200 * mib < res["peak"] < 330 * mib
