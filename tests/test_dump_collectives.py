"""collectives.txt (zerofx/passes/dump_collectives.py) and its cost model (zerofx/comm_cost.py):
every collective of a graph listed with what it moves and a prediction from the alpha-beta
formula; on real ranks, the forms the runtime timed reach plan.txt and the table."""
from pathlib import Path

import pytest
import torch
from torch import fx

from models import make, mlp_batch
from multiproc import run_ranks
from zerofx.comm_cost import DEFAULT, LATENCY_MS, MIB, fitted
from zerofx.passes.dump_collectives import collective_rows, render_collectives
from zerofx.tools import dump as dump_cli

_c10d = torch.ops._c10d_functional


def _graph_with_all_reduce(numel: int, group: str) -> fx.GraphModule:
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(numel, dtype=torch.bfloat16)
    ar = g.call_function(_c10d.all_reduce.default, (x, "sum", group))
    ar.meta["val"] = torch.empty(numel, dtype=torch.bfloat16)
    w = g.call_function(_c10d.wait_tensor.default, (ar,))
    w.meta["val"] = ar.meta["val"]
    g.output(w)
    return fx.GraphModule(torch.nn.Module(), g)


def test_each_collective_is_listed_with_the_alpha_beta_prediction():
    numel = 3 << 20  # 6 MiB of bf16
    gm = _graph_with_all_reduce(numel, "7")
    (row,) = collective_rows(gm, tp_group="7", dp_size=1, kinds={}, cost=None)
    assert row["collective"] == "all_reduce" and row["group"] == "tp"
    assert row["elements"] == numel and row["dtype"] == "bfloat16" and row["MiB"] == 6.0
    rate = dict(DEFAULT.ms_per_mib)["all_reduce"]
    assert row["pred ms"] == round(LATENCY_MS + rate * 6.0, 2)
    (row,) = collective_rows(gm, tp_group="8", dp_size=2, kinds={}, cost=None)
    assert row["group"] == "dp"  # another group's name: not the tensor-parallel one
    text = render_collectives([row])
    assert "1 collectives" in text and f"{row['pred ms']:.2f} ms predicted" in text


def test_the_norm_all_reduce_over_every_rank_is_labelled_world(monkeypatch):
    """With tensor parallelism the step's norm all-reduce spans the world group, not a
    data-parallel one: the dump says so."""
    from zerofx.passes import dump_collectives

    monkeypatch.setattr(dump_collectives, "_world_name", lambda: "0")
    gm = _graph_with_all_reduce(1, "0")
    (row,) = collective_rows(gm, tp_group="7", dp_size=2, kinds={}, cost=None)
    assert row["group"] == "world"


def test_rates_are_fitted_only_from_timings_the_fixed_cost_does_not_hide():
    big, small = 8 * int(MIB), int(MIB) // 4
    cost = fitted([("p2p_reduce", big, LATENCY_MS + 8.0),  # 1 ms per MiB
                   ("p2p_gather", small, 5.0)])  # too small to read a rate from
    assert dict(cost.ms_per_mib) == {"p2p_reduce": 1.0}
    assert cost.predict_ms("p2p_reduce", 2 * int(MIB)) == pytest.approx(LATENCY_MS + 2.0)
    assert cost.predict_ms("p2p_gather", int(MIB)) == pytest.approx(
        LATENCY_MS + dict(DEFAULT.ms_per_mib)["p2p_gather"])
    assert fitted([]) is DEFAULT


def _dump_body(rank, world, root):
    import zerofx

    model, _ = make("mlp")
    cfg = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 2, "reduce_bucket_size": 300},
           "zerofx": {"dump_dir": root}}
    rt = zerofx.ZeroRuntime(model, cfg)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    compiled(*mlp_batch(seed=rank)).backward()
    rt.step()
    return {role: c.form for role, c in rt.comm.forms.items()}, len(rt.plan.buckets)


@pytest.mark.slow
def test_stage_2_dump_shows_the_timed_forms_and_every_bucket_collective(tmp_path):
    forms, buckets = run_ranks(_dump_body, 2, args=(str(tmp_path),))[0]
    (graph,) = (d for d in (tmp_path / "rank0").iterdir() if d.is_dir())
    plan = (graph / "plan.txt").read_text()
    for role, form in forms.items():  # the choice, with every candidate's measured time
        line = next(ln for ln in plan.splitlines() if ln.strip().startswith(f"{role}: "))
        assert f"{role}: {form} (" in line and line.count(" ms") >= 2, line
    backward = (graph / "backward" / "collectives.txt").read_text()
    from zerofx.runtime.comm.forms import kind_of

    kind = kind_of("reduce", forms["reduce"])
    assert backward.count(kind) == len(_rows(backward)) >= 1, backward
    step = (graph / "optimizer" / "collectives.txt").read_text()
    assert kind_of("gather", forms["gather"]) in step, step
    assert "all_reduce" in step  # the gradient norm's


def _measured_body(rank, world, root):
    """Stage 2 (forms pinned to point-to-point) and stage 3, 3 steps each, dumps on."""
    import zerofx

    out = []
    for stage in (2, 3):
        torch._dynamo.reset()
        model, _ = make("mlp")
        cfg = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
               "zero_optimization": {"stage": stage, "reduce_bucket_size": 300,
                                     "stage3_param_persistence_threshold": 0},
               "zerofx": {"dump_dir": f"{root}/stage{stage}",  # stage 3 through /dev/shm
                          "reduce_form": "p2p" if stage == 2 else "shm",
                          "gather_form": "p2p" if stage == 2 else "shm"}}
        rt = zerofx.ZeroRuntime(model, cfg)
        compiled = torch.compile(model, backend="zero", options={"runtime": rt})
        for step in range(3):
            with rt.shape_carriers():  # stage 3: the partitioned weights' stand-ins
                loss = compiled(*mlp_batch(seed=10 * step + rank))
            loss.backward()
            rt.step()
        out.append([b.padded for b in rt.plan.buckets])
    return out


@pytest.mark.slow
def test_collective_times_measured_while_training_are_dumped_per_rank(tmp_path, capsys):
    """rank<r>/comm_measured.txt: every collective the runtime started, with its form, the
    prediction and the measured medians over the 3 steps (blocked never above in flight)."""
    results = run_ranks(_measured_body, 2, args=(str(tmp_path),))
    for rank, (stage2, stage3) in enumerate(results):
        text = (tmp_path / "stage2" / f"rank{rank}" / "comm_measured.txt").read_text()
        assert "over 3 optimizer steps" in text, text
        rows = [r.split() for r in _measured_rows(text)]
        reduces = [r for r in rows if r[0] == "reduce"]
        assert [int(r[3]) for r in reduces] == stage2, text  # each bucket, whole, once
        assert all(r[2] == "p2p_reduce" for r in reduces)
        gathers = [r for r in rows if r[0] == "gather"]
        assert gathers and all(r[2] == "p2p_gather" for r in gathers), text
        assert sum(int(r[3]) for r in gathers) == sum(stage2)  # the chunks cover the buffer
        for r in rows:
            pred, flight, blocked, samples = float(r[5]), float(r[6]), float(r[7]), int(r[8])
            assert samples == 3 and pred > 0 and 0 <= blocked <= flight, r
        text3 = (tmp_path / "stage3" / f"rank{rank}" / "comm_measured.txt").read_text()
        # "stage3 gather" is two words: the bucket index is the third column
        gathered = {int(r.split()[2]) for r in _measured_rows(text3)
                    if r.startswith("stage3 gather") and r.split()[3] == "shm_gather"}
        assert gathered == set(range(len(stage3))), text3  # every bucket gathered
        assert sum(r.split()[0] == "reduce" and r.split()[2] == "shm_reduce"
                   for r in _measured_rows(text3)) == len(stage3), text3
    assert dump_cli.main([str(tmp_path / "stage2")]) == 0  # zerofx-dump prints them last
    out = capsys.readouterr().out
    assert out.count("collectives measured while training") == 2, out[-2000:]


def _measured_rows(text: str) -> list[str]:
    return text.split("\n\n")[1].splitlines()[2:]  # after the title, header and rule


def _rows(text: str) -> list[str]:
    lines = text.split("\n\n")[0].splitlines()
    return lines[2:]  # after the header and its rule


def test_plain_compile_dump_has_a_collectives_file(tmp_path, no_torchrun_env):
    model, _ = make("mlp")
    compiled = torch.compile(model, backend="zero",
                             options={"config": {"zerofx": {"dump_dir": str(tmp_path)}}})
    compiled(*mlp_batch()).backward()
    files = list(Path(tmp_path).glob("rank0/*/*/collectives.txt"))
    assert files and all(f.read_text() == "no collectives in this graph\n" for f in files)
